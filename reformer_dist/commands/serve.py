"""Serve a model over HTTP: OpenAI-compatible completions, scoring, health and Prometheus metrics.

PATH is a checkpoint directory (torch), an exported .onnx graph (onnxruntime: cached decoding through its
.prefill/.decode graphs when exported with --generation) or a TensorRT .plan (tensorrt); --backend is
inferred from the path when omitted. Every backend decodes with the same runtime (continuous batching,
one sampler), so the same prompt gives the same greedy text on each, and the model id is the run or
model directory's name whatever the backend. The server binds 127.0.0.1 unless --host says otherwise,
and drains in-flight requests on SIGTERM before exiting.

Examples:
  reformer-dist serve --model runs/tiny                            # a run directory (its native/ model)
  reformer-dist serve --model runs/tiny/model.onnx --port 8080     # ONNX Runtime
  curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
       -d '{"prompt": "def ", "max_tokens": 32, "temperature": 0}'
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from reformer_dist.serve.config import ServeConfig

# ServeConfig field -> (flag, type, help). Defaults: ServeConfig's, or the serve: section of --config.
SERVE_FLAGS = (
    ("host", "--host", str, "address to bind"),
    ("port", "--port", int, "TCP port, 0 = any free one"),
    ("max_batch_size", "--max-batch-size", int, "sequences decoded together"),
    ("max_tokens_cap", "--max-tokens-cap", int, "largest max_tokens a request may ask for"),
    ("max_concurrency", "--max-concurrency", int, "sequences queued + running before requests get 429"),
    ("max_body_bytes", "--max-body-bytes", int, "largest request body"),
    ("batch_window_ms", "--batch-window-ms", float, "how long an idle server waits to batch arrivals"),
    ("request_timeout_s", "--request-timeout", float, "per-sequence time limit in seconds"),
    ("drain_timeout_s", "--drain-timeout", float, "on SIGTERM, seconds in-flight requests may still run"),
    ("chat_template", "--chat-template", str, "Jinja2 chat template file enabling /v1/chat/completions"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServeConfig()
    from reformer_dist.decoding.loading import BACKENDS

    parser.add_argument("--model", required=True, metavar="PATH",
                        help="checkpoint directory (torch), model.onnx (onnxruntime) or model.plan (tensorrt)")
    parser.add_argument("--backend", default=None, choices=BACKENDS,
                        help="inference runtime (default: from the path: .onnx, .plan/.engine, a directory)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a run config YAML whose serve: section sets the defaults of the flags below")
    parser.add_argument("--model-name", default=None,
                        help="name in /v1/models and the 'model' field (default: the run or model directory's "
                             "name, recorded in exports)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda if available, else cpu); onnxruntime uses CUDA when "
                             "its CUDA provider is installed")
    parser.add_argument("--tokenizer", default=None, metavar="SPEC",
                        help="bytes, a tokenizer.json or a sentencepiece .model (default: the one recorded with "
                             "the model)")
    parser.add_argument("--eos-token-id", type=int, default=None,
                        help="end a sequence (finish_reason 'stop') when it generates this token id")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the model (default: the runtime's choice)")
    for field, flag, kind, text in SERVE_FLAGS:
        parser.add_argument(flag, dest=field, type=kind, default=None, metavar=flag[2:].upper().replace("-", "_"),
                            help=f"{text} (default {getattr(d, field)})")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="server and access log verbosity (default info)")


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """ServeConfig defaults < the serve: section of --config < flags given on the command line."""
    from reformer_dist.config_files import load_section

    cfg = load_section("serve", ServeConfig, [args.config] if args.config else [])
    values = {field: getattr(args, field) for field, *_ in SERVE_FLAGS if getattr(args, field) is not None}
    return replace(cfg, **values).validate()


def run(args: argparse.Namespace) -> int:
    import logging

    from reformer_dist.decoding.loading import open_model, quiet_openmp
    from reformer_dist.serve.app import create_app
    from reformer_dist.serve.server import run_server

    quiet_openmp()  # before torch is imported
    cfg = serve_config(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    loaded = open_model(args.model, args.backend, device=args.device, threads=args.threads,
                        tokenizer=args.tokenizer)
    app = create_app(loaded.backend, loaded.tokenizer, cfg, args.model_name or loaded.name,
                     eos_token_id=args.eos_token_id)
    return run_server(app, cfg, log_level=args.log_level)

"""Serve a model over HTTP: OpenAI-compatible completions, scoring, health and Prometheus metrics.

PATH is a native checkpoint directory (--backend torch), an exported .onnx graph (--backend onnxruntime)
or a TensorRT .plan (--backend tensorrt). The server binds 127.0.0.1 unless --host says otherwise, and
drains in-flight requests on SIGTERM before exiting.

Examples:
  reformer-dist serve --model runs/tiny/checkpoints/final --backend torch
  reformer-dist serve --model runs/export/model.onnx --backend onnxruntime --port 8080
  curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
       -d '{"prompt": "def ", "max_tokens": 32, "temperature": 0}'
"""

from __future__ import annotations

import argparse

from reformer_dist.serve.config import ServeConfig

BACKENDS = ("onnxruntime", "tensorrt", "torch")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServeConfig()
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="native checkpoint directory (torch), model.onnx (onnxruntime) or model.plan (tensorrt)")
    parser.add_argument("--backend", required=True, choices=BACKENDS, help="inference runtime")
    parser.add_argument("--model-name", default=None,
                        help="name in /v1/models and the 'model' field (default: the file or directory name)")
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
    parser.add_argument("--host", default=d.host, help=f"address to bind (default {d.host})")
    parser.add_argument("--port", type=int, default=d.port, help=f"TCP port, 0 = any free one (default {d.port})")
    parser.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                        help=f"sequences decoded together (default {d.max_batch_size})")
    parser.add_argument("--max-tokens-cap", type=int, default=d.max_tokens_cap,
                        help=f"largest max_tokens a request may ask for (default {d.max_tokens_cap})")
    parser.add_argument("--max-concurrency", type=int, default=d.max_concurrency,
                        help=f"sequences queued + running before requests get 429 (default {d.max_concurrency})")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                        help=f"largest request body (default {d.max_body_bytes})")
    parser.add_argument("--batch-window-ms", type=float, default=d.batch_window_ms,
                        help=f"how long an idle server waits to batch arrivals (default {d.batch_window_ms})")
    parser.add_argument("--request-timeout", type=float, default=d.request_timeout_s, metavar="SECONDS",
                        help=f"per-sequence time limit (default {d.request_timeout_s:g})")
    parser.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s, metavar="SECONDS",
                        help=f"on SIGTERM, how long in-flight requests may still run (default {d.drain_timeout_s:g})")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run(args: argparse.Namespace) -> int:
    import logging

    from reformer_dist.serve.app import create_app
    from reformer_dist.serve.backends import load_model
    from reformer_dist.serve.server import run_server

    cfg = ServeConfig(host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                      max_tokens_cap=args.max_tokens_cap, max_concurrency=args.max_concurrency,
                      max_body_bytes=args.max_body_bytes, batch_window_ms=args.batch_window_ms,
                      request_timeout_s=args.request_timeout, drain_timeout_s=args.drain_timeout).validate()
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    loaded = load_model(args.backend, args.model, device=args.device, threads=args.threads,
                        tokenizer=args.tokenizer)
    app = create_app(loaded.backend, loaded.tokenizer, cfg, args.model_name or loaded.name,
                     eos_token_id=args.eos_token_id)
    return run_server(app, cfg, log_level=args.log_level)

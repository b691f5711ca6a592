"""Generate a continuation of a prompt, streamed to stdout as it is produced.

Examples:
  reformer-dist generate --checkpoint runs/tiny --prompt "The " --max-new-tokens 200
  reformer-dist generate --checkpoint hf-reformer-enwik8/ --prompt "In 1905, " --temperature 0.8 --top-k 40 --seed 1
  reformer-dist generate --model runs/tiny/model.onnx --prompt "def " --temperature 0

The checkpoint is a training run directory, a native model directory, or a Hugging Face Reformer
directory (PyTorch); --model is an exported model: an ONNX graph (ONNX Runtime, cached through its
.prefill/.decode graphs when exported with --generation) or a TensorRT .plan. Decoding runs the same
runtime as `reformer-dist serve` (``reformer_dist.decoding``: prefill once, then one cached step per
token, one sampler), so greedy text equals the server's on every backend. Only the generated text is
written to stdout (followed by a newline); the token count and speed go to stderr. Byte-level models
(HF enwik8: byte + 2) decode raw bytes; other models use the tokenizer recorded with the checkpoint, or
--tokenizer. --temperature 0 is greedy.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="training run directory, native model directory or HF Reformer directory (PyTorch)")
    parser.add_argument("--model", default=None, metavar="FILE",
                        help="an exported model instead: FILE.onnx (ONNX Runtime) or FILE.plan (TensorRT)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="tokens to generate (100)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (1.0)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest tokens")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="sample among the likeliest tokens whose probability reaches P")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, metavar="F",
                        help="lower a token's logit by F per time it was generated (OpenAI, [-2, 2])")
    parser.add_argument("--presence-penalty", type=float, default=0.0, metavar="F",
                        help="lower a token's logit by F once it was generated (OpenAI, [-2, 2])")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end before this text (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling generator (default: random)")
    parser.add_argument("--eos-token-id", type=int, default=None, metavar="ID", help="stop at this token")
    parser.add_argument("--tokenizer", default=None, metavar="SPEC",
                        help="bytes, a tokenizer.json or a sentencepiece .model (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--max-cache-len", type=int, default=None, metavar="N",
                        help="keep at most N tokens in full-attention caches (a sliding window beyond; torch)")
    parser.add_argument("--providers", default=None, metavar="A,B",
                        help="ONNX Runtime execution providers (default: TensorRT > CUDA > CPU, as installed)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: the runtime's)")


def run(args: argparse.Namespace) -> int:
    from reformer_dist.decoding import SamplingParams, generate_stream
    from reformer_dist.decoding.loading import open_model, quiet_openmp
    from reformer_dist.errors import ConfigError
    from reformer_dist.serve.textstream import TextStream

    quiet_openmp()  # before torch is imported
    if (args.checkpoint is None) == (args.model is None):
        raise ConfigError("--checkpoint", "give exactly one of --checkpoint (PyTorch) or --model (an export)")
    loaded = open_model(args.checkpoint or args.model, "torch" if args.checkpoint else None, device=args.device,
                        threads=args.threads, tokenizer=args.tokenizer,
                        providers=args.providers.split(",") if args.providers else None,
                        max_cache_len=args.max_cache_len)
    prompt = loaded.tokenizer.encode(args.prompt)
    if not prompt:
        raise ConfigError("--prompt", "encodes to no tokens")
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or 0,
                            top_p=1.0 if args.top_p is None else args.top_p, stop=tuple(args.stop),
                            seed=args.seed, frequency_penalty=args.frequency_penalty,
                            presence_penalty=args.presence_penalty)
    text = TextStream(loaded.tokenizer, params.stop)
    start, count = time.perf_counter(), 0
    for tokens in generate_stream(loaded.backend, [prompt], params, args.eos_token_id):
        count += 1
        sys.stdout.write(text.push(int(tokens[0])))
        sys.stdout.flush()
        if text.stopped:
            break
    sys.stdout.write(text.finish() + "\n")
    elapsed = time.perf_counter() - start
    print(f"[{count} tokens in {elapsed:.2f} s, {count / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0

"""Generate a continuation of a prompt, streamed to stdout as it is produced.

Examples:
  reformer-dist generate --checkpoint runs/tiny --prompt "The " --max-new-tokens 200
  reformer-dist generate --checkpoint hf-reformer-enwik8/ --prompt "In 1905, " --temperature 0.8 --top-k 40 --seed 1
  reformer-dist generate --model runs/tiny/model.onnx --prompt "def " --temperature 0

The checkpoint is a training run directory, a native model directory, or a Hugging Face Reformer
directory (PyTorch); --model is an exported ONNX graph (ONNX Runtime, cached through its .prefill/.decode
graphs when they were exported with --generation). Only the generated text is written to stdout (followed by a newline); the token count and
speed go to stderr. Byte-level models (HF enwik8: byte + 2) decode raw bytes; other models use the
tokenizer recorded with the checkpoint, or --tokenizer. Decoding uses the model's cache (prefill once,
then one token per step); --temperature 0 is greedy.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

# A backend opens a model and returns (stream, tokenizer spec or None, vocab size), where stream(prompt_ids)
# yields generated token ids one at a time.
TokenStream = Callable[[list[int]], Iterator[int]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="training run directory, native model directory or HF Reformer directory")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="tokens to generate (100)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (1.0)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest tokens")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="sample among the likeliest tokens whose probability reaches P")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling generator (default: random)")
    parser.add_argument("--eos-token-id", type=int, default=None, metavar="ID", help="stop at this token")
    parser.add_argument("--tokenizer", default=None, metavar="SPEC",
                        help="bytes, a tokenizer.json or a sentencepiece .model (default: the checkpoint's)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.add_argument("--max-cache-len", type=int, default=None, metavar="N",
                        help="keep at most N tokens in full-attention caches (a sliding window beyond)")
    from reformer_dist.export.ort_generate import add_onnx_arguments

    add_onnx_arguments(parser)


def _open_torch(args: argparse.Namespace) -> tuple[TokenStream, dict[str, Any] | None, int]:
    """The PyTorch model behind --checkpoint, decoding with the cached generation of the model package."""
    import torch

    from reformer_dist.export.loading import load_model_for_export
    from reformer_dist.model import hf_interop
    from reformer_dist.model.generation import stream_generate

    source = load_model_for_export(args.checkpoint)
    model = source.model.to(args.device)
    tokenizer = source.tokenizer
    if tokenizer is None and source.kind == "hf":
        tokenizer = hf_interop.hf_tokenizer_spec(source.path, model.config.vocab_size)

    def stream(prompt: list[int]) -> Iterator[int]:
        ids = torch.tensor([prompt], dtype=torch.long, device=args.device)
        for token in stream_generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                     args.eos_token_id, args.seed, max_cache_len=args.max_cache_len):
            yield int(token[0])

    return stream, tokenizer, model.config.vocab_size


def _open_onnx(args: argparse.Namespace) -> tuple[TokenStream, dict[str, Any] | None, int]:
    """The exported graph behind --model, decoding with ONNX Runtime."""
    from reformer_dist.export.ort_generate import open_onnx

    return open_onnx(args)


BACKENDS = {"torch": _open_torch, "onnx": _open_onnx}


def run(args: argparse.Namespace) -> int:
    from reformer_dist.data.tokenizer import get_tokenizer
    from reformer_dist.errors import ConfigError
    from reformer_dist.serve.textstream import TextStream

    if (args.checkpoint is None) == (args.model is None):
        raise ConfigError("--checkpoint", "give exactly one of --checkpoint (PyTorch) or --model (ONNX)")
    stream, spec, vocab_size = BACKENDS["onnx" if args.model else "torch"](args)
    if args.tokenizer is not None:
        spec = args.tokenizer
    if spec is None:
        raise ConfigError("--tokenizer", f"{args.model or args.checkpoint} records no tokenizer and its vocabulary "
                                         f"({vocab_size}) is not bytes: pass --tokenizer")
    tokenizer = get_tokenizer(spec)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ConfigError("--prompt", "encodes to no tokens")
    if max(prompt) >= vocab_size:
        raise ConfigError("--tokenizer", f"produces id {max(prompt)}, outside the model's vocabulary ({vocab_size})")
    text = TextStream(tokenizer)
    start, count = time.perf_counter(), 0
    for token in stream(prompt):
        count += 1
        sys.stdout.write(text.push(token))
        sys.stdout.flush()
    sys.stdout.write(text.finish() + "\n")
    elapsed = time.perf_counter() - start
    print(f"[{count} tokens in {elapsed:.2f} s, {count / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0

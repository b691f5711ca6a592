"""Generate with ONNX Runtime: prefill the prompt once, then one decode-step graph run per token.

    for tokens in generate_onnx("model.onnx", [[5, 9, 2], [7]], max_new_tokens=64, temperature=0):
        ...                                   # tokens: (B,) int64, the next token of every row

Uses ``<stem>.prefill.onnx`` + ``<stem>.decode.onnx`` beside the model when they exist (written by
``reformer-dist export onnx --generation``): the same cached algorithm as PyTorch's
``reformer_dist.model.generation``, so greedy tokens equal PyTorch's cached ``generate`` (with the
rotations frozen at export). The cache stays in ONNX Runtime values between steps (IO binding: on a GPU
provider it never leaves the device; only the logits come back to the host). Without those graphs it
falls back to recomputing the whole sequence with the main logits graph every step (quadratic cost).

Prompts of different lengths are right-padded into one batch; every row continues at its own position.
Sampling (temperature > 0, top_k, top_p) follows ``generation.sample`` with a NumPy generator seeded by
``seed``: the same distribution as PyTorch's, not the same draws.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from reformer_dist.errors import ConfigError, ReformerDistError
from reformer_dist.export.ort_runner import OrtRunner, create_session, output_device

# advance(tokens (B,)) -> logits (B, vocab) of the next position
Advance = Callable[[np.ndarray], np.ndarray]


def sample(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None,
           rng: np.random.Generator) -> np.ndarray:
    """Next tokens (B,) from logits (B, V), as ``reformer_dist.model.generation.sample``."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = _softmax(sorted_logits)
        drop = np.cumsum(probs, axis=-1) - probs >= top_p  # mass before this token already reaches top_p
        np.put_along_axis(logits, order, np.where(drop, -np.inf, sorted_logits), axis=-1)
    probs = _softmax(logits)
    return np.array([rng.choice(p.shape[0], p=p) for p in probs], dtype=np.int64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class OrtGenerator:
    """Sessions over an exported model's generation graphs (or its logits graph, see module doc)."""

    def __init__(self, model_path: str | os.PathLike, providers: list[str] | None = None,
                 optimization: str = "all", threads: int = 0):
        # imported here, not at module level: they pull in torch/onnx, which `--help` must not wait for
        from reformer_dist.export.generation_export import generation_paths
        from reformer_dist.export.metadata import read_metadata

        paths = generation_paths(model_path)
        self.cached = all(p.is_file() for p in paths.values())
        if self.cached:
            self.prefill = create_session(paths["prefill"], providers, optimization, threads=threads)
            self.decode = create_session(paths["decode"], providers, optimization, threads=threads)
            self.metadata = read_metadata(self.prefill.get_modelmeta().custom_metadata_map)
            self.cache_names: list[str] = json.loads(self.metadata["cache_names"])
            self._device = output_device(self.decode)
        else:
            self.runner = OrtRunner(model_path, providers, optimization, threads=threads)
            self.metadata = self.runner.metadata
        self.max_seq_len = int(self.metadata["max_seq_len"])
        self.pad_multiple = int(self.metadata["pad_multiple"])
        self.vocab_size = int(self.metadata["vocab_size"])

    def stream(self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               eos_token_id: int | None = None) -> Iterator[np.ndarray]:
        """Yield the next token of every row (B,) per step; rows that produced ``eos_token_id`` keep
        yielding it. Stops after max_new_tokens steps or once every row has finished."""
        self._check(prompt_ids, max_new_tokens, temperature, top_p)
        rng = np.random.default_rng(seed)
        logits, advance = self.start(prompt_ids)
        done = np.zeros(len(prompt_ids), dtype=bool)
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, rng).astype(np.int64)
            if eos_token_id is not None:
                token = np.where(done, eos_token_id, token)
                done |= token == eos_token_id
            yield token
            if step + 1 == max_new_tokens or done.all():
                return
            logits = advance(token)

    def start(self, prompt_ids: list[list[int]]) -> tuple[np.ndarray, Advance]:
        """Run the prompts: the logits (B, vocab) after each row's last token, and ``advance(tokens)``
        that appends one token per row and returns the next logits."""
        lengths = np.array([len(p) for p in prompt_ids], dtype=np.int64)
        return (self._start_cached if self.cached else self._start_recompute)(prompt_ids, lengths)

    def _check(self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float,
               top_p: float | None) -> None:
        from reformer_dist.model.generation import check_sampling  # torch: loaded by __init__ already

        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ConfigError("prompt_ids", "need at least one prompt, each of at least one token")
        check_sampling(max(len(p) for p in prompt_ids), max_new_tokens, temperature, top_p, self.max_seq_len,
                       "the export's max_seq_len")
        if max(max(p) for p in prompt_ids) >= self.vocab_size or min(min(p) for p in prompt_ids) < 0:
            raise ConfigError("prompt_ids", f"ids must be in [0, {self.vocab_size})")

    def _start_cached(self, prompt_ids: list[list[int]], lengths: np.ndarray) -> tuple[np.ndarray, Advance]:
        m = self.pad_multiple
        # the prefill graph takes whole chunk multiples, at least two (see generation_export)
        width = max(2 * m, math.ceil(int(lengths.max()) / m) * m)
        ids, mask = _right_padded(prompt_ids, width)
        binding = self.prefill.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        self._bind_outputs(self.prefill, binding)
        self.prefill.run_with_iobinding(binding)
        logits, *cache = binding.get_outputs()
        position = lengths.copy()

        def advance(token: np.ndarray) -> np.ndarray:
            nonlocal cache
            step = self.decode.io_binding()
            step.bind_cpu_input("token", np.ascontiguousarray(token, dtype=np.int64))
            step.bind_cpu_input("position", position)
            for name, value in zip(self.cache_names, cache):
                step.bind_ortvalue_input(f"cache.{name}", value)
            self._bind_outputs(self.decode, step)
            self.decode.run_with_iobinding(step)
            out, *cache = step.get_outputs()
            position[:] += 1
            return out.numpy()

        return logits.numpy(), advance

    def _bind_outputs(self, session, binding) -> None:
        """Logits to the host, the cache where the provider computes (it feeds the next step)."""
        for output in session.get_outputs():
            binding.bind_output(output.name, "cpu" if output.name == "logits" else self._device)

    def _start_recompute(self, prompt_ids: list[list[int]], lengths: np.ndarray) -> tuple[np.ndarray, Advance]:
        rows = [list(p) for p in prompt_ids]

        def last_logits() -> np.ndarray:
            ids, mask = _right_padded(rows, max(len(r) for r in rows))
            logits = self.runner.logits(ids, mask)  # (B, L, vocab)
            return logits[np.arange(len(rows)), [len(r) - 1 for r in rows]]

        def advance(token: np.ndarray) -> np.ndarray:
            for row, t in zip(rows, token.tolist()):
                row.append(t)
            return last_logits()

        return last_logits(), advance


def _right_padded(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, width) int64 ids and mask (1 = real token) of right-padded rows."""
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def generate_onnx(model_path: str | os.PathLike, prompt_ids: list[list[int]], max_new_tokens: int,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, eos_token_id: int | None = None,
                  providers: list[str] | None = None, threads: int = 0) -> Iterator[np.ndarray]:
    """Stream the next token of every row (B,) int64 per step (see :meth:`OrtGenerator.stream`)."""
    yield from OrtGenerator(model_path, providers, threads=threads).stream(
        prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id)


# ---------------------------------------------------------------------- `reformer-dist generate --model`
def add_onnx_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``reformer-dist generate`` adds for an exported model."""
    parser.add_argument("--model", default=None, metavar="FILE.onnx",
                        help="generate with ONNX Runtime from an exported model (its .prefill/.decode graphs "
                             "when present, else by recomputation) instead of --checkpoint")
    parser.add_argument("--providers", default=None, metavar="A,B",
                        help="ONNX Runtime execution providers (default: TensorRT > CUDA > CPU, as installed)")


def open_onnx(args: argparse.Namespace) -> tuple[Callable[[list[int]], Iterator[int]], dict[str, Any] | None, int]:
    """A ``reformer-dist generate`` backend: (stream(prompt) -> token ids, tokenizer spec or None, vocab size)."""
    providers = args.providers.split(",") if args.providers else None
    generator = OrtGenerator(args.model, providers)

    def stream(prompt: list[int]) -> Iterator[int]:
        for tokens in generator.stream([prompt], args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                       args.seed, args.eos_token_id):
            yield int(tokens[0])

    return stream, _tokenizer_spec(generator.metadata), generator.vocab_size


def _tokenizer_spec(metadata: dict[str, str]) -> dict[str, Any] | None:
    """The recorded tokenizer spec; a file tokenizer's embedded file is written to a temporary directory
    that lives until the process exits (the tokenizer libraries load from a path)."""
    if "tokenizer" not in metadata:
        return None
    spec = json.loads(metadata["tokenizer"])
    if "path" not in spec:
        return spec
    if "tokenizer_file" not in metadata:
        raise ReformerDistError(f"the model records a {spec.get('kind')} tokenizer but does not embed its file")
    folder = tempfile.mkdtemp(prefix="reformer-tokenizer-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    file = Path(folder) / os.path.basename(spec["path"])
    file.write_bytes(base64.b64decode(metadata["tokenizer_file"]))
    return {**spec, "path": str(file)}

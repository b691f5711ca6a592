"""Model backends for the server: PyTorch (checkpoint), ONNX Runtime (.onnx), TensorRT (.plan).

A backend turns token ids into logits; the engine does everything else (batching, sampling, text). The
engine needs two things from it:

    step(seqs)              → (B, V) next-token logits, one row per sequence of the decode batch
    token_logprobs(seqs)    → per sequence, log p(token_t | tokens_<t) for t >= 1 (scoring)

Both have a generic implementation on top of :meth:`Backend.forward`, the full-sequence logits of a
right-padded batch: each decode step recomputes every sequence from its first token. That is correct for
any model and graph, and it is what the exported graphs do (:class:`GraphBackend`). The torch backend
overrides ``step`` with cached decoding, keeping each sequence's state in ``seq.cache`` (None before its
first step, i.e. its prefill); ``release`` drops it when the sequence leaves.

No backend imports DeepSpeed or the training code; torch is imported only by the torch backend and by
the export runners that need it.
"""

from __future__ import annotations

import base64
import json
import math
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from reformer_dist.data.tokenizer import Tokenizer, get_tokenizer
from reformer_dist.errors import ReformerDistError
from reformer_dist.serve.sampling import log_softmax

BACKENDS = ("torch", "onnxruntime", "tensorrt")


class DecodeState(Protocol):
    """What a backend sees of one sequence of the decode batch (see engine.Sequence)."""

    tokens: list[int]
    cache: Any


class Backend(ABC):
    name: str
    max_seq_len: int
    """Longest sequence (prompt + generated) the model accepts."""
    vocab_size: int
    max_batch_size: int | None = None
    """Largest batch the backend accepts (a TensorRT profile's maximum); None = any."""
    pad_token_id: int = 0
    """Id written into the padding of a right-padded batch (masked, so its value does not matter)."""
    length_multiple: int = 1
    """Padded batch lengths are rounded up to a multiple of this (graphs exported for chunked lengths)."""

    @abstractmethod
    def forward(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Logits (B, T, V) float32 of a right-padded batch ``input_ids`` (B, T) int64 whose row b holds
        ``lengths[b]`` real tokens; positions at or after a row's length are padding (ignored)."""

    def pack(self, sequences: Sequence[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad token lists into (B, T) int64 plus their lengths (B,)."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        t = int(lengths.max())
        t = min(self.max_seq_len, math.ceil(t / self.length_multiple) * self.length_multiple)
        ids = np.full((len(sequences), t), self.pad_token_id, dtype=np.int64)
        for row, seq in zip(ids, sequences):
            row[: len(seq)] = seq
        return ids, lengths

    def step(self, seqs: Sequence[DecodeState]) -> np.ndarray:
        """Next-token logits (B, V) of each sequence (no cache: the whole sequence is recomputed)."""
        ids, lengths = self.pack([s.tokens for s in seqs])
        logits = self.forward(ids, lengths)  # (B, T, V)
        return logits[np.arange(len(seqs)), lengths - 1]

    def token_logprobs(self, sequences: Sequence[list[int]]) -> list[np.ndarray]:
        """For each sequence of n tokens, log p(token_t | tokens_<t) for t = 1..n-1 (float64, (n-1,))."""
        ids, lengths = self.pack(sequences)
        logp = log_softmax(self.forward(ids, lengths))  # (B, T, V)
        out = []
        for b, n in enumerate(lengths):
            targets = ids[b, 1:n]
            out.append(logp[b, np.arange(n - 1), targets])
        return out

    def release(self, seq: DecodeState) -> None:
        """The sequence left the batch: free whatever ``step`` kept in ``seq.cache``."""
        seq.cache = None


class TorchBackend(Backend):
    """A checkpoint run by the PyTorch model, with cached decoding (``reformer_dist.model.generation``).

    A sequence's first step prefills its prompt and keeps its cache (a batch of one) in ``seq.cache``;
    later steps run one ``decode_step`` for the whole batch and hand each sequence its row (a view).
    The batched cache is reused while the batch is unchanged and restacked from the rows when a
    sequence joins or leaves, so membership can change between any two steps. Newcomers are prefilled in groups of equal
    prompt length: no padding, so each row is computed exactly as it would be alone (which matters for
    the reference 'chunk' LSH window, whose padded prefill differs slightly).

    LSH rotations are drawn once (seed 0, or the model's ``hash_seed``) and shared by every sequence,
    so all caches stack; greedy output equals ``generate`` whenever ``hash_seed`` is set.
    """

    name = "torch"

    def __init__(self, model: Any, device: str = "cpu"):
        import torch

        from reformer_dist.model.generation import decode_step, draw_rotations, prefill

        self._torch = torch
        self._prefill, self._decode_step = prefill, decode_step
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        cfg = model.config
        self.max_seq_len = cfg.max_seq_len
        self.vocab_size = cfg.vocab_size
        self.pad_token_id = cfg.pad_token_id or 0
        self.rotations = draw_rotations(self.model, torch.Generator().manual_seed(0))
        # (batched cache, the per-sequence row views handed out) of the last decode step
        self._last_batch: tuple[dict, list[dict]] | None = None

    def forward(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        torch = self._torch
        ids = torch.from_numpy(input_ids).to(self.device)
        mask = torch.arange(ids.shape[1], device=self.device)[None, :] < torch.from_numpy(lengths).to(self.device)[:, None]
        with torch.inference_mode():
            logits = self.model(ids, attention_mask=mask)  # (B, T, V)
        return logits.float().cpu().numpy()

    def step(self, seqs: Sequence[DecodeState]) -> np.ndarray:
        torch = self._torch
        rows: dict[int, Any] = {}  # id(seq) -> next-token logits (V,)
        with torch.inference_mode():
            by_length: dict[int, list[DecodeState]] = {}
            for s in seqs:
                if s.cache is None:
                    by_length.setdefault(len(s.tokens), []).append(s)
            for group in by_length.values():
                ids = torch.tensor([s.tokens for s in group], dtype=torch.long, device=self.device)
                logits, cache = self._prefill(self.model, ids, None, self.rotations, max_len=self.max_seq_len)
                self._scatter(group, logits, cache, rows)
            running = [s for s in seqs if id(s) not in rows]
            if running:
                token = torch.tensor([s.tokens[-1] for s in running], dtype=torch.long, device=self.device)
                position = torch.tensor([len(s.tokens) - 1 for s in running], dtype=torch.long, device=self.device)
                logits, cache = self._decode_step(self.model, token, position, self._batched_cache(running))
                self._scatter(running, logits, cache, rows)
                self._last_batch = (cache, [s.cache for s in running])
        return torch.stack([rows[id(s)] for s in seqs]).float().cpu().numpy()

    def _batched_cache(self, running: list[DecodeState]) -> dict:
        """The batch's cache: the previous step's batched cache when the batch is unchanged (the common
        case between joins and leaves), else the sequences' caches stacked (a copy)."""
        if self._last_batch is not None:
            cache, rows = self._last_batch
            if len(rows) == len(running) and all(s.cache is row for s, row in zip(running, rows)):
                return cache
        return stack_caches([s.cache for s in running])

    @staticmethod
    def _scatter(group: list[DecodeState], logits: Any, cache: dict, rows: dict[int, Any]) -> None:
        for i, s in enumerate(group):
            s.cache = cache_row(cache, i)
            rows[id(s)] = logits[i]


# A generation cache is {"<layer>.<name>": tensor}; every entry leads with the batch except the layer's
# LSH rotations ("<layer>.rot"), which all sequences share (see TorchBackend).
def cache_row(cache: dict, i: int) -> dict:
    """Row i of a batched cache, as a batch of one (views, no copy)."""
    return {k: t if k.endswith(".rot") else t[i:i + 1] for k, t in cache.items()}


def stack_caches(caches: list[dict]) -> dict:
    """Batch-of-one caches stacked into one batched cache."""
    import torch

    return {k: t if k.endswith(".rot") else torch.cat([c[k] for c in caches]) for k, t in caches[0].items()}


class GraphBackend(Backend):
    """An exported graph behind a runner with ``logits(input_ids, attention_mask)``: ONNX Runtime's
    :class:`~reformer_dist.export.ort_runner.OrtRunner` or the TensorRT engine runner. Each step
    recomputes the sequences (the exported graph is the full-sequence model)."""

    def __init__(self, name: str, runner: Any, metadata: dict[str, Any]):
        self.name = name
        self.runner = runner
        self.max_seq_len = int(runner.max_seq_len)
        self.vocab_size = int(metadata["vocab_size"])
        self.pad_token_id = json.loads(metadata.get("config", "{}")).get("pad_token_id") or 0
        self.max_batch_size = getattr(runner, "max_batch_size", None)
        # a TensorRT profile starts at the chunk multiple: pad every batch to multiples of it
        self.length_multiple = int(metadata.get("pad_multiple", 1)) if name == "tensorrt" else 1

    def forward(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        mask = (np.arange(input_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        return self.runner.logits(input_ids, mask)


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    backend: Backend
    tokenizer: Tokenizer
    name: str
    """Default model name in the API (the file or directory name)."""


def load_model(kind: str, path: str, device: str | None = None, threads: int | None = None,
               tokenizer: str | None = None) -> LoadedModel:
    """Open ``path`` with the ``kind`` backend, with the tokenizer recorded with the model (or
    ``tokenizer``, a ``--tokenizer`` spec string, when given)."""
    if kind not in BACKENDS:
        raise ReformerDistError(f"unknown backend {kind!r}; choose from {list(BACKENDS)}")
    if not os.path.exists(path):
        raise ReformerDistError(f"{path}: no such file or directory")
    name = Path(path).stem if Path(path).is_file() else Path(path).resolve().name
    recorded: Tokenizer | None
    if kind == "torch":
        import torch

        # a run directory, a native directory (safetensors + config.yaml) or a Hugging Face directory
        from reformer_dist.export.loading import load_model_for_export
        from reformer_dist.model.hf_interop import hf_tokenizer_spec

        if threads:
            torch.set_num_threads(threads)
        source = load_model_for_export(path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        backend: Backend = TorchBackend(source.model, device)
        spec = source.tokenizer
        if spec is None and source.kind == "hf":
            spec = hf_tokenizer_spec(source.path, backend.vocab_size)
        recorded = get_tokenizer(spec) if spec is not None and tokenizer is None else None
    else:
        if kind == "onnxruntime":
            if not path.endswith(".onnx"):
                raise ReformerDistError(f"--backend onnxruntime serves an exported .onnx file, got {path}")
            from reformer_dist.export.ort_runner import OrtRunner

            runner = OrtRunner(path, threads=threads or 0)
        else:
            if not path.endswith(".plan"):
                raise ReformerDistError(f"--backend tensorrt serves a TensorRT engine (.plan), got {path}")
            from reformer_dist.export.tensorrt_build import TensorRTRunner

            runner = TensorRTRunner(path)
            if not runner.metadata:
                raise ReformerDistError(f"{path}: its metadata ({path}.json, written by `export tensorrt`) "
                                        f"is missing")
        backend = GraphBackend(kind, runner, runner.metadata)
        recorded = embedded_tokenizer(runner.metadata) if tokenizer is None else None
    chosen = get_tokenizer(tokenizer) if tokenizer is not None else recorded
    if chosen is None:
        raise ReformerDistError(f"{path} records no tokenizer: pass --tokenizer (bytes, a tokenizer.json or a "
                                f"sentencepiece .model)")
    if chosen.vocab_size > backend.vocab_size:
        # ids past the model's vocabulary would fail inside a batch, taking other requests down with it
        raise ReformerDistError(f"the tokenizer has {chosen.vocab_size} ids but the model only {backend.vocab_size}")
    return LoadedModel(backend, chosen, name)


def embedded_tokenizer(metadata: dict[str, str]) -> Tokenizer | None:
    """The tokenizer an exported graph records (for a file tokenizer, built from the embedded file);
    None if the export recorded none."""
    if "tokenizer" not in metadata:
        return None
    spec = json.loads(metadata["tokenizer"])
    if "path" not in spec:
        return get_tokenizer(spec)
    if "tokenizer_file" not in metadata:
        raise ReformerDistError(f"the model records a {spec.get('kind')} tokenizer but does not embed its file")
    # The tokenizer libraries load from a path: materialise the embedded file just long enough to load it.
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / os.path.basename(spec["path"])
        file.write_bytes(base64.b64decode(metadata["tokenizer_file"]))
        return get_tokenizer({**spec, "path": str(file)})

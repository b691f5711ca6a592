"""Model backends for the server: PyTorch (native checkpoint), ONNX Runtime (.onnx), TensorRT (.plan).

A backend turns token ids into logits; the engine does everything else (batching, sampling, text). The
engine only needs two things from it:

    step(seqs)              → (B, V) next-token logits, one row per sequence of the decode batch
    token_logprobs(seqs)    → per sequence, log p(token_t | tokens_<t) for t >= 1 (scoring)

Both have a generic implementation on top of :meth:`Backend.forward`, the full-sequence logits of a
right-padded batch: each decode step recomputes every sequence from its first token. That is correct for
any model and graph. A backend with cached decoding overrides ``step``, keeping its per-sequence state in
``seq.cache`` (None on a sequence's first step, i.e. its prefill) and freeing it in ``release``.

Nothing here imports torch unless the torch backend is chosen, so ONNX Runtime / TensorRT serving runs
without it; no backend imports DeepSpeed or the training code.
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

from reformer_dist.data.tokenizer import ByteTokenizer, Tokenizer, get_tokenizer
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
    """A native checkpoint (safetensors + config.yaml) run by the PyTorch model."""

    name = "torch"

    def __init__(self, model: Any, device: str = "cpu"):
        import torch

        self._torch = torch
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        cfg = model.config
        self.max_seq_len = cfg.max_seq_len
        self.vocab_size = cfg.vocab_size
        self.pad_token_id = cfg.pad_token_id or 0

    def forward(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        torch = self._torch
        ids = torch.from_numpy(input_ids).to(self.device)
        mask = torch.arange(ids.shape[1], device=self.device)[None, :] < torch.from_numpy(lengths).to(self.device)[:, None]
        with torch.inference_mode():
            logits = self.model(ids, attention_mask=mask)  # (B, T, V)
        return logits.float().cpu().numpy()


class OnnxRuntimeBackend(Backend):
    """An exported ``.onnx`` graph run by ONNX Runtime (TensorRT / CUDA providers first when installed)."""

    name = "onnxruntime"

    def __init__(self, runner: Any):
        self.runner = runner  # reformer_dist.export.ort_runner.OrtRunner
        self.max_seq_len = runner.max_seq_len
        self.vocab_size = runner.vocab_size
        self.pad_token_id = runner.config.get("pad_token_id") or 0

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
    eos_token_id: int | None = None


def load_model(kind: str, path: str, device: str | None = None, threads: int | None = None) -> LoadedModel:
    """Open ``path`` with the ``kind`` backend, plus the tokenizer recorded with the model."""
    if kind not in BACKENDS:
        raise ReformerDistError(f"unknown backend {kind!r}; choose from {list(BACKENDS)}")
    if not os.path.exists(path):
        raise ReformerDistError(f"{path}: no such file or directory")
    name = Path(path).stem if Path(path).is_file() else Path(path).resolve().name
    if kind == "onnxruntime":
        if not path.endswith(".onnx"):
            raise ReformerDistError(f"--backend onnxruntime serves an exported .onnx file, got {path}")
        from reformer_dist.export.ort_runner import OrtRunner

        runner = OrtRunner(path, threads=threads or 0)
        return LoadedModel(OnnxRuntimeBackend(runner), tokenizer_from_metadata(runner.metadata, path), name)
    raise ReformerDistError(f"--backend {kind} is not available yet")


def tokenizer_from_metadata(metadata: dict[str, str], source: str) -> Tokenizer:
    """The tokenizer an exported graph records (spec + embedded file); raw bytes if it records none."""
    if "tokenizer" not in metadata:
        return ByteTokenizer()
    spec = json.loads(metadata["tokenizer"])
    if "path" not in spec:
        return get_tokenizer(spec)
    if "tokenizer_file" not in metadata:
        raise ReformerDistError(f"{source}: records a {spec.get('kind')} tokenizer but does not embed its file")
    # The tokenizer libraries load from a path: materialise the embedded file just long enough to load it.
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / os.path.basename(spec["path"])
        file.write_bytes(base64.b64decode(metadata["tokenizer_file"]))
        return get_tokenizer({**spec, "path": str(file)})

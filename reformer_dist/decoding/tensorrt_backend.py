"""The TensorRT backend: cached decoding through the prefill and decode engines of an export.

``export tensorrt --onnx model.onnx --output model.plan`` also builds ``model.prefill.plan`` and
``model.decode.plan`` when the ONNX generation graphs sit beside ``model.onnx``. The batch state is the
decode engine's cache as torch CUDA tensors (it never leaves the device; only the logits come back) plus
each row's next position; joining concatenates along the batch, leaving selects rows. The same cached
algorithm and frozen rotations as the other backends, so greedy text is the same (within the engine's
precision). Without the generation engines :func:`open_tensorrt` recomputes every sequence with the
logits engine per token, and says so in a warning.

TensorRT cannot be installed on CPU-only machines: everything here runs where ``import tensorrt`` and a
GPU work (tests marked ``tensorrt``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reformer_dist.decoding.backend import DecodingBackend, RecomputingBackend
from reformer_dist.errors import ReformerDistError
from reformer_dist.export.metadata import generation_paths

log = logging.getLogger("reformer_dist.decoding")


@dataclass
class TensorRTState:
    cache: dict[str, Any]
    """``cache.<name>`` -> torch CUDA tensor, batch first."""
    position: Any
    """(B,) int64 CUDA tensor: where each row's next token goes."""


class TensorRTBackend(DecodingBackend):
    """The prefill / decode engines beside ``plan_path``; the logits engine is opened for scoring only."""

    name = "tensorrt"

    def __init__(self, plan_path: str | os.PathLike):
        import torch

        from reformer_dist.export.tensorrt_build import TensorRTEngine

        self._torch = torch
        self.plan_path = str(plan_path)
        paths = generation_paths(plan_path, ".plan")
        self.prefill_engine = TensorRTEngine(paths["prefill"])
        self.decode_engine = TensorRTEngine(paths["decode"])
        self.metadata = self.prefill_engine.metadata
        if "cache_names" not in self.metadata:
            raise ReformerDistError(f"{paths['prefill']}: its metadata ({paths['prefill']}.json, written by "
                                    f"`export tensorrt`) is missing")
        self.cache_names: list[str] = json.loads(self.metadata["cache_names"])
        self.pad_multiple = int(self.metadata["pad_multiple"])
        self.vocab_size = int(self.metadata["vocab_size"])
        (_, min_len), (max_batch, max_len) = self.prefill_engine.profile("input_ids")
        self.min_prefill = min_len
        self.max_seq_len = min(int(self.metadata["max_seq_len"]), max_len)
        self.max_batch_size = min(max_batch, self.decode_engine.profile("token")[1][0])
        self._runner = None

    def prefill(self, prompts: list[list[int]]) -> tuple[TensorRTState, np.ndarray]:
        torch = self._torch
        m = self.pad_multiple
        lengths = [len(p) for p in prompts]
        width = max(self.min_prefill, math.ceil(max(lengths) / m) * m)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)], mask[row, : len(prompt)] = torch.tensor(prompt), 1
        out = self.prefill_engine.run({"input_ids": ids.cuda(), "attention_mask": mask.cuda()})
        cache = {name: out[f"present.{name}"] for name in self.cache_names}
        position = torch.tensor(lengths, dtype=torch.long, device="cuda")
        return TensorRTState(cache, position), out["logits"].float().cpu().numpy()

    def decode(self, state: TensorRTState, tokens: np.ndarray) -> np.ndarray:
        torch = self._torch
        feeds = {"token": torch.as_tensor(np.ascontiguousarray(tokens, dtype=np.int64)).cuda(),
                 "position": state.position, **{f"cache.{n}": t for n, t in state.cache.items()}}
        out = self.decode_engine.run(feeds)
        state.cache = {name: out[f"present.{name}"] for name in self.cache_names}
        state.position = state.position + 1
        return out["logits"].float().cpu().numpy()

    def merge(self, state: TensorRTState, other: TensorRTState) -> TensorRTState:
        torch = self._torch
        cache = {n: torch.cat([t, other.cache[n]]) for n, t in state.cache.items()}
        return TensorRTState(cache, torch.cat([state.position, other.position]))

    def release(self, state: TensorRTState, keep: Sequence[int]) -> TensorRTState | None:
        if not keep:
            return None
        rows = self._torch.tensor(list(keep), dtype=self._torch.long, device="cuda")
        return TensorRTState({n: t.index_select(0, rows) for n, t in state.cache.items()},
                             state.position.index_select(0, rows))

    def forward(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if self._runner is None:
            from reformer_dist.export.tensorrt_build import TensorRTRunner

            self._runner = TensorRTRunner(self.plan_path)
        mask = (np.arange(input_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        return self._runner.logits(input_ids, mask)


class TensorRTRecomputeBackend(RecomputingBackend):
    """The logits engine alone: every token recomputes each whole sequence (the fallback)."""

    name = "tensorrt"

    def __init__(self, plan_path: str | os.PathLike):
        from reformer_dist.export.tensorrt_build import TensorRTRunner

        self.runner = TensorRTRunner(plan_path)
        self.metadata = self.runner.metadata
        if not self.metadata:
            raise ReformerDistError(f"{plan_path}: its metadata ({plan_path}.json, written by `export tensorrt`) "
                                    f"is missing")
        self.max_seq_len = self.runner.max_seq_len
        self.max_batch_size = self.runner.max_batch_size
        self.vocab_size = int(self.metadata["vocab_size"])
        self.pad_token_id = json.loads(self.metadata.get("config", "{}")).get("pad_token_id") or 0
        # the profile starts at the chunk multiple: pad every batch to multiples of it
        self.length_multiple = int(self.metadata.get("pad_multiple", 1))

    def forward(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        mask = (np.arange(input_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        return self.runner.logits(input_ids, mask)


def open_tensorrt(plan_path: str | os.PathLike) -> DecodingBackend:
    """The cached backend when the generation engines sit beside ``plan_path``, else the recomputing one
    (with a warning)."""
    if all(p.is_file() for p in generation_paths(plan_path, ".plan").values()):
        return TensorRTBackend(plan_path)
    log.warning("%s has no prefill/decode engines beside it: every generated token recomputes the whole "
                "sequence; build them with `export tensorrt` from an export with --generation", plan_path)
    return TensorRTRecomputeBackend(plan_path)

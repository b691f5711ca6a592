"""The PyTorch backend: a ReformerLM decoding with its cache (``reformer_dist.model.generation``).

The batch state is one generation cache (``{"<layer>.<name>": tensor}``, batch first except the layers'
shared LSH rotations ``"<layer>.rot"``) plus each row's next position. Decode steps write into it in
place; joining concatenates caches along the batch, leaving selects rows. Prompts are prefilled in groups
of equal length (no padding), so every row is computed exactly as it would be alone, also for the
reference 'chunk' LSH window whose padded prefill differs slightly.

On CPU a decode step is a few hundred tiny ops ((B, d_model) matrix products, ring gathers): intra-op
threads only add synchronisation to each, and on a busy machine OpenMP's waits for a descheduled thread
made steps ~10x slower (measured: 5 vs 48+ tokens/s). Decode steps therefore run on one thread; prefill,
a real batch of work, keeps the configured count. A warm-up step at construction pays the first-call
costs of the custom LSH op and friends (ONNX Runtime pays its own when its session is created).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from reformer_dist.decoding.backend import DecodingBackend
from reformer_dist.model.generation import Cache, Decoder, prefill
from reformer_dist.model.reformer import ReformerLM


@dataclass
class TorchState:
    cache: Cache
    position: Tensor
    """(B,) int64: where each row's next token goes."""


class TorchBackend(DecodingBackend):
    """``model`` on ``device``. LSH rotations are the model's (:meth:`ReformerLM.draw_rotations`); with
    ``freeze`` (a model this backend owns) they are also frozen into the model, so full-sequence forwards
    (scoring) hash like decoding. ``max_cache_len`` bounds full-attention caches (a sliding window)."""

    name = "torch"

    def __init__(self, model: ReformerLM, device: str | torch.device | None = None,
                 max_cache_len: int | None = None, freeze: bool = True):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if freeze:
            self.model.freeze_rotations()
        self.rotations = self.model.draw_rotations()
        self.decoder = Decoder(self.model)  # the decode step's weights, prepared once
        cfg = model.config
        self.max_seq_len = cfg.max_seq_len
        self.vocab_size = cfg.vocab_size
        self.pad_token_id = cfg.pad_token_id or 0
        self.max_cache_len = max_cache_len
        self.threads = torch.get_num_threads()
        state, _ = self.prefill([[0]])  # warm-up (see module doc)
        self.decode(state, np.zeros(1, dtype=np.int64))

    @contextlib.contextmanager
    def _threads(self, n: int) -> Iterator[None]:
        """Run on ``n`` intra-op threads (CPU), then restore the caller's count."""
        before = torch.get_num_threads()
        if self.device.type == "cpu" and before != n:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> tuple[TorchState, np.ndarray]:
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        state, logits, order = None, [], []
        for rows in by_length.values():
            ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=self.device)
            with self._threads(self.threads):
                out, cache = prefill(self.model, ids, None, self.rotations, self.max_seq_len, self.max_cache_len,
                                     decoder=self.decoder)
            group = TorchState(cache, torch.full((len(rows),), ids.shape[1], dtype=torch.long, device=self.device))
            state = group if state is None else self.merge(state, group)
            logits.append(out)
            order += rows
        if order != sorted(order):  # back to the prompts' order
            state = self.release(state, list(np.argsort(order)))
            logits = [torch.cat(logits)[np.argsort(order)]]
        return state, torch.cat(logits).float().cpu().numpy()

    @torch.inference_mode()
    def decode(self, state: TorchState, tokens: np.ndarray) -> np.ndarray:
        token = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(self.device)
        with self._threads(1):
            logits, state.cache = self.decoder.step(token, state.position, state.cache, inplace=True)
        state.position += 1
        return logits.float().cpu().numpy()

    def merge(self, state: TorchState, other: TorchState) -> TorchState:
        cache = {k: t if k.endswith(".rot") else torch.cat([t, other.cache[k]]) for k, t in state.cache.items()}
        return TorchState(cache, torch.cat([state.position, other.position]))

    def release(self, state: TorchState, keep: Sequence[int]) -> TorchState | None:
        if not keep:
            return None
        rows = torch.tensor(list(keep), dtype=torch.long, device=self.device)
        cache = {k: t if k.endswith(".rot") else t.index_select(0, rows) for k, t in state.cache.items()}
        return TorchState(cache, state.position.index_select(0, rows))

    @torch.inference_mode()
    def forward(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(input_ids).to(self.device)
        real = torch.from_numpy(lengths).to(self.device)[:, None]
        mask = torch.arange(ids.shape[1], device=self.device)[None, :] < real
        return self.model(ids, attention_mask=mask).float().cpu().numpy()

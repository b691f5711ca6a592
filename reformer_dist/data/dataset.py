"""Fixed-length training windows over a prepared split, read from memory-mapped shards.

Window i covers tokens [i*seq_len, i*seq_len + seq_len + 1) of the split's stream: consecutive windows
share one token, so every token but the first is a prediction target exactly once per epoch
(``input_ids = w[:-1]``, ``targets = w[1:]``). Windows may span two shards.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from reformer_dist.data.sample_order import GlobalOrderSampler
from reformer_dist.data.shards import load_manifest
from reformer_dist.errors import DataError

if TYPE_CHECKING:
    import torch


class TokenWindowDataset:
    """``ds[i]`` is window i as an int64 array of shape (seq_len + 1,); ``len(ds)`` windows.

    A map-style dataset (torch's ``Dataset`` protocol). Shards are opened lazily with ``np.memmap`` —
    the OS pages in what is read, every rank shares the page cache — and are not pickled, so handing
    the dataset to DataLoader worker processes copies nothing.
    """

    def __init__(self, data_dir: str, split: str = "train", seq_len: int = 256, verify_checksums: bool = False):
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        manifest = load_manifest(data_dir, verify_checksums=verify_checksums)
        if split not in manifest["splits"]:
            raise DataError(f"{data_dir}: no split {split!r} (has {sorted(manifest['splits'])})")
        self.data_dir, self.split, self.seq_len = data_dir, split, seq_len
        self.vocab_size: int = manifest["vocab_size"]
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        shards = manifest["splits"][split]["shards"]
        self.n_tokens: int = manifest["splits"][split]["n_tokens"]
        if self.n_tokens < seq_len + 1:
            raise DataError(f"{data_dir}: split {split!r} has {self.n_tokens:,} tokens, fewer than the "
                            f"seq_len + 1 = {seq_len + 1:,} one window needs; lower seq_len or add data")
        self._paths = [os.path.join(data_dir, s["file"]) for s in shards]
        # starts[k] = stream position of shard k's first token; starts[-1] = n_tokens
        self._starts = np.cumsum([0] + [s["n_tokens"] for s in shards])
        self._maps: list[np.memmap] | None = None
        tok = dict(manifest["tokenizer"])
        if "path" in tok:  # the copy in the data directory, made absolute so get_tokenizer finds it
            tok = {"kind": tok["kind"], "path": os.path.abspath(os.path.join(data_dir, tok["path"]))}
        self.tokenizer_spec: dict[str, Any] = tok

    def __len__(self) -> int:
        return (self.n_tokens - 1) // self.seq_len

    def __getitem__(self, i: int) -> np.ndarray:
        return self.window(i)

    def window(self, i: int, first: int = 0, count: int | None = None) -> np.ndarray:
        """Tokens [first, first + count + 1) of window i (the whole window by default): the inputs and
        targets of ``count`` of its positions."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        count = self.seq_len - first if count is None else count
        start = (i % len(self)) * self.seq_len + first
        return self.tokens(start, start + count + 1)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream as int64, gathered across shards."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"tokens [{start}, {stop}) outside the split's [0, {self.n_tokens})")
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r") for p in self._paths]
        out = np.empty(stop - start, dtype=np.int64)
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            lo = pos - self._starts[k]
            hi = min(stop, self._starts[k + 1]) - self._starts[k]
            piece = out[pos - start:pos - start + hi - lo]
            piece[:] = self._maps[k][lo:hi]
            if piece.size and piece.max() >= self.vocab_size:  # an overwritten shard (sizes still match)
                raise DataError(f"{self._paths[k]}: token id {piece.max()} is outside the vocabulary "
                                f"({self.vocab_size} ids); the shard is corrupted, re-run prepare-data")
            pos += hi - lo
            k += 1
        return out

    def __getstate__(self) -> dict:
        # pickling a memmap copies its data: send paths, reopen on the other side
        return {**self.__dict__, "_maps": None}


def next_batch(dataset: TokenWindowDataset, sampler: GlobalOrderSampler, micro_batch_size: int,
               part: int = 0, parts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's next micro-batch as CPU tensors ``(input_ids, targets)``, each (B, seq_len) int64, or
    with ``parts`` > 1 (sequence parallelism: ranks that share samples) positions
    [part*seq_len/parts, (part+1)*seq_len/parts) of them, read alone from the shards.

    The sampler advances by one global micro-batch on every call, so its ``state_dict()`` taken after
    the training step that used this batch resumes with the batch after it.
    """
    import torch

    span = dataset.seq_len // parts
    windows = [dataset.window(int(i), part * span, span) for i in sampler.next_indices(micro_batch_size)]
    batch = torch.from_numpy(np.stack(windows))  # (B, span + 1)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

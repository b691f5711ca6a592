"""What an LSH attention layer computes, as one frozen value: ``LshSpec``.

The reference op, the Triton kernels, the ONNX node (its attributes), the ONNX Runtime override kernel
and the TensorRT plugin all take their hashing and window parameters from an ``LshSpec``; the custom
op's schema carries its fields as plain arguments (``LshSpec.op_args``), since torch.library ops take
no dataclasses. Per-call settings (attention dropout, its seed, a head slice under sequence parallelism)
are not part of the spec.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

WINDOWS = ("bucket", "chunk")
"""'bucket': strictly causal per-bucket windows; 'chunk': HF/trax chunk windows (checkpoint parity)."""

# 'bucket' window query chunks are chunk_len / BUCKET_SPLIT long (see ``LshSpec.compute_chunks``).
BUCKET_SPLIT = 2
# The widest digit of the counting sort the exported graphs use (see ``LshSpec.counting_digits``).
COUNTING_DIGIT_MAX = 32


@dataclass(frozen=True)
class LshSpec:
    """The static parameters of one LSH attention layer (all LSH layers of a model share them)."""

    n_hashes: int
    """Hash rounds: rotations are (H, D, n_hashes, sum(n_buckets)//2), buckets (B, H, n_hashes, L)."""
    n_buckets: tuple[int, ...]
    """Bucket factors; a position's bucket is ``b_0 + f_0*b_1 + ...`` in ``[0, prod(n_buckets))``."""
    chunk_len: int
    """Chunk of the sorted order ('chunk') or reach in sorted slots ('bucket'); L must be a multiple."""
    chunks_before: int
    """'chunk' windows: neighbouring chunks a query chunk sees before its own."""
    chunks_after: int
    """'chunk' windows: neighbouring chunks a query chunk sees after its own."""
    window: str
    """One of ``WINDOWS``."""
    causal: bool
    """Whether a query may see only keys at or before its own position."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_buckets", tuple(int(f) for f in self.n_buckets))  # hashable, whatever came in
        if self.window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, got {self.window!r}")

    @property
    def n_real_buckets(self) -> int:
        """Buckets of real tokens, ``prod(n_buckets)``; padding goes to the extra bucket of that number."""
        return math.prod(self.n_buckets)

    @property
    def hf_rounding(self) -> bool:
        """'chunk' reproduces HF's fp32 per-round softmax arithmetic; 'bucket' keeps every statistic precise."""
        return self.window == "chunk"

    def offsets(self) -> list[int]:
        """Chunk offsets (relative to a query's chunk of ``chunk_len``) whose keys a query may see. For
        'bucket' the query's own chunk is always the second entry, so its self key sits at window column
        ``c + i``. This geometry also keys the attention-dropout counters (``layout.dropout_keep``)."""
        if self.window == "bucket":
            return [-1, 0] if self.causal else [-1, 0, 1]
        return list(range(-self.chunks_before, self.chunks_after + 1))

    def compute_chunks(self, dropout_p: float = 0.0) -> tuple[int, list[int]]:
        """(query chunk length, chunk offsets) the window is computed with, by the op and the ONNX body.

        'chunk' is defined by its chunks (``offsets``). 'bucket' is defined by a reach of ``chunk_len`` sorted
        slots, so without attention dropout it is computed with query chunks of ``chunk_len / BUCKET_SPLIT``:
        a chunk of q queries needs the chunk_len slots before it plus its own, (1 + 1/BUCKET_SPLIT) *
        chunk_len scores per query instead of 2x, with the same ones valid. With dropout it keeps the
        ``offsets`` geometry that keys the dropout mask (and that the Triton kernels reproduce bit for bit).
        """
        split = BUCKET_SPLIT if self.window == "bucket" and dropout_p == 0 and self.chunk_len % BUCKET_SPLIT == 0 else 1
        if split == 1:
            return self.chunk_len, self.offsets()
        return self.chunk_len // split, list(range(-split, 1 if self.causal else split + 1))

    def counting_digits(self, padding: bool) -> list[int]:
        """Digit widths, least significant first, of the radix sort that orders buckets by counting (the
        exported graphs' sort: TensorRT rejects a TopK whose K is the sequence length). The bucket values, 0 ..
        n_real_buckets - 1 plus the padding bucket when ``padding``, are written in as few digits of at most
        ``COUNTING_DIGIT_MAX`` values as can hold them, all of one base but the top one: each counting pass
        is a one-hot that wide, so 129 values sort in passes of 12 and 11 values, not one of 129."""
        values = self.n_real_buckets + int(padding)
        passes = 1
        while COUNTING_DIGIT_MAX**passes < values:
            passes += 1
        base = 1
        while base**passes < values:
            base += 1
        return [base] * (passes - 1) + [-(-values // base ** (passes - 1))]

    def is_plain(self, length: int) -> bool:
        """Whether the 'chunk' window runs as one plain attention (HF: ``sequence_length <= chunk_length``)."""
        return self.window == "chunk" and length <= self.chunk_len

    def op_args(self) -> tuple:
        """The spec's arguments of ``torch.ops.reformer.lsh_attention*``, in schema order."""
        return (self.n_hashes, list(self.n_buckets), self.chunk_len, self.chunks_before, self.chunks_after,
                self.window, self.causal)

    def attributes(self) -> dict:
        """The spec as attributes: the ONNX node's, the TensorRT plugin's fields, the ORT kernel's."""
        return {"window": self.window, "chunk_len": self.chunk_len, "chunks_before": self.chunks_before,
                "chunks_after": self.chunks_after, "n_hashes": self.n_hashes, "n_buckets": list(self.n_buckets),
                "causal": int(self.causal)}

    @classmethod
    def from_attributes(cls, attributes: Mapping) -> LshSpec:
        """Inverse of ``attributes`` (strings may come as bytes, ``n_buckets`` as any int sequence)."""
        window = attributes["window"]
        return cls(n_hashes=int(attributes["n_hashes"]), n_buckets=tuple(attributes["n_buckets"]),
                   chunk_len=int(attributes["chunk_len"]), chunks_before=int(attributes["chunks_before"]),
                   chunks_after=int(attributes["chunks_after"]),
                   window=window.decode() if isinstance(window, bytes) else window,
                   causal=bool(attributes["causal"]))


def mask_values(dtype: torch.dtype) -> tuple[float, float]:
    """HF's (masked, self-masked) score constants: fp16 needs small ones to stay finite.

    The op itself masks with -inf and uses only the self-masked value (see ``layout.Block.mask``); scores
    are soft-maxed in fp32, so bf16 inputs use the fp32 constants. Local attention uses both.
    """
    if dtype == torch.float16:
        return -1e4, -1e3
    return -1e9, -1e5


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores, softmax statistics and gradients accumulate in at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def check_inputs(qk: Tensor, v: Tensor, rotations: Tensor | None, buckets: Tensor | None, spec: LshSpec) -> None:
    """The shape contract of the op's tensors against ``spec`` (one clear message per violation)."""
    torch._check(qk.dim() == 4 and qk.shape == v.shape, lambda: "qk and v must both be (B, H, L, D)")
    torch._check(qk.shape[2] % spec.chunk_len == 0,
                 lambda: f"L={qk.shape[2]} must be a multiple of chunk_len={spec.chunk_len}")
    if rotations is not None:
        torch._check(rotations.dim() == 4 and rotations.shape[2] == spec.n_hashes,
                     lambda: f"rotations {tuple(rotations.shape)} must be (H, D, n_hashes={spec.n_hashes}, R)")
    if buckets is not None:
        torch._check(buckets.dim() == 4 and buckets.shape[2] == spec.n_hashes,
                     lambda: f"buckets {tuple(buckets.shape)} must be (B, H, n_hashes={spec.n_hashes}, L)")

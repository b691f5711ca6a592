"""Step 1 of LSH attention: the random-rotation hash of every position in every round.

``bucket = argmax(cat[x R, -x R])`` per bucket factor, in fp32, combined as ``b_0 + f_0*b_1 + ...``;
padding positions go to the extra bucket ``prod(n_buckets)``. Buckets are per round and without round
offsets: (B, H, n_hashes, L).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from reformer_dist.model.lsh.spec import LshSpec

# Rotated elements per hashing block: a block of positions whose (B, H, n_hashes, positions, R/2) rotations
# stay a few MiB at any length and head count.
HASH_BLOCK_ELEMENTS = 1 << 21
# Below this many rotated elements per bucket factor, buckets come from the argmax of the sign-doubled
# rotations built whole (fewer operator calls); from here on from amax, amin and one argmax (fewer passes).
# Measured on CPU, one thread: a decode step's (1, 4, 2, 32) rotations 11-13 vs 43 us, a prefill block of 4K
# positions 6.7-8.0 vs 4.7-5.3 ms.
DOUBLED_ARGMAX_ELEMENTS = 1 << 14


def hash_vectors(qk: Tensor, rotations: Tensor, n_buckets: list[int], key_padding_mask: Tensor | None) -> Tensor:
    """Random-rotation hash of every position in every round.

    qk (B, H, L, D); rotations (H, D, n_hashes, sum(n_buckets)//2) fp32; key_padding_mask (B, L) bool,
    True = real token. Returns buckets (B, H, n_hashes, L) int64: ``b_0 + f_0*b_1 + f_0*f_1*b_2 ...``
    per round, padding positions in the extra bucket ``prod(n_buckets)``.
    """
    rotated = torch.einsum("bhld,hdnr->bhnlr", qk.detach().float(), rotations.float())
    buckets = rotated_buckets(rotated, n_buckets)
    if key_padding_mask is not None:
        buckets = torch.where(key_padding_mask[:, None, None, :].bool(), buckets, math.prod(n_buckets))
    return buckets


def rotated_buckets(rotated: Tensor, n_buckets: list[int]) -> Tensor:
    """Buckets (...) of rotated vectors (..., sum(n_buckets)//2): ``b_0 + f_0*b_1 + ...``, the argmax of
    ``cat[x R, -x R]`` per bucket factor over its slice of the rotations.

    Large inputs (training, prefill) skip the doubled tensor: the winner is in the positive half if
    ``max >= -min`` (that half comes first, so it wins ties), and its index is the first maximum of the
    slice times that half's sign, + f/2 for the negative half. ``amax`` and ``amin`` are vectorised, and one
    indexed reduction remains where max and min with indices were two (they run element by element on CPU):
    hashing a 1M-token head (factors 256 and 128) 2.7 -> 2.0 s. Small ones (a decode step) build it: fewer
    operator calls, which is what their time is. Exported graphs build it too (one ArgMax per factor, and no
    branch on a dynamic size)."""
    buckets, offset, stride = None, 0, 1
    for factor in n_buckets:
        part = rotated[..., offset : offset + factor // 2]
        if torch.compiler.is_exporting() or part.numel() < DOUBLED_ARGMAX_ELEMENTS:
            b = torch.argmax(torch.cat([part, -part], dim=-1), dim=-1)
        else:
            positive = part.amax(dim=-1) >= -part.amin(dim=-1)  # the winner is in the positive half
            sign = torch.where(positive, 1.0, -1.0).to(part.dtype).unsqueeze(-1)
            b = (part * sign).argmax(dim=-1) + (~positive) * (factor // 2)
        buckets = b if buckets is None else buckets + stride * b
        offset += factor // 2
        stride *= factor
    return buckets


def hash_in_blocks(qk: Tensor, rotations: Tensor, n_buckets: list[int], key_padding_mask: Tensor | None) -> Tensor:
    """:func:`hash_vectors` over blocks of positions, so that the rotated tensor stays a few MiB at any length
    (``HASH_BLOCK_ELEMENTS``)."""
    b, h, length, _ = qk.shape
    block = max(1, HASH_BLOCK_ELEMENTS // (b * h * rotations.shape[2] * rotations.shape[3]))
    parts = []
    for start in range(0, length, block):
        stop = min(start + block, length)
        mask = None if key_padding_mask is None else key_padding_mask[:, start:stop]
        parts.append(hash_vectors(qk[:, :, start:stop], rotations, n_buckets, mask))
    return torch.cat(parts, dim=-1)


def buckets_or_hash(qk: Tensor, rotations: Tensor, key_padding_mask: Tensor | None, buckets: Tensor | None,
                    spec: LshSpec) -> Tensor:
    """The buckets to attend with: the given ones (a replay), else the hash of qk."""
    return hash_in_blocks(qk, rotations, list(spec.n_buckets), key_padding_mask) if buckets is None else buckets

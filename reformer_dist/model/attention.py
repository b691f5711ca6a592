"""The attention branch of a Reformer layer: LayerNorm -> self-attention (LSH, local or full) -> output.

Each kind keeps HF's parameter meaning so checkpoints map 1:1: LSH has ``query_key`` and ``value``
(shared-QK), local and full have ``query``, ``key`` and ``value``; all without bias. The branch module
(``AttentionBlock``) owns the layer's private generator: LSH rotations, the attention-dropout seed and
the output dropout all come from it, so the reversible backward replays them by restoring its state.

Each self-attention kind splits into ``project`` (its input projections: position-wise) and ``forward`` (the
kernel over the whole sequence, from the projected tensors), so the reversible stack can run the
position-wise parts in tiles of positions. Under sequence parallelism (``shard``, see
``sequence_parallel.py``) the projections run on this rank's positions for all heads; ``split_heads``
exchanges them for all positions of this rank's heads, the attention kernel runs as in one process, and
``merge_heads`` exchanges the output back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.lsh import mask_values  # (importing the package registers the ops)
from reformer_dist.model.rng import GeneratorHolder, draw_seed, positional_dropout
from reformer_dist.model.sequence_parallel import SequenceShard


def split_heads(x: Tensor, n_heads: int, shard: SequenceShard | None = None) -> Tensor:
    """(B, L, H*D) -> (B, H, L, D), a view of (B, L, H, D) memory. With a shard: (B, l, H*D) of the local
    positions -> (B, H/P, L, D), this rank's heads over the whole sequence."""
    b, length, _ = x.shape
    x = x.view(b, length, n_heads, -1)
    return (x if shard is None else shard.to_heads(x)).transpose(1, 2)


def merge_heads(x: Tensor, shard: SequenceShard | None = None) -> Tensor:
    """(B, H, L, D) -> (B, L, H*D). With a shard: (B, H/P, L, D) -> (B, l, H*D) of the local positions."""
    x = x.transpose(1, 2)
    if shard is not None:
        x = shard.to_sequence(x)
    b, length, h, d = x.shape
    return x.reshape(b, length, h * d)


def look_adjacent(x: Tensor, before: int, after: int, dim: int) -> Tensor:
    """Chunks along ``dim``, chunk elements along ``dim + 1``: each chunk concatenated with its
    ``before`` previous and ``after`` next chunks, wrapping around (HF's ``_look_adjacent``)."""
    parts = [x if i == 0 else torch.roll(x, shifts=-i, dims=dim) for i in range(-before, after + 1)]
    return torch.cat(parts, dim=dim + 1)


def local_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, chunk_len: int, chunks_before: int,
    chunks_after: int, causal: bool, dropout_p: float = 0.0, dropout_seed: int | None = None,
    head_offset: int = 0,
) -> Tensor:
    """Chunked attention with look-back/ahead (HF ``LocalSelfAttention``): keys / sqrt(D), no self-mask.

    q, k, v (B, H, L, D) with L a multiple of chunk_len; key_padding_mask (B, L) bool, True = real.
    Returns (B, H, L, D). Softmax runs in fp32. Dropout masks come from ``dropout_seed`` addressed by
    (head_offset + head, query position), so a slice of a layer's heads drops what the whole layer drops.
    """
    b, h, length, d = q.shape
    c = min(chunk_len, length)
    n = length // c
    masked, _ = mask_values(q.dtype)
    qc = q.reshape(b, h, n, c, d)
    kc = look_adjacent((k / math.sqrt(d)).reshape(b, h, n, c, d), chunks_before, chunks_after, 2)
    vc = look_adjacent(v.reshape(b, h, n, c, d), chunks_before, chunks_after, 2)
    scores = torch.matmul(qc, kc.transpose(-1, -2)).float()  # (B, H, n, c, W)
    pos = torch.arange(length, device=q.device).view(n, c)
    k_pos = look_adjacent(pos, chunks_before, chunks_after, 0)  # (n, W)
    allowed = None
    if causal:
        allowed = pos[:, :, None] >= k_pos[:, None, :]  # (n, c, W)
    if key_padding_mask is not None:
        real = look_adjacent(key_padding_mask.bool().view(b, 1, n, c), chunks_before, chunks_after, 2)
        real = real[:, :, :, None, :]  # (B, 1, n, 1, W)
        allowed = real if allowed is None else allowed & real
    if allowed is not None:
        scores = scores.masked_fill(~allowed, masked)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        rows = probs.view(b, h, length, -1)
        probs = torch.stack([positional_dropout(rows[:, i], dropout_p, dropout_seed, stream=head_offset + i)
                             for i in range(h)], dim=1).view_as(probs)
    return torch.matmul(probs.to(v.dtype), vc).reshape(b, h, length, d)


class HeadProjection(nn.Linear):
    """A bias-free projection to (or, ``merge=True``, from) n_heads * d_head features that can compute the
    features of a range of heads alone: the rows (or columns) of its weight that belong to them. Slicing
    happens inside the module's own forward, so hooks that gather a sharded weight before a module runs
    (ZeRO-3) fire as for any Linear; parameter names and shapes are nn.Linear's."""

    def __init__(self, d_model: int, n_heads: int, d_head: int, merge: bool = False):
        inner = n_heads * d_head
        super().__init__(inner if merge else d_model, d_model if merge else inner, bias=False)
        self.d_head, self.merge = d_head, merge

    def forward(self, x: Tensor, heads: tuple[int, int] | None = None) -> Tensor:
        """x (..., features) -> (..., features); ``heads`` = (first, count): only those heads' features
        (as output, or as the input columns of a merging projection)."""
        if heads is None:
            return F.linear(x, self.weight)
        cols = slice(heads[0] * self.d_head, (heads[0] + heads[1]) * self.d_head)
        return F.linear(x, self.weight[:, cols] if self.merge else self.weight[cols])


@dataclass(frozen=True)
class BranchDraw:
    """The randomness of one call of an attention branch, drawn once from its generator
    (``AttentionBlock.draw``), so any split of the call into head groups uses the same draw."""

    rotations: Tensor | None
    """LSH: random rotations of all heads (H, D, n_hashes, R/2); None for other kinds."""
    attention_seed: int | None
    """Seed of the attention-probability dropout (LSH: always drawn, the op's counter seed); None = off."""
    output_seed: int | None
    """Seed of the branch-output dropout; None = off."""


def head_range(n_heads: int, heads: tuple[int, int] | None, shard: SequenceShard | None) -> tuple[int, int]:
    """(first, count) of the heads this process attends over, for a call that computes ``heads`` (all by
    default) and exchanges them over ``shard`` (each rank of a group gets count / P of them)."""
    first, count = heads or (0, n_heads)
    if shard is None:
        return first, count
    return first + shard.rank * (count // shard.size), count // shard.size


class LSHSelfAttention(nn.Module):
    """Shared-QK LSH attention (``torch.ops.reformer.lsh_attention``) with HF's projections."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.n_heads, self.d_head = config.n_heads, config.d_head
        self.query_key = HeadProjection(config.d_model, config.n_heads, config.d_head)
        self.value = HeadProjection(config.d_model, config.n_heads, config.d_head)
        self.spec = config.lsh_spec()
        self.dropout = config.attn_dropout
        self.hash_seed = config.hash_seed
        self.frozen_rotations: Tensor | None = None  # set by ReformerLM.freeze_rotations (fp32, kept as is)

    def rotations(self, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """Random rotations (H, D, n_hashes, sum(n_buckets)//2) fp32: the frozen ones when frozen; with
        hash_seed set, the same ones every call (equal to HF's ``torch.manual_seed(hash_seed);
        torch.randn(...)`` on CPU); otherwise a fresh draw from ``generator``."""
        if self.frozen_rotations is not None:
            return self.frozen_rotations.to(device)
        shape = (self.n_heads, self.d_head, self.spec.n_hashes, sum(self.spec.n_buckets) // 2)
        if self.hash_seed is not None:
            generator = torch.Generator().manual_seed(self.hash_seed)
        return torch.randn(shape, generator=generator).to(device)

    def project(self, h: Tensor, heads: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """h (B, l, d_model) -> (qk, v), (B, l, count*D) each, for ``heads`` = (first, count) (all by default)."""
        return self.query_key(h, heads), self.value(h, heads)

    def forward(self, projected: tuple[Tensor, ...], key_padding_mask: Tensor | None, buckets: Tensor | None,
                draw: BranchDraw, shard: SequenceShard | None = None,
                heads: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """``project``'s (qk, v) -> (B, L, count*D) and the buckets (B, count, n_hashes, L) used, for ``heads``
        = (first, count) (all by default). With a shard, the projections hold the local positions and the
        buckets are those of this rank's count/P heads."""
        count = self.n_heads if heads is None else heads[1]
        qk, v = (split_heads(p, count, shard) for p in projected)
        first, local = head_range(self.n_heads, heads, shard)
        args = (qk, v, draw.rotations[first : first + local], key_padding_mask, buckets, *self.spec.op_args(),
                self.dropout if self.training else 0.0, draw.attention_seed)
        if local != self.n_heads:  # a slice of the heads: dropout counters keep the layer's head indices
            args = (*args, first, self.n_heads)
        if torch.is_grad_enabled() and (qk.requires_grad or v.requires_grad):
            # same op, but it hands its softmax statistics to its backward (one pass fewer there)
            out, buckets, _ = torch.ops.reformer.lsh_attention_with_stats(*args)
        else:
            out, buckets = torch.ops.reformer.lsh_attention(*args)
        return merge_heads(out, shard), buckets


class LocalSelfAttention(nn.Module):
    """Chunked local attention (``local_attention``) with separate query/key/value projections."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.query, self.key, self.value = (HeadProjection(config.d_model, config.n_heads, config.d_head)
                                            for _ in range(3))
        self.chunk_len = config.local_chunk_len
        self.chunks_before, self.chunks_after = config.local_chunks_before, config.local_chunks_after
        self.causal = config.causal
        self.dropout = config.attn_dropout if config.local_attn_dropout is None else config.local_attn_dropout

    def project(self, h: Tensor, heads: tuple[int, int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """h (B, l, d_model) -> (q, k, v), (B, l, count*D) each, for ``heads`` (all by default)."""
        return tuple(proj(h, heads) for proj in (self.query, self.key, self.value))

    def _split(self, projected: tuple[Tensor, ...], shard: SequenceShard | None,
               heads: tuple[int, int] | None) -> tuple[Tensor, ...]:
        count = self.n_heads if heads is None else heads[1]
        return tuple(split_heads(p, count, shard) for p in projected)

    def forward(self, projected: tuple[Tensor, ...], key_padding_mask: Tensor | None, buckets: Tensor | None,
                draw: BranchDraw | None, shard: SequenceShard | None = None,
                heads: tuple[int, int] | None = None) -> tuple[Tensor, None]:
        """``project``'s (q, k, v) -> (B, L, count*D) for ``heads`` (all by default); draw None = no dropout."""
        q, k, v = self._split(projected, shard, heads)
        seed = None if draw is None else draw.attention_seed
        out = local_attention(q, k, v, key_padding_mask, self.chunk_len, self.chunks_before, self.chunks_after,
                              self.causal, self.dropout if seed is not None else 0.0, seed,
                              head_range(self.n_heads, heads, shard)[0])
        return merge_heads(out, shard), None


class FullSelfAttention(LocalSelfAttention):
    """Exact O(L^2) attention, the reference mode: SDPA; with active attention dropout it runs the same
    math as one local chunk covering the sequence, because SDPA's dropout would draw from the global RNG."""

    def forward(self, projected: tuple[Tensor, ...], key_padding_mask: Tensor | None, buckets: Tensor | None,
                draw: BranchDraw | None, shard: SequenceShard | None = None,
                heads: tuple[int, int] | None = None) -> tuple[Tensor, None]:
        q, k, v = self._split(projected, shard, heads)
        length = q.shape[2]
        seed = None if draw is None else draw.attention_seed
        if seed is not None:
            out = local_attention(q, k, v, key_padding_mask, length, 0, 0, self.causal, self.dropout, seed,
                                  head_range(self.n_heads, heads, shard)[0])
        elif key_padding_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            allowed = key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
            if self.causal:
                allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return merge_heads(out, shard), None


ATTENTION_CLASSES = {"lsh": LSHSelfAttention, "local": LocalSelfAttention, "full": FullSelfAttention}


class AttentionBlock(GeneratorHolder):
    """F of the reversible pair: ``dropout(output(attention(LayerNorm(x))))``, upcast to x's dtype.

    ``forward`` runs it whole. It is three steps, each callable alone: ``project`` (the LayerNorm and the
    input projections) and ``project_out`` (the output projection and dropout) are position-wise, ``attend``
    needs the whole sequence. The reversible stack calls ``draw`` once and then, per group of heads, runs
    ``project`` and ``project_out`` in tiles of positions around one ``attend`` (each group adding its
    share of the output projection): no (B, L, d_model) temporary exists, only the group's attention
    tensors."""

    def __init__(self, config: ReformerConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.self_attention = ATTENTION_CLASSES[kind](config)
        self.output = HeadProjection(config.d_model, config.n_heads, config.d_head, merge=True)
        self.dropout = config.dropout

    def draw(self, device: torch.device) -> BranchDraw:
        """This call's randomness, from the block's generator (the reversible backward replays it)."""
        sa = self.self_attention
        rotations = sa.rotations(self.generator, device) if self.kind == "lsh" else None
        live = self.training and sa.dropout > 0
        if self.kind == "lsh":
            # LSH always takes a counter seed; frozen rotations mean deployment: no random draw unless
            # dropout is live (export traces this)
            attention_seed = draw_seed(self.generator) if sa.frozen_rotations is None or live else 0
        else:
            attention_seed = draw_seed(self.generator) if live else None
        output_seed = draw_seed(self.generator) if self.training and self.dropout > 0 else None
        return BranchDraw(rotations, attention_seed, output_seed)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, buckets: Tensor | None = None,
                shard: SequenceShard | None = None) -> tuple[Tensor, Tensor | None]:
        """x (B, L, d_model) -> (branch output (B, L, d_model), LSH buckets or None). With a shard, x holds
        this rank's positions and key_padding_mask covers the whole sequence."""
        draw = self.draw(x.device)
        a, buckets = self.attend(self.project(x), key_padding_mask, buckets, shard, draw)
        start = 0 if shard is None else shard.start(x.shape[1])
        return self.project_out(a, draw, start).to(x.dtype), buckets

    def project(self, x: Tensor, heads: tuple[int, int] | None = None) -> tuple[Tensor, ...]:
        """x (B, l, d_model) -> the LayerNorm'd input's projections for ``heads`` = (first, count) (all by
        default): (qk, v) for LSH, (q, k, v) otherwise, (B, l, count*D) each, in the compute dtype."""
        return self.self_attention.project(self.layer_norm(x), heads)

    def attend(self, projected: tuple[Tensor, ...], key_padding_mask: Tensor | None, buckets: Tensor | None,
               shard: SequenceShard | None, draw: BranchDraw,
               heads: tuple[int, int] | None = None) -> tuple[Tensor, Tensor | None]:
        """The attention of ``heads`` over the whole sequence, from ``project``'s tensors (of this rank's
        positions under a shard): (B, l, count*D) and the LSH buckets (None for other kinds)."""
        return self.self_attention(projected, key_padding_mask, buckets, draw, shard, heads)

    def project_out(self, a: Tensor, draw: BranchDraw, start: int, heads: tuple[int, int] | None = None) -> Tensor:
        """``attend``'s output at positions [start, start + l) -> that share of the branch output
        (B, l, d_model) in the compute dtype (output dropout addressed by position)."""
        out = self.output(a, heads)
        if draw.output_seed is not None:
            out = positional_dropout(out, self.dropout, draw.output_seed, start)
        return out

"""The attention branch of a Reformer layer: LayerNorm -> self-attention (LSH, local or full) -> output.

Each kind keeps HF's parameter meaning so checkpoints map 1:1: LSH has ``query_key`` and ``value``
(shared-QK), local and full have ``query``, ``key`` and ``value``; all without bias. The branch module
(``AttentionBlock``) owns the layer's private generator: LSH rotations, the attention-dropout seed and
the output dropout all come from it, so the reversible backward replays them by restoring its state.

Under sequence parallelism (``shard``, see ``sequence_parallel.py``) the projections run on this rank's
positions for all heads; ``split_heads`` exchanges them for all positions of this rank's heads, the
attention kernel runs as in one process, and ``merge_heads`` exchanges the output back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import reformer_dist.model.lsh_attention  # noqa: F401  (registers torch.ops.reformer.lsh_attention)
from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.lsh_attention import mask_values
from reformer_dist.model.rng import GeneratorHolder, draw_seed, dropout, positional_dropout
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
    chunks_after: int, causal: bool, dropout_p: float = 0.0, generator: torch.Generator | None = None,
    head_offset: int = 0,
) -> Tensor:
    """Chunked attention with look-back/ahead (HF ``LocalSelfAttention``): keys / sqrt(D), no self-mask.

    q, k, v (B, H, L, D) with L a multiple of chunk_len; key_padding_mask (B, L) bool, True = real.
    Returns (B, H, L, D). Softmax runs in fp32. Dropout masks are addressed by (head_offset + head,
    query position), so a slice of a layer's heads draws what the whole layer draws for them.
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
        seed = draw_seed(generator)
        rows = probs.view(b, h, length, -1)
        probs = torch.stack([positional_dropout(rows[:, i], dropout_p, seed, stream=head_offset + i)
                             for i in range(h)], dim=1).view_as(probs)
    return torch.matmul(probs.to(v.dtype), vc).reshape(b, h, length, d)


class LSHSelfAttention(nn.Module):
    """Shared-QK LSH attention (``torch.ops.reformer.lsh_attention``) with HF's projections."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        inner = config.n_heads * config.d_head
        self.n_heads, self.d_head = config.n_heads, config.d_head
        self.query_key = nn.Linear(config.d_model, inner, bias=False)
        self.value = nn.Linear(config.d_model, inner, bias=False)
        self.n_buckets = config.lsh_bucket_factors()
        self.n_hashes = config.lsh_n_hashes
        self.chunk_len = config.lsh_chunk_len
        self.chunks_before, self.chunks_after = config.lsh_chunks_before, config.lsh_chunks_after
        self.window, self.causal = config.lsh_window, config.causal
        self.dropout = config.attn_dropout
        self.hash_seed = config.hash_seed

    def rotations(self, generator: torch.Generator, device: torch.device) -> Tensor:
        """Random rotations (H, D, n_hashes, sum(n_buckets)//2) fp32. With hash_seed set, the same ones every
        call (equal to HF's ``torch.manual_seed(hash_seed); torch.randn(...)`` on CPU)."""
        shape = (self.n_heads, self.d_head, self.n_hashes, sum(self.n_buckets) // 2)
        if self.hash_seed is not None:
            generator = torch.Generator().manual_seed(self.hash_seed)
        return torch.randn(shape, generator=generator).to(device)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None, buckets: Tensor | None,
                generator: torch.Generator, shard: SequenceShard | None = None) -> tuple[Tensor, Tensor]:
        """x (B, L, d_model) -> (B, L, H*D) and the buckets (B, H, n_hashes, L) used. With a shard, x holds
        the local positions and the buckets are those of this rank's heads (B, H/P, n_hashes, L)."""
        qk = split_heads(self.query_key(x), self.n_heads, shard)
        v = split_heads(self.value(x), self.n_heads, shard)
        rotations = self.rotations(generator, x.device)  # all heads' draw, sliced under a shard
        seed = draw_seed(generator)
        args = (qk, v, rotations, key_padding_mask, buckets, self.n_buckets, self.chunk_len, self.chunks_before,
                self.chunks_after, self.window, self.causal, self.dropout if self.training else 0.0, seed)
        if shard is not None:
            first, count = shard.heads(self.n_heads)
            args = (qk, v, rotations[first : first + count], *args[3:], first, self.n_heads)
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
        inner = config.n_heads * config.d_head
        self.n_heads = config.n_heads
        self.query = nn.Linear(config.d_model, inner, bias=False)
        self.key = nn.Linear(config.d_model, inner, bias=False)
        self.value = nn.Linear(config.d_model, inner, bias=False)
        self.chunk_len = config.local_chunk_len
        self.chunks_before, self.chunks_after = config.local_chunks_before, config.local_chunks_after
        self.causal = config.causal
        self.dropout = config.attn_dropout if config.local_attn_dropout is None else config.local_attn_dropout

    def forward(self, x: Tensor, key_padding_mask: Tensor | None, buckets: Tensor | None,
                generator: torch.Generator, shard: SequenceShard | None = None) -> tuple[Tensor, None]:
        q, k, v = (split_heads(proj(x), self.n_heads, shard) for proj in (self.query, self.key, self.value))
        out = local_attention(q, k, v, key_padding_mask, self.chunk_len, self.chunks_before, self.chunks_after,
                              self.causal, self.dropout if self.training else 0.0, generator,
                              0 if shard is None else shard.heads(self.n_heads)[0])
        return merge_heads(out, shard), None


class FullSelfAttention(LocalSelfAttention):
    """Exact O(L^2) attention, the reference mode: SDPA; with active attention dropout it runs the same
    math as one local chunk covering the sequence, because SDPA's dropout would draw from the global RNG."""

    def forward(self, x: Tensor, key_padding_mask: Tensor | None, buckets: Tensor | None,
                generator: torch.Generator, shard: SequenceShard | None = None) -> tuple[Tensor, None]:
        q, k, v = (split_heads(proj(x), self.n_heads, shard) for proj in (self.query, self.key, self.value))
        length = q.shape[2]
        if self.training and self.dropout > 0:
            out = local_attention(q, k, v, key_padding_mask, length, 0, 0, self.causal, self.dropout, generator,
                                  0 if shard is None else shard.heads(self.n_heads)[0])
        elif key_padding_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            allowed = key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
            if self.causal:
                allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return merge_heads(out, shard), None


ATTENTION_CLASSES = {"lsh": LSHSelfAttention, "local": LocalSelfAttention, "full": FullSelfAttention}


class AttentionBlock(GeneratorHolder):
    """F of the reversible pair: ``dropout(output(attention(LayerNorm(x))))``, upcast to x's dtype."""

    def __init__(self, config: ReformerConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.self_attention = ATTENTION_CLASSES[kind](config)
        self.output = nn.Linear(config.n_heads * config.d_head, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, buckets: Tensor | None = None,
                shard: SequenceShard | None = None) -> tuple[Tensor, Tensor | None]:
        """x (B, L, d_model) -> (branch output (B, L, d_model), LSH buckets or None). With a shard, x holds
        this rank's positions and key_padding_mask covers the whole sequence."""
        h, buckets = self.self_attention(self.layer_norm(x), key_padding_mask, buckets, self.generator, shard)
        start = 0 if shard is None else shard.start(x.shape[1])
        out = dropout(self.output(h), self.dropout, self.generator, self.training, start)
        return out.to(x.dtype), buckets

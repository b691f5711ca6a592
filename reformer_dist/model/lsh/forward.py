"""Steps 3-4 of LSH attention, the forward: attend over the sorted order, unsort, combine the rounds.

Normalisation. 'bucket' keeps every softmax statistic as (row max, log of the shifted sum) and folds the
rounds into one softmax over the union of their windows (``LSE = logsumexp_r(lse_r)``, never rounded at
the -1e5 self-mask scale). 'chunk' exists for parity with HF checkpoints, so it reproduces HF's fp32
arithmetic instead: per round ``p = exp(s - lse_r)`` with ``lse_r = max + log(sum)`` rounded in fp32, and
round weights ``exp(lse_r - logsumexp(lse))``. At -1e5 that rounding is visible (a token that sees only
itself gets ~0.997 of its value in HF), and parity needs it.

``lsh_attention_reference`` is the op's semantics in plain differentiable PyTorch: the spec of the Triton
kernels and of the ONNX function body.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from reformer_dist.model import buffer_pool
from reformer_dist.model.lsh.hashing import buckets_or_hash
from reformer_dist.model.lsh.layout import (
    SortedLayout,
    Window,
    as_rows,
    block_scores,
    blocks,
    dropout_keep,
    from_rows,
    heads_inner,
)
from reformer_dist.model.lsh.spec import LshSpec, acc_dtype, check_inputs, mask_values


def attend_sorted(
    q: Tensor, v: Tensor, layout: SortedLayout, win: Window, dropout_p: float, dropout_seed: int
) -> tuple[Tensor | list[Tensor], Tensor, Tensor]:
    """Attention over the sorted order, block by block, on rows: q, v (B*H*L, D) (``as_rows``).

    Returns per-round outputs ``o`` (n, B*H*L, D) in v's dtype (under a training pass's buffer pool, n
    separate (B*H*L, D) tensors: the size of the op's other whole-sequence tensors, so the pool hands the
    same buffers round after round and to the backward's gradients, ``buffer_pool``) and the per-round
    softmax statistics ``row_max`` and ``log_sum`` (n, B*H*L) (logsumexp = row_max + log_sum), un-sorted
    to the input rows.
    The statistics are kept apart because row maxima sit at -1e5 for rows that only see themselves: one
    fp32 logsumexp there would lose ~4e-3 ('bucket' avoids that; 'chunk' reproduces it, as HF rounds
    there). Differentiable with ordinary autograd (the reference); the op's forward runs it under no_grad,
    where it works in place.
    """
    d, rows_total = q.shape[-1], q.shape[0]
    self_masked = mask_values(q.dtype)[1]
    acc = acc_dtype(q.dtype)
    n, length = layout.n_hashes, layout.length
    pooled = buffer_pool.pooled((rows_total, d), v.dtype, q.device) and not (q.requires_grad or v.requires_grad)
    if pooled:
        o = [buffer_pool.empty((rows_total, d), v.dtype, q.device) for _ in range(n)]
    else:  # one allocation, returned whole when the rounds are combined
        o = torch.empty(n * rows_total, d, device=q.device, dtype=v.dtype)
    row_max = torch.empty(n * rows_total, device=q.device, dtype=acc)
    log_sum = torch.empty_like(row_max)
    for block in blocks(layout, win):
        flat, scores, m, *_ = block_scores(block, q, self_masked)  # m: a shift, not differentiated
        in_place = not scores.requires_grad
        probs = scores.sub_(m).exp_() if in_place else torch.exp(scores - m)  # in place: flat holds them
        total = probs.sum(dim=-1, keepdim=True)
        if dropout_p > 0:
            keep = dropout_keep(dropout_seed, layout.bh_ids, layout.n_total, block.first * block.c,
                                tuple(probs.shape), dropout_p, probs.device)
            probs, in_place = probs * keep / (1.0 - dropout_p), False
        log_total = total.log()
        # normalise the (c, D) output rather than the (c, W) probabilities; 'chunk' as HF:
        # exp(s - lse) = exp(s - m) * exp(m - lse) with lse = m + log(sum) rounded in fp32
        norm = torch.exp(m - (m + log_total)) if win.kind == "chunk" else total.reciprocal()
        # straddling windows' rows of ``flat`` hold raw scores: their outputs are computed and ignored
        probs_flat = flat if in_place else block.to_flat(probs)
        ob = block.valid(torch.bmm(probs_flat.to(v.dtype), block.flat_windows(block.span(v)))) * norm.to(v.dtype)
        first, last = block.first * block.c, block.last * block.c  # the block's sorted entries
        rows = layout.dest[:, first:last].flatten()
        row_max.index_copy_(0, rows, m.flatten())
        log_sum.index_copy_(0, rows, log_total.flatten())
        if not pooled:
            o.index_copy_(0, rows, ob.flatten(0, 2))
            continue
        entries = ob.flatten(1, 2)  # (BH, entries, D); the sorted order holds round r at [r*L, (r+1)*L)
        for r in range(first // length, (last - 1) // length + 1):
            lo, hi = max(first, r * length), min(last, (r + 1) * length)
            o[r].index_copy_(0, layout.flat_pos[:, lo:hi].flatten(), entries[:, lo - first : hi - first].flatten(0, 1))
    return (o if pooled else o.view(n, rows_total, d)), row_max.view(n, rows_total), log_sum.view(n, rows_total)


def round_weights(row_max: Tensor, log_sum: Tensor, hf_rounding: bool) -> Tensor:
    """Softmax over rounds (dim 0) of the per-round logsumexps ``row_max + log_sum``; with ``hf_rounding``
    HF's ``exp(lse - logsumexp(lse))`` on the fp32-rounded sums (weights then need not sum to 1)."""
    if hf_rounding:
        lse = row_max + log_sum
        return torch.exp(lse - torch.logsumexp(lse, dim=0, keepdim=True))
    top = row_max.amax(dim=0, keepdim=True)
    return torch.softmax((row_max - top) + log_sum, dim=0)


def combine_rounds(o: Tensor | list[Tensor], row_max: Tensor, log_sum: Tensor, hf_rounding: bool) -> Tensor:
    """``sum_r o_r * exp(lse_r - logsumexp_r lse)``: o (n, R, D) or the n pooled rounds (R, D) of
    ``attend_sorted``, stats (n, R) -> (R, D)."""
    w = round_weights(row_max, log_sum, hf_rounding).unsqueeze(-1).to(o[0].dtype)
    if isinstance(o, Tensor):
        return (o * w).sum(dim=0) if o.requires_grad else o.mul_(w).sum(dim=0)  # the op's forward: in place
    out = o[0].mul_(w[0])  # pooled rounds (no grad): summed in place into the first
    for r in range(1, len(o)):
        out.add_(o[r].mul_(w[r]))
    return out


def pad_rounds(row_max: Tensor, log_sum: Tensor, n_hashes: int) -> Tensor:
    """Stack the per-round stats (n, R) into (2, n_hashes, R), rounds a plain attention skipped as (-inf, 0)."""
    stats = torch.stack([row_max, log_sum])
    missing = n_hashes - stats.shape[1]
    if missing:
        pad = stats.new_zeros(2, missing, stats.shape[2])
        pad[0] = -math.inf
        stats = torch.cat([stats, pad], dim=1)
    return stats


def probability_terms(stats: Tensor, hf_rounding: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per (round, row) terms (n*R,) of the probabilities the forward used: ``P = exp(s - a - b) * w``.

    Precise ('bucket'): one softmax over all rounds' windows, a = top, b = log_total (LSE = top +
    log_total, kept apart), no w. HF ('chunk'): a = lse_r = row_max + log_sum (rounded as HF), no b,
    w = the round weights.
    """
    row_max, log_sum = stats[0], stats[1]
    if hf_rounding:
        return (row_max + log_sum).flatten(), None, round_weights(row_max, log_sum, True).flatten()
    top = row_max.amax(dim=0, keepdim=True)
    log_total = torch.logsumexp((row_max - top) + log_sum, dim=0, keepdim=True)
    n = row_max.shape[0]
    return top.expand(n, -1).flatten(), log_total.expand(n, -1).flatten(), None


def lsh_attention_forward(
    qk: Tensor, v: Tensor, rotations: Tensor, key_padding_mask: Tensor | None, buckets: Tensor | None,
    spec: LshSpec, dropout_p: float = 0.0, dropout_seed: int = 0, head_offset: int = 0, n_heads_total: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The op's semantics in plain differentiable PyTorch: (out, buckets, per-round softmax statistics
    (2, n_hashes, B*H*L)). ``head_offset``/``n_heads_total`` (0 = the input's H) place the input's heads
    among a layer's heads for the dropout counters (``SortedLayout.bh_ids``)."""
    check_inputs(qk, v, rotations, buckets, spec)
    inner = heads_inner(v)
    buckets = buckets_or_hash(qk, rotations, key_padding_mask, buckets, spec)
    win = Window(spec, dropout_p, qk.shape[2])
    layout = win.layout(buckets, key_padding_mask, inner, head_offset, n_heads_total)
    o, row_max, log_sum = attend_sorted(as_rows(qk, inner), as_rows(v, inner), layout, win, dropout_p,
                                        dropout_seed)
    stats = pad_rounds(row_max.detach(), log_sum.detach(), spec.n_hashes)
    out = combine_rounds(o, row_max, log_sum, spec.hf_rounding)
    return from_rows(out, tuple(qk.shape), inner), buckets, stats


def lsh_attention_reference(
    qk: Tensor, v: Tensor, rotations: Tensor, key_padding_mask: Tensor | None, buckets: Tensor | None,
    spec: LshSpec, dropout_p: float = 0.0, dropout_seed: int = 0, head_offset: int = 0, n_heads_total: int = 0,
) -> tuple[Tensor, Tensor]:
    """The op's semantics in plain differentiable PyTorch (autograd backward): (out (B, H, L, D) in v's
    dtype, buckets (B, H, n_hashes, L))."""
    out, buckets, _ = lsh_attention_forward(qk, v, rotations, key_padding_mask, buckets, spec, dropout_p,
                                            dropout_seed, head_offset, n_heads_total)
    return out, buckets

"""The backward of LSH attention, flash-style.

It saves only qk, v, the output, the buckets and the per-round softmax statistics, recomputes the scores
block by block and uses ``delta = rowsum(dO * O)``. For both normalisations the score gradient is
``dS = P * (dP - delta)`` with P the probabilities the forward used (for 'chunk', ``p_r * w_r`` with HF's
rounded terms, which is what autograd through HF's code computes; ``forward.probability_terms``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from reformer_dist.model import buffer_pool
from reformer_dist.model.lsh.forward import pad_rounds, probability_terms
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
from reformer_dist.model.lsh.spec import LshSpec, acc_dtype, mask_values


def _recompute_stats(layout: SortedLayout, q: Tensor, win: Window, self_masked: float, n_hashes: int) -> Tensor:
    """The forward's softmax statistics (2, n_hashes, rows) from one scores-only pass over the blocks."""
    rows_total, n, c = q.shape[0], layout.n_hashes, layout.chunk_len
    row_max = torch.empty(n * rows_total, device=q.device, dtype=acc_dtype(q.dtype))
    log_sum = torch.empty_like(row_max)
    for block in blocks(layout, win):
        _, scores, m, *_ = block_scores(block, q, self_masked)
        rows = layout.dest[:, block.first * c : block.last * c].flatten()
        row_max.index_copy_(0, rows, m.flatten())
        log_sum.index_copy_(0, rows, scores.sub_(m).exp_().sum(-1).log_().flatten())
    return pad_rounds(row_max.view(n, rows_total), log_sum.view(n, rows_total), n_hashes)


def lsh_attention_backward_reference(
    grad_out: Tensor, qk: Tensor, v: Tensor, out: Tensor, buckets: Tensor, key_padding_mask: Tensor | None,
    stats: Tensor | None, spec: LshSpec, dropout_p: float = 0.0, dropout_seed: int = 0, head_offset: int = 0,
    n_heads_total: int = 0,
) -> tuple[Tensor, Tensor]:
    """(grad_qk, grad_v) of ``lsh_attention_reference`` for ``grad_out``, flash-style (see the module
    docstring). ``stats`` (2, n_hashes, B*H*L) from the forward, or None to recompute them."""
    inner = heads_inner(v)
    win = Window(spec, dropout_p, qk.shape[2])
    layout = win.layout(buckets, key_padding_mask, inner, head_offset, n_heads_total)
    q, vf = as_rows(qk, inner), as_rows(v, inner)
    rows_total, d = q.shape
    self_masked = mask_values(qk.dtype)[1]
    acc = acc_dtype(qk.dtype)
    c, bh = win.chunk, layout.bh

    if stats is None:
        stats = _recompute_stats(layout, q, win, self_masked, spec.n_hashes)
    shift, log_norm, weight = probability_terms(stats[:, : layout.n_hashes], spec.hf_rounding)

    go = as_rows(grad_out, inner)
    delta = (go.to(acc) * as_rows(out, inner).to(acc)).sum(-1)  # (rows,) rowsum(dO * O)
    grad_qk = buffer_pool.zeros((rows_total, d), acc, qk.device)
    grad_v = buffer_pool.zeros((rows_total, d), acc, qk.device)
    # P as the forward formed it (``probability_terms``); dS = P * (dP - delta), zero on self entries
    for block in blocks(layout, win):
        flat, scores, _, qf, kf, q_span, scale_span = block_scores(block, q, self_masked)
        q_flat = block.q_rows.flatten()
        entries = layout.dest[:, block.first * c : block.last * c].flatten()  # (round, row) of each
        row_shape = (bh, block.nb, c, 1)
        probs = scores.sub_(shift[entries].view(row_shape))
        if log_norm is not None:
            probs.sub_(log_norm[entries].view(row_shape))
        probs = probs.exp_()
        if weight is not None:
            probs.mul_(weight[entries].view(row_shape))
        block.zero_invalid(flat)  # flat now holds P (the probs were formed in place), 0 where it straddles
        go_f = block.flat_queries(block.span(go))  # (T, c, D)
        dp_flat = block.zero_invalid(torch.bmm(go_f, block.flat_windows(block.span(vf)).transpose(1, 2)).to(acc))
        dp = block.valid(dp_flat)  # (BH, nb, c, W)
        if dropout_p > 0:
            keep = dropout_keep(dropout_seed, layout.bh_ids, layout.n_total, block.first * c, tuple(probs.shape), dropout_p,
                                probs.device).to(acc) / (1.0 - dropout_p)
            dp.mul_(keep)
            p_drop = block.to_flat(probs * keep)
        else:
            p_drop = flat
        dv = torch.bmm(p_drop.transpose(1, 2).to(go.dtype), go_f)  # (T, W, D)
        block.zero_self(dp.sub_(delta[q_flat].view(row_shape)).mul_(probs))  # dS, in dp_flat
        ds = dp_flat.to(qk.dtype)
        block.accumulate(grad_qk, grad_v, torch.bmm(ds, kf), torch.bmm(ds.transpose(1, 2), qf), dv, q_span,
                         scale_span)
    return (from_rows(grad_qk.to(qk.dtype), tuple(qk.shape), inner),
            from_rows(grad_v.to(v.dtype), tuple(v.shape), inner))

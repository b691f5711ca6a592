"""Steps 2-3 of LSH attention: the sorted layout, the windows over it, and blocks of scores.

Every (round, position) is sorted by (round, bucket, position) (``sort_by_bucket``); attention then runs
in chunks of the sorted order, one ``Block`` of chunks at a time so the (chunks, c, window) score tensor
never exists whole. Queries are ``qk`` itself; keys are ``qk`` normalised to unit length and divided by
sqrt(D) (HF: ``qk * rsqrt(mean(qk^2) + 1e-6) / sqrt(D)``, ``normalize_keys``), built per block.

Inputs may be laid out as (B, H, L, D) or as the (B, L, H, D) memory that head-splitting a projection
gives (``x.view(B, L, H, D).transpose(1, 2)``): the op works on rows of that memory directly
(``as_rows``/``from_rows``), so neither side pays for ``.contiguous()`` copies.

Attention-probability dropout uses a counter-based hash of (seed, batch*head, sorted query, window slot)
(``dropout_keep``), so its mask is independent of the block size and can be regenerated in the backward
without state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from reformer_dist.model.lsh.spec import LshSpec, acc_dtype

# Score elements per block of chunks (all batch*heads together). On CPU 4 MiB of fp32 scores: enough work
# per block that op-launch and thread-sync overheads stay small (measured: no slower than 16 MiB blocks at
# 16K tokens), and small temporaries keep the allocator's peak low at any length. On an accelerator each
# of a block's ~30 ops is a kernel launch, so blocks are 16x larger there (still a fixed bound).
BLOCK_SCORES = 1 << 20
ACCELERATOR_BLOCK_SCORES = 1 << 24


def heads_inner(x: Tensor) -> bool:
    """Whether a (B, H, L, D) tensor is a head-split view of (B, L, H, D) memory (rows ordered b, pos, h)."""
    return not x.is_contiguous() and x.transpose(1, 2).is_contiguous()


def as_rows(x: Tensor, inner: bool) -> Tensor:
    """(B*H*L, D) rows of a (B, H, L, D) tensor in the given layout (a view when x already has it)."""
    return (x.transpose(1, 2) if inner else x).contiguous().view(-1, x.shape[-1])


def from_rows(rows: Tensor, shape: tuple[int, ...], inner: bool) -> Tensor:
    """Inverse of ``as_rows``: the (B, H, L, D) view of rows laid out as ``inner`` says."""
    b, h, length, d = shape
    return rows.view(b, length, h, d).transpose(1, 2) if inner else rows.view(b, h, length, d)


def key_scale(x: Tensor) -> Tensor:
    """Per-row factor of ``normalize_keys`` in the accumulation dtype: rsqrt(mean(x^2) + 1e-6) / sqrt(D),
    shape (..., 1)."""
    x = x.to(acc_dtype(x.dtype))
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(x.shape[-1])


def normalize_keys(qk: Tensor) -> Tensor:
    """Keys of shared-QK attention: unit length and divided by sqrt(D) (HF's ``_len_and_dim_norm``)."""
    return (qk.to(acc_dtype(qk.dtype)) * key_scale(qk)).to(qk.dtype)


def normalize_keys_backward(x: Tensor, grad_k: Tensor, scale: Tensor) -> Tensor:
    """Vector-Jacobian product of ``normalize_keys`` at rows x with ``scale = key_scale(x)``:
    ``s * (g - x * s^2 * (g . x))``. Linear in grad_k row by row, so partial sums may be mapped."""
    x = x.to(scale.dtype)
    return scale * (grad_k - x * scale.square() * (grad_k * x).sum(-1, keepdim=True))


# ------------------------------------------------------------------------------ sorted-order attention
class SortedLayout:
    """Everything about one sort that the attention blocks need, flattened over batch*heads.

    ``sorted_idx`` (BH, N) with N = n*L holds ``r*L + pos``; ``pos`` (BH, N) the original positions;
    ``flat_pos`` (BH, N) the row of each sorted entry in the (B*H*L, D) rows of qk / v (``as_rows`` with
    layout ``inner``); ``bucket_key`` (BH, N)
    the (round, bucket) id; ``key_pos`` (BH, N) the position, or L for padding (so ``q_pos >= key_pos`` is
    the causal-and-not-padding test and ``key_pos < L`` the padding test); ``dest`` (BH, N) the row of each
    sorted entry in per-round (n*B*H*L, ...) outputs and statistics, ``r * B*H*L + flat_pos``; ``bh_ids``
    (BH,) each batch*head's index in the dropout counters, ``b * n_heads_total + head_offset + h`` (under
    sequence parallelism a call's heads are a slice of the layer's: the counters stay those of one process).
    """

    def __init__(self, buckets: Tensor, key_padding_mask: Tensor | None, chunk_len: int, inner: bool,
                 head_offset: int = 0, n_heads_total: int = 0):
        b, h, n, length = buckets.shape
        sorted_idx, bucket_key = sort_by_bucket(buckets)
        self.bh, self.n_hashes, self.length, self.chunk_len = b * h, n, length, chunk_len
        self.n_total = n * length
        self.n_chunks = self.n_total // chunk_len
        self.sorted_idx = sorted_idx.view(b * h, -1)
        self.bucket_key = bucket_key.view(b * h, -1)
        self.pos = self.sorted_idx % length
        if inner:  # rows ordered (b, pos, h)
            bi = torch.arange(b, device=buckets.device).repeat_interleave(h).unsqueeze(1)
            hi = torch.arange(h, device=buckets.device).repeat(b).unsqueeze(1)
            self.flat_pos = (bi * length + self.pos) * h + hi
        else:
            self.flat_pos = torch.arange(b * h, device=buckets.device).unsqueeze(1) * length + self.pos
        if key_padding_mask is None:
            self.key_pos = self.pos
        else:
            real = key_padding_mask.bool().repeat_interleave(h, dim=0)  # (BH, L)
            self.key_pos = torch.where(torch.gather(real, 1, self.pos), self.pos, length)
        self.dest = (self.sorted_idx // length) * (self.bh * length) + self.flat_pos
        heads = torch.arange(h, device=buckets.device) + head_offset
        self.bh_ids = (torch.arange(b, device=buckets.device)[:, None] * (n_heads_total or h) + heads).flatten()

class Window:
    """What a query sees, and how it is computed: ``chunk`` (the compute chunk length), ``offsets`` (the
    chunks a query chunk sees, relative to its own; ``LshSpec.compute_chunks``), ``reach`` ('bucket':
    sorted slots back/ahead)."""

    def __init__(self, spec: LshSpec, dropout_p: float, length: int):
        self.spec, self.kind, self.causal, self.reach = spec, spec.window, spec.causal, spec.chunk_len
        # HF skips hashing when the sequence fits in one chunk: one round, the chunk sees only itself
        self.plain = spec.is_plain(length)
        self.chunk, self.offsets = (spec.chunk_len, [0]) if self.plain else spec.compute_chunks(dropout_p)

    def layout(self, buckets: Tensor, key_padding_mask: Tensor | None, inner: bool, head_offset: int = 0,
               n_heads_total: int = 0) -> SortedLayout:
        """The sorted order this window attends over (``attended_buckets``)."""
        return SortedLayout(attended_buckets(buckets, self.spec), key_padding_mask, self.chunk, inner,
                            head_offset, n_heads_total)


def attended_buckets(buckets: Tensor, spec: LshSpec) -> Tensor:
    """The buckets to sort by: all hash rounds, or for a plain attention one unhashed round (B, H, 1, L)."""
    return torch.zeros_like(buckets[:, :, :1]) if spec.is_plain(buckets.shape[-1]) else buckets


def sort_by_bucket(buckets: Tensor) -> tuple[Tensor, Tensor]:
    """Stable sort of all (round, position) pairs by (round, bucket, position).

    buckets (B, H, n, L) without round offsets. Returns ``sorted_idx`` (B, H, n*L) holding ``r*L + pos``
    in sorted order, and the sorted keys ``round * 2**32 + bucket`` (B, H, n*L), which identify
    (round, bucket) pairs. The extra bucket (padding) sorts last within its round.
    """
    n = buckets.shape[2]
    # any stride above the largest bucket keeps the rounds apart and in order
    offsets = torch.arange(n, device=buckets.device).view(1, 1, n, 1) << 32
    keys = (buckets + offsets).flatten(2)
    sorted_keys, sorted_idx = torch.sort(keys, dim=-1, stable=True)
    return sorted_idx, sorted_keys


def _fill(t: Tensor, mask: Tensor, value: float) -> Tensor:
    """masked_fill, in place unless autograd needs the original (the reference path)."""
    return t.masked_fill(mask, value) if t.requires_grad else t.masked_fill_(mask, value)


class Block:
    """One block of query chunks [first, last) of the sorted order and its key windows.

    The keys of all windows come from the contiguous chunk span [first + min(offsets), last + max(offsets))
    (wrapping around): ``span_rows`` (BH, n_span*c) are their rows in the flat (B*H*L, D) inputs, gathered
    once per block. ``q_rows`` (BH, nb*c) are the query rows.

    The window offsets are consecutive, so a query chunk's window is one contiguous run of ``n_off`` span
    chunks, and consecutive windows overlap. The matmuls therefore run on the span with batch*head folded
    into the chunk axis, as T = BH*n_span - n_off + 1 overlapping windows (``flat_windows``, a strided
    view: no window is ever copied out) against T query chunks (``flat_queries``). The last n_off - 1
    windows of each batch*head straddle into the next one: they are computed and ignored (``valid`` views
    the (BH, nb, ...) rows that count, ``zero_invalid`` clears the others before anything sums over them).
    """

    def __init__(self, layout: SortedLayout, first: int, last: int, win: Window):
        c, nc, bh, dev = layout.chunk_len, layout.n_chunks, layout.bh, layout.sorted_idx.device
        offsets, window, causal, reach = win.offsets, win.kind, win.causal, win.reach
        self.first, self.last, self.nb, self.c, self.bh = first, last, last - first, c, bh
        self.window, self.causal, self.length = window, causal, layout.length
        lo, hi = min(offsets), max(offsets)
        assert offsets == list(range(lo, hi + 1)), offsets  # consecutive: windows are contiguous spans
        self.n_off = len(offsets)
        self.n_span = self.nb + hi - lo
        self.n_flat = bh * self.n_span - self.n_off + 1  # T: windows in the flat span, valid or not
        self.span_q_start = -lo  # where the query chunks start within the span
        span_chunks = torch.arange(first + lo, last + hi, device=dev) % nc
        self.span_rows = layout.flat_pos.view(bh, nc, c)[:, span_chunks].flatten(1)
        self.q_rows = self.span_rows[:, -lo * c : (self.nb - lo) * c]

        raw_chunks = torch.arange(first, last, device=dev)[:, None] + torch.tensor(offsets, device=dev)  # (nb, n_off)
        slot = torch.arange(c, device=dev)
        key_sidx = ((raw_chunks % nc)[:, :, None] * c + slot).flatten()  # (nb*W,) sorted index, wrapped
        rows = slice(first * c, last * c)
        shape_q, shape_k = (bh, self.nb, c, 1), (bh, self.nb, 1, len(offsets) * c)
        if window == "chunk":  # HF: causal on original positions, padding keys masked, wrap-around
            self.q_pos = layout.pos[:, rows].reshape(shape_q)
            self.k_pos = layout.key_pos[:, key_sidx].view(shape_k)  # L for padding
            self.is_self = self.q_pos == layout.pos[:, key_sidx].view(shape_k)
        else:  # same (round, bucket), at most `reach` sorted slots back (or ahead): a static band per chunk
            self.q_key = layout.bucket_key[:, rows].reshape(shape_q)
            in_range = ((raw_chunks >= 0) & (raw_chunks < nc)).repeat_interleave(c, dim=1)  # (nb, W)
            self.k_key = layout.bucket_key[:, key_sidx].view(shape_k).masked_fill(~in_range[:, None, :], -1)
            lag = slot[:, None] - (torch.tensor(offsets, device=dev)[:, None] * c + slot).flatten()  # (c, W)
            self.out_of_band = (lag > reach) | (lag < (0 if causal else -reach))

    def span(self, x: Tensor) -> Tensor:
        """Rows of x (B*H*L, ...) for the key span: (BH, n_span, c, ...), contiguous."""
        return x.index_select(0, self.span_rows.flatten()).view(self.bh, self.n_span, self.c, *x.shape[1:])

    def flat_queries(self, span: Tensor) -> Tensor:
        """The query chunk of every flat window, (T, c, D), a slice of a contiguous span tensor."""
        return span.view(-1, self.c, span.shape[-1])[self.span_q_start : self.span_q_start + self.n_flat]

    def flat_windows(self, span: Tensor) -> Tensor:
        """Every flat window, (T, W, D) with W = n_off*c: a strided view of a contiguous span tensor."""
        d = span.shape[-1]
        return span.as_strided((self.n_flat, self.n_off * self.c, d), (self.c * d, d, 1), span.storage_offset())

    def valid(self, flat: Tensor) -> Tensor:
        """The (BH, nb, c, X) view of the windows that count, from a contiguous (T, c, X) tensor."""
        c, x = flat.shape[1:]
        return flat.as_strided((self.bh, self.nb, c, x), (self.n_span * c * x, c * x, x, 1), flat.storage_offset())

    def zero_invalid(self, flat: Tensor) -> Tensor:
        """Zero the rows of the straddling windows of a contiguous (T, c, X) tensor, in place."""
        c, x = flat.shape[1:]
        if self.bh > 1 and self.n_off > 1:
            flat.as_strided((self.bh - 1, self.n_off - 1, c, x), (self.n_span * c * x, c * x, x, 1),
                            flat.storage_offset() + self.nb * c * x).fill_(0.0)
        return flat

    def to_flat(self, t: Tensor) -> Tensor:
        """A (BH, nb, c, X) tensor laid out as a zero-padded contiguous (T, c, X) one."""
        flat = t.new_zeros(self.n_flat, *t.shape[2:])
        if t.requires_grad:  # the reference path: stay differentiable
            return flat.as_strided_scatter(t, t.shape, self.valid(flat).stride(), 0)
        self.valid(flat).copy_(t)
        return flat

    def _self_entries(self, t: Tensor) -> Tensor:
        """'bucket': the (BH, nb, c) diagonal view of the own-chunk columns (the only self entries)."""
        own = self.span_q_start * self.c
        return t[..., own : own + self.c].diagonal(dim1=-2, dim2=-1)

    def mask(self, scores: Tensor, self_masked: float) -> tuple[Tensor, Tensor]:
        """Apply the window's masks to raw scores (BH, nb, c, W); return them and their row maxima.

        Disallowed entries become -inf. Self entries become -inf too unless the row allows nothing else,
        in which case they take ``self_masked`` (HF's -1e5): the same softmax as HF's constants whenever
        real scores are above -1e5 + 100, without exp() working through -1e5 - max in every row (a slow
        denormal path), and no row is ever all -inf.
        """
        if self.window == "chunk":
            bad = self.q_pos < self.k_pos if self.causal else self.k_pos >= self.length
            scores = _fill(_fill(scores, bad, -math.inf), self.is_self, -math.inf)
        else:
            scores = _fill(_fill(scores, self.q_key != self.k_key, -math.inf), self.out_of_band, -math.inf)
            if scores.requires_grad:
                scores = scores.clone()
            self._self_entries(scores).fill_(-math.inf)
        m = scores.detach().amax(dim=-1, keepdim=True)
        self_only = m == -math.inf  # (BH, nb, c, 1)
        if self.window == "chunk":
            scores = _fill(scores, self.is_self & self_only, self_masked)
        else:
            self._self_entries(scores).masked_fill_(self_only.squeeze(-1), self_masked)
        return scores, m.masked_fill_(self_only, self_masked)

    def zero_self(self, t: Tensor) -> Tensor:
        """Zero the self entries of a (BH, nb, c, W) tensor in place (no gradient flows through them)."""
        if self.window == "chunk":
            return t.masked_fill_(self.is_self, 0.0)
        self._self_entries(t).fill_(0.0)
        return t

    def accumulate(self, grad_qk: Tensor, grad_v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor, q_span: Tensor,
                   scale_span: Tensor) -> None:
        """Add this block's gradients into ``grad_qk`` and ``grad_v`` (B*H*L, D): flat dq (T, c, D) of the
        queries, flat dk and dv (T, W, D) of the window keys (straddling windows zeroed). Window columns are
        summed per span chunk, dk is mapped through the key normalisation (row-linear), and each span row is
        added once (rows recur across rounds, so the indexed add accumulates)."""
        c, t, d = self.c, self.n_flat, dk.shape[-1]
        span_dk = grad_qk.new_zeros(self.bh * self.n_span, c, d)
        span_dv = torch.zeros_like(span_dk)
        for i in range(self.n_off):  # window column block i is span chunk (window start + i)
            span_dk[i : i + t] += dk[:, i * c : (i + 1) * c]
            span_dv[i : i + t] += dv[:, i * c : (i + 1) * c]
        span_dqk = normalize_keys_backward(q_span, span_dk.view_as(q_span), scale_span)
        self.flat_queries(span_dqk).add_(dq)
        rows = self.span_rows.flatten()
        # index_add_ adds whole rows (vectorised); index_put_(accumulate=True) went element by element, 5x
        # slower on CPU, and at long lengths its random row accesses were the backward's largest excess
        grad_qk.index_add_(0, rows, span_dqk.flatten(0, 2))
        grad_v.index_add_(0, rows, span_dv.flatten(0, 1))


def block_scores(block: Block, q: Tensor, self_masked: float) -> tuple[Tensor, ...]:
    """Scores of one block in the accumulation dtype: flat (T, c, W) and masked (BH, nb, c, W) (a view of
    the flat ones, unless autograd needs a copy), their row maxima (BH, nb, c, 1), plus the flat queries
    (T, c, D) and key windows (T, W, D), and the raw rows and key scales of the span (for the backward).
    Keys are normalised here, per block, from the gathered query rows: neither a full key tensor nor a
    full tensor of key scales is ever stored (at long lengths each would be one more pass over, and one
    more random gather from, memory far larger than the cache)."""
    q_span = block.span(q)
    scale_span = key_scale(q_span)  # (BH, n_span, c, 1), the same per-row values as key_scale(q) gathered
    k_span = (q_span.to(scale_span.dtype) * scale_span).to(q.dtype)
    qf, kf = block.flat_queries(q_span), block.flat_windows(k_span)
    flat = torch.bmm(qf, kf.transpose(1, 2)).to(scale_span.dtype)
    scores, m = block.mask(block.valid(flat), self_masked)
    return flat, scores, m, qf, kf, q_span, scale_span


def dropout_keep(seed: int, bh_ids: Tensor, n_total: int, first_row: int, shape: tuple[int, ...], p: float,
                 device: torch.device) -> Tensor:
    """Keep-mask (BH, nb, c, W) of attention dropout from a counter hash: no state, any block size.

    The counter is (bh id, sorted query index, window slot), bh ids from ``SortedLayout.bh_ids``; two
    rounds of multiply-xorshift (all intermediate products < 2**63) turn it into 24 uniform bits.
    """
    _, nb, c, w = shape
    m32 = 0xFFFFFFFF
    q_idx = first_row + torch.arange(nb * c, device=device).view(1, nb, c, 1)
    counter = (bh_ids.view(-1, 1, 1, 1) * n_total + q_idx) * w
    counter = counter + torch.arange(w, device=device).view(1, 1, 1, w)
    x = (counter & m32) ^ ((seed ^ (seed >> 32)) & m32)
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & m32
        x = x ^ (x >> 15)
        x = (x * 0x5BD1E995) & m32
        x = x ^ (x >> 16) ^ (counter >> 32)
    return (x & 0xFFFFFF).float() * (1.0 / (1 << 24)) >= p


def blocks(layout: SortedLayout, win: Window):
    """Yield the Blocks of the sorted order, each holding about BLOCK_SCORES score elements (CPU)."""
    per_chunk = layout.bh * layout.chunk_len * layout.chunk_len * len(win.offsets)
    budget = BLOCK_SCORES if layout.sorted_idx.device.type == "cpu" else ACCELERATOR_BLOCK_SCORES
    step = max(1, budget // per_chunk)
    for first in range(0, layout.n_chunks, step):
        yield Block(layout, first, min(first + step, layout.n_chunks), win)

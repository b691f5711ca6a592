"""LSH self-attention as one registered PyTorch op: ``torch.ops.reformer.lsh_attention``.

The algorithm is HF transformers' Reformer attention (ported from trax), reorganised for memory:

1. hash    ``bucket = argmax(cat[x R, -x R])`` per bucket factor, in fp32 (``hash_vectors``);
2. sort    every (round, position) by (round, bucket, position), one stable sort (``sort_by_bucket``);
3. attend  in chunks of ``chunk_len`` over the sorted order (``attend_sorted``), one block of
           chunks at a time so the (chunks, c, window) score tensor never exists whole;
4. unsort  the per-round outputs and combine the rounds with logsumexp weights (``combine_rounds``).

A padded sequence that fits in one chunk (``L <= chunk_len``) is not hashed in the 'chunk' window: HF then
runs one plain causal shared-QK attention over it (one round, no wrap-around), and so does the op.

Queries are the shared projection ``qk`` itself; keys are ``qk`` normalised to unit length and divided
by sqrt(D) (HF: ``qk * rsqrt(mean(qk^2) + 1e-6) / sqrt(D)``, ``normalize_keys``).

Two windows over the sorted order:

- ``"chunk"`` (reference, HF/trax): a query sees its whole chunk plus ``chunks_before``/``chunks_after``
  neighbouring chunks, wrapping around across hash rounds, with the causal mask on original positions,
  padding keys masked, and the self-mask (a token sees itself only when nothing else is allowed).
  Causal masking forbids attending later keys, but later tokens still occupy sorted slots and move the
  chunk boundaries, so outputs depend (slightly) on the future.
- ``"bucket"`` (strictly causal): a query sees the at most ``chunk_len`` most recent earlier tokens of its
  own bucket in the same round (itself only via the self-mask), i.e. sorted keys with the same
  (round, bucket) and sorted index in ``[i - chunk_len, i]``. That set depends on tokens up to the query
  alone. (Non-causal models use ``[i - chunk_len, i + chunk_len]``.)

Buckets returned by the op are per round and *without* round offsets: (B, H, n_hashes, L) in
``[0, prod(n_buckets)]``, the last value being the padding bucket. Passing them back as ``buckets=``
reproduces the same sort (the reversible backward replays them).

Normalisation. 'bucket' keeps every softmax statistic as (row max, log of the shifted sum) and folds the
rounds into one softmax over the union of their windows (``LSE = logsumexp_r(lse_r)``, never rounded at
the -1e5 self-mask scale). 'chunk' exists for parity with HF checkpoints, so it reproduces HF's fp32
arithmetic instead: per round ``p = exp(s - lse_r)`` with ``lse_r = max + log(sum)`` rounded in fp32, and
round weights ``exp(lse_r - logsumexp(lse))``. At -1e5 that rounding is visible (a token that sees only
itself gets ~0.997 of its value in HF), and parity needs it.

The backward is flash-style: it saves only qk, v, the output, the buckets and the per-round softmax
statistics, recomputes the scores block by block and uses ``delta = rowsum(dO * O)``. For both
normalisations the score gradient is ``dS = P * (dP - delta)`` with P the probabilities the forward used
(for 'chunk', ``p_r * w_r`` with HF's rounded terms, which is what autograd through HF's code computes).

Inputs may be laid out as (B, H, L, D) or as the (B, L, H, D) memory that head-splitting a projection
gives (``x.view(B, L, H, D).transpose(1, 2)``): the op works on rows of that memory directly and returns
outputs in the same layout, so neither side pays for ``.contiguous()`` copies.

Attention-probability dropout uses a counter-based hash of (seed, batch*head, sorted query, window slot),
so its mask is independent of the block size and can be regenerated in the backward without state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

WINDOWS = ("bucket", "chunk")

# Score elements per block of chunks (all batch*heads together). On CPU 4 MiB of fp32 scores: enough work
# per block that op-launch and thread-sync overheads stay small (measured: no slower than 16 MiB blocks at
# 16K tokens), and small temporaries keep the allocator's peak low at any length. On an accelerator each
# of a block's ~30 ops is a kernel launch, so blocks are 16x larger there (still a fixed bound).
BLOCK_SCORES = 1 << 20
ACCELERATOR_BLOCK_SCORES = 1 << 24
# 'bucket' window query chunks are chunk_len / BUCKET_SPLIT long (see ``Window``).
BUCKET_SPLIT = 2
# Rotated elements per hashing block: a block of positions whose (B, H, n_hashes, positions, R/2) rotations
# (and their (..., R) sign-doubled copy) stay a few MiB at any length and head count.
HASH_BLOCK_ELEMENTS = 1 << 21


def mask_values(dtype: torch.dtype) -> tuple[float, float]:
    """HF's (masked, self-masked) score constants: fp16 needs small ones to stay finite.

    The op itself masks with -inf and uses only the self-masked value (see ``Block.mask``); scores are
    soft-maxed in fp32, so bf16 inputs use the fp32 constants. Local attention uses both.
    """
    if dtype == torch.float16:
        return -1e4, -1e3
    return -1e9, -1e5


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores, softmax statistics and gradients accumulate in at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


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


# ----------------------------------------------------------------------------------------- hashing
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
    ``cat[x R, -x R]`` per bucket factor over its slice of the rotations."""
    buckets, offset, stride = None, 0, 1
    for factor in n_buckets:
        part = rotated[..., offset : offset + factor // 2]
        b = torch.argmax(torch.cat([part, -part], dim=-1), dim=-1)
        buckets = b if buckets is None else buckets + stride * b
        offset += factor // 2
        stride *= factor
    return buckets


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


def key_scale(x: Tensor) -> Tensor:
    """Per-row factor of ``normalize_keys`` in the accumulation dtype: rsqrt(mean(x^2) + 1e-6) / sqrt(D),
    shape (..., 1)."""
    x = x.to(_acc_dtype(x.dtype))
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(x.shape[-1])


def normalize_keys(qk: Tensor) -> Tensor:
    """Keys of shared-QK attention: unit length and divided by sqrt(D) (HF's ``_len_and_dim_norm``)."""
    return (qk.to(_acc_dtype(qk.dtype)) * key_scale(qk)).to(qk.dtype)


def _normalize_keys_backward(x: Tensor, grad_k: Tensor, scale: Tensor) -> Tensor:
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


def window_offsets(window: str, chunks_before: int, chunks_after: int, causal: bool) -> list[int]:
    """Chunk offsets (relative to a query's chunk of ``chunk_len``) whose keys a query may see. For 'bucket'
    the query's own chunk is always the second entry, so its self key sits at window column ``c + i``.
    This geometry also keys the attention-dropout counters (``dropout_keep``)."""
    if window == "bucket":
        return [-1, 0] if causal else [-1, 0, 1]
    return list(range(-chunks_before, chunks_after + 1))


class Window:
    """What a query sees, and how it is computed: ``chunk`` (the compute chunk length), ``offsets`` (the
    chunks a query chunk sees, relative to its own), ``reach`` ('bucket': sorted slots back/ahead).

    'chunk' is defined by its chunks. 'bucket' is defined by a reach of ``chunk_len`` sorted slots, so
    without attention dropout it is computed with query chunks of ``chunk_len / BUCKET_SPLIT``: a chunk of
    q queries needs the chunk_len slots before it plus its own, (1 + 1/BUCKET_SPLIT) * chunk_len scores per
    query instead of 2x. With dropout it keeps the ``window_offsets`` geometry that keys the dropout mask
    (and that ``reformer_dist.kernels.lsh_triton`` reproduces bit for bit).
    """

    def __init__(self, kind: str, chunk_len: int, chunks_before: int, chunks_after: int, causal: bool,
                 dropout_p: float, length: int):
        self.kind, self.causal, self.reach = kind, causal, chunk_len
        # HF skips hashing when the sequence fits in one chunk: one round, the chunk sees only itself
        self.plain = is_plain(kind, length, chunk_len)
        split = BUCKET_SPLIT if kind == "bucket" and dropout_p == 0 and chunk_len % BUCKET_SPLIT == 0 else 1
        self.chunk = chunk_len // split
        if self.plain:
            self.offsets = [0]
        elif split == 1:
            self.offsets = window_offsets(kind, chunks_before, chunks_after, causal)
        else:
            self.offsets = list(range(-split, 1 if causal else split + 1))

    def layout(self, buckets: Tensor, key_padding_mask: Tensor | None, inner: bool, head_offset: int = 0,
               n_heads_total: int = 0) -> SortedLayout:
        """The sorted order this window attends over (``attended_buckets``)."""
        return SortedLayout(attended_buckets(buckets, self.kind, self.reach), key_padding_mask, self.chunk, inner,
                            head_offset, n_heads_total)


def is_plain(window: str, length: int, chunk_len: int) -> bool:
    """Whether the 'chunk' window runs as one plain attention (HF: ``sequence_length <= chunk_length``)."""
    return window == "chunk" and length <= chunk_len


def attended_buckets(buckets: Tensor, window: str, chunk_len: int) -> Tensor:
    """The buckets to sort by: all hash rounds, or for a plain attention one unhashed round (B, H, 1, L)."""
    return torch.zeros_like(buckets[:, :, :1]) if is_plain(window, buckets.shape[-1], chunk_len) else buckets


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
        span_dqk = _normalize_keys_backward(q_span, span_dk.view_as(q_span), scale_span)
        self.flat_queries(span_dqk).add_(dq)
        rows = self.span_rows.flatten()
        grad_qk.index_put_((rows,), span_dqk.flatten(0, 2), accumulate=True)
        grad_v.index_put_((rows,), span_dv.flatten(0, 1), accumulate=True)


def block_scores(block: Block, q: Tensor, scale: Tensor, self_masked: float) -> tuple[Tensor, ...]:
    """Scores of one block in the accumulation dtype: flat (T, c, W) and masked (BH, nb, c, W) (a view of
    the flat ones, unless autograd needs a copy), their row maxima (BH, nb, c, 1), plus the flat queries
    (T, c, D) and key windows (T, W, D), and the raw rows and key scales of the span (for the backward).
    Keys are normalised here, per block, from the gathered query rows and ``scale = key_scale(q)``
    (B*H*L, 1): no full key tensor is ever stored."""
    q_span, scale_span = block.span(q), block.span(scale)
    k_span = (q_span.to(scale.dtype) * scale_span).to(q.dtype)
    qf, kf = block.flat_queries(q_span), block.flat_windows(k_span)
    flat = torch.bmm(qf, kf.transpose(1, 2)).to(scale.dtype)
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


def _blocks(layout: SortedLayout, win: Window):
    """Yield the Blocks of the sorted order, each holding about BLOCK_SCORES score elements (CPU)."""
    per_chunk = layout.bh * layout.chunk_len * layout.chunk_len * len(win.offsets)
    budget = BLOCK_SCORES if layout.sorted_idx.device.type == "cpu" else ACCELERATOR_BLOCK_SCORES
    step = max(1, budget // per_chunk)
    for first in range(0, layout.n_chunks, step):
        yield Block(layout, first, min(first + step, layout.n_chunks), win)


def attend_sorted(
    q: Tensor, v: Tensor, layout: SortedLayout, win: Window, dropout_p: float, dropout_seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention over the sorted order, block by block, on rows: q, v (B*H*L, D) (``as_rows``).

    Returns per-round outputs ``o`` (n, B*H*L, D) in v's dtype and the per-round softmax statistics
    ``row_max`` and ``log_sum`` (n, B*H*L) (logsumexp = row_max + log_sum), un-sorted to the input rows.
    The statistics are kept apart because row maxima sit at -1e5 for rows that only see themselves: one
    fp32 logsumexp there would lose ~4e-3 ('bucket' avoids that; 'chunk' reproduces it, as HF rounds
    there). Differentiable with ordinary autograd (the reference); the op's forward runs it under no_grad,
    where it works in place.
    """
    d, rows_total = q.shape[-1], q.shape[0]
    scale = key_scale(q)
    self_masked = mask_values(q.dtype)[1]
    acc = _acc_dtype(q.dtype)
    o = torch.empty(layout.n_hashes * rows_total, d, device=q.device, dtype=v.dtype)
    row_max = torch.empty(layout.n_hashes * rows_total, device=q.device, dtype=acc)
    log_sum = torch.empty_like(row_max)
    for block in _blocks(layout, win):
        flat, scores, m, *_ = block_scores(block, q, scale, self_masked)  # m: a shift, not differentiated
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
        rows = layout.dest[:, block.first * block.c : block.last * block.c].flatten()
        o.index_copy_(0, rows, ob.flatten(0, 2))
        row_max.index_copy_(0, rows, m.flatten())
        log_sum.index_copy_(0, rows, log_total.flatten())
    n = layout.n_hashes
    return o.view(n, rows_total, d), row_max.view(n, rows_total), log_sum.view(n, rows_total)


def round_weights(row_max: Tensor, log_sum: Tensor, hf_rounding: bool) -> Tensor:
    """Softmax over rounds (dim 0) of the per-round logsumexps ``row_max + log_sum``; with ``hf_rounding``
    HF's ``exp(lse - logsumexp(lse))`` on the fp32-rounded sums (weights then need not sum to 1)."""
    if hf_rounding:
        lse = row_max + log_sum
        return torch.exp(lse - torch.logsumexp(lse, dim=0, keepdim=True))
    top = row_max.amax(dim=0, keepdim=True)
    return torch.softmax((row_max - top) + log_sum, dim=0)


def combine_rounds(o: Tensor, row_max: Tensor, log_sum: Tensor, hf_rounding: bool) -> Tensor:
    """``sum_r o_r * exp(lse_r - logsumexp_r lse)``: o (n, R, D), stats (n, R) -> (R, D)."""
    w = round_weights(row_max, log_sum, hf_rounding).unsqueeze(-1).to(o.dtype)
    if o.requires_grad:
        return (o * w).sum(dim=0)
    return o.mul_(w).sum(dim=0)  # the op's forward: o is a temporary, reuse it


def _buckets_or_hash(qk: Tensor, rotations: Tensor, key_padding_mask: Tensor | None, buckets: Tensor | None,
                     n_buckets: list[int]) -> Tensor:
    return hash_in_blocks(qk, rotations, n_buckets, key_padding_mask) if buckets is None else buckets


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


def _check(qk: Tensor, v: Tensor, chunk_len: int, window: str) -> None:
    torch._check(qk.dim() == 4 and qk.shape == v.shape, lambda: "qk and v must both be (B, H, L, D)")
    torch._check(qk.shape[2] % chunk_len == 0, lambda: f"L={qk.shape[2]} must be a multiple of chunk_len={chunk_len}")
    torch._check(window in WINDOWS, lambda: f"window must be one of {WINDOWS}, got {window!r}")


def _pad_rounds(row_max: Tensor, log_sum: Tensor, n_hashes: int) -> Tensor:
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
    n_buckets: list[int], chunk_len: int, chunks_before: int, chunks_after: int, window: str, causal: bool,
    dropout_p: float = 0.0, dropout_seed: int = 0, head_offset: int = 0, n_heads_total: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The op's semantics in plain differentiable PyTorch: (out, buckets, per-round softmax statistics
    (2, n_hashes, B*H*L)). ``head_offset``/``n_heads_total`` (0 = the input's H) place the input's heads
    among a layer's heads for the dropout counters (``SortedLayout.bh_ids``)."""
    _check(qk, v, chunk_len, window)
    inner = heads_inner(v)
    buckets = _buckets_or_hash(qk, rotations, key_padding_mask, buckets, n_buckets)
    win = Window(window, chunk_len, chunks_before, chunks_after, causal, dropout_p, qk.shape[2])
    layout = win.layout(buckets, key_padding_mask, inner, head_offset, n_heads_total)
    o, row_max, log_sum = attend_sorted(as_rows(qk, inner), as_rows(v, inner), layout, win, dropout_p,
                                        dropout_seed)
    stats = _pad_rounds(row_max.detach(), log_sum.detach(), buckets.shape[2])
    out = combine_rounds(o, row_max, log_sum, hf_rounding=window == "chunk")
    return from_rows(out, tuple(qk.shape), inner), buckets, stats


def lsh_attention_reference(
    qk: Tensor, v: Tensor, rotations: Tensor, key_padding_mask: Tensor | None, buckets: Tensor | None,
    n_buckets: list[int], chunk_len: int, chunks_before: int, chunks_after: int, window: str, causal: bool,
    dropout_p: float = 0.0, dropout_seed: int = 0, head_offset: int = 0, n_heads_total: int = 0,
) -> tuple[Tensor, Tensor]:
    """The op's semantics in plain differentiable PyTorch (autograd backward). Same signature/outputs."""
    out, buckets, _ = lsh_attention_forward(qk, v, rotations, key_padding_mask, buckets, n_buckets, chunk_len,
                                            chunks_before, chunks_after, window, causal, dropout_p, dropout_seed,
                                            head_offset, n_heads_total)
    return out, buckets


# ------------------------------------------------------------------------------------ the custom ops
def _run_forward(qk, v, rotations, key_padding_mask, buckets, *args):
    with torch.no_grad(), torch.autocast(qk.device.type, enabled=False):
        out, used, stats = lsh_attention_forward(qk, v, rotations, key_padding_mask, buckets, *args)
    return out.to(v.dtype), used.clone() if buckets is not None else used, stats


def _fake_forward(qk, v, rotations):
    b, h, length, d = qk.shape
    n_hashes = rotations.shape[2]
    out = from_rows(v.new_empty(b * h * length, d), tuple(v.shape), heads_inner(v))
    stats = qk.new_empty((2, n_hashes, b * h * length), dtype=_acc_dtype(qk.dtype))
    return out, qk.new_empty((b, h, n_hashes, length), dtype=torch.long), stats


@torch.library.custom_op("reformer::lsh_attention_backward", mutates_args=())
def lsh_attention_backward(
    grad_out: Tensor,
    qk: Tensor,
    v: Tensor,
    out: Tensor,
    buckets: Tensor,
    key_padding_mask: Tensor | None,
    stats: Tensor | None,
    chunk_len: int,
    chunks_before: int,
    chunks_after: int,
    window: str,
    causal: bool,
    dropout_p: float,
    dropout_seed: int,
    head_offset: int = 0,
    n_heads_total: int = 0,
) -> tuple[Tensor, Tensor]:
    """Flash-style backward of ``lsh_attention``: returns (grad_qk, grad_v). ``stats`` from the forward
    (``lsh_attention_with_stats``) or None to recompute them."""
    with torch.no_grad(), torch.autocast(qk.device.type, enabled=False):
        return _backward(grad_out, qk, v, out, buckets, key_padding_mask, stats, chunk_len, chunks_before,
                         chunks_after, window, causal, dropout_p, dropout_seed, head_offset, n_heads_total)


@lsh_attention_backward.register_fake
def _(grad_out, qk, v, out, buckets, key_padding_mask, stats, chunk_len, chunks_before, chunks_after, window, causal,
      dropout_p, dropout_seed, head_offset=0, n_heads_total=0):
    inner, rows = heads_inner(v), qk.shape[0] * qk.shape[1] * qk.shape[2]
    return (from_rows(qk.new_empty(rows, qk.shape[-1]), tuple(qk.shape), inner),
            from_rows(v.new_empty(rows, v.shape[-1]), tuple(v.shape), inner))


def _recompute_stats(layout: SortedLayout, q: Tensor, scale: Tensor, win: Window, self_masked: float,
                     n_hashes: int) -> Tensor:
    """The forward's softmax statistics (2, n_hashes, rows) from one scores-only pass over the blocks."""
    rows_total, n, c = q.shape[0], layout.n_hashes, layout.chunk_len
    row_max = torch.empty(n * rows_total, device=q.device, dtype=_acc_dtype(q.dtype))
    log_sum = torch.empty_like(row_max)
    for block in _blocks(layout, win):
        _, scores, m, *_ = block_scores(block, q, scale, self_masked)
        rows = layout.dest[:, block.first * c : block.last * c].flatten()
        row_max.index_copy_(0, rows, m.flatten())
        log_sum.index_copy_(0, rows, scores.sub_(m).exp_().sum(-1).log_().flatten())
    return _pad_rounds(row_max.view(n, rows_total), log_sum.view(n, rows_total), n_hashes)


def _backward(grad_out, qk, v, out, buckets, key_padding_mask, stats, chunk_len, chunks_before, chunks_after, window,
              causal, dropout_p, dropout_seed, head_offset, n_heads_total):
    inner = heads_inner(v)
    win = Window(window, chunk_len, chunks_before, chunks_after, causal, dropout_p, qk.shape[2])
    layout = win.layout(buckets, key_padding_mask, inner, head_offset, n_heads_total)
    q, vf = as_rows(qk, inner), as_rows(v, inner)
    rows_total, d = q.shape
    scale = key_scale(q)
    self_masked = mask_values(qk.dtype)[1]
    acc = _acc_dtype(qk.dtype)
    c, bh = win.chunk, layout.bh

    if stats is None:
        stats = _recompute_stats(layout, q, scale, win, self_masked, buckets.shape[2])
    shift, log_norm, weight = probability_terms(stats[:, : layout.n_hashes], hf_rounding=window == "chunk")

    go = as_rows(grad_out, inner)
    delta = (go.to(acc) * as_rows(out, inner).to(acc)).sum(-1)  # (rows,) rowsum(dO * O)
    grad_qk = torch.zeros(rows_total, d, device=qk.device, dtype=acc)
    grad_v = torch.zeros_like(grad_qk)
    # P as the forward formed it (``probability_terms``); dS = P * (dP - delta), zero on self entries
    for block in _blocks(layout, win):
        flat, scores, _, qf, kf, q_span, scale_span = block_scores(block, q, scale, self_masked)
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


def _setup_context(ctx, inputs, output):
    (qk, v, _rot, key_padding_mask, _b, _nb, chunk_len, chunks_before, chunks_after, window, causal, dropout_p,
     dropout_seed, head_offset, n_heads_total) = inputs
    out, buckets, *stats = output
    ctx.save_for_backward(qk, v, out, buckets, key_padding_mask, stats[0] if stats else None)
    ctx.args = (chunk_len, chunks_before, chunks_after, window, causal, dropout_p, dropout_seed, head_offset,
                n_heads_total)


def _autograd_backward(ctx, grad_out, *_unused_grads):
    qk, v, out, buckets, key_padding_mask, stats = ctx.saved_tensors
    grad_qk, grad_v = torch.ops.reformer.lsh_attention_backward(grad_out, qk, v, out, buckets, key_padding_mask,
                                                                stats, *ctx.args)
    return grad_qk, grad_v, *([None] * 13)


# The forward ops share one schema: (qk, v, rotations, key_padding_mask, buckets, n_buckets, chunk_len,
# chunks_before, chunks_after, window, causal, dropout_p, dropout_seed[, head_offset, n_heads_total]); the last
# two (defaults: the input's own heads) only matter for attention dropout under sequence parallelism.
_FORWARD_ARGS = ("(Tensor qk, Tensor v, Tensor rotations, Tensor? key_padding_mask, Tensor? buckets, "
                 "int[] n_buckets, int chunk_len, int chunks_before, int chunks_after, str window, bool causal, "
                 "float dropout_p, int dropout_seed, int head_offset=0, int n_heads_total=0)")


def _forward_op(name: str, n_outputs: int):
    """Register ``reformer::<name>``: the forward returning its first ``n_outputs`` of (out, buckets,
    stats), with its fake implementation and the flash-style backward."""

    def forward(*args):
        return _run_forward(*args)[:n_outputs]

    op = torch.library.custom_op(f"reformer::{name}", forward, mutates_args=(),
                                 schema=f"{_FORWARD_ARGS} -> ({', '.join(['Tensor'] * n_outputs)})")
    op.register_fake(lambda qk, v, rotations, *_: _fake_forward(qk, v, rotations)[:n_outputs])
    op.register_autograd(_autograd_backward, setup_context=_setup_context)
    return op


# LSH self-attention (see the module docstring): (out (B, H, L, D) in v's dtype, buckets (B, H, n, L)).
lsh_attention = _forward_op("lsh_attention", 2)
# ``lsh_attention`` that also returns the softmax statistics (2, n_hashes, B*H*L) its backward needs, so the
# backward skips recomputing them (one of its two passes). The model uses it when training; inference and
# export use ``lsh_attention``.
lsh_attention_with_stats = _forward_op("lsh_attention_with_stats", 3)

"""Fused Triton kernels: the CUDA implementation of ``torch.ops.reformer.lsh_attention`` (``dispatch``).

The PyTorch reference (``forward``, ``backward``) gathers the sorted queries and keys
of a block of chunks into new tensors, builds the (chunks, c, window) score tensor, soft-maxes it and
scatters the result back. Here one program instance does all of that for one block of sorted rows in
registers: it reads the sorted index, gathers q/k/v rows straight from the (B, H, L, D) inputs,
normalises the keys on the fly, applies the causal / padding / band / self masks, runs an online
softmax over the window and writes the per-round output and softmax statistics *unsorted* (to row
``round*L + pos``), so nothing of size (window x L) ever reaches device memory. The sort itself is
``sort_by_bucket`` (one stable ``torch.sort`` of (B, H, n_hashes*L) int64 keys: O(n_hashes x L)
integers); the unsort is the scattered store.

Semantics are exactly the reference's (same window offsets, mask constants, wrap-around, dropout
counter hash); the reference stays the fallback everywhere else and the spec in the tests:

- ``lsh_attention_triton``          == ``forward.lsh_attention_reference``            (forward of the op)
- ``lsh_attention_backward_triton`` == ``backward.lsh_attention_backward_reference``  (flash-style backward)

Rows of the sorted order are processed in tiles of ``BLOCK`` rows inside a chunk (``n_sub`` tiles per
chunk, the last one masked when chunk_len is not a multiple of ``BLOCK``). A query tile visits the key
tiles of the chunks at the window offsets (``LshSpec.offsets``); ``'bucket'`` windows skip the tiles
that lie outside the band or outside the sorted order (their scores are masked constants that add
exactly 0 next to the always-present self score).

The backward saves nothing extra: one stats-only forward pass rebuilds the per-round softmax statistics,
they become the reference's per-entry probability terms (``probability_terms``: one softmax over all
rounds for 'bucket', HF's fp32-rounded per-round terms for 'chunk'), and a single kernel then computes,
for its tile of sorted rows, dK/dV (the tile as keys, looping over the query tiles whose windows contain
it) and dQ (the tile as queries), writing both to per-round fp32 buffers that are summed over rounds at
the end. No atomics, so gradients are deterministic. A 'chunk' sequence that fits one chunk runs as the
reference's plain attention (one unhashed round, ``_attention_order``).

Under ``TRITON_INTERPRET=1`` (CPU tests) tiles are multiplied in fp32, because the interpreter cannot do
bf16/fp16 arithmetic; loads, stores and everything else are the same code as on the GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from reformer_dist.model.lsh.forward import combine_rounds, pad_rounds, probability_terms
from reformer_dist.model.lsh.hashing import buckets_or_hash
from reformer_dist.model.lsh.layout import attended_buckets, sort_by_bucket
from reformer_dist.model.lsh.spec import LshSpec, check_inputs, mask_values

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ------------------------------------------------------------------------------------------ tile helpers
@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: full fp32 products like the reference's matmul (not TF32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_rows(SIDX_bh, BKEY_bh, PAD_b, QK_bh, rows, ok, offs_d, L, D, sqrt_d, HAS_PAD: tl.constexpr,
               BUCKET_WINDOW: tl.constexpr, KEY_DTYPE: tl.constexpr):
    """Gather the sorted rows ``rows`` (flat sorted indices, masked by ``ok``) of one batch*head.

    Returns sidx (r*L + pos), pos, key_pos (pos, or L for padding), bucket, x = qk rows in fp32
    (BLOCK, BLOCK_D), rk = the key normalisation factor, and the normalised key rows in the input dtype.
    Indices are narrowed to int32 (the wrapper checks n_hashes*L*D < 2**31): int64 index tiles cost
    registers the score tiles need.
    """
    sidx = tl.load(SIDX_bh + rows, mask=ok, other=0).to(tl.int32)
    pos = sidx % L
    if HAS_PAD:
        real = tl.load(PAD_b + pos, mask=ok, other=0) != 0
        key_pos = tl.where(real, pos, L)
    else:
        key_pos = pos
    if BUCKET_WINDOW:
        # low 32 bits of the sort key (round << 32 | bucket); the round is compared separately
        bucket = tl.load(BKEY_bh + rows, mask=ok, other=-1).to(tl.int32)
    else:
        bucket = sidx  # unused
    d_ok = offs_d < D
    x = tl.load(QK_bh + pos[:, None] * D + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
    x = x.to(tl.float32)
    # reference normalize_keys: x * rsqrt(mean(x^2) + 1e-6) / sqrt(D), rounded to the input dtype
    rk = tl.rsqrt(tl.sum(x * x, 1) / D + 1e-6)
    k = ((x * rk[:, None]) / sqrt_d).to(KEY_DTYPE)
    rk = rk / sqrt_d
    return sidx, pos, key_pos, bucket, x, rk, k


@triton.jit
def _load_chunk_tile(c, j, ar, SIDX_bh, BKEY_bh, PAD_b, QK_bh, offs_d, L, D, sqrt_d, C: tl.constexpr,
                     BLOCK: tl.constexpr, HAS_PAD: tl.constexpr, BUCKET_WINDOW: tl.constexpr,
                     KEY_DTYPE: tl.constexpr):
    """Tile ``j`` of sorted chunk ``c``: its slots in the chunk, which exist, its sorted rows, and
    :func:`_load_rows` of them (the forward's key tiles and both backward phases walk chunks this way)."""
    slot = j * BLOCK + ar
    ok = slot < C
    rows = c * C + slot
    sidx, pos, key_pos, bucket, x, rk, k = _load_rows(SIDX_bh, BKEY_bh, PAD_b, QK_bh, rows, ok, offs_d, L, D,
                                                      sqrt_d, HAS_PAD, BUCKET_WINDOW, KEY_DTYPE)
    return slot, ok, rows, sidx, pos, key_pos, bucket, x, rk, k


@triton.jit
def _masked_scores(q, k, pos_q, key_pos_k, rows_q, rows_k, bucket_q, bucket_k, k_ok, L, masked, self_masked,
                   C: tl.constexpr, BUCKET_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    """fp32 scores of a (query tile, key tile) with the reference's masks (``block_scores``).

    Masked entries get the ``masked`` constant, self entries ``self_masked``; key slots outside the chunk
    (tile padding) get -inf. ``allowed`` marks the entries whose score is the real dot product.
    """
    s = _dot(q, tl.trans(k), IEEE)
    if BUCKET_WINDOW:
        lag = rows_q[:, None] - rows_k[None, :]  # how far back in sorted order
        if CAUSAL:
            band = (lag >= 0) & (lag <= C)
        else:
            band = (lag >= -C) & (lag <= C)
        same_round = (rows_q // L)[:, None] == (rows_k // L)[None, :]
        valid = band & same_round & (bucket_q[:, None] == bucket_k[None, :])
        is_self = lag == 0
    else:
        if CAUSAL:
            valid = pos_q[:, None] >= key_pos_k[None, :]
        else:
            valid = key_pos_k[None, :] < L
        is_self = pos_q[:, None] == key_pos_k[None, :]
    s = tl.where(valid, s, masked)
    s = tl.where(is_self, self_masked, s)
    s = tl.where(k_ok[None, :], s, float("-inf"))
    allowed = valid & (is_self == 0) & k_ok[None, :]
    return s, allowed


@triton.jit
def _dropout_keep(bh, N, rows_q, slots_k, seed32, dropout_p, W: tl.constexpr):
    """Keep-mask of attention dropout, bit-identical to the reference's ``dropout_keep`` counter hash.

    Counter = (bh*N + sorted query index)*W + window slot; uint32 arithmetic wraps exactly like the
    reference's ``& 0xFFFFFFFF`` on int64.
    """
    counter = (bh.to(tl.int64) * N + rows_q[:, None].to(tl.int64)) * W + slots_k[None, :].to(tl.int64)
    hi = (counter >> 32).to(tl.uint32)
    x = counter.to(tl.uint32) ^ seed32.to(tl.uint32)
    for _ in tl.static_range(2):
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x5BD1E995
        x = x ^ (x >> 16) ^ hi
    return (x & 0xFFFFFF).to(tl.float32) * (1.0 / 16777216.0) >= dropout_p


@triton.jit
def _wrap(chunk, n_chunks):
    """chunk mod n_chunks in [0, n_chunks) for any sign: compiled Triton's % truncates like C, the
    interpreter's (numpy) floors like Python, and look-back/ahead may exceed n_chunks."""
    return (chunk % n_chunks + n_chunks) % n_chunks


@triton.jit
def _tile_needed(c_raw, n_chunks, t0, s0, BLOCK: tl.constexpr, C: tl.constexpr, BUCKET_WINDOW: tl.constexpr,
                 CAUSAL: tl.constexpr):
    """Does the key tile starting at sorted row t0 hold any window entry of the query tile at s0?

    'chunk' windows wrap around, so every tile counts. 'bucket' windows count only chunks inside the
    sorted order (c_raw: the unwrapped chunk) and tiles that meet the band lag = s - t in [lo, C].
    """
    if BUCKET_WINDOW:
        inside = (c_raw >= 0) & (c_raw < n_chunks) & (s0 - (t0 + BLOCK - 1) <= C)
        if CAUSAL:
            return inside & (s0 + BLOCK - 1 - t0 >= 0)
        else:
            return inside & (s0 + BLOCK - 1 - t0 >= -C)
    else:
        return True


# ---------------------------------------------------------------------------------------------- forward
@triton.jit
def _lsh_fwd_kernel(
    QK, V, SIDX, BKEY, PAD, OUT, RMAX, LSUM,
    L, N, H, D, sqrt_d, n_chunks, seed32, dropout_p, masked, self_masked,
    C: tl.constexpr, BEFORE: tl.constexpr, N_OFF: tl.constexpr, N_SUB: tl.constexpr,
    BUCKET_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr,
    STATS_ONLY: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One program: BLOCK sorted query rows of one batch*head -> their per-round output and softmax stats.

    QK, V (BH, L, D); SIDX, BKEY (BH, N) sorted r*L+pos and (round, bucket) keys; PAD (B, L) bool;
    OUT (BH, N, D) per-round outputs, RMAX and LSUM (BH, N) fp32 row max and log of the row sum (kept apart
    as in the reference: row maxima sit near the -1e5 self-mask, where one fp32 logsumexp loses ~1e-2),
    all at row r*L+pos (un-sorted).
    """
    pid, bh = tl.program_id(0), tl.program_id(1)
    cq, sub = pid // N_SUB, pid % N_SUB
    bh64 = bh.to(tl.int64)
    QK_bh, V_bh = QK + bh64 * L * D, V + bh64 * L * D
    SIDX_bh, BKEY_bh, PAD_b = SIDX + bh64 * N, BKEY + bh64 * N, PAD + (bh64 // H) * L
    key_dtype = QK.dtype.element_ty

    ar = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    slot_q = sub * BLOCK + ar
    q_ok = slot_q < C
    rows_q = cq * C + slot_q
    sidx_q, pos_q, _kp, bucket_q, x_q, _rk, _k = _load_rows(
        SIDX_bh, BKEY_bh, PAD_b, QK_bh, rows_q, q_ok, offs_d, L, D, sqrt_d, HAS_PAD, BUCKET_WINDOW, key_dtype)
    q = x_q.to(key_dtype).to(DOT_DTYPE)  # queries are qk itself (not normalised)

    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    for oi in range(N_OFF):
        kc_raw = cq + oi - BEFORE
        kc = _wrap(kc_raw, n_chunks)  # 'chunk' windows wrap around across rounds
        for j in range(N_SUB):
            if _tile_needed(kc_raw, n_chunks, kc_raw * C + j * BLOCK, cq * C + sub * BLOCK, BLOCK, C,
                            BUCKET_WINDOW, CAUSAL):
                slot_k, k_ok, rows_k, _s, pos_k, key_pos_k, bucket_k, _x, _rk, k = _load_chunk_tile(
                    kc, j, ar, SIDX_bh, BKEY_bh, PAD_b, QK_bh, offs_d, L, D, sqrt_d, C, BLOCK, HAS_PAD,
                    BUCKET_WINDOW, key_dtype)
                s, _allowed = _masked_scores(q, k.to(DOT_DTYPE), pos_q, key_pos_k, rows_q, rows_k, bucket_q,
                                             bucket_k, k_ok, L, masked, self_masked, C, BUCKET_WINDOW, CAUSAL,
                                             IEEE)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                if not STATS_ONLY:
                    if DROPOUT:
                        keep = _dropout_keep(bh, N, rows_q, oi * C + slot_k, seed32, dropout_p, N_OFF * C)
                        p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
                    d_ok = offs_d < D
                    vt = tl.load(V_bh + pos_k[:, None] * D + offs_d[None, :],
                                 mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
                    p = p.to(V.dtype.element_ty).to(DOT_DTYPE)  # the reference rounds probs to v's dtype
                    acc = acc * alpha[:, None] + _dot(p, vt, IEEE)
                m_i = m_new

    tl.store(RMAX + bh64 * N + sidx_q, m_i, mask=q_ok)
    tl.store(LSUM + bh64 * N + sidx_q, tl.log(l_i), mask=q_ok)
    if not STATS_ONLY:
        if BUCKET_WINDOW:
            o = acc / l_i[:, None]
        else:  # 'chunk' as HF: exp(s - lse) with lse = max + log(sum) rounded in fp32 (the reference's)
            o = acc * tl.exp(m_i - (m_i + tl.log(l_i)))[:, None]
        o_ptrs = OUT + (bh64 * N + sidx_q[:, None]) * D + offs_d[None, :]
        tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=q_ok[:, None] & (offs_d[None, :] < D))


# --------------------------------------------------------------------------------------------- backward
@triton.jit
def _lsh_bwd_kernel(
    QK, V, DO, SHIFT, LOGN, WEIGHT, DELTA, SIDX, BKEY, PAD, DQK, DV,
    L, N, H, D, sqrt_d, n_chunks, seed32, dropout_p, masked, self_masked,
    C: tl.constexpr, BEFORE: tl.constexpr, N_OFF: tl.constexpr, N_SUB: tl.constexpr,
    BUCKET_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
):
    """One program: BLOCK sorted rows of one batch*head, first as keys (dK, dV), then as queries (dQ).

    DO (BH, L, D) grad of the combined output; SHIFT, LOGN, WEIGHT (BH, N) fp32 per sorted entry (at
    r*L+pos): the terms of the probabilities the forward used, P = exp((S - SHIFT) - LOGN) * WEIGHT (the
    reference's ``probability_terms``); DELTA (BH, L) rowsum(dO * O). dS = P * (dP - delta). Writes DQK, DV
    (BH, N, D) fp32 at row r*L+pos (summed over rounds later); DQK already holds dQ plus the
    key-normalisation backward of dK.
    """
    pid, bh = tl.program_id(0), tl.program_id(1)
    cq, sub = pid // N_SUB, pid % N_SUB
    bh64 = bh.to(tl.int64)
    QK_bh, V_bh, DO_bh = QK + bh64 * L * D, V + bh64 * L * D, DO + bh64 * L * D
    SIDX_bh, BKEY_bh, PAD_b = SIDX + bh64 * N, BKEY + bh64 * N, PAD + (bh64 // H) * L
    SHIFT_bh, LOGN_bh, WEIGHT_bh, DELTA_bh = SHIFT + bh64 * N, LOGN + bh64 * N, WEIGHT + bh64 * N, DELTA + bh64 * L
    key_dtype = QK.dtype.element_ty
    drop_scale = 1.0 / (1.0 - dropout_p)

    ar = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    slot_o = sub * BLOCK + ar  # slot of the own rows inside their chunk
    o_ok = slot_o < C
    rows_o = cq * C + slot_o
    tile_o = o_ok[:, None] & d_ok[None, :]
    # each phase gathers only what it uses: tiles live across both phases cost registers (spills)
    sidx_o, pos_o, key_pos_o, bucket_o, _x, rk_o, k_o = _load_rows(
        SIDX_bh, BKEY_bh, PAD_b, QK_bh, rows_o, o_ok, offs_d, L, D, sqrt_d, HAS_PAD, BUCKET_WINDOW, key_dtype)
    k_o = k_o.to(DOT_DTYPE)
    v_o = tl.load(V_bh + pos_o[:, None] * D + offs_d[None, :], mask=tile_o, other=0.0).to(DOT_DTYPE)

    # ---- phase 1: own rows as keys; visit every query tile whose window offset oi lands on this chunk
    dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    for oi in range(N_OFF):
        qc_raw = cq - (oi - BEFORE)
        qc = _wrap(qc_raw, n_chunks)
        for j in range(N_SUB):
            if _tile_needed(qc_raw, n_chunks, cq * C + sub * BLOCK, qc_raw * C + j * BLOCK, BLOCK, C,
                            BUCKET_WINDOW, CAUSAL):
                _slot_q, q_ok, rows_q, sidx_q, pos_q, _kp, bucket_q, x_q, _rk, _k = _load_chunk_tile(
                    qc, j, ar, SIDX_bh, BKEY_bh, PAD_b, QK_bh, offs_d, L, D, sqrt_d, C, BLOCK, HAS_PAD,
                    BUCKET_WINDOW, key_dtype)
                q = x_q.to(key_dtype).to(DOT_DTYPE)
                tile_q = q_ok[:, None] & d_ok[None, :]
                do = tl.load(DO_bh + pos_q[:, None] * D + offs_d[None, :], mask=tile_q, other=0.0)
                do = do.to(DOT_DTYPE)
                shift = tl.load(SHIFT_bh + sidx_q, mask=q_ok, other=0.0)
                logn = tl.load(LOGN_bh + sidx_q, mask=q_ok, other=0.0)
                weight = tl.load(WEIGHT_bh + sidx_q, mask=q_ok, other=0.0)
                delta = tl.load(DELTA_bh + pos_q, mask=q_ok, other=0.0)
                s, allowed = _masked_scores(q, k_o, pos_q, key_pos_o, rows_q, rows_o, bucket_q, bucket_o,
                                            o_ok, L, masked, self_masked, C, BUCKET_WINDOW, CAUSAL, IEEE)
                p = tl.where(q_ok[:, None], tl.exp((s - shift[:, None]) - logn[:, None]) * weight[:, None], 0.0)
                dp = _dot(do, tl.trans(v_o), IEEE)
                if DROPOUT:
                    keep = _dropout_keep(bh, N, rows_q, oi * C + slot_o, seed32, dropout_p, N_OFF * C)
                    dp = tl.where(keep, dp * drop_scale, 0.0)
                    p_drop = tl.where(keep, p * drop_scale, 0.0)
                else:
                    p_drop = p
                dv += _dot(tl.trans(p_drop).to(DOT_DTYPE), do, IEEE)
                ds = tl.where(allowed, p * (dp - delta[:, None]), 0.0)
                dk += _dot(tl.trans(ds).to(DOT_DTYPE), q, IEEE)
    out_rows = (bh64 * N + sidx_o[:, None]) * D + offs_d[None, :]
    tl.store(DV + out_rows, dv, mask=tile_o)
    # key normalisation backward (linear in dk, so per-round partial sums are fine):
    # d/dx [x * rk(x)] applied to g = rk * g - rk^3 * x * (x . g)
    x_o = tl.load(QK_bh + pos_o[:, None] * D + offs_d[None, :], mask=tile_o, other=0.0).to(tl.float32)
    dqk = rk_o[:, None] * dk - (rk_o * rk_o * rk_o * tl.sum(x_o * dk, 1))[:, None] * x_o

    # ---- phase 2: own rows as queries; the same key tiles as the forward
    q_o = x_o.to(key_dtype).to(DOT_DTYPE)
    do_o = tl.load(DO_bh + pos_o[:, None] * D + offs_d[None, :], mask=tile_o, other=0.0).to(DOT_DTYPE)
    shift_o = tl.load(SHIFT_bh + sidx_o, mask=o_ok, other=0.0)
    logn_o = tl.load(LOGN_bh + sidx_o, mask=o_ok, other=0.0)
    weight_o = tl.load(WEIGHT_bh + sidx_o, mask=o_ok, other=0.0)
    delta_o = tl.load(DELTA_bh + pos_o, mask=o_ok, other=0.0)
    for oi in range(N_OFF):
        kc_raw = cq + oi - BEFORE
        kc = _wrap(kc_raw, n_chunks)
        for j in range(N_SUB):
            if _tile_needed(kc_raw, n_chunks, kc_raw * C + j * BLOCK, cq * C + sub * BLOCK, BLOCK, C,
                            BUCKET_WINDOW, CAUSAL):
                slot_k, k_ok, rows_k, _s, pos_k, key_pos_k, bucket_k, _x, _rk, k = _load_chunk_tile(
                    kc, j, ar, SIDX_bh, BKEY_bh, PAD_b, QK_bh, offs_d, L, D, sqrt_d, C, BLOCK, HAS_PAD,
                    BUCKET_WINDOW, key_dtype)
                k = k.to(DOT_DTYPE)
                vt = tl.load(V_bh + pos_k[:, None] * D + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :],
                             other=0.0).to(DOT_DTYPE)
                s, allowed = _masked_scores(q_o, k, pos_o, key_pos_k, rows_o, rows_k, bucket_o, bucket_k,
                                            k_ok, L, masked, self_masked, C, BUCKET_WINDOW, CAUSAL, IEEE)
                p = tl.exp((s - shift_o[:, None]) - logn_o[:, None]) * weight_o[:, None]
                dp = _dot(do_o, tl.trans(vt), IEEE)
                if DROPOUT:
                    keep = _dropout_keep(bh, N, rows_o, oi * C + slot_k, seed32, dropout_p, N_OFF * C)
                    dp = tl.where(keep, dp * drop_scale, 0.0)
                ds = tl.where(allowed, p * (dp - delta_o[:, None]), 0.0)
                dqk += _dot(ds.to(DOT_DTYPE), k, IEEE)
    tl.store(DQK + out_rows, dqk, mask=tile_o)


# ---------------------------------------------------------------------------------------------- launches
def interpreting() -> bool:
    """Were the kernels decorated under TRITON_INTERPRET=1 (decided at import, like Triton does)?"""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_lsh_fwd_kernel, InterpretedFunction)


def _on_device(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the *current* CUDA device: make it the tensors' one (CPU: interpreter, no-op)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _tiles(chunk_len: int, d: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK rows, BLOCK_D, num_warps) per program.

    Chosen from the sm_90 register use reported by cuobjdump for bf16 (255 registers is the cap; any
    stack means spills): forward 64x64 tiles fit 4 warps, 128x64 and 64x128 need 8; the backward holds
    twice the live tiles, so it takes 64 rows at D=64 and 32 rows at D=128, with 8 warps.
    """
    block_d = max(16, triton.next_power_of_2(d))
    cap = (64 if d <= 64 else 32) if backward else (128 if d <= 64 else 64)
    block = min(cap, max(16, triton.next_power_of_2(chunk_len)))
    if backward:
        warps = 8 if block * block_d >= 64 * 64 else 4
    else:
        warps = 4 if block * block_d <= 64 * 64 else 8
    return block, block_d, warps


def _launch_args(qk: Tensor, sorted_idx: Tensor, key_padding_mask: Tensor | None, spec: LshSpec, dropout_p: float,
                 dropout_seed: int, backward: bool):
    """Runtime scalars, compile-time constants (with num_warps) and grid shared by both kernels."""
    b, h, length, d = qk.shape
    n_total = sorted_idx.shape[-1]
    torch._check(n_total * d < 2**31, lambda: f"n_hashes*L*D = {n_total * d} is over 2**31 (int32 indexing)")
    offsets = spec.offsets()
    block, block_d, num_warps = _tiles(spec.chunk_len, d, backward)
    n_sub = triton.cdiv(spec.chunk_len, block)
    n_chunks = n_total // spec.chunk_len
    masked, self_masked = mask_values(qk.dtype)
    seed32 = (dropout_seed ^ (dropout_seed >> 32)) & 0xFFFFFFFF  # the reference's seed folding
    scalars = (length, n_total, h, d, math.sqrt(d), n_chunks, seed32, float(dropout_p), masked, self_masked)
    consts = dict(
        C=spec.chunk_len, BEFORE=-offsets[0], N_OFF=len(offsets), N_SUB=n_sub,
        BUCKET_WINDOW=spec.window == "bucket", CAUSAL=spec.causal, HAS_PAD=key_padding_mask is not None,
        DROPOUT=dropout_p > 0, BLOCK=block, BLOCK_D=block_d, IEEE=qk.dtype == torch.float32,
        DOT_DTYPE=tl.float32 if interpreting() else _TL_DTYPES[qk.dtype], num_warps=num_warps,
    )
    return scalars, consts, (n_chunks * n_sub, b * h)


def _forward_rounds(qk: Tensor, v: Tensor, sorted_idx: Tensor, bucket_key: Tensor,
                    key_padding_mask: Tensor | None, spec: LshSpec, dropout_p: float, dropout_seed: int,
                    stats_only: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """Per-round outputs (B*H, n, L, D) in v's dtype (None if stats_only) and softmax stats row_max,
    log_sum (B*H, n, L) fp32 (logsumexp = row_max + log_sum), as the reference's ``attend_sorted``."""
    b, h, length, d = qk.shape
    n = sorted_idx.shape[-1] // length
    scalars, consts, grid = _launch_args(qk, sorted_idx, key_padding_mask, spec, dropout_p, dropout_seed, backward=False)
    row_max = torch.empty(b * h, n, length, device=qk.device, dtype=torch.float32)
    log_sum = torch.empty_like(row_max)
    o = row_max if stats_only else torch.empty(b * h, n, length, d, device=qk.device, dtype=v.dtype)
    pad = key_padding_mask.contiguous() if key_padding_mask is not None else sorted_idx  # dummy when unused
    with _on_device(qk):
        _lsh_fwd_kernel[grid](qk, v, sorted_idx, bucket_key, pad, o, row_max, log_sum, *scalars,
                              STATS_ONLY=stats_only, **consts)
    return (None if stats_only else o), row_max, log_sum


def _backward_rounds(qk: Tensor, v: Tensor, grad_out: Tensor, terms: tuple[Tensor, Tensor, Tensor], delta: Tensor,
                     sorted_idx: Tensor, bucket_key: Tensor, key_padding_mask: Tensor | None,
                     spec: LshSpec, dropout_p: float, dropout_seed: int) -> tuple[Tensor, Tensor]:
    """Per-round gradients (B*H, n, L, D) fp32 of qk and v; ``terms`` (shift, log_norm, weight) (B*H, n*L)
    from ``_probability_terms``, delta (B*H, L) fp32."""
    b, h, length, d = qk.shape
    n = sorted_idx.shape[-1] // length
    scalars, consts, grid = _launch_args(qk, sorted_idx, key_padding_mask, spec, dropout_p, dropout_seed, backward=True)
    dqk = torch.empty(b * h, n, length, d, device=qk.device, dtype=torch.float32)
    dv = torch.empty_like(dqk)
    pad = key_padding_mask.contiguous() if key_padding_mask is not None else sorted_idx  # dummy when unused
    with _on_device(qk):
        _lsh_bwd_kernel[grid](qk, v, grad_out, *terms, delta, sorted_idx, bucket_key, pad, dqk, dv, *scalars,
                              **consts)
    return dqk, dv


def _probability_terms(row_max: Tensor, log_sum: Tensor, spec: LshSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Per-round stats (B*H, n, L) -> the reference's ``probability_terms`` as (B*H, n*L) fp32 arrays
    (shift, log_norm, weight), indexed like the sorted entries (r*L + pos); absent terms as 0 and 1."""
    bh, n, length = row_max.shape
    stats = torch.stack([row_max, log_sum]).transpose(1, 2).reshape(2, n, bh * length)
    shift, log_norm, weight = probability_terms(stats, spec.hf_rounding)
    log_norm = torch.zeros_like(shift) if log_norm is None else log_norm
    weight = torch.ones_like(shift) if weight is None else weight
    return tuple(t.view(n, bh, length).transpose(0, 1).reshape(bh, n * length) for t in (shift, log_norm, weight))


def _attention_order(buckets: Tensor, spec: LshSpec) -> tuple[Tensor, Tensor, LshSpec]:
    """The sort the kernels walk, as the reference's ``Window.layout``: every round, or for a plain 'chunk'
    attention (the sequence fits one chunk) one unhashed round whose chunk sees only itself."""
    # (B, H, n*L) each: O(n_hashes x L) integers
    sorted_idx, bucket_key = sort_by_bucket(attended_buckets(buckets, spec))
    if spec.is_plain(buckets.shape[-1]):
        spec = dataclasses.replace(spec, chunks_before=0, chunks_after=0)
    return sorted_idx, bucket_key, spec


def lsh_attention_triton_with_stats(
    qk: Tensor, v: Tensor, rotations: Tensor, key_padding_mask: Tensor | None, buckets: Tensor | None,
    spec: LshSpec, dropout_p: float = 0.0, dropout_seed: int = 0, inner: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`lsh_attention_triton` plus the per-round softmax statistics (2, n_hashes, B*H*L) laid out as
    the reference's (``forward.lsh_attention_forward``), rows ordered (b, pos, h) when ``inner``."""
    check_inputs(qk, v, rotations, buckets, spec)
    b, h, length, d = qk.shape
    buckets = buckets_or_hash(qk, rotations, key_padding_mask, buckets, spec)
    sorted_idx, bucket_key, walked = _attention_order(buckets, spec)
    o, row_max, log_sum = _forward_rounds(qk.contiguous(), v.contiguous(), sorted_idx, bucket_key,
                                          key_padding_mask, walked, dropout_p, dropout_seed, stats_only=False)
    row_max, log_sum = (t.transpose(0, 1) for t in (row_max, log_sum))  # (n, B*H, L)
    out = combine_rounds(o.transpose(0, 1), row_max, log_sum, spec.hf_rounding).view(b, h, length, d)
    rows = [t.reshape(-1, b, h, length) for t in (row_max, log_sum)]
    if inner:
        rows = [t.transpose(2, 3) for t in rows]
    stats = pad_rounds(*(t.reshape(t.shape[0], -1) for t in rows), spec.n_hashes)
    return out, buckets, stats


def lsh_attention_triton(
    qk: Tensor, v: Tensor, rotations: Tensor, key_padding_mask: Tensor | None, buckets: Tensor | None,
    spec: LshSpec, dropout_p: float = 0.0, dropout_seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Forward of ``torch.ops.reformer.lsh_attention`` with the fused kernel; same arguments and outputs
    as ``lsh_attention_reference``: (out (B, H, L, D) in v's dtype, buckets (B, H, n_hashes, L))."""
    out, buckets, _ = lsh_attention_triton_with_stats(qk, v, rotations, key_padding_mask, buckets, spec, dropout_p,
                                                      dropout_seed)
    return out, buckets


def lsh_attention_backward_triton(
    grad_out: Tensor, qk: Tensor, v: Tensor, out: Tensor, buckets: Tensor, key_padding_mask: Tensor | None,
    spec: LshSpec, dropout_p: float = 0.0, dropout_seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Backward of the op, as ``backward.lsh_attention_backward_reference`` (which it checks against).

    Returns (grad_qk, grad_v) (B, H, L, D) contiguous, in the dtypes of qk and v.
    """
    b, h, length, d = qk.shape
    qk, v, grad_out, out = qk.contiguous(), v.contiguous(), grad_out.contiguous(), out.contiguous()
    sorted_idx, bucket_key, walked = _attention_order(buckets, spec)
    _, row_max, log_sum = _forward_rounds(qk, v, sorted_idx, bucket_key, key_padding_mask, walked, dropout_p,
                                          dropout_seed, stats_only=True)
    terms = _probability_terms(row_max, log_sum, spec)
    delta = (grad_out.float() * out.float()).sum(-1).view(b * h, length)  # rowsum(dO * O)
    dqk, dv = _backward_rounds(qk, v, grad_out, terms, delta, sorted_idx, bucket_key, key_padding_mask, walked,
                               dropout_p, dropout_seed)
    return dqk.sum(1).view(b, h, length, d).to(qk.dtype), dv.sum(1).view(b, h, length, d).to(v.dtype)

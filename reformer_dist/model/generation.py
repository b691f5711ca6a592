"""Cached incremental decoding: ``prefill`` a prompt once, then ``decode_step`` one token at a time.

The cache is a flat ``dict[str, Tensor]`` (keys ``"<layer>.<name>"``) of fixed-shape tensors, and both
functions are pure tensor code — no ``.item()``, no Python branch on tensor values — so the export
engineer can trace them into ONNX prefill / decode graphs. Each layer's cache depends on its kind:

``local``  a ring of the last ``(chunks_before + 1) * chunk_len`` keys/values (``k`` already divided by
           sqrt(D), as the model's local attention does) with their positions ``pos`` (-1 = empty). A query
           at position p sees the ring entries at positions ``>= (p // c - chunks_before) * c``: exactly the
           keys of its own chunk and the chunks before it, as in the uncached model.
``full``   a ring of keys/values of capacity ``max_cache_len`` (default: the whole generation). Exact
           while the sequence fits; beyond it, a sliding window over the most recent tokens.
``lsh``, ``lsh_window="bucket"``
           per (batch, head, round, bucket) a ring of the last ``chunk_len + 1`` keys (unit-normalised) and
           values and their positions, plus ``count`` tokens seen per bucket and the layer's rotations
           ``rot``. The new token is hashed with the same rotations and replaces its bucket's oldest entry,
           then attends to the ring: the last ``chunk_len`` earlier tokens of its bucket and itself
           (self-masked, so only when it is alone); rounds are combined by logsumexp weights. Bounded by
           ``n_buckets * (chunk_len + 1)`` per round, and equal to recomputation because a bucket window
           only ever looks at earlier tokens.
``lsh``, ``lsh_window="chunk"`` (imported HF checkpoints)
           HF's cached algorithm (``ReformerDynamicCache`` / ``_get_relevant_hid_states_and_buckets``)
           in fixed shapes: every token's key/value and HF-style bucket value (round offsets included),
           and per round the positions in bucket-sorted order. The new token is hashed, placed into the
           sorted order by counting (no re-sort), and attends its sorted chunk plus ``chunks_before``
           chunks (wrapping modulo the length, duplicates included, as HF); while HF would not have cached
           buckets yet (the first ``chunk_len`` tokens) it attends to everything, as HF does. The softmax
           and round combination use HF's fp32 formulas ``exp(s - logsumexp(s))``, so greedy tokens equal
           HF's own cached ``generate``. Recomputing the sequence would differ by construction: later
           tokens move the chunk boundaries of the sorted order.

Batches hold prompts of different lengths **right-padded** (``attention_mask`` 1 = real token, then 0s):
every row continues at its own position (``position`` is per row), so the decode step needs no padding
at all, and the strictly causal kinds prefill exactly as if each row were alone. With ``chunk`` windows
the prefill of a padded batch follows HF's padded forward (padding in its own bucket), which moves chunk
boundaries slightly versus a row alone. (HF's own cached ``generate`` mixes up rows for batch > 1: it
gathers every row's hidden states from row 0; batch 1 is the parity reference.)

LSH rotations come from the model (:meth:`ReformerLM.draw_rotations`: its frozen ones, else one fixed
draw) and are held in the cache, so prefill and every step hash alike, and so do the exported graphs and
every serving backend. Choosing tokens (sampling, penalties, stop rules) and batching sequences that join
and leave is the decoding runtime's work (``reformer_dist.decoding``), shared by every backend.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from reformer_dist.model.attention import merge_heads, split_heads
from reformer_dist.model.lsh_attention import hash_vectors, mask_values, normalize_keys

if TYPE_CHECKING:
    from reformer_dist.model.reformer import ReformerLM

Cache = dict[str, Tensor]


# ------------------------------------------------------------------------------------------ helpers
def _ring_from_sequence(x: Tensor, lengths: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """The last ``size`` entries of each row of x (B, H, L, D) as a ring indexed by ``position % size``.

    Returns (ring (B, H, size, D), pos (B, size)), pos = -1 where a slot is still empty.
    """
    slot = torch.arange(size, device=x.device)
    # newest position p < length with p % size == slot
    pos = slot + size * torch.div(lengths[:, None] - 1 - slot, size, rounding_mode="floor")  # (B, size)
    pos = torch.where(pos >= 0, pos, -1)
    index = pos.clamp(min=0)[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1])
    return torch.gather(x, 2, index), pos


def _write(buf: Tensor, dim: int, index: Tensor, src: Tensor, inplace: bool) -> Tensor:
    """``buf`` with ``src`` scattered along ``dim`` at ``index`` (shaped like src). In place for eager
    generation, so a step does not copy the whole cache; out of place (a pure function) for tracing."""
    return buf.scatter_(dim, index, src) if inplace else buf.scatter(dim, index, src)


def _fit(x: Tensor, dim: int, size: int, fill: int) -> Tensor:
    """x cropped or padded (with ``fill``) along ``dim`` to ``size``."""
    if x.shape[dim] >= size:
        return x.narrow(dim, 0, size)
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, size - x.shape[dim]]
    return F.pad(x, pad, value=fill)


def _axial_at(model: ReformerLM, position: Tensor) -> Tensor:
    """Axial positional embedding rows at ``position`` (B,): (B, d_model), as the model's table."""
    emb = model.embeddings.position_embeddings
    pos = position % math.prod(emb.shape)
    parts, stride = [], math.prod(emb.shape)
    for n, weight in zip(emb.shape, emb.weights):
        stride //= n
        parts.append(weight[torch.div(pos, stride, rounding_mode="floor") % n])
    return torch.cat(parts, dim=-1)


def _hf_prefill_layout(model: ReformerLM, length: int) -> tuple[int, bool]:
    """HF's padded length for a prompt of ``length`` and whether HF pads it (it pads to the lcm of the
    chunk lengths only beyond the smallest chunk length)."""
    cfg = model.config
    kinds = set(cfg.layer_kinds())
    chunks = [c for kind, c in (("lsh", cfg.lsh_chunk_len), ("local", cfg.local_chunk_len)) if kind in kinds]
    lcm = math.lcm(*chunks, 1)
    if not chunks or length <= min(chunks) or length % lcm == 0:
        return length, False
    return math.ceil(length / lcm) * lcm, True


# ------------------------------------------------------------------------------------------ prefill
def _prefill_local(sa, h: Tensor, mask: Tensor | None, lengths: Tensor, capacity: int, full: bool):
    k, v = split_heads(sa.key(h), sa.n_heads), split_heads(sa.value(h), sa.n_heads)
    out = sa(h, mask, None, None)[0]  # the model's own attention (its generator is unused in eval)
    if full:
        size = capacity
    else:
        size = (sa.chunks_before + 1) * sa.chunk_len
        k = k / math.sqrt(k.shape[-1])
    k_ring, pos = _ring_from_sequence(k, lengths, size)
    v_ring, _ = _ring_from_sequence(v, lengths, size)
    return out, {"k": k_ring, "v": v_ring, "pos": pos}


def _prefill_lsh(sa, h: Tensor, mask: Tensor | None, lengths: Tensor, capacity: int, rot: Tensor,
                 hf_stride_pad: Tensor, hf_hashed: bool, counting: bool):
    qk, v = split_heads(sa.query_key(h), sa.n_heads), split_heads(sa.value(h), sa.n_heads)
    out, buckets = torch.ops.reformer.lsh_attention(
        qk, v, rot, mask, None, sa.n_buckets, sa.chunk_len, sa.chunks_before, sa.chunks_after, sa.window,
        sa.causal, 0.0, 0)
    out = merge_heads(out)
    k = normalize_keys(qk)
    b, n_heads, n_hashes, length = buckets.shape
    nb = math.prod(sa.n_buckets)
    pos = torch.arange(length, device=h.device)
    real = pos[None, :] < lengths[:, None]  # (B, L)
    if sa.window == "chunk":
        rounds = torch.arange(n_hashes, device=h.device).view(1, 1, n_hashes, 1)
        value = buckets + rounds * (nb + hf_stride_pad.long())
        value = torch.where(real[:, None, None, :], value, n_hashes * (nb + 2))  # padding sorts last
        order = torch.sort(value * length + pos, dim=-1).indices  # keys are unique: a stable order
        # positions past a row's length are padding: cropping or extending them to capacity is safe
        cache = {
            "rot": rot,
            "k": _fit(k, 2, capacity, 0),
            "v": _fit(v, 2, capacity, 0),
            "bucket": _fit(value, 3, capacity, n_hashes * (nb + 2)),
            "order": _fit(order, 3, capacity, 0),
            "hashed": torch.full((b,), hf_hashed, dtype=torch.bool, device=h.device),
        }
        return out, cache
    # bucket window: per bucket, the last chunk_len + 1 tokens (a decode step writes the new one first, see
    # _step_lsh_bucket), at ring slot (rank within bucket) % (chunk_len + 1)
    c = sa.chunk_len + 1
    real = buckets < nb  # (B, H, n, L); padding sits in bucket nb
    rank, counts = _bucket_ranks_counting(buckets, sa.n_buckets) if counting else _bucket_ranks_sorting(buckets, nb)
    seen = torch.gather(counts, 3, buckets.clamp(max=nb - 1))  # tokens in each position's bucket
    keep = real & (rank >= seen - c)
    slot = torch.where(keep, buckets * c + rank % c, nb * c)  # nb * c: a discard slot, dropped below
    d = k.shape[-1]
    index = slot[..., None].expand(-1, -1, -1, -1, d)

    def scatter(x: Tensor) -> Tensor:  # (B, H, L, D) -> per round, each kept position at its slot
        buf = x.new_zeros(b, n_heads, n_hashes, nb * c + 1, d)
        return buf.scatter(3, index, x[:, :, None].expand(-1, -1, n_hashes, -1, -1))[:, :, :, : nb * c]

    pos_buf = torch.full((b, n_heads, n_hashes, nb * c + 1), -1, dtype=torch.long, device=h.device)
    cache = {
        "rot": rot,
        "k": scatter(k),
        "v": scatter(v),
        "pos": pos_buf.scatter(3, slot, pos.expand_as(slot))[..., : nb * c],
        "count": counts,
    }
    return out, cache


def _bucket_ranks_sorting(buckets: Tensor, nb: int) -> tuple[Tensor, Tensor]:
    """Each position's rank among the earlier positions of its bucket (B, H, n, L) and the number of
    tokens per real bucket (B, H, n, nb), by a stable sort on (bucket, position): eager's layout."""
    length = buckets.shape[-1]
    pos = torch.arange(length, device=buckets.device)
    order = torch.sort(buckets * length + pos, dim=-1).indices  # (B, H, n, L) positions by (bucket, pos)
    counts = torch.zeros(*buckets.shape[:3], nb + 1, dtype=torch.long, device=buckets.device)
    counts = counts.scatter_add(3, buckets, torch.ones_like(buckets))
    starts = torch.cumsum(counts, dim=-1) - counts
    sorted_rank = torch.arange(length, device=buckets.device) - torch.gather(starts, 3, torch.gather(buckets, 3, order))
    rank = torch.empty_like(buckets).scatter_(3, order, sorted_rank)
    return rank, counts[..., :nb]


def _bucket_ranks_counting(buckets: Tensor, factors: list[int]) -> tuple[Tensor, Tensor]:
    """As :func:`_bucket_ranks_sorting`, by counting, because TensorRT takes neither a TopK whose K is the
    prompt length nor an INT64 CumSum: the exported prefill's layout. A least-significant-digit radix sort
    with one stable counting pass per bucket factor (one-hot + fp32 CumSum, exact below 2**24 tokens), so
    it costs B*H*n*L*(factor + 1) floats per pass rather than B*H*n*L*n_buckets; the tokens per bucket are
    a sum over positions of (top digit one-hot) x (lower digits one-hot): one MatMul."""
    nb, top_factor = math.prod(factors), factors[-1]
    positions = torch.arange(buckets.shape[-1], device=buckets.device).expand_as(buckets)
    order, stride = positions, 1  # order: slot -> position, sorted by the digits so far
    for i, factor in enumerate(factors):
        digit = torch.div(buckets, stride, rounding_mode="floor")
        last = i == len(factors) - 1
        digit = digit if last else digit % factor  # padding (bucket nb) is the top digit's extra value
        keys = torch.gather(digit, 3, order)
        onehot = (keys[..., None] == torch.arange(factor + last, device=buckets.device)).float()
        running = torch.cumsum(onehot, dim=3)  # (B, H, n, L, width): each value's count up to each slot
        counts = running[:, :, :, -1]
        starts = torch.cumsum(counts, dim=-1) - counts
        slot = torch.gather(running, 4, keys[..., None])[..., 0] + torch.gather(starts, 3, keys) - 1
        order = torch.zeros_like(order).scatter(3, slot.long(), order)
        stride *= factor
    slot_of = torch.zeros_like(order).scatter(3, order, positions)  # position -> slot in (bucket, position)
    low = nb // top_factor
    top_hot = (torch.div(buckets, low, rounding_mode="floor")[..., None]
               == torch.arange(top_factor + 1, device=buckets.device)).float()
    low_hot = ((buckets % low)[..., None] == torch.arange(low, device=buckets.device)).float()
    counts = torch.matmul(top_hot.transpose(-1, -2), low_hot)[:, :, :, :top_factor].flatten(3)  # (B, H, n, nb)
    starts = torch.cumsum(counts, dim=-1) - counts
    rank = slot_of - torch.gather(starts, 3, buckets.clamp(max=nb - 1)).long()
    return rank, counts.long()


def prefill(model: ReformerLM, input_ids: Tensor, attention_mask: Tensor | None = None,
            rotations: list[Tensor | None] | None = None, max_len: int | None = None,
            max_cache_len: int | None = None, counting: bool = False) -> tuple[Tensor, Cache]:
    """Run the prompt and build the cache.

    input_ids (B, L) right-padded, attention_mask (B, L) 1 = real token (None: all real); rotations: one
    per layer (default: the model's, :meth:`ReformerLM.draw_rotations`); max_len = the longest sequence
    the cache must hold (default max_seq_len); max_cache_len bounds full-attention caches; counting: lay
    out bucket-window LSH caches by counting instead of sorting (same cache; the TensorRT-legal form the
    exported prefill graph uses).
    Returns the logits of each row's last real token (B, vocab) and the cache; the next token of row b
    goes to position ``lengths[b]``.
    """
    cfg = model.config
    batch, length = input_ids.shape
    if rotations is None:
        rotations = model.draw_rotations()
    max_len = cfg.max_seq_len if max_len is None else max_len
    full_len = max_len if max_cache_len is None else min(max_len, max_cache_len)
    lengths = (torch.full((batch,), length, device=input_ids.device) if attention_mask is None
               else attention_mask.long().sum(-1))
    # as ReformerLM.hidden_states: right-pad to the chunk multiple, padding masked out
    padded = math.ceil(length / cfg.pad_multiple()) * cfg.pad_multiple()
    mask = None if attention_mask is None else attention_mask.bool()
    if padded != length:
        input_ids = F.pad(input_ids, (0, padded - length))
        real = torch.ones(batch, length, dtype=torch.bool, device=input_ids.device) if mask is None else mask
        mask = F.pad(real, (0, padded - length), value=False)
    # HF's prefill state for 'chunk' windows: a padded forward (its own chunk padding or padded rows) adds
    # a padding bucket, which widens the round offsets of the cached buckets by one
    hf_len, hf_padded = _hf_prefill_layout(model, length)
    hf_stride_pad = torch.tensor(hf_padded, device=input_ids.device)
    if attention_mask is not None:
        hf_stride_pad = hf_stride_pad | (attention_mask == 0).any()
    hf_hashed = hf_len > cfg.lsh_chunk_len  # HF hashes a prompt only if it is longer than one chunk

    x = model.embeddings(input_ids)
    x1, x2, cache = x, x, {}
    for i, layer in enumerate(model.layers):
        block = layer.attention
        h = block.layer_norm(x2)
        if block.kind == "lsh":
            out, layer_cache = _prefill_lsh(block.self_attention, h, mask, lengths, max_len, rotations[i],
                                            hf_stride_pad, hf_hashed, counting)
        else:
            out, layer_cache = _prefill_local(block.self_attention, h, mask, lengths, full_len,
                                              block.kind == "full")
        cache.update({f"{i}.{name}": t for name, t in layer_cache.items()})
        x1 = x1 + block.output(out).to(x1.dtype)
        x2 = x2 + layer.feed_forward(x1)
    last = (lengths - 1)[:, None, None].expand(-1, 1, x1.shape[-1])
    hidden = torch.cat([torch.gather(x1, 1, last), torch.gather(x2, 1, last)], dim=-1)[:, 0]
    return model.lm_head(model.final_norm(hidden)), cache


# ------------------------------------------------------------------------------------------ decode
def _step_local(sa, h: Tensor, position: Tensor, c: Cache, full: bool, inplace: bool) -> tuple[Tensor, Cache]:
    q, k, v = (split_heads(proj(h), sa.n_heads) for proj in (sa.query, sa.key, sa.value))  # (B, H, 1, D)
    _, n_heads, _, d = q.shape
    if not full:
        k = k / math.sqrt(d)
    slot = position % c["k"].shape[2]  # (B,) ring slot of the new token
    index = slot.view(-1, 1, 1, 1).expand(-1, n_heads, 1, d)
    keys, values = _write(c["k"], 2, index, k, inplace), _write(c["v"], 2, index, v, inplace)
    pos = _write(c["pos"], 1, slot[:, None], position[:, None], inplace)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float()  # (B, H, 1, W)
    if full:
        scores = scores / math.sqrt(d)
        allowed = pos >= 0
    else:
        first = (torch.div(position, sa.chunk_len, rounding_mode="floor") - sa.chunks_before) * sa.chunk_len
        allowed = (pos >= 0) & (pos >= first[:, None])
    scores = scores.masked_fill(~allowed[:, None, None, :], mask_values(q.dtype)[0])
    out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), values)
    return merge_heads(out), {"k": keys, "v": values, "pos": pos}


def _step_lsh_bucket(sa, qk: Tensor, v: Tensor, position: Tensor, c: Cache, inplace: bool) -> tuple[Tensor, Cache]:
    """Bucket window: the new token joins its bucket's ring of chunk_len + 1 slots (replacing the oldest),
    then attends to that ring: the last chunk_len earlier tokens of its bucket, and itself self-masked.
    Written first, read after: nothing reads the incoming cache once it is written, so a runtime may
    update it in place (ONNX Runtime binds each ``present.*`` output to its ``cache.*`` input)."""
    b, n_heads, _, d = qk.shape
    width = sa.chunk_len + 1
    buckets = hash_vectors(qk, c["rot"], sa.n_buckets, None)[..., 0]  # (B, H, n)
    n_hashes = buckets.shape[-1]
    seen = torch.gather(c["count"], 3, buckets[..., None])  # (B, H, n, 1) tokens of the bucket so far
    slot = buckets[..., None] * width + seen % width
    index = slot[..., None].expand(-1, -1, -1, -1, d)
    keys = _write(c["k"], 3, index, normalize_keys(qk)[:, :, None].expand(-1, -1, n_hashes, -1, -1), inplace)
    values = _write(c["v"], 3, index, v[:, :, None].expand(-1, -1, n_hashes, -1, -1), inplace)
    pos = _write(c["pos"], 3, slot, position.view(-1, 1, 1, 1).expand_as(slot), inplace)
    count = _write(c["count"], 3, buckets[..., None], seen + 1, inplace)

    slots = buckets[..., None] * width + torch.arange(width, device=qk.device)  # (B, H, n, c+1)
    ring_k = torch.gather(keys, 3, slots[..., None].expand(-1, -1, -1, -1, d))  # (B, H, n, c+1, D)
    ring_v = torch.gather(values, 3, slots[..., None].expand(-1, -1, -1, -1, d))
    ring_pos = torch.gather(pos, 3, slots)
    masked, self_masked = mask_values(qk.dtype)
    scores = torch.einsum("bhqd,bhnkd->bhnk", qk, ring_k).float().masked_fill(ring_pos < 0, masked)
    scores = scores.masked_fill(ring_pos == position.view(-1, 1, 1, 1), self_masked)
    # the model's LSH op arithmetic: per-round softmax statistics kept as (max, log-sum) — at the -1e5
    # self-mask scale a folded logsumexp would lose ~1e-2 in fp32 — then a softmax over rounds
    top = scores.amax(dim=-1, keepdim=True)  # (B, H, n, 1)
    probs = torch.exp(scores - top)
    total = probs.sum(dim=-1, keepdim=True)
    o = torch.einsum("bhnk,bhnkd->bhnd", (probs / total).to(v.dtype), ring_v)
    weights = torch.softmax((top - top.amax(dim=2, keepdim=True)) + total.log(), dim=2)  # (B, H, n, 1)
    out = (o * weights.to(o.dtype)).sum(dim=2, keepdim=True).transpose(1, 2)  # (B, 1, H, D)
    new = {"rot": c["rot"], "k": keys, "v": values, "pos": pos, "count": count}
    return out.reshape(b, 1, n_heads * d), new


def _hf_softmax(scores: Tensor) -> tuple[Tensor, Tensor]:
    """HF's fp32 softmax ``exp(s - logsumexp(s))`` and its logsumexp (not renormalised: at the -1e5
    self-mask scale the rounding of the logsumexp is visible, and parity needs the same rounding)."""
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.exp(scores - lse), lse


def _step_lsh_chunk(sa, qk: Tensor, v: Tensor, position: Tensor, c: Cache, inplace: bool) -> tuple[Tensor, Cache]:
    """HF's cached LSH step (chunk window) on fixed-capacity buffers."""
    b, n_heads, _, d = qk.shape
    capacity = c["k"].shape[2]
    chunk, before, after = sa.chunk_len, sa.chunks_before, sa.chunks_after
    nb = math.prod(sa.n_buckets)
    masked, self_masked = mask_values(qk.dtype)
    slot = torch.arange(capacity, device=qk.device)
    past = slot[None, :] < position[:, None]  # (B, C) tokens already cached

    # bucket value of the new token, with HF's round offsets: HF widens them by one when the cached
    # buckets reveal a padding bucket (a padded prefill), detected from their maximum
    raw = hash_vectors(qk, c["rot"], sa.n_buckets, None)  # (B, H, n, 1)
    n_hashes = raw.shape[2]
    cached_max = torch.where(past[:, None, None, :], c["bucket"], -1).amax(dim=(1, 2, 3))  # (B,)
    stride = nb + (cached_max > n_hashes * nb - 1).long()
    value = raw + torch.arange(n_hashes, device=qk.device).view(1, 1, -1, 1) * stride.view(-1, 1, 1, 1)
    # its rank in each round's sorted order: cached entries with a smaller or equal value come first
    rank = ((c["bucket"] <= value) & past[:, None, None, :]).sum(-1, keepdim=True)  # (B, H, n, 1)
    shifted = torch.gather(c["order"], 3, (slot - (slot > rank).long()).clamp(min=0).expand_as(c["order"]))
    order = torch.where(slot == rank, position.view(-1, 1, 1, 1), shifted)
    # store the new token (its slot is its position)
    index = position.view(-1, 1, 1, 1).expand(-1, n_heads, 1, d)
    keys = _write(c["k"], 2, index, normalize_keys(qk), inplace)
    values = _write(c["v"], 2, index, v, inplace)
    bucket = _write(c["bucket"], 3, position.view(-1, 1, 1, 1).expand_as(value), value, inplace)

    # window: the new token's sorted chunk and its neighbours, modulo the current length (HF wraps)
    width = chunk * (1 + before + after)
    start = (torch.div(rank, chunk, rounding_mode="floor") - before) * chunk
    sorted_idx = (start + torch.arange(width, device=qk.device)) % (position + 1).view(-1, 1, 1, 1)
    win_pos = torch.gather(order, 3, sorted_idx)  # (B, H, n, W) token positions
    flat = win_pos.flatten(2)[..., None].expand(-1, -1, -1, d)
    win_k = torch.gather(keys, 2, flat).view(b, n_heads, n_hashes, width, d)
    win_v = torch.gather(values, 2, flat).view(b, n_heads, n_hashes, width, d)
    scores = torch.einsum("bhqd,bhnkd->bhnk", qk, win_k).float()
    scores = scores.masked_fill(win_pos == position.view(-1, 1, 1, 1), self_masked)
    probs, lse = _hf_softmax(scores)  # lse (B, H, n, 1)
    o = torch.einsum("bhnk,bhnkd->bhnd", probs.to(v.dtype), win_v)
    windowed = (o * torch.exp(lse - torch.logsumexp(lse, dim=2, keepdim=True))).sum(dim=2)  # (B, H, D)

    # before HF caches buckets (fewer than chunk_len tokens so far) it attends to every token
    first = min(capacity, chunk + 1)
    scores = torch.einsum("bhqd,bhkd->bhk", qk, keys[:, :, :first]).float()
    scores = scores.masked_fill(slot[None, None, :first] > position.view(-1, 1, 1), masked)
    scores = scores.masked_fill(slot[None, None, :first] == position.view(-1, 1, 1), self_masked)
    probs, _ = _hf_softmax(scores)
    everything = torch.einsum("bhk,bhkd->bhd", probs.to(v.dtype), values[:, :, :first])

    out = torch.where(c["hashed"].view(-1, 1, 1), windowed, everything)
    new = {"rot": c["rot"], "k": keys, "v": values, "bucket": bucket, "order": order,
           "hashed": c["hashed"] | (position + 1 >= chunk)}
    return out.reshape(b, 1, n_heads * d), new


def decode_step(model: ReformerLM, token: Tensor, position: Tensor, cache: Cache,
                inplace: bool = False) -> tuple[Tensor, Cache]:
    """One new token per row: token (B,) int64 at position (B,) int64 -> (logits (B, vocab), new cache).

    A pure function by default (the input cache is left as it was); ``inplace=True`` writes the new
    entries into the input cache's tensors instead of copying them, which eager generation uses. Every
    layer writes its new entries before it reads the cache, and reads only what it wrote: an exported
    decode graph may therefore run with its outputs bound to its cache inputs (in place)."""
    x = (model.embeddings.word_embeddings(token) + _axial_at(model, position))[:, None]  # (B, 1, d_model)
    x1, x2, new_cache = x, x, {}
    for i, layer in enumerate(model.layers):
        block = layer.attention
        sa = block.self_attention
        c = {key.split(".", 1)[1]: t for key, t in cache.items() if key.split(".", 1)[0] == str(i)}
        h = block.layer_norm(x2)
        if block.kind == "lsh":
            qk, v = split_heads(sa.query_key(h), sa.n_heads), split_heads(sa.value(h), sa.n_heads)
            step = _step_lsh_chunk if sa.window == "chunk" else _step_lsh_bucket
            out, layer_cache = step(sa, qk, v, position, c, inplace)
        else:
            out, layer_cache = _step_local(sa, h, position, c, block.kind == "full", inplace)
        new_cache.update({f"{i}.{name}": t for name, t in layer_cache.items()})
        x1 = x1 + block.output(out).to(x1.dtype)
        x2 = x2 + layer.feed_forward(x1)
    return model.lm_head(model.final_norm(torch.cat([x1, x2], dim=-1)))[:, 0], new_cache


__all__ = ["Cache", "decode_step", "prefill"]

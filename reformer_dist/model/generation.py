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
from torch import Tensor, nn

from reformer_dist.model.attention import merge_heads, split_heads
from reformer_dist.model.lsh.hashing import hash_in_blocks, hash_vectors, rotated_buckets
from reformer_dist.model.lsh.layout import normalize_keys
from reformer_dist.model.lsh.spec import mask_values

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
def _prefill_local(sa, h: Tensor, mask: Tensor | None, lengths: Tensor, capacity: int, full: bool,
                   outputs: bool = True):
    """(attention output (B, L, H*D), or None without ``outputs``; the layer's cache)."""
    projected = sa.project(h)  # (q, k, v)
    k, v = (split_heads(p, sa.n_heads) for p in projected[1:])
    # the model's own attention (its generator is unused in eval)
    out = sa(projected, mask, None, None)[0] if outputs else None
    if full:
        size = capacity
    else:
        size = (sa.chunks_before + 1) * sa.chunk_len
        k = k / math.sqrt(k.shape[-1])
    k_ring, pos = _ring_from_sequence(k, lengths, size)
    v_ring, _ = _ring_from_sequence(v, lengths, size)
    return out, {"k": k_ring, "v": v_ring, "pos": pos}


def _prefill_lsh(sa, h: Tensor, mask: Tensor | None, lengths: Tensor, capacity: int, rot: Tensor,
                 hf_stride_pad: Tensor, hf_hashed: bool, counting: bool, outputs: bool = True):
    """(attention output (B, L, H*D), or None without ``outputs``; the layer's cache)."""
    qk, v = split_heads(sa.query_key(h), sa.n_heads), split_heads(sa.value(h), sa.n_heads)
    if outputs:
        out, buckets = torch.ops.reformer.lsh_attention(
            qk, v, rot, mask, None, *sa.spec.op_args(), 0.0, 0)
        out = merge_heads(out)
    else:  # the cache needs the buckets only (the op's: same hash, padding in bucket prod(n_buckets))
        # an exported graph's length is symbolic: no Python loop over blocks of it
        hash_fn = hash_vectors if torch.compiler.is_exporting() else hash_in_blocks
        out, buckets = None, hash_fn(qk, rot, list(sa.spec.n_buckets), mask)
    k = normalize_keys(qk)
    b, n_heads, n_hashes, length = buckets.shape
    nb = sa.spec.n_real_buckets
    pos = torch.arange(length, device=h.device)
    real = pos[None, :] < lengths[:, None]  # (B, L)
    if sa.spec.window == "chunk":
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
    # _step_lsh_bucket), the token of rank r within its bucket at ring slot r % (chunk_len + 1). Read from
    # the bucket-sorted order (a gather of whole rows, no scatter): ring slot j of a bucket holding n tokens
    # holds its rank r = j + c * floor((n - 1 - j) / c), the newest rank = j mod c (none if n <= j).
    c = sa.spec.chunk_len + 1
    order, counts, starts = (_bucket_order_counting(buckets, sa.spec.counting_digits(padding=True), nb) if counting
                             else _bucket_order_sorting(buckets, nb))
    j = torch.arange(c, device=h.device)
    newest = counts[..., None] - 1 - j  # (B, H, n, nb, c)
    rank = j + c * torch.div(newest, c, rounding_mode="floor")
    index = (starts[..., None] + rank).clamp(0, length - 1).flatten(3)  # (B, H, n, nb*c) into the order
    ring_pos = torch.where(newest.flatten(3) >= 0, torch.gather(order, 3, index), -1)  # -1 = empty slot
    # rows of (B*H*L, D): row (b*H + h) * L + position (empty slots read position 0: masked by pos = -1)
    first = (torch.arange(b * n_heads, device=h.device) * length).view(b, n_heads, 1, 1)
    rows = (first + ring_pos.clamp(min=0)).flatten()
    d = k.shape[-1]

    def ring(x: Tensor) -> Tensor:  # (B, H, L, D) -> (B, H, n, nb*c, D)
        return x.reshape(-1, d).index_select(0, rows).view(b, n_heads, n_hashes, nb * c, d)

    return out, {"rot": rot, "k": ring(k), "v": ring(v), "pos": ring_pos, "count": counts}


def _bucket_order_sorting(buckets: Tensor, nb: int) -> tuple[Tensor, Tensor, Tensor]:
    """The positions sorted by (bucket, position) (B, H, n, L), the tokens per real bucket (B, H, n, nb) and
    where each bucket starts in that order (B, H, n, nb), by a stable sort: eager's layout."""
    length = buckets.shape[-1]
    pos = torch.arange(length, device=buckets.device)
    order = torch.sort(buckets * length + pos, dim=-1).indices  # keys are unique: a stable order
    counts = torch.zeros(*buckets.shape[:3], nb + 1, dtype=torch.long, device=buckets.device)
    counts = counts.scatter_add(3, buckets, torch.ones_like(buckets))[..., :nb].contiguous()
    return order, counts, torch.cumsum(counts, dim=-1) - counts


def _bucket_order_counting(buckets: Tensor, widths: list[int], nb: int) -> tuple[Tensor, Tensor, Tensor]:
    """As :func:`_bucket_order_sorting`, by counting, because TensorRT takes neither a TopK whose K is the
    prompt length nor an INT64 CumSum: the exported prefill's layout. A least-significant-digit radix sort
    with one stable counting pass per digit of the bucket (``widths``: ``LshSpec.counting_digits``; one-hot
    + fp32 CumSum, exact below 2**24 tokens), so a pass costs B*H*n*L*width floats rather than
    B*H*n*L*n_buckets; the tokens per bucket are a sum over positions of (high part one-hot) x (low part
    one-hot), both about sqrt(nb) wide: one MatMul."""
    positions = torch.arange(buckets.shape[-1], device=buckets.device).expand_as(buckets)
    order, stride = positions, 1  # order: slot -> position, sorted by the digits so far
    for i, width in enumerate(widths):
        digit = torch.div(buckets, stride, rounding_mode="floor")
        digit = digit if i == len(widths) - 1 else digit % width
        keys = torch.gather(digit, 3, order)
        onehot = (keys[..., None] == torch.arange(width, device=buckets.device)).float()
        running = torch.cumsum(onehot, dim=3)  # (B, H, n, L, width): each value's count up to each slot
        counts = running[:, :, :, -1]
        starts = torch.cumsum(counts, dim=-1) - counts
        slot = torch.gather(running, 4, keys[..., None])[..., 0] + torch.gather(starts, 3, keys) - 1
        order = torch.zeros_like(order).scatter(3, slot.long(), order)
        stride *= width
    low = math.isqrt(nb - 1) + 1  # bucket = high * low + (bucket % low); padding (nb) lands past nb - 1
    high_hot = (torch.div(buckets, low, rounding_mode="floor")[..., None]
                == torch.arange(nb // low + 1, device=buckets.device)).float()
    low_hot = ((buckets % low)[..., None] == torch.arange(low, device=buckets.device)).float()
    counts = torch.matmul(high_hot.transpose(-1, -2), low_hot).flatten(3)[..., :nb]  # (B, H, n, nb)
    starts = torch.cumsum(counts, dim=-1) - counts
    return order, counts.long(), starts.long()


def prefill(model: ReformerLM, input_ids: Tensor, attention_mask: Tensor | None = None,
            rotations: list[Tensor | None] | None = None, max_len: int | None = None,
            max_cache_len: int | None = None, counting: bool = False,
            decoder: Decoder | None = None) -> tuple[Tensor, Cache]:
    """Run the prompt and build the cache.

    input_ids (B, L) right-padded, attention_mask (B, L) 1 = real token (None: all real); rotations: one
    per layer (default: the model's, :meth:`ReformerLM.draw_rotations`); max_len = the longest sequence
    the cache must hold (default max_seq_len); max_cache_len bounds full-attention caches; counting: lay
    out bucket-window LSH caches by counting instead of sorting (same cache; the TensorRT-legal form the
    exported prefill graph uses); decoder: the model's :class:`Decoder`, if the caller keeps one.
    Returns the logits of each row's last real token (B, vocab) and the cache; the next token of row b
    goes to position ``lengths[b]``.

    Only the last token's logits are wanted, and the last layer's outputs feed nothing but them: so when
    every layer's cache is causal-exact (not HF's chunk windows) the prompt minus each row's last token
    is prefilled with the last layer building its cache alone (no attention output, no feed-forward over
    the prompt), and the last token runs as a decode step. Same cache and logits, one layer's attention
    less (half of the work of a 2-layer model's prefill).
    """
    cfg = model.config
    batch, length = input_ids.shape
    if rotations is None:
        rotations = model.draw_rotations()
    lengths = (torch.full((batch,), length, device=input_ids.device) if attention_mask is None
               else attention_mask.long().sum(-1))
    if "lsh" in cfg.layer_kinds() and cfg.lsh_window == "chunk":
        return _prefill(model, input_ids, attention_mask, lengths, rotations, max_len, max_cache_len, counting)
    last = lengths - 1
    before_last = (torch.arange(length, device=input_ids.device)[None, :] < last[:, None]).long()
    _, cache = _prefill(model, input_ids, before_last, last, rotations, max_len, max_cache_len, counting,
                        last_layer_outputs=False)
    token = torch.gather(input_ids, 1, last[:, None])[:, 0]
    # in place: the cache was built just now, by this call
    return (decoder or Decoder(model)).step(token, last, cache, inplace=True)


def _prefill(model: ReformerLM, input_ids: Tensor, attention_mask: Tensor | None, lengths: Tensor,
             rotations: list[Tensor | None], max_len: int | None, max_cache_len: int | None, counting: bool,
             last_layer_outputs: bool = True) -> tuple[Tensor | None, Cache]:
    """:func:`prefill` of every real token (``lengths`` per row); without ``last_layer_outputs`` the last
    layer builds its cache only and no logits are returned (None)."""
    cfg = model.config
    batch, length = input_ids.shape
    max_len = cfg.max_seq_len if max_len is None else max_len
    full_len = max_len if max_cache_len is None else min(max_len, max_cache_len)
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
        outputs = last_layer_outputs or i < len(model.layers) - 1
        h = block.layer_norm(x2)
        if block.kind == "lsh":
            out, layer_cache = _prefill_lsh(block.self_attention, h, mask, lengths, max_len, rotations[i],
                                            hf_stride_pad, hf_hashed, counting, outputs)
        else:
            out, layer_cache = _prefill_local(block.self_attention, h, mask, lengths, full_len,
                                              block.kind == "full", outputs)
        cache.update({f"{i}.{name}": t for name, t in layer_cache.items()})
        if not outputs:
            return None, cache
        x1 = x1 + block.output(out).to(x1.dtype)
        x2 = x2 + layer.feed_forward(x1)
    last = (lengths - 1)[:, None, None].expand(-1, 1, x1.shape[-1])
    hidden = torch.cat([torch.gather(x1, 1, last), torch.gather(x2, 1, last)], dim=-1)[:, 0]
    return model.lm_head(model.final_norm(hidden)), cache


# ------------------------------------------------------------------------------------------ decode
# A decode step computes little: a few (B, d_model) x (d_model, n) products per layer and attention over a
# few dozen cached entries. On a CPU its cost is the number of ops, each paying microseconds of dispatch
# whatever its size (profiled on the tiny config: ~600 aten calls per step, views included, bound by that
# overhead). So :class:`Decoder` prepares what it can once (one input projection per layer over weights
# concatenated at construction, transposed weight views, cache keys), builds what depends on the
# positions alone once per step and shares it between layers (:class:`_StepPositions`), keeps hidden
# states as (B, d_model) rows, writes rings through flat row indices, and fuses what the arithmetic allows
# (residual adds into the matmuls, an LSH step's rounds into one softmax).


class _StepPositions:
    """Per-step values derived from the positions alone, built on first use and shared by the layers.

    Every local (and every full) layer writes the same positions into rings of the same size, so their
    slots and masks are equal: computed once per step, not once per layer."""

    def __init__(self, position: Tensor, n_heads: int, d_head: int):
        self.position, self.n_heads, self.d_head = position, n_heads, d_head
        self._rings: dict[int, tuple[Tensor, Tensor]] = {}
        self._blocked: dict[tuple[int, bool], Tensor] = {}
        self._lsh_rows: dict[tuple[int, int], Tensor] = {}

    def ring(self, size: int) -> tuple[Tensor, Tensor]:
        """(slot (B, 1): the new token's slot in a ring of ``size``, index (B, H, 1, D) to scatter a row)."""
        if size not in self._rings:
            slot = (self.position % size)[:, None]
            self._rings[size] = slot, slot[:, :, None, None].expand(-1, self.n_heads, 1, self.d_head)
        return self._rings[size]

    def blocked(self, pos: Tensor, full: bool, chunk_len: int, chunks_before: int) -> Tensor:
        """(B, 1, 1, W) True where a ring entry is hidden from the new token: empty, or (local) before the
        first chunk it sees, ``(p // chunk_len - chunks_before) * chunk_len``. pos: the ring's positions
        after the new token's write."""
        key = (pos.shape[1], full)
        if key not in self._blocked:
            first = 0 if full else ((torch.div(self.position, chunk_len, rounding_mode="floor") - chunks_before)
                                    * chunk_len).clamp(min=0)[:, None]
            self._blocked[key] = (pos < first)[:, None, None, :]
        return self._blocked[key]

    def lsh_rows(self, per_row: int, n_buckets: int) -> Tensor:
        """(B * per_row,) the first bucket row of each (batch, head, round) in a (B*H*n*n_buckets, ...)
        view (per_row = H*n)."""
        key = (per_row, n_buckets)  # static sizes only: an exported graph keeps its batch dynamic
        if key not in self._lsh_rows:
            rows = self.position.shape[0] * per_row
            self._lsh_rows[key] = torch.arange(rows, device=self.position.device) * n_buckets
        return self._lsh_rows[key]


class _LayerWeights:
    """One layer's decode weights: the attention's input projections concatenated into one matrix
    (local/full: [query; key; value], LSH: [query_key; value]), the module's other weights as transposed
    views (for ``addmm``), and the layer's cache keys."""

    def __init__(self, index: int, layer):
        block, ff = layer.attention, layer.feed_forward
        sa = block.self_attention
        self.kind, self.attention = block.kind, sa
        projections = (sa.query_key, sa.value) if block.kind == "lsh" else (sa.query, sa.key, sa.value)
        self.w_in = torch.cat([p.weight for p in projections]).detach().t()  # (d_model, n * H*D)
        self.inner = projections[0].weight.shape[0]  # H*D
        self.d_head = self.inner // sa.n_heads
        self.w_out = block.output.weight.t()
        self.norm, self.ff_norm, self.act = block.layer_norm, ff.layer_norm, ff.act
        self.w_dense, self.b_dense = ff.dense.weight.t(), ff.dense.bias
        self.w_ff_out, self.b_ff_out = ff.output.weight.t(), ff.output.bias
        names = ("rot", "k", "v", "pos", "count", "bucket", "order", "hashed") if block.kind == "lsh" else ("k", "v", "pos")
        self.keys = {name: f"{index}.{name}" for name in names}


def _layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class _AxialRows:
    """The axial positional embedding of single positions by two lookups: per position its row in every
    axis table (precomputed, offset into one stacked table), and the stacked table with each axis's rows
    in its own columns (zeros elsewhere), so the sum of a position's rows is the concatenation
    ``cat[w_0[i_0], w_1[i_1], ...]`` exactly (adding zeros is exact)."""

    def __init__(self, model: ReformerLM):
        emb = model.embeddings.position_embeddings
        self.period = math.prod(emb.shape)
        pos = torch.arange(self.period, device=emb.weights[0].device)
        width = sum(w.shape[1] for w in emb.weights)
        blocks, index, stride, row, col = [], [], self.period, 0, 0
        for n, weight in zip(emb.shape, emb.weights):
            stride //= n
            index.append(torch.div(pos, stride, rounding_mode="floor") % n + row)
            blocks.append(F.pad(weight.detach(), (col, width - col - weight.shape[1])))
            row, col = row + n, col + weight.shape[1]
        self.index = torch.stack(index, dim=-1)  # (period, axes)
        self.table = torch.cat(blocks)  # (sum(shape), sum(dims))

    def __call__(self, position: Tensor) -> Tensor:
        """(B,) -> (B, d_model)."""
        return F.embedding(self.index.index_select(0, position % self.period), self.table).sum(dim=1)


class Decoder:
    """The cached decode step of ``model`` with its weights prepared once (see above):
    ``Decoder(model).step(token, position, cache)``. It holds the model's tensors (views, and copies only
    of the concatenated projections and the axial tables): build it again after changing the weights.
    Inference only (eval mode: no dropout)."""

    def __init__(self, model: ReformerLM):
        self.model = model
        self.layers = [_LayerWeights(i, layer) for i, layer in enumerate(model.layers)]
        self.n_heads, self.d_head = model.config.n_heads, model.config.d_head
        self.axial = _AxialRows(model)

    def step(self, token: Tensor, position: Tensor, cache: Cache, inplace: bool = False) -> tuple[Tensor, Cache]:
        """One new token per row: token (B,) int64 at position (B,) int64 -> (logits (B, vocab), new cache).

        A pure function by default (the input cache is left as it was); ``inplace=True`` writes the new
        entries into the input cache's tensors instead of copying them, which eager generation uses. Every
        layer writes its new entries before it reads the cache, and reads only what it wrote: an exported
        decode graph may therefore run with its outputs bound to its cache inputs (in place)."""
        model = self.model
        x = F.embedding(token, model.embeddings.word_embeddings.weight)  # (B, d_model)
        x = x + self.axial(position).to(x.dtype)
        x1, x2, new_cache = x, x, {}
        positions = _StepPositions(position, self.n_heads, self.d_head)
        for layer in self.layers:
            proj = torch.mm(_layer_norm(x2, layer.norm), layer.w_in)  # (B, n * H*D)
            c = {name: cache[key] for name, key in layer.keys.items() if key in cache}
            if layer.kind != "lsh":
                out, layer_cache = _step_local(layer, proj, positions, c, inplace)
            elif layer.attention.spec.window == "chunk":
                qk, v = proj.view(proj.shape[0], 2, layer.attention.n_heads, 1, layer.d_head).unbind(1)
                out, layer_cache = _step_lsh_chunk(layer.attention, qk, v, position, c, inplace)
            else:
                out, layer_cache = _step_lsh_bucket(layer, proj, positions, c, inplace)
            new_cache.update({layer.keys[name]: t for name, t in layer_cache.items()})
            x1 = torch.addmm(x1, out.reshape(x.shape[0], layer.inner), layer.w_out)  # x1 + output(out)
            # the feed-forward block in eval mode, on rows (position-wise)
            h = layer.act(torch.addmm(layer.b_dense, _layer_norm(x1, layer.ff_norm), layer.w_dense))
            x2 = x2 + torch.addmm(layer.b_ff_out, h, layer.w_ff_out)
        return model.lm_head(model.final_norm(torch.cat([x1, x2], dim=-1))), new_cache


def _step_local(layer: _LayerWeights, proj: Tensor, positions: _StepPositions, c: Cache,
                inplace: bool) -> tuple[Tensor, Cache]:
    """Local or full attention of the new token over its ring (keys already divided by sqrt(D) for local)."""
    sa, d = layer.attention, layer.d_head
    b, n_heads, full = proj.shape[0], sa.n_heads, layer.kind == "full"
    q, k, v = proj.view(b, 3, n_heads, 1, d).unbind(1)  # (B, H, 1, D) each
    if not full:
        k = k / math.sqrt(d)
    slot, index = positions.ring(c["k"].shape[2])
    keys, values = _write(c["k"], 2, index, k, inplace), _write(c["v"], 2, index, v, inplace)
    pos = _write(c["pos"], 1, slot, positions.position[:, None], inplace)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float()  # (B, H, 1, W)
    if full:
        scores = scores / math.sqrt(d)
    scores = scores.masked_fill_(positions.blocked(pos, full, sa.chunk_len, sa.chunks_before), mask_values(q.dtype)[0])
    out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), values)  # (B, H, 1, D)
    return out, {"k": keys, "v": values, "pos": pos}


def _step_lsh_bucket(layer: _LayerWeights, proj: Tensor, positions: _StepPositions, c: Cache,
                     inplace: bool) -> tuple[Tensor, Cache]:
    """Bucket window: the new token joins its bucket's ring of chunk_len + 1 slots (replacing the oldest),
    then attends to that ring: the last chunk_len earlier tokens of its bucket, and itself self-masked.
    Written first, read after: nothing reads the incoming cache once it is written, so a runtime may
    update it in place (ONNX Runtime binds each ``present.*`` output to its ``cache.*`` input)."""
    sa, d = layer.attention, layer.d_head
    b, n_heads, position = proj.shape[0], sa.n_heads, positions.position
    qk, v = proj.view(b, 2, n_heads, 1, d).unbind(1)  # (B, H, 1, D) each
    rot = c["rot"]
    n_hashes, width = sa.spec.n_hashes, sa.spec.chunk_len + 1
    # hash as hash_vectors does (fp32), the rounds' rotations side by side: (B, H, n, R/2)
    rotated = torch.matmul(qk.float(), rot.float().flatten(2)).view(b, n_heads, n_hashes, -1)
    buckets = rotated_buckets(rotated, list(sa.spec.n_buckets))  # (B, H, n)
    # the cache as (B*H*n*buckets) bucket rings, each a row of (c+1) slots (x D): read by row index;
    # written by scatter (an exported graph then writes straight into its bound output: in place)
    bucket = positions.lsh_rows(n_heads * n_hashes, c["count"].shape[-1]) + buckets.view(-1)  # (B*H*n,)
    seen = c["count"].view(-1).index_select(0, bucket).view(b, n_heads, n_hashes, 1)  # tokens so far
    slot = buckets[..., None] * width + seen % width  # (B, H, n, 1): the bucket's oldest entry
    index = slot[..., None].expand(-1, -1, -1, -1, d)
    keys = _write(c["k"], 3, index, normalize_keys(qk)[:, :, None].expand(-1, -1, n_hashes, -1, -1), inplace)
    values = _write(c["v"], 3, index, v[:, :, None].expand(-1, -1, n_hashes, -1, -1), inplace)
    pos = _write(c["pos"], 3, slot, position.view(-1, 1, 1, 1).expand_as(slot), inplace)
    count = _write(c["count"], 3, buckets[..., None], seen + 1, inplace)

    ring_k = keys.view(-1, width * d).index_select(0, bucket).view(b, n_heads, n_hashes * width, d)
    ring_v = values.view(-1, width * d).index_select(0, bucket).view(b, n_heads, n_hashes * width, d)
    ring_pos = pos.view(-1, width).index_select(0, bucket).view(b, n_heads, 1, n_hashes * width)
    masked, self_masked = mask_values(qk.dtype)
    scores = torch.matmul(qk, ring_k.transpose(-1, -2)).float()  # (B, H, 1, n*(c+1))
    scores = scores.masked_fill_(ring_pos < 0, masked).masked_fill_(ring_pos == position.view(-1, 1, 1, 1), self_masked)
    # The rounds combine as the model's LSH op does: weights softmax_r(lse_r) over per-round softmaxes,
    # i.e. one softmax over the union of the rounds' rings (duplicates counted per round), computed here
    # as such (max-shifted once: no logsumexp is ever formed at the -1e5 self-mask scale).
    out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), ring_v)  # (B, H, 1, D)
    return out, {"rot": rot, "k": keys, "v": values, "pos": pos, "count": count}


def _hf_softmax(scores: Tensor) -> tuple[Tensor, Tensor]:
    """HF's fp32 softmax ``exp(s - logsumexp(s))`` and its logsumexp (not renormalised: at the -1e5
    self-mask scale the rounding of the logsumexp is visible, and parity needs the same rounding)."""
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.exp(scores - lse), lse


def _step_lsh_chunk(sa, qk: Tensor, v: Tensor, position: Tensor, c: Cache, inplace: bool) -> tuple[Tensor, Cache]:
    """HF's cached LSH step (chunk window) on fixed-capacity buffers."""
    b, n_heads, _, d = qk.shape
    capacity = c["k"].shape[2]
    spec = sa.spec
    chunk, before, after, nb = spec.chunk_len, spec.chunks_before, spec.chunks_after, spec.n_real_buckets
    masked, self_masked = mask_values(qk.dtype)
    slot = torch.arange(capacity, device=qk.device)
    past = slot[None, :] < position[:, None]  # (B, C) tokens already cached

    # bucket value of the new token, with HF's round offsets: HF widens them by one when the cached
    # buckets reveal a padding bucket (a padded prefill), detected from their maximum
    raw = hash_vectors(qk, c["rot"], list(spec.n_buckets), None)  # (B, H, n, 1)
    n_hashes = spec.n_hashes
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
    """One step of :class:`Decoder` (see :meth:`Decoder.step`), its weights prepared for this call only:
    code that steps many times builds a ``Decoder`` once."""
    return Decoder(model).step(token, position, cache, inplace)


__all__ = ["Cache", "Decoder", "decode_step", "prefill"]

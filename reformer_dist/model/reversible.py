"""Reversible residual stack: ``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)`` without stored activations.

The forward runs under no_grad and keeps only the stack's outputs; the backward walks the layers in
reverse, recomputing G(Y1) and then F(X2) with grad enabled, back-propagating each with a nested
``torch.autograd.backward`` (parameter gradients accumulate into ``.grad`` as usual) and reconstructing
``X2 = Y2 - G(Y1)``, ``X1 = Y1 - F(X2)``.

The recompute must equal the forward exactly:
- randomness: each branch owns a private generator; its state before the forward call is recorded and
  restored for the recompute (then put back, so the backward consumes no randomness);
- LSH buckets: saved from the forward and passed back (re-hashing could flip a bucket under bf16);
- autocast: the forward's autocast state is re-entered for the recompute;
- submodules are called through ``__call__`` so module hooks (DeepSpeed ZeRO-3 parameter gathering) fire.

Memory is what bounds the longest sequence, so every layer works in tiles and in place:
- position tiles (``ff_chunk_size`` positions): G is position-wise and runs tile by tile; so do F's
  position-wise parts, its LayerNorm + input projections and its output projection (``AttentionBlock``'s
  ``project`` / ``project_out``), whose tiles stay in cache;
- head groups: F's attention runs over the whole sequence for a group of heads at a time
  (``head_groups``: each group's (B, L, heads, D) tensors stay under ``HEAD_GROUP_ELEMENTS``), its
  projections gathered from the position tiles, each group adding its share of the output projection;
- the two streams are two buffers updated in place, forward (X -> Y) and backward (Y -> X), and the
  backward accumulates the stream gradients into the gradient tensors it receives (``ReformerLM``'s head
  creates them for it and reads nothing else from them).
So a layer never allocates a (B, L, d_model) temporary: only a tile's and a head group's tensors. On CPU
the large ones among a head group's tensors come from a pool that lives for one pass (forward or backward,
``buffer_pool``), so the next group and layer reuse them instead of faulting fresh memory in from the kernel.
A tile's nested backward accumulates into parameters that later tiles of the same layer use again; a
``tile_hook(parameters, last)`` (installed with ``ReformerLM.set_tile_hook``) hears before each tile whether
it is the last, for optimizers that reduce a gradient as soon as it is accumulated (DeepSpeed ZeRO-2/3).

The two streams stay in the dtype they enter with (fp32 under autocast): branches upcast their outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from reformer_dist.model import buffer_pool
from reformer_dist.model.sequence_parallel import SequenceShard

TileHook = Callable[[Iterable[nn.Parameter], bool], None]
# Elements of one (B, L, heads, D) attention tensor above which the heads are split into groups (16 MiB in
# fp32: the LSH op's per-group buffers, qk/v and their gradients, stay small at any length).
HEAD_GROUP_ELEMENTS = 1 << 22


@contextmanager
def _replaying(generator: torch.Generator, state: Tensor):
    """Run with ``generator`` set to ``state``; afterwards put back whatever state it had."""
    current = generator.get_state()
    generator.set_state(state)
    try:
        yield
    finally:
        generator.set_state(current)


def tile_spans(length: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of consecutive position tiles of ``size`` (0 = one tile) covering ``length``."""
    size = size if size > 0 else length
    return [(s, min(s + size, length)) for s in range(0, length, size)]


def autocast_state(device_type: str) -> dict:
    """The current autocast state of ``device_type`` as ``torch.autocast`` keyword arguments, for a
    backward that recomputes a forward to re-enter it."""
    return {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type)}


def head_groups(n_heads: int, elements_per_head: int, multiple: int = 1) -> list[tuple[int, int]]:
    """(first, count) groups of heads: the most heads per group (a divisor of n_heads and a multiple of
    ``multiple``, the sequence-parallel size) whose tensors hold at most HEAD_GROUP_ELEMENTS, else the
    fewest allowed. ``elements_per_head``: B * L * d_head of the whole sequence."""
    allowed = [c for c in range(multiple, n_heads + 1, multiple) if n_heads % c == 0]
    fits = [c for c in allowed if c * elements_per_head <= HEAD_GROUP_ELEMENTS]
    count = max(fits) if fits else min(allowed)
    return [(first, count) for first in range(0, n_heads, count)]


def _layer_groups(layer: nn.Module, stream: Tensor, shard: SequenceShard | None) -> list[tuple[int, int]]:
    sa = layer.attention.self_attention
    length = stream.shape[1] * (1 if shard is None else shard.size)
    return head_groups(sa.n_heads, stream.shape[0] * length * sa.value.d_head, 1 if shard is None else shard.size)


def _projections(attention: nn.Module, x: Tensor, spans: list[tuple[int, int]],
                 heads: tuple[int, int]) -> list[Tensor]:
    """``attention.project(x, heads)`` computed tile by tile (no grad) into whole-length tensors
    (B, l, count*D) each: the LayerNorm and projections of one tile stay in cache."""
    if len(spans) == 1:
        return list(attention.project(x, heads))
    out: list[Tensor] = []
    for s, e in spans:
        parts = attention.project(x[:, s:e], heads)
        if not out:
            out = [buffer_pool.empty((x.shape[0], x.shape[1], p.shape[-1]), p.dtype, p.device) for p in parts]
        for whole, p in zip(out, parts):
            whole[:, s:e] = p
    return out


def _free(tensors: list[Tensor]) -> None:
    """Release the memory of tensors whose values nothing reads again (autograd keeps their metadata)."""
    for t in tensors:
        t.untyped_storage().resize_(0)


def mark_tile(tile_hook: TileHook | None, modules: Iterable[nn.Module], last: bool) -> None:
    """Tell ``tile_hook`` (if any) that a tile accumulating into ``modules``' parameters comes, and whether
    it is their last."""
    if tile_hook is not None:
        tile_hook([p for m in modules for p in m.parameters()], last)


class ReversibleStack(torch.autograd.Function):
    """Apply ``layers`` (each with ``.attention`` = F and ``.feed_forward`` = G) reversibly."""

    @staticmethod
    def forward(ctx, x1: Tensor, x2: Tensor, layers: nn.ModuleList, key_padding_mask: Tensor | None,
                ff_chunk_size: int, shard: SequenceShard | None, tile_hook: TileHook | None) -> tuple[Tensor, Tensor]:
        records = []
        start = 0 if shard is None else shard.start(x1.shape[1])
        spans = tile_spans(x1.shape[1], ff_chunk_size)
        with torch.no_grad(), buffer_pool.reusing_buffers():
            x1, x2 = x1.clone(), x2.clone()  # the streams' own buffers, updated in place from here on
            for layer in layers:
                attention, feed_forward = layer.attention, layer.feed_forward
                f_state = attention.generator.get_state()
                draw = attention.draw(x1.device)
                buckets = []
                for heads in _layer_groups(layer, x2, shard):
                    a, b = attention.attend(_projections(attention, x2, spans, heads), key_padding_mask, None,
                                            shard, draw, heads)
                    for s, e in spans:
                        x1[:, s:e] += attention.project_out(a[:, s:e], draw, start + s, heads)
                    buckets.append(None if b is None else b.to(torch.int32))
                    del a
                g_state = feed_forward.generator.get_state()
                for s, e in spans:  # every chunk is a call with the same draw (masks are addressed by position)
                    feed_forward.generator.set_state(g_state)
                    x2[:, s:e] += feed_forward(x1[:, s:e], start + s)
                records.append((f_state, g_state, buckets))
        ctx.autocast = autocast_state(x1.device.type)
        ctx.layers, ctx.records, ctx.mask, ctx.spans = layers, records, key_padding_mask, spans
        ctx.shard, ctx.start, ctx.tile_hook = shard, start, tile_hook
        # kept as detached aliases rather than save_for_backward: the backward reconstructs the inputs in
        # these buffers (the streams are not read by anything else)
        ctx.outputs = [x1.detach(), x2.detach()]
        return x1, x2

    @staticmethod
    def backward(ctx, dy1: Tensor | None, dy2: Tensor | None):
        if ctx.outputs is None:
            raise RuntimeError("ReversibleStack: backward through the same forward twice is not supported")
        y1, y2 = ctx.outputs
        ctx.outputs = None
        dy1, dy2 = _accumulator(dy1, y1), _accumulator(dy2, y2)
        with torch.autocast(**ctx.autocast), buffer_pool.reusing_buffers():
            for layer, (f_state, g_state, buckets) in zip(reversed(ctx.layers), reversed(ctx.records)):
                # G: x2 = y2 - G(y1); dL/dy1 += G'(y1)^T dy2, chunk by chunk, in place (y2 becomes x2)
                feed_forward = layer.feed_forward
                for s, e in ctx.spans:
                    # each chunk its own leaf: a slice of one leaf would give every chunk's backward a
                    # zero-filled gradient of the whole sequence to add into (quadratic in length)
                    part = y1[:, s:e].detach().requires_grad_()
                    mark_tile(ctx.tile_hook, [feed_forward], last=e == y1.shape[1])
                    with _replaying(feed_forward.generator, g_state), torch.enable_grad():
                        g = feed_forward(part, ctx.start + s)
                    torch.autograd.backward(g, dy2[:, s:e])
                    y2[:, s:e] -= g.detach()
                    dy1[:, s:e] += part.grad
                del g, part
                # F: x1 = y1 - F(x2); dL/dx2 = dy2 + F'(x2)^T dy1, head group by head group, the
                # position-wise parts tile by tile (y2 holds x2 now)
                attention, end, hook = layer.attention, y1.shape[1], ctx.tile_hook
                with _replaying(attention.generator, f_state):
                    draw = attention.draw(y1.device)
                groups = _layer_groups(layer, y2, ctx.shard)
                for i, (heads, replay) in enumerate(zip(groups, buckets)):
                    last_group = i == len(groups) - 1
                    # the heap's holes from the tiles and the previous group go back before this
                    # group's tensors (the step's peak) are allocated (CPU; see buffer_pool)
                    buffer_pool.return_free_heap(y1.device)
                    inputs = [t.requires_grad_() for t in _projections(attention, y2, ctx.spans, heads)]
                    with torch.enable_grad():
                        a, _ = attention.attend(inputs, ctx.mask, None if replay is None else replay.long(),
                                                ctx.shard, draw, heads)
                    exchanged = ctx.shard is not None
                    if exchanged:  # the exchange copied the projections and saved nothing: only their
                        _free(inputs)  # gradients are read from here on
                    grad_a = buffer_pool.empty(a.shape, a.dtype, a.device)
                    for s, e in ctx.spans:  # output projection: x1 = y1 - its share, and dL/da
                        part = a[:, s:e].detach().requires_grad_()
                        mark_tile(hook, [attention.output], last=last_group and e == end)
                        with torch.enable_grad():
                            f = attention.project_out(part, draw, ctx.start + s, heads)
                        y1[:, s:e] -= f.detach()
                        torch.autograd.backward(f, dy1[:, s:e])  # outside grad mode: accumulates in place
                        grad_a[:, s:e] = part.grad
                    if exchanged:  # likewise the exchanged output (without a shard it is the kernel's own)
                        _free([a])
                    buffer_pool.return_free_heap(y1.device)  # likewise the recompute's and projection's
                    torch.autograd.backward(a, grad_a)  # the attention itself: dL/d(projections)
                    del a, grad_a, f, part
                    for s, e in ctx.spans:  # LayerNorm + input projections: dL/dx2
                        part = y2[:, s:e].detach().requires_grad_()
                        mark_tile(hook, [attention.layer_norm, attention.self_attention], last=last_group and e == end)
                        with torch.enable_grad():
                            projected = attention.project(part, heads)
                        torch.autograd.backward(projected, [t.grad[:, s:e] for t in inputs])
                        dy2[:, s:e] += part.grad
                    del inputs, projected, part
        return dy1, dy2, None, None, None, None, None


def _accumulator(grad: Tensor | None, like: Tensor) -> Tensor:
    """The incoming gradient to accumulate into in place, or a fresh one when it cannot take writes
    (absent, or an expanded view whose elements share memory)."""
    if grad is None:
        return torch.zeros_like(like)
    if any(stride == 0 and size > 1 for stride, size in zip(grad.stride(), grad.shape)):
        return grad.clone()
    return grad


def reversible_stack(x1: Tensor, x2: Tensor, layers: nn.ModuleList, key_padding_mask: Tensor | None,
                     ff_chunk_size: int, shard: SequenceShard | None = None,
                     tile_hook: TileHook | None = None) -> tuple[Tensor, Tensor]:
    """The reversible stack when gradients are needed, the plain recurrence otherwise (same result).
    With a shard the streams hold this rank's positions (``sequence_parallel.py``)."""
    if torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad):
        return ReversibleStack.apply(x1, x2, layers, key_padding_mask, ff_chunk_size, shard, tile_hook)
    return residual_stack(x1, x2, layers, key_padding_mask, shard)


def residual_stack(x1: Tensor, x2: Tensor, layers: nn.ModuleList, key_padding_mask: Tensor | None,
                   shard: SequenceShard | None = None) -> tuple[Tensor, Tensor]:
    """Ordinary residual stack with ordinary autograd (``reversible=False`` and no-grad inference)."""
    start = 0 if shard is None else shard.start(x1.shape[1])
    for layer in layers:
        f, _ = layer.attention(x2, key_padding_mask, None, shard)
        x1 = x1 + f
        x2 = x2 + layer.feed_forward(x1, start)
    return x1, x2

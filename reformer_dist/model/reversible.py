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

The two streams stay in the dtype they enter with (fp32 under autocast): branches upcast their outputs.
G is position-wise, so with ``ff_chunk_size`` its recompute + backward runs chunk by chunk, bounding the
feed-forward activations to one chunk.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from reformer_dist.model.sequence_parallel import SequenceShard


@contextmanager
def _replaying(generator: torch.Generator, state: Tensor):
    """Run with ``generator`` set to ``state``; afterwards put back whatever state it had."""
    current = generator.get_state()
    generator.set_state(state)
    try:
        yield
    finally:
        generator.set_state(current)


def _spans(length: int, chunk: int) -> list[tuple[int, int]]:
    chunk = chunk if chunk > 0 else length
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


class ReversibleStack(torch.autograd.Function):
    """Apply ``layers`` (each with ``.attention`` = F and ``.feed_forward`` = G) reversibly."""

    @staticmethod
    def forward(ctx, x1: Tensor, x2: Tensor, layers: nn.ModuleList, key_padding_mask: Tensor | None,
                ff_chunk_size: int, shard: SequenceShard | None) -> tuple[Tensor, Tensor]:
        records = []
        start = 0 if shard is None else shard.start(x1.shape[1])
        with torch.no_grad():
            for layer in layers:
                f_state = layer.attention.generator.get_state()
                f, buckets = layer.attention(x2, key_padding_mask, None, shard)
                x1 = x1 + f
                g_state = layer.feed_forward.generator.get_state()
                x2 = x2 + layer.feed_forward(x1, start)
                records.append((f_state, g_state, None if buckets is None else buckets.to(torch.int32)))
        device = x1.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.layers, ctx.records, ctx.mask, ctx.ff_chunk_size = layers, records, key_padding_mask, ff_chunk_size
        ctx.shard, ctx.start = shard, start
        # kept as detached aliases rather than save_for_backward, so the backward can drop them as soon as
        # the top layer has been reconstructed (the streams are never modified in place)
        ctx.outputs = [x1.detach(), x2.detach()]
        return x1, x2

    @staticmethod
    def backward(ctx, dy1: Tensor | None, dy2: Tensor | None):
        if ctx.outputs is None:
            raise RuntimeError("ReversibleStack: backward through the same forward twice is not supported")
        y1, y2 = ctx.outputs
        ctx.outputs = None
        dy1 = torch.zeros_like(y1) if dy1 is None else dy1
        dy2 = torch.zeros_like(y2) if dy2 is None else dy2
        device, enabled, dtype = ctx.autocast
        length = y1.shape[1]
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            for layer, (f_state, g_state, buckets) in zip(reversed(ctx.layers), reversed(ctx.records)):
                # G: x2 = y2 - G(y1); dL/dy1 += G'(y1)^T dy2
                y1 = y1.detach()
                x2, grad_y1 = torch.empty_like(y2), torch.empty_like(y1)
                for s, e in _spans(length, ctx.ff_chunk_size):
                    # each chunk its own leaf: a slice of one leaf would give every chunk's backward a
                    # zero-filled gradient of the whole sequence to add into (quadratic in length); each
                    # chunk replays the call's seed (the masks are addressed by position)
                    with _replaying(layer.feed_forward.generator, g_state), torch.enable_grad():
                        part = y1[:, s:e].requires_grad_()
                        g = layer.feed_forward(part, ctx.start + s)
                        torch.autograd.backward(g, dy2[:, s:e])
                        x2[:, s:e] = y2[:, s:e] - g.detach()
                        grad_y1[:, s:e] = _take_grad(part)
                del g, part
                y2 = None  # reconstructed as x2: free it before the attention recompute
                dy1 = dy1 + grad_y1
                del grad_y1
                # F: x1 = y1 - F(x2); dL/dx2 = dy2 + F'(x2)^T dy1
                x2.requires_grad_()
                replay = None if buckets is None else buckets.long()
                with _replaying(layer.attention.generator, f_state), torch.enable_grad():
                    f, _ = layer.attention(x2, ctx.mask, replay, ctx.shard)
                    torch.autograd.backward(f, dy1)
                with torch.no_grad():
                    y1 = y1.detach() - f
                del f
                dy2 = dy2 + _take_grad(x2)
                y2 = x2.detach()
                del x2
        return dy1, dy2, None, None, None, None


def _take_grad(x: Tensor) -> Tensor:
    """Detach and return x.grad, freeing it from x (the caller adds it into the running gradient)."""
    grad, x.grad = x.grad, None
    return grad


def reversible_stack(x1: Tensor, x2: Tensor, layers: nn.ModuleList, key_padding_mask: Tensor | None,
                     ff_chunk_size: int, shard: SequenceShard | None = None) -> tuple[Tensor, Tensor]:
    """The reversible stack when gradients are needed, the plain recurrence otherwise (same result).
    With a shard the streams hold this rank's positions (``sequence_parallel.py``)."""
    if torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad):
        return ReversibleStack.apply(x1, x2, layers, key_padding_mask, ff_chunk_size, shard)
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

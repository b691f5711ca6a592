"""Private random streams: every source of randomness in the model is a per-module ``torch.Generator``.

The global RNG is never read or written after construction, so a forward/backward leaves it untouched,
reversible recompute can replay a module's randomness by restoring its generator's state, and a
checkpoint can save every stream (``ReformerLM.rng_state``) for an exact resume.

Generators are CPU generators (their state is a small byte tensor on any machine). A dropout call draws
one seed from its module's generator; the mask itself is *addressed by position*: positions are grouped
in blocks of ``MASK_BLOCK`` and block k's mask is drawn from a throw-away generator (on the tensor's
device) seeded by (call seed, stream, k). So the mask of a position does not depend on which part of the
sequence a call covers: a feed-forward chunk, the whole sequence, or one rank's shard under sequence
parallelism all see the same mask at the same position (``stream`` tells heads apart in attention).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Positions per independently seeded mask block (a call covering part of a block draws the whole block).
MASK_BLOCK = 256
_M64 = (1 << 64) - 1


def new_generator() -> torch.Generator:
    """A CPU generator seeded from the global RNG (so ``torch.manual_seed`` makes models reproducible)."""
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    return torch.Generator().manual_seed(seed)


def draw_seed(generator: torch.Generator) -> int:
    """One 62-bit seed from a private generator (a CPU draw: no device synchronisation)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64, generator=generator).item())


def _mix(x: int) -> int:
    """splitmix64's step: a bijection on 64-bit ints whose every output bit depends on every input bit."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def keep_mask(seed: int, shape: tuple[int, ...], p: float, device: torch.device, start: int = 0,
              stream: int = 0) -> Tensor:
    """Dropout keep-mask (bool, ``shape`` = (B, L, ...)) for positions [start, start + L) of dim 1.

    Each block of ``MASK_BLOCK`` positions is one Bernoulli draw of shape (B, MASK_BLOCK, ...) from a
    generator seeded by (seed, stream, block index): a function of the global position alone.
    """
    batch, length, rest = shape[0], shape[1], tuple(shape[2:])
    out = torch.empty(shape, dtype=torch.bool, device=device)
    gen = torch.Generator(device)
    base = _mix(_mix(seed) ^ stream)
    for k in range(start // MASK_BLOCK, (start + length - 1) // MASK_BLOCK + 1):
        lo, hi = max(k * MASK_BLOCK, start), min((k + 1) * MASK_BLOCK, start + length)
        gen.manual_seed(_mix(base ^ k) >> 1)
        block = torch.empty((batch, MASK_BLOCK, *rest), device=device).bernoulli_(1.0 - p, generator=gen)
        out[:, lo - start : hi - start] = block[:, lo - k * MASK_BLOCK : hi - k * MASK_BLOCK]
    return out


def positional_dropout(x: Tensor, p: float, seed: int, start: int = 0, stream: int = 0) -> Tensor:
    """Inverted dropout of x (B, L, ...) at global positions [start, start + L) with ``keep_mask``."""
    if p == 0.0:
        return x
    return x * keep_mask(seed, tuple(x.shape), p, x.device, start, stream) / (1.0 - p)


def dropout(x: Tensor, p: float, generator: torch.Generator, training: bool, start: int = 0) -> Tensor:
    """Inverted dropout of x (B, L, ...) at global positions [start, start + L): one seed drawn from
    ``generator`` (``F.dropout`` would use the global RNG), the mask addressed by position."""
    if not training or p == 0.0:
        return x
    return positional_dropout(x, p, draw_seed(generator), start)


class GeneratorHolder(torch.nn.Module):
    """Base of modules that own a private generator (found by ``ReformerLM.rng_state``)."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = new_generator()

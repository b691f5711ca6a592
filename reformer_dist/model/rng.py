"""Private random streams: every source of randomness in the model is a per-module ``torch.Generator``.

The global RNG is never read or written after construction, so a forward/backward leaves it untouched,
reversible recompute can replay a module's randomness by restoring its generator's state, and a
checkpoint can save every stream (``ReformerLM.rng_state``) for an exact resume.

Generators are CPU generators (their state is a small byte tensor on any machine). Work on another
device draws a seed from the private generator and seeds a throw-away generator on that device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def new_generator() -> torch.Generator:
    """A CPU generator seeded from the global RNG (so ``torch.manual_seed`` makes models reproducible)."""
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    return torch.Generator().manual_seed(seed)


def draw_seed(generator: torch.Generator) -> int:
    """One 62-bit seed from a private generator (a CPU draw: no device synchronisation)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64, generator=generator).item())


def dropout(x: Tensor, p: float, generator: torch.Generator, training: bool) -> Tensor:
    """Inverted dropout with a mask drawn from ``generator`` (``F.dropout`` would use the global RNG)."""
    if not training or p == 0.0:
        return x
    device_gen = generator if x.device.type == "cpu" else torch.Generator(x.device).manual_seed(draw_seed(generator))
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=device_gen)
    return x * keep / (1.0 - p)


class GeneratorHolder(torch.nn.Module):
    """Base of modules that own a private generator (found by ``ReformerLM.rng_state``)."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = new_generator()

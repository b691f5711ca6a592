"""Fused GPU kernels (Triton) behind the model's custom ops; the PyTorch implementations stay the fallback.

``reformer_dist.kernels.lsh_triton`` imports Triton when it is imported, so import it only after
:func:`triton_available` said yes (the model's op does, inside its CUDA branch).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

DISABLE_ENV = "REFORMER_DISABLE_TRITON"
"""Set to 1 to force the PyTorch implementation on GPUs (debugging, A/B timing)."""

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton.language  # noqa: F401
    except Exception:  # a broken or CPU-only-incompatible install counts as absent
        return False
    return True


def triton_available(tensor: torch.Tensor) -> bool:
    """Should the fused kernels run on ``tensor``?

    Yes for a CUDA tensor of a supported dtype on an Ampere-or-newer GPU (bf16 tensor-core dots) when
    Triton imports and ``REFORMER_DISABLE_TRITON`` is not 1. The env var is read on every call.
    """
    if os.environ.get(DISABLE_ENV, "") == "1":
        return False
    if not tensor.is_cuda or tensor.dtype not in SUPPORTED_DTYPES:
        return False
    if torch.cuda.get_device_capability(tensor.device) < (8, 0):
        return False
    return _triton_importable()

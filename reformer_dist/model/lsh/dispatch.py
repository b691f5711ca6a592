"""Which implementation runs a call of the op: the fused Triton kernels or the PyTorch reference.

The kernels (``triton_kernels``) run on CUDA tensors of a supported dtype on an Ampere-or-newer GPU when
Triton imports and ``REFORMER_DISABLE_TRITON`` is not 1, and on CPU tensors when ``TRITON_INTERPRET=1``
(Triton's interpreter: how the CPU tests exercise the dispatch). On such a device a call the kernels do not
cover runs the reference instead, and the reason is logged once per reason. Elsewhere (CPU without the
interpreter: the usual case) the reference runs silently.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch
from torch import Tensor

from reformer_dist.model.lsh.spec import LshSpec

logger = logging.getLogger(__name__)

DISABLE_ENV = "REFORMER_DISABLE_TRITON"
"""Set to 1 to force the PyTorch reference where the kernels would run (debugging, A/B timing)."""
INTERPRET_ENV = "TRITON_INTERPRET"
"""Triton's own switch: 1 runs kernels through its interpreter, on CPU tensors too."""

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


def kernel_device(tensor: Tensor) -> bool:
    """Is ``tensor`` on a device the kernels are meant for (CUDA; CPU under ``TRITON_INTERPRET=1``)?"""
    return tensor.is_cuda or (tensor.device.type == "cpu" and os.environ.get(INTERPRET_ENV, "") == "1")


def _device_refusal(tensor: Tensor) -> str | None:
    """Why the kernels cannot run on this kernel device and dtype (None: they can). Env vars are read on
    every call."""
    if os.environ.get(DISABLE_ENV, "") == "1":
        return f"{DISABLE_ENV}=1"
    if tensor.dtype not in SUPPORTED_DTYPES:
        return f"{tensor.dtype} inputs (the kernels take float32, bfloat16 and float16)"
    if tensor.is_cuda and torch.cuda.get_device_capability(tensor.device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(tensor.device)
        return f"a GPU of compute capability {major}.{minor} (the kernels need Ampere, 8.0, or newer)"
    if not _triton_importable():
        return "Triton is not importable"
    if not tensor.is_cuda:
        from reformer_dist.model.lsh import triton_kernels

        if not triton_kernels.interpreting():
            return (f"{INTERPRET_ENV}=1 was set after the kernels were compiled for a GPU (set it before "
                    "importing reformer_dist.model.lsh.triton_kernels)")
    return None


def triton_available(tensor: Tensor) -> bool:
    """Should the fused kernels run on ``tensor``? (Device, dtype, GPU generation, Triton, env vars.)"""
    return kernel_device(tensor) and _device_refusal(tensor) is None


def _call_refusal(qk: Tensor, v: Tensor, spec: LshSpec, dropout_p: float, head_offset: int,
                  n_heads_total: int) -> str | None:
    """Why the kernels do not cover this call (None: they do)."""
    if v.dtype != qk.dtype:
        return f"qk in {qk.dtype} and v in {v.dtype} (the kernels take one dtype)"
    if dropout_p > 0 and (head_offset != 0 or n_heads_total not in (0, qk.shape[1])):
        return ("attention dropout over a slice of a layer's heads (sequence parallelism): the kernels' "
                "dropout counters number the call's own heads")
    length, d = qk.shape[2:]
    if spec.n_hashes * length * d >= 2**31:
        return f"n_hashes*L*D = {spec.n_hashes * length * d} >= 2**31 (the kernels index with int32)"
    return None


@functools.cache
def _log_once(reason: str) -> None:
    logger.warning("LSH attention runs the PyTorch reference instead of the Triton kernels: %s", reason)


def use_kernels(qk: Tensor, v: Tensor, spec: LshSpec, dropout_p: float, head_offset: int = 0,
                n_heads_total: int = 0) -> bool:
    """Whether this call runs the kernels; a refusal on a kernel device is logged (once per reason)."""
    if not kernel_device(qk):
        return False
    reason = _device_refusal(qk) or _call_refusal(qk, v, spec, dropout_p, head_offset, n_heads_total)
    if reason is not None:
        _log_once(reason)
    return reason is None

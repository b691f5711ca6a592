"""Large CPU buffers reused within one pass of the reversible stack (``reusing_buffers``).

Why: glibc serves every allocation above its mmap threshold (32 MiB at most) with a fresh mapping and
unmaps it when freed, so at long lengths each of a layer's whole-sequence head-group tensors (256 MiB per
head at 1M tokens: projections, the LSH op's per-round outputs and gradients) is faulted in and zeroed by
the kernel again on every use: ~120 GiB of page faults in one 1M-token step, 14% of its CPU time on a
virtual machine. Keeping all freed memory in glibc's heap instead (``M_MMAP_MAX=0``) removes the faults,
but the heap cannot reuse its holes across the many sizes a step frees, and per-rank peaks rose 60-80%
(256K tokens, 2 sequence-parallel ranks). This pool keeps only those large buffers, hands one out again
for a request of its size (or down to half of it) once nothing references its memory any more (the
storage's use count, as PyTorch Inductor's CUDA-graph pool checks it), and drops them all when the pass
ends, so between passes the memory is the system's again.

Allocation sites ask through ``empty``/``zeros``: outside ``reusing_buffers``, on other devices (PyTorch's
CUDA caching allocator already reuses) and below ``POOLED_BYTES`` they are plain ``torch.empty``.

The other end of the sizes: every tensor below the mmap threshold lives in glibc's heap, which keeps what is
freed resident and can reuse a hole only for a request that fits it, so below ~128K tokens (where every
tensor of a step is such a tensor) a process's peak RSS ran 15-45% above the memory its tensors occupy at
once (the same training runs with glibc's default heap and with its mmap threshold pinned low,
``benchmarks/bench_memory_plan.py --mmap-threshold``). ``return_free_heap`` hands the heap's free pages back to
the kernel (``malloc_trim``): the reversible backward calls it before each head group's attention and
before that attention's own backward, the trainer after each micro-batch's step, so the peak's allocations
start from a heap without the previous phase's holes. Pinning glibc's mmap threshold low instead gives
peaks at the live memory but faults every tensor above it in on each use (16-27% slower steps at 16K-64K).
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

# glibc's largest dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): smaller blocks come from
# its heap, which reuses them without page faults already.
POOLED_BYTES = 32 << 20


class BufferPool:
    """Byte buffers (each held by one uint8 tensor) reused by size while a pass runs."""

    def __init__(self) -> None:
        self._buffers: list[Tensor] = []

    @staticmethod
    def _unreferenced(buffer: Tensor) -> bool:
        """Does nothing but the pool reference this buffer's memory?"""
        return torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) == 2  # the pool's + this call's

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """An uninitialised contiguous tensor: the smallest free buffer of nbytes..2*nbytes, else a new one."""
        nbytes = math.prod(shape) * dtype.itemsize
        # a buffer whose memory someone released early (``untyped_storage().resize_(0)``) is gone
        self._buffers = [b for b in self._buffers if b.untyped_storage().nbytes() == b.numel()]
        fitting = [b for b in self._buffers if nbytes <= b.numel() <= 2 * nbytes and self._unreferenced(b)]
        if fitting:
            buffer = min(fitting, key=Tensor.numel)
        else:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            self._buffers.append(buffer)
        return torch.empty(0, dtype=dtype).set_(buffer.untyped_storage(), 0, tuple(shape))

    @property
    def held_bytes(self) -> int:
        return sum(b.numel() for b in self._buffers)


_active: BufferPool | None = None


@contextmanager
def reusing_buffers() -> Iterator[BufferPool]:
    """Within this block large CPU tensors from ``empty``/``zeros`` come from one pool, released at its end."""
    global _active
    outer, _active = _active, BufferPool()
    try:
        yield _active
    finally:
        _active = outer


def pooled(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> bool:
    """Would ``empty`` serve this tensor from a pool (one is active, the tensor is large and on CPU)?"""
    return (_active is not None and torch.device(device).type == "cpu"
            and math.prod(shape) * dtype.itemsize >= POOLED_BYTES)


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``torch.empty(shape)``, from the active pool when ``pooled`` says so."""
    if not pooled(shape, dtype, device):
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return _active.take(shape, dtype)


def zeros(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``torch.zeros(shape)`` through ``empty``."""
    return empty(shape, dtype, device).zero_()


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def return_free_heap(device: torch.device | str) -> None:
    """On CPU, hand the free pages of glibc's heaps back to the kernel (every arena, not only the top); a
    no-op on other devices and C libraries. The memory comes back on use through page faults: call it
    between phases of a step, not per allocation."""
    if torch.device(device).type == "cpu" and (trim := _malloc_trim()) is not None:
        trim(0)

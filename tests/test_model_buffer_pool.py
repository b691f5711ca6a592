"""Large-buffer pool of the reversible stack: a buffer is handed out again only once nothing references its
memory, released memory is never handed out, and a training step computes the same bits with it. Below it,
glibc's heap gives its free pages back before each head group's attention of the reversible backward."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_model_reversible import grads_and_loss, twins

from reformer_dist.model import buffer_pool


def test_a_buffer_is_reused_only_after_every_tensor_on_it_is_gone(monkeypatch):
    monkeypatch.setattr(buffer_pool, "POOLED_BYTES", 1024)
    with buffer_pool.reusing_buffers() as pool:
        a = buffer_pool.empty((64, 8), torch.float32, "cpu").fill_(7.0)  # 2 KiB
        first = a.data_ptr()
        view = a[1:]
        del a
        b = buffer_pool.empty((64, 8), torch.float32, "cpu")
        assert b.data_ptr() != first  # a view still holds the first buffer
        del view
        c = buffer_pool.zeros((32, 16), torch.float32, "cpu")  # same size: the first buffer again, zeroed
        assert c.data_ptr() == first and torch.equal(c, torch.zeros(32, 16)) and pool.held_bytes == 2 * 2048
        del b, c
        d = buffer_pool.empty((300,), torch.float64, "cpu")  # 2400 B: a new buffer, none is large enough
        e = buffer_pool.empty((100,), torch.int64, "cpu")  # 800 B: below the threshold, not pooled
        assert pool.held_bytes == 2 * 2048 + 2400 and d.shape == (300,) and e.shape == (100,)


def test_a_buffer_smaller_than_half_a_free_one_gets_its_own(monkeypatch):
    monkeypatch.setattr(buffer_pool, "POOLED_BYTES", 0)
    with buffer_pool.reusing_buffers() as pool:
        ptr = buffer_pool.empty((1000,), torch.uint8, "cpu").data_ptr()  # freed at once
        assert buffer_pool.empty((500,), torch.uint8, "cpu").data_ptr() == ptr  # half: reused
        assert buffer_pool.empty((499,), torch.uint8, "cpu").data_ptr() != ptr
        assert pool.held_bytes == 1000 + 499


def test_memory_released_early_is_never_handed_out_again(monkeypatch):
    monkeypatch.setattr(buffer_pool, "POOLED_BYTES", 0)
    with buffer_pool.reusing_buffers() as pool:
        a = buffer_pool.empty((256,), torch.float32, "cpu")
        a.untyped_storage().resize_(0)  # what the reversible backward does to exchanged projections
        del a
        b = buffer_pool.empty((256,), torch.float32, "cpu").fill_(1.0)
        assert b.untyped_storage().nbytes() == 1024 and pool.held_bytes == 1024


def test_a_training_step_with_every_buffer_pooled_is_bitwise_the_same(monkeypatch):
    from reformer_dist.model import reversible

    monkeypatch.setattr(reversible, "HEAD_GROUP_ELEMENTS", 1)  # head groups: buffers recur within a layer
    handed_out: list[buffer_pool.BufferPool] = []  # (kept alive: distinct objects)
    take = buffer_pool.BufferPool.take
    monkeypatch.setattr(buffer_pool.BufferPool, "take",
                        lambda pool, *args: handed_out.append(pool) or take(pool, *args))
    for window in ("bucket", "chunk"):
        loss_plain, grads_plain = grads_and_loss(twins(window)[0])
        assert not handed_out
        monkeypatch.setattr(buffer_pool, "POOLED_BYTES", 0)
        loss_pooled, grads_pooled = grads_and_loss(twins(window)[0])
        monkeypatch.setattr(buffer_pool, "POOLED_BYTES", 1 << 62)
        # one pool for the forward, one for the backward, each handing out ~20 tensors
        assert len({id(pool) for pool in handed_out}) == 2 and len(handed_out) > 20
        handed_out.clear()
        assert torch.equal(loss_pooled, loss_plain)
        assert all(torch.equal(grads_pooled[n], grads_plain[n]) for n in grads_plain)


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(buffer_pool._malloc_trim() is None or not Path("/proc/self/statm").is_file(),
                    reason="needs glibc's malloc_trim and /proc (Linux with glibc)")
def test_the_heaps_free_pages_go_back_to_the_kernel():
    torch.ones(4 << 20).sum()  # a freed 16 MiB mapping lifts glibc's mmap threshold: 4 MiB blocks use the heap
    blocks = [torch.ones(1 << 20) for _ in range(64)]
    del blocks[::2]  # 32 holes of 4 MiB between live blocks: free, but glibc keeps them resident
    before = _resident_bytes()
    buffer_pool.return_free_heap("cpu")
    assert before - _resident_bytes() >= 96 << 20  # most of the 128 MiB
    buffer_pool.return_free_heap("meta")  # other devices: nothing to do


def test_the_reversible_backward_returns_the_free_heap_before_each_head_groups_attention(monkeypatch):
    from reformer_dist.model import reversible

    monkeypatch.setattr(reversible, "HEAD_GROUP_ELEMENTS", 1)  # one group per head
    devices: list[str] = []
    monkeypatch.setattr(buffer_pool, "return_free_heap", lambda device: devices.append(torch.device(device).type))
    model = twins("bucket")[0]
    grads_and_loss(model)
    # each group: before its recompute and before its attention's backward; the forward never
    assert devices == ["cpu"] * (2 * model.config.n_layers * model.config.n_heads)

"""GlobalOrderSampler: one global order per (seed, epoch), split over ranks, resumable on any world size."""

from __future__ import annotations

import numpy as np
import pytest

from reformer_dist.data import GlobalOrderSampler
from reformer_dist.data.sample_order import permute
from reformer_dist.errors import DataError


def run(samplers: list[GlobalOrderSampler], micro_batch_size: int, steps: int) -> list[int]:
    """The global sequence the ranks consume: per step, rank 0's micro-batch, then rank 1's, ..."""
    out: list[int] = []
    for _ in range(steps):
        for s in samplers:
            out += s.next_indices(micro_batch_size).tolist()
    return out


def ranks(world_size: int, n: int = 103, seed: int = 5) -> list[GlobalOrderSampler]:
    return [GlobalOrderSampler(n, seed=seed, rank=r, world_size=world_size) for r in range(world_size)]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4097])
def test_each_epoch_order_is_a_permutation(n):
    order = permute(np.arange(n), n, seed=3, epoch=0)
    assert sorted(order.tolist()) == list(range(n))


def test_order_depends_on_seed_and_epoch_only():
    a = permute(np.arange(1000), 1000, seed=1, epoch=0)
    np.testing.assert_array_equal(a, permute(np.arange(1000), 1000, seed=1, epoch=0))
    assert not np.array_equal(a, permute(np.arange(1000), 1000, seed=2, epoch=0))
    assert not np.array_equal(a, permute(np.arange(1000), 1000, seed=1, epoch=1))
    assert not np.array_equal(a, np.arange(1000))  # actually shuffled
    # positions can be asked for in any grouping: the answer is a pure function
    np.testing.assert_array_equal(permute(np.array([999, 0, 500]), 1000, 1, 0), a[[999, 0, 500]])


def test_union_over_ranks_is_the_global_order():
    n = 103
    reference = GlobalOrderSampler(n, seed=5).global_indices(0, 3 * n)
    for world_size in (1, 2, 3, 4):
        consumed = run(ranks(world_size), micro_batch_size=5, steps=7)
        assert consumed == reference[:7 * 5 * world_size].tolist()


def test_no_sample_repeats_within_an_epoch_and_epochs_reshuffle():
    n = 103
    stream = run(ranks(2, n), micro_batch_size=4, steps=40)  # 320 samples: 3+ epochs, batches straddle ends
    epochs = [stream[i:i + n] for i in range(0, 3 * n, n)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2]
    assert ranks(1, n)[0].state_dict()["epoch"] == 0
    s = ranks(1, n)[0]
    s.next_indices(n + 1)
    assert s.state_dict()["epoch"] == 1 and s.epoch == 1


def test_without_shuffle_the_order_is_the_file_order():
    s = GlobalOrderSampler(10, shuffle=False, rank=1, world_size=2)
    assert s.next_indices(3).tolist() == [3, 4, 5]
    assert s.next_indices(3).tolist() == [9, 0, 1]


def test_resume_after_k_steps_continues_identically():
    uninterrupted = run(ranks(2), micro_batch_size=3, steps=30)
    first = ranks(2)
    head = run(first, micro_batch_size=3, steps=11)
    state = first[0].state_dict()
    assert state["consumed_global_samples"] == 11 * 3 * 2 and state["seed"] == 5
    resumed = ranks(2)
    for s in resumed:
        s.load_state_dict(state)
    assert head + run(resumed, micro_batch_size=3, steps=19) == uninterrupted


@pytest.mark.parametrize("saved_world, resumed_world", [(1, 2), (2, 1), (2, 4), (4, 3)])
def test_resume_on_a_different_world_size_yields_the_same_global_sequence(saved_world, resumed_world):
    # same global micro-batch (12 samples) on every world size, so the two runs step in lockstep
    global_mb = 12
    uninterrupted = run(ranks(1), micro_batch_size=global_mb, steps=20)
    before = ranks(saved_world)
    head = run(before, micro_batch_size=global_mb // saved_world, steps=9)
    state = before[-1].state_dict()
    after = ranks(resumed_world)
    for s in after:
        s.load_state_dict(state)
    assert head + run(after, micro_batch_size=global_mb // resumed_world, steps=11) == uninterrupted


@pytest.mark.parametrize("change", [{"seed": 6}, {"n_samples": 104}, {"shuffle": False}])
def test_resuming_with_other_data_or_seed_is_refused(change):
    state = ranks(1)[0].state_dict()
    args = {"n_samples": 103, "seed": 5, "shuffle": True, **change}
    with pytest.raises(DataError, match=next(iter(change))):
        GlobalOrderSampler(**args).load_state_dict(state)

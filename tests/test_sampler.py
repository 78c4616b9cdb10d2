"""The instance-balanced distributed batch sampler: a partition of each global batch, balanced by
instances, identical global batches on every rank, reproducible per epoch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hamil.data import InstanceBalancedBatchSampler, balance_instances


@given(st.lists(st.integers(1, 500), min_size=1, max_size=40), st.integers(1, 6))
def test_balance_instances_partitions_with_bounded_imbalance(sizes, world):
    parts = balance_instances(sizes, world)
    assert sorted(i for p in parts for i in p) == list(range(len(sizes)))
    assert all(p == sorted(p) for p in parts)
    loads = [sum(sizes[i] for i in p) for p in parts]
    # greedy largest-first: the spread never exceeds the largest bag
    assert max(loads) - min(loads) <= max(sizes)
    if len(sizes) >= world:
        assert all(parts)


def test_balance_instances_beats_equal_bag_counts():
    sizes = [100, 1, 1, 1, 1, 1, 1, 1]
    loads = [sum(sizes[i] for i in p) for p in balance_instances(sizes, 2)]
    assert sorted(loads) == [7, 100]  # bag counts 1 and 7: the big bag alone on one rank


@given(
    st.lists(st.integers(1, 50), min_size=2, max_size=60),
    st.integers(1, 7),
    st.integers(1, 3),
    st.integers(0, 5),
)
def test_ranks_together_see_each_global_batch_once(sizes, batch_bags, world, epoch):
    if len(sizes) < world or batch_bags < world:
        with pytest.raises(ValueError, match="cannot be shared|at least the number of ranks"):
            InstanceBalancedBatchSampler(sizes, batch_bags, world, 0)
        return
    samplers = [InstanceBalancedBatchSampler(sizes, batch_bags, world, r, True, seed=3) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank
    assert all(len(b) == len(s) for b, s in zip(per_rank, samplers, strict=True))
    glob = samplers[0].global_batches()
    for step, batch in enumerate(glob):
        got = sorted(i for rank in per_rank for i in rank[step])
        assert got == sorted(batch)
        assert all(rank[step] for rank in per_rank)  # no idle rank
    assert sorted(i for b in glob for i in b) == list(range(len(sizes)))


def test_epochs_differ_and_repeat():
    sampler = InstanceBalancedBatchSampler(np.arange(1, 31), 4, seed=0)
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != first
    sampler.set_epoch(1)
    assert list(sampler) == first
    unshuffled = InstanceBalancedBatchSampler(np.arange(1, 31), 4, shuffle=False)
    assert [i for b in unshuffled for i in b] == list(range(30))


def test_too_few_bags_for_the_ranks():
    with pytest.raises(ValueError, match="2 bags cannot be shared by 3 ranks"):
        InstanceBalancedBatchSampler([1, 2], 4, world=3)

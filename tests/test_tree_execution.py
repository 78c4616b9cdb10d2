"""Linear-cost tree execution (``hamil.models.tree_plan``) against the quadratic implementation it replaced.

``reference_forward`` is the former ``TreeAggregator.forward``, kept verbatim apart from names: it grows one
node tensor with a ``torch.cat`` per level. The new execution must give the same outputs and gradients.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hamil.models import create
from hamil.models.tree_aggregators import _zero_touch
from hamil.models.tree_plan import leaf_depths, plan_trees
from hamil.tree import merge_order, random_merge_order, tree_height, tree_levels


def reference_forward(agg, features: torch.Tensor, bag_sizes: torch.Tensor) -> torch.Tensor:
    """The pre-#16 execution: one tree per bag, merges level by level, all nodes in one growing tensor."""
    merges, levels, roots = [], [], []
    offset, next_id = 0, features.shape[0]
    for n in bag_sizes.tolist():
        with torch.no_grad():
            tri = agg.bag_tree(features[offset : offset + n].detach())
        local_to_global = np.concatenate([np.arange(offset, offset + n), np.arange(next_id, next_id + n - 1)])
        merges.append(local_to_global[tri])
        levels.append(tree_levels(tri, n))
        roots.append(local_to_global[-1] if n > 1 else offset)
        offset, next_id = offset + n, next_id + n - 1
    merges_all = np.concatenate(merges)
    levels_all = np.concatenate(levels)
    nodes = features
    row_of = np.full(next_id, -1, dtype=np.int64)
    row_of[: features.shape[0]] = np.arange(features.shape[0])
    for level in range(1, int(levels_all.max(initial=0)) + 1):
        todo = merges_all[levels_all == level]
        left = nodes[torch.as_tensor(row_of[todo[:, 0]])]
        right = nodes[torch.as_tensor(row_of[todo[:, 1]])]
        merged = agg.unit(left, right)
        row_of[todo[:, 2]] = nodes.shape[0] + np.arange(len(todo))
        nodes = torch.cat([nodes, merged])
    bags = nodes[torch.as_tensor(row_of[np.asarray(roots, dtype=np.int64)])]
    if levels_all.max(initial=0) == 0:  # keep DDP's gradient hooks firing for all-singleton batches
        bags = bags + _zero_touch(agg.unit)
    return bags


# ------------------------------------------------------------------------------------------ bag shapes


def _chain(n: int, rng: np.random.Generator) -> np.ndarray:
    """Points at 2**i: each merge joins the growing cluster and the next point (tree height n - 1)."""
    return 2.0 ** np.arange(n) + rng.uniform(0, 0.1, n)


def _balanced(n: int, rng: np.random.Generator) -> np.ndarray:
    """Points at sum_k bit_k(i) * 4**k: pairs, then pairs of pairs... (height ceil(log2 n))."""
    bits = (np.arange(n)[:, None] >> np.arange(12)) & 1
    return (bits * 4.0 ** np.arange(12)).sum(1) + rng.uniform(0, 0.01, n)


def _ties(n: int, rng: np.random.Generator) -> np.ndarray:
    """Integer points with many exact ties (duplicates included)."""
    return rng.integers(0, 3, n).astype(np.float64)


def _random(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n)


SHAPES = {"chain": _chain, "balanced": _balanced, "ties": _ties, "random": _random}


def _bag_features(
    kinds_and_sizes, c: int = 3, hw: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, c, hw, hw)`` float64 features whose flattened distances follow each bag's 1-D layout."""
    rng = np.random.default_rng(seed)
    parts = []
    for kind, n in kinds_and_sizes:
        x = SHAPES[kind](n, rng)  # (n,) positions along one direction
        direction = rng.standard_normal(c * hw * hw)
        noise = 1e-9 * rng.standard_normal((n, c * hw * hw)) if kind != "ties" else 0.0
        parts.append(x[:, None] * direction[None, :] + noise)  # (n, D)
    feats = np.concatenate(parts).reshape(-1, c, hw, hw)
    sizes = torch.tensor([n for _, n in kinds_and_sizes])
    return torch.from_numpy(feats), sizes


def _compare(name: str, feats: torch.Tensor, sizes: torch.Tensor, train: bool = True, **options) -> None:
    """New and reference execution: same outputs, same gradients of features and unit parameters."""
    torch.manual_seed(0)
    new = create(name, feats.shape[1], **options).double().train(train)
    ref = copy.deepcopy(new)
    weight = torch.randn(len(sizes), *feats.shape[1:], dtype=torch.float64)  # (B, ...) a random loss
    x_new, x_ref = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    out_new = new(x_new, sizes).bags
    out_ref = reference_forward(ref, x_ref, sizes)
    torch.testing.assert_close(out_new, out_ref, rtol=0, atol=1e-12)
    (out_new * weight).sum().backward()
    (out_ref * weight).sum().backward()
    # The two executions sum the same float64 terms in other orders (banded matrix products, segment sums,
    # batch-norm reductions over at most a few hundred terms): each gradient differs by at most about
    # n * eps * the largest term, ~1e3 * 2.2e-16 = 2.2e-13 of the gradients' scale. Batch norm over a few
    # nearly equal instances makes that scale large (gradients of ~1e3 seen), so the bound is relative to it.
    scale = max(1.0, float(x_ref.grad.abs().max()))
    torch.testing.assert_close(x_new.grad, x_ref.grad, rtol=0, atol=1e-12 * scale)
    for p_new, p_ref in zip(new.parameters(), ref.parameters(), strict=True):
        scale = max(1.0, float(p_ref.grad.abs().max()))
        torch.testing.assert_close(p_new.grad, p_ref.grad, rtol=1e-12, atol=1e-12 * scale)
    for b_new, b_ref in zip(new.buffers(), ref.buffers(), strict=True):  # batch-norm running statistics
        torch.testing.assert_close(b_new, b_ref, rtol=0, atol=1e-12)


BATCHES = {
    "singletons": [("random", 1), ("random", 1)],
    "pairs": [("random", 2), ("random", 1), ("random", 2)],
    "chain": [("chain", 12)],
    "balanced": [("balanced", 16)],
    "ties": [("ties", 9), ("ties", 5)],
    "mixed": [("chain", 9), ("random", 1), ("balanced", 8), ("ties", 6), ("random", 2), ("chain", 3)],
}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("train", [True, False])
def test_hamil_equals_reference(batch: str, train: bool) -> None:
    feats, sizes = _bag_features(BATCHES[batch])
    _compare("hamil", feats, sizes, train=train, init="default")


@pytest.mark.parametrize("batch", ["singletons", "pairs", "chain", "ties", "mixed"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("options", [{}, {"batch_norm": False}, {"depth": 2}, {"kernel_size": 3}])
def test_vectors_equal_reference(batch: str, train: bool, options: dict) -> None:
    """Feature vectors with the 1-D unit (mil-bench): the L1Agg runs as one fused autograd node
    (``hamil.models.fused_tree``), deeper units level by level; both equal the reference."""
    feats, sizes = _bag_features(BATCHES[batch], c=2, hw=4)
    _compare("hamil", feats.flatten(1), sizes, train=train, init="default", dims=1, **options)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 14), min_size=1, max_size=6), seed=st.integers(0, 2**31 - 1))
def test_random_forests_of_vectors_equal_reference(sizes: list[int], seed: int) -> None:
    kinds = list(SHAPES)
    rng = np.random.default_rng(seed)
    feats, bag_sizes = _bag_features([(kinds[rng.integers(len(kinds))], n) for n in sizes], seed=seed)
    _compare("hamil", feats.flatten(1), bag_sizes, init="default", dims=1, kernel_size=3)


@pytest.mark.parametrize("options", [{"depth": 2}, {"tree_features": "pooled"}, {"batch_norm": False}])
def test_hamil_options_equal_reference(options: dict) -> None:
    feats, sizes = _bag_features(BATCHES["mixed"], seed=3)
    _compare("hamil", feats, sizes, init="default", **options)


def test_ramil_equals_reference_in_eval() -> None:
    """RAMIL's evaluation trees are fixed per bag size, so both executions see the same trees."""
    feats, sizes = _bag_features(BATCHES["mixed"], seed=4)
    _compare("ramil", feats, sizes, train=False, init="default")


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 14), min_size=1, max_size=6),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_forests_equal_reference(sizes: list[int], seed: int) -> None:
    kinds = list(SHAPES)
    rng = np.random.default_rng(seed)
    feats, bag_sizes = _bag_features([(kinds[rng.integers(len(kinds))], n) for n in sizes], seed=seed)
    _compare("hamil", feats, bag_sizes, init="default")


def test_unit_calls_and_tree_shapes() -> None:
    feats, sizes = _bag_features([("chain", 10), ("balanced", 8)])
    agg = create("hamil", 3).double()
    agg(feats, sizes)
    assert agg.last_unit_calls == 9  # the chain's height; the balanced tree (height 3) runs alongside
    assert tree_height(merge_order(feats[10:].flatten(1)), 8) == 3


# ------------------------------------------------------------------------------------------ the plan


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 20), min_size=1, max_size=8), seed=st.integers(0, 2**31 - 1))
def test_plan_routes_every_node_once(sizes: list[int], seed: int) -> None:
    """Each level's output is cut into pieces that cover it exactly; each consumer gets 2 x its merges."""
    rng = np.random.default_rng(seed)
    trees = [random_merge_order(n, rng) for n in sizes]
    plan = plan_trees(trees, np.asarray(sizes))
    levels = np.concatenate([tree_levels(t, n) for t, n in zip(trees, sizes, strict=True)])  # (merges,)
    merges = np.bincount(levels, minlength=plan.height + 1)[1:]  # merges per level 1..height
    produced = [sum(sizes), *merges.tolist()]
    received = np.zeros(plan.height + 2, dtype=np.int64)
    for level, pieces in enumerate(plan.route):
        assert sum(rows for _, rows in pieces) == produced[level]
        assert all(consumer > level for consumer, _ in pieces)
        for consumer, rows in pieces:
            received[consumer] += rows
    assert received[1 : plan.height + 1].tolist() == (2 * merges).tolist()
    assert received[plan.height + 1] == len(sizes)
    assert plan.height == max(tree_height(t, n) for t, n in zip(trees, sizes, strict=True))


def test_hamil_a_closed_form_equals_level_by_level_mean() -> None:
    feats, sizes = _bag_features(BATCHES["mixed"], seed=5)
    agg = create("hamil_a", 3).double()
    level_by_level = reference_forward(agg, feats, sizes)  # the MeanUnit along the tree
    torch.testing.assert_close(agg(feats, sizes).bags, level_by_level, rtol=0, atol=1e-6)
    assert agg.last_unit_calls == 0


def test_hamil_a_closed_form_float32_long_chain() -> None:
    """Deep leaves get weights 2**-depth far below float32's epsilon; the sums still agree to 1e-6."""
    feats, sizes = _bag_features([("chain", 60), ("random", 1), ("balanced", 32)], seed=6)
    feats = feats.float() / feats.abs().amax()
    agg = create("hamil_a", 3)
    torch.testing.assert_close(
        agg(feats, sizes).bags, reference_forward(agg, feats, sizes), rtol=0, atol=1e-6
    )


def test_leaf_depths() -> None:
    chain = np.array([[0, 1, 4], [2, 4, 5], [3, 5, 6]])  # ((0 1) 2) 3
    assert leaf_depths(chain, 4).tolist() == [3, 3, 2, 1]
    assert leaf_depths(np.empty((0, 3), np.int64), 1).tolist() == [0]
    rng = np.random.default_rng(0)
    for n in (2, 5, 17):
        depths = leaf_depths(random_merge_order(n, rng), n)
        assert np.isclose(np.ldexp(1.0, -depths).sum(), 1.0)  # the weights of a binary tree sum to one


def test_sync_batch_norm_units_are_run_as_modules() -> None:
    """A unit whose batch norm was converted (``SyncBatchNorm``, not a BatchNorm1d/2d subclass) runs its
    layers as modules, never as a wrong fast step (found in review: it had become a ReLU)."""
    agg = create("hamil", 3, init="default", depth=2).double().eval()
    ref = copy.deepcopy(agg)
    agg.unit = torch.nn.SyncBatchNorm.convert_sync_batchnorm(agg.unit)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in agg.unit.modules())
    feats, sizes = _bag_features(BATCHES["mixed"], seed=7)
    torch.testing.assert_close(
        agg(feats, sizes).bags, reference_forward(ref, feats, sizes), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("name", ["hamil", "hamil_a", "ramil"])
def test_no_bags_and_non_contiguous_vectors(name: str) -> None:
    agg = create(name, 3, dims=1) if name != "hamil_a" else create(name, 3)
    empty = agg(torch.zeros(0, 8), torch.zeros(0, dtype=torch.int64)).bags
    assert empty.shape == (0, 8)
    feats = torch.randn(8, 6).t()  # (6, 8) non-contiguous instance vectors
    sizes = torch.tensor([2, 2, 2])
    torch.testing.assert_close(agg.eval()(feats, sizes).bags, agg(feats.contiguous(), sizes).bags)

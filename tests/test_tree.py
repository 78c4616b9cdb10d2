"""Tests for hamil.tree: exact agreement with the paper's naive Algorithm 1, ties included."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import pdist, squareform

from hamil import tree
from hamil.tree import merge_order, tree_height, tree_levels

FAST = settings(max_examples=200, deadline=None)


def _reference_merge_order(features: np.ndarray) -> np.ndarray:
    """Literal Algorithm 1 (naive loop, strict ``<``), on pdist's float64 distances."""
    x = np.asarray(features, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    n = x.shape[0]
    dist = squareform(pdist(x)).tolist() if n > 1 else [[0.0]]
    clusters = list(range(n))
    members = {i: [i] for i in range(n)}
    rows = []
    for k in range(n - 1):
        best, pair = float("inf"), None
        for pos, i in enumerate(clusters):
            for j in clusters[pos + 1 :]:
                d = min(dist[p][q] for p in members[i] for q in members[j])
                if d < best:
                    best, pair = d, (i, j)
        a, b = pair
        c = n + k
        rows.append((a, b, c))
        members[c] = members.pop(a) + members.pop(b)
        clusters.remove(a)
        clusters.remove(b)
        clusters.append(c)
    return np.asarray(rows, dtype=np.int64).reshape(n - 1, 3)


def _leaf_sets(triplets: np.ndarray, n: int, labels: np.ndarray | None = None) -> list[tuple]:
    """Per merge, the pair of leaf sets merged (leaves renamed through ``labels``)."""
    names = np.arange(n) if labels is None else labels
    sets: dict[int, frozenset] = {i: frozenset([int(names[i])]) for i in range(n)}
    out = []
    for a, b, c in triplets.tolist():
        sets[c] = sets[a] | sets[b]
        out.append(frozenset([sets[a], sets[b]]))
    return out


def _check(x: np.ndarray) -> None:
    got = merge_order(x)
    want = _reference_merge_order(x)
    np.testing.assert_array_equal(got, want)


@pytest.fixture
def gram_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send every bag (n >= 2) through the Gram-matrix route."""
    monkeypatch.setattr(tree, "_GRAM_MIN_N", 2)
    monkeypatch.setattr(tree, "_GRAM_MIN_DIM", 1)


# ---------------------------------------------------------------------------------------------------
# agreement with the naive loop


@FAST
@given(
    hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 40), st.integers(1, 8)),
        elements=st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=32),
    )
)
def test_matches_reference_on_floats(x: np.ndarray) -> None:
    _check(x)


@FAST
@given(st.integers(1, 40), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_matches_reference_on_gaussian(n: int, d: int, seed: int) -> None:
    _check(np.random.default_rng(seed).standard_normal((n, d)))


@FAST
@given(st.integers(1, 40), st.integers(1, 4), st.integers(2, 4), st.integers(0, 2**32 - 1))
def test_matches_reference_with_many_ties(n: int, d: int, values: int, seed: int) -> None:
    _check(np.random.default_rng(seed).integers(0, values, (n, d)))


@FAST
@given(st.integers(1, 20), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_matches_reference_with_duplicated_points(base: int, d: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    points = rng.standard_normal((base, d))
    x = points[rng.integers(0, base, rng.integers(1, 41))]
    _check(x)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33])
def test_identical_points(n: int) -> None:
    _check(np.full((n, 3), 0.25))


@pytest.mark.parametrize("n", [2, 3, 9, 30])
def test_points_on_a_line(n: int) -> None:
    _check(np.arange(n, dtype=np.float64)[:, None])
    _check(np.random.default_rng(n).permutation(n)[:, None] * np.array([[1.0, 0.0]]))


def test_grid_ties() -> None:
    g = np.stack(np.meshgrid(np.arange(5), np.arange(6)), axis=-1).reshape(-1, 2)
    _check(g)
    _check(g[::-1].copy())


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40), st.integers(1, 4), st.integers(2, 4), st.integers(0, 2**32 - 1))
def test_gram_route_matches_reference_with_ties(n: int, d: int, values: int, seed: int) -> None:
    x = np.random.default_rng(seed).integers(0, values, (n, d))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tree, "_GRAM_MIN_N", 2)
        mp.setattr(tree, "_GRAM_MIN_DIM", 1)
        mp.setattr(tree, "_MAX_CHECKED_FRACTION", 1.0)
        assert tree._gram_spanning(x.astype(np.float64)) is not None  # exercised, not fallen back
        _check(x)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_gram_route_matches_reference_on_gaussian(n: int, d: int, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((n, d)) * 10.0 + 50.0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tree, "_GRAM_MIN_N", 2)
        mp.setattr(tree, "_GRAM_MIN_DIM", 1)
        assert tree._gram_spanning(x) is not None
        _check(x)


@pytest.mark.parametrize("checked_fraction", [1.0 / 16.0, 1.0])
def test_gram_route_repairs_or_rejects_a_non_minimal_tree(
    gram_route: None, monkeypatch: pytest.MonkeyPatch, checked_fraction: float
) -> None:
    """A wrong approximate tree is caught by the certificate: recomputed, or handed to pdist."""
    x = np.random.default_rng(3).standard_normal((30, 4))

    def chain(sq_dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = sq_dist.shape[0]
        return np.arange(n - 1), np.arange(1, n)

    monkeypatch.setattr(tree, "_prim", chain)
    monkeypatch.setattr(tree, "_MAX_CHECKED_FRACTION", checked_fraction)
    spanning = tree._gram_spanning(x)
    if checked_fraction == 1.0:
        assert spanning is not None
        np.testing.assert_array_equal(tree._replay(30, spanning), _reference_merge_order(x))
    _check(x)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_gram_route_on_decimal_near_ties(n: int, d: int, seed: int) -> None:
    """Rounded decimals: mathematically tied distances differ by ulps, inside the Gram error bound."""
    x = np.round(np.random.default_rng(seed).standard_normal((n, d)), 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tree, "_GRAM_MIN_N", 2)
        mp.setattr(tree, "_GRAM_MIN_DIM", 1)
        mp.setattr(tree, "_MAX_CHECKED_FRACTION", 1.0)
        assert tree._gram_spanning(x) is not None
        _check(x)


def test_gram_route_equals_pdist_route_at_scale() -> None:
    rng = np.random.default_rng(7)
    bags = (rng.standard_normal((700, 64)).astype(np.float32), rng.integers(0, 20, (600, 8)))
    for bag in bags:
        x = np.asarray(bag, dtype=np.float64)
        spanning = tree._gram_spanning(x)
        assert spanning is not None  # certified, no fallback
        by_pdist, direct = tree._pdist_spanning(x)
        expected = direct if direct is not None else tree._replay(x.shape[0], by_pdist)
        np.testing.assert_array_equal(tree._replay(x.shape[0], spanning), expected)
        np.testing.assert_array_equal(merge_order(bag), expected)


def test_gram_route_gives_up_on_massive_ties() -> None:
    x = np.random.default_rng(7).integers(0, 3, (600, 3)).astype(np.float64)  # 27 distinct points
    assert tree._gram_spanning(x) is None  # nearly every pair would need an exact check
    assert merge_order(x).shape == (599, 3)


def test_tied_bags_larger_than_reference_range() -> None:
    """All-identical and lattice bags: known closed-form orders."""
    n = 64
    got = merge_order(np.zeros((n, 2)))
    # Algorithm 1 pairs leaves (0,1), (2,3), ... then the new clusters in creation order.
    expected = []
    active = list(range(n))
    for k in range(n - 1):
        a, b = active[0], active[1]
        expected.append((a, b, n + k))
        active = active[2:] + [n + k]
    np.testing.assert_array_equal(got, np.asarray(expected))
    line = merge_order(np.arange(n, dtype=np.float64)[:, None])
    # After (0, 1) the lowest active id with a neighbour at distance 1 is 2, joined to 3.
    assert tuple(line[0]) == (0, 1, n)
    assert tuple(line[1]) == (2, 3, n + 1)


# ---------------------------------------------------------------------------------------------------
# agreement with scipy when heights are distinct


@FAST
@given(st.integers(2, 60), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_equals_scipy_single_linkage_without_ties(n: int, d: int, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((n, d))
    dist = pdist(x)
    if np.unique(dist).size != dist.size:
        return
    z = linkage(dist, method="single")
    got = merge_order(x)
    np.testing.assert_array_equal(got[:, 0], np.minimum(z[:, 0], z[:, 1]).astype(np.int64))
    np.testing.assert_array_equal(got[:, 1], np.maximum(z[:, 0], z[:, 1]).astype(np.int64))
    np.testing.assert_array_equal(got[:, 2], np.arange(n, 2 * n - 1))


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 40), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_permutation_invariance_without_ties(n: int, d: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    perm = rng.permutation(n)
    base = _leaf_sets(merge_order(x), n)
    permuted = _leaf_sets(merge_order(x[perm]), n, labels=perm)
    assert base == permuted


# ---------------------------------------------------------------------------------------------------
# API details


def test_shape_dtype_and_ids() -> None:
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    got = merge_order(x)
    assert got.shape == (9, 3)
    assert got.dtype == np.int64
    assert (got[:, 0] < got[:, 1]).all()
    np.testing.assert_array_equal(got[:, 2], np.arange(10, 19))
    assert np.array_equal(np.sort(got[:, :2].ravel()), np.arange(18))  # every non-root id used once


def test_single_instance() -> None:
    got = merge_order(np.ones((1, 5)))
    assert got.shape == (0, 3)
    assert got.dtype == np.int64


def test_empty_bag_raises() -> None:
    with pytest.raises(ValueError, match="n == 0"):
        merge_order(np.empty((0, 4)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises(bad: float) -> None:
    x = np.zeros((4, 2))
    x[2, 1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        merge_order(x)


def test_overflowing_distances_raise() -> None:
    with pytest.raises(ValueError, match="overflow"):
        merge_order(np.array([[1e308, 0.0], [-1e308, 0.0], [0.0, 0.0]]))


def test_one_dimensional_input_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        merge_order(np.arange(4.0))


def test_higher_dimensional_input_is_flattened() -> None:
    x = np.random.default_rng(1).standard_normal((6, 2, 3, 2))
    np.testing.assert_array_equal(merge_order(x), merge_order(x.reshape(6, -1)))


def test_torch_input() -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).standard_normal((12, 5)).astype(np.float32)
    t = torch.from_numpy(x).requires_grad_(True)
    np.testing.assert_array_equal(merge_order(t), merge_order(x))
    np.testing.assert_array_equal(merge_order(t.reshape(12, 5, 1)), merge_order(x))


# ---------------------------------------------------------------------------------------------------
# levels and height


def test_levels_chain_and_balanced() -> None:
    chain = np.array([[0, 1, 4], [2, 4, 5], [3, 5, 6]])
    np.testing.assert_array_equal(tree_levels(chain, 4), [1, 2, 3])
    assert tree_height(chain, 4) == 3
    balanced = np.array([[0, 1, 4], [2, 3, 5], [4, 5, 6]])
    np.testing.assert_array_equal(tree_levels(balanced, 4), [1, 1, 2])
    assert tree_height(balanced, 4) == 2
    assert tree_levels(balanced, 4).dtype == np.int64


def test_levels_single_leaf_and_real_trees() -> None:
    assert tree_levels(np.empty((0, 3), dtype=np.int64), 1).shape == (0,)
    assert tree_height(np.empty((0, 3), dtype=np.int64), 1) == 0
    line = merge_order(np.array([[0.0], [1.0], [3.0], [6.0]]))  # gaps 1 < 2 < 3: a chain
    assert tree_height(line, 4) == 3
    pairs = merge_order(np.array([[0.0], [1.0], [10.0], [11.5]]))  # two tight pairs, then the root
    np.testing.assert_array_equal(tree_levels(pairs, 4), [1, 1, 2])


def test_levels_validate_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        tree_levels(np.zeros((2, 3), dtype=np.int64), 4)
    with pytest.raises(ValueError, match="2n - 2"):
        tree_levels(np.array([[0, 1, 5], [2, 3, 4], [4, 5, 6]]), 4)
    with pytest.raises(ValueError, match="child"):
        tree_levels(np.array([[0, 1, 4], [2, 5, 5], [3, 4, 6]]), 4)
    with pytest.raises(ValueError, match="at most once"):
        tree_levels(np.array([[0, 1, 4], [1, 2, 5], [3, 5, 6]]), 4)

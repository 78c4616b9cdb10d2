"""Merge trees of a bag: HAMIL's Algorithm 1, RAMIL's random orders, and the canonical child order.

HAMIL aggregates a bag of instance features along the merge tree of single-linkage clustering on
Euclidean distances. The paper's Algorithm 1 is a naive loop: while more than one cluster is active,
scan the active cluster ids in ascending order, ``i`` then ``j > i``, and merge the first pair whose
single-linkage distance is minimal (strict ``<``, so the lexicographically smallest pair wins ties).
The merged cluster gets the next id ``n + k``. :func:`merge_order` reproduces that loop exactly,
ties included, in O(n^2 d) time and O(n^2) memory for ``n`` instances of ``d`` dimensions.
:func:`canonical_children` makes the (asymmetric) unit's input order independent of the instance
order; :func:`random_merge_order` is RAMIL's pairing order; :func:`tree_levels` and
:func:`tree_height` give the depth structure used to batch the aggregation. No torch modules here:
the ``nn.Module`` s that run along these trees are in :mod:`hamil.models.tree_aggregators`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.cluster.hierarchy import linkage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import minimum_spanning_tree
from scipy.spatial.distance import pdist

if TYPE_CHECKING:
    import torch

__all__ = ["canonical_children", "merge_order", "random_merge_order", "tree_height", "tree_levels"]

# Bags with at least this many instances and dimensions take the Gram-matrix route (BLAS), others pdist.
_GRAM_MIN_N = 512
_GRAM_MIN_DIM = 64
# The Gram route gives up (and uses pdist) when more than this fraction of all pairs needs an exact check.
_MAX_CHECKED_FRACTION = 1.0 / 16.0
# Rows of the difference matrix evaluated at once by _exact_distances (bounds temporary memory).
_EXACT_CHUNK_ELEMENTS = 1 << 22
_EPS = float(np.finfo(np.float64).eps)
_NO_ID = np.iinfo(np.int64).max

PairsAt = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class _Spanning:
    """A single-linkage skeleton: ``n - 1`` edges sorted by height, plus a source of tied pairs.

    ``u[k]``, ``v[k]`` are leaves in the two clusters joined by the k-th merge (in height order) and
    ``w[k]`` its height. ``pairs_at(levels)`` returns every point pair ``(x, y, d)`` whose distance
    ``d`` is one of the (sorted, float64) ``levels``; it is only called for heights that repeat.
    """

    u: np.ndarray
    v: np.ndarray
    w: np.ndarray
    pairs_at: PairsAt


def merge_order(features: np.ndarray | torch.Tensor) -> np.ndarray:
    """Merge triplets of single-linkage clustering, identical to HAMIL's Algorithm 1.

    Args:
        features: ``(n, d)`` instance features, a numpy array or a torch tensor (detached and moved
            to CPU). Inputs with more than two dimensions are flattened per instance,
            ``(n, ...) -> (n, prod(...))``. Computed in float64.

    Returns:
        int64 array of shape ``(n - 1, 3)``. Row ``k`` is ``(a, b, c)``: clusters ``a < b`` are merged
        into the new cluster ``c = n + k``. Leaf ``i`` (instance ``i``) has id ``i``, so ids match
        ``scipy.cluster.hierarchy.linkage``. For ``n == 1`` the result is empty, shape ``(0, 3)``.

    Tie rule:
        Exactly Algorithm 1: at each step the pair at minimal single-linkage distance that comes first
        in the scan ``for i in active (ascending): for j in active, j > i (ascending)`` is merged,
        i.e. the lexicographically smallest ``(a, b)``. Distances are float64 Euclidean distances
        ``sqrt(sum((x - y) ** 2))`` computed from coordinate differences, so duplicated points are
        at distance exactly 0 and integer-valued features give exactly tied distances; "equal" means
        equal as float64 values.

    Complexity:
        O(n^2 d) time, O(n^2) memory. Without repeated merge heights the result is scipy's single
        linkage; repeated heights are resolved level by level with a dense contraction that costs
        O(m^2) for a level touching m clusters. Small bags use ``scipy.spatial.distance.pdist`` and
        scipy's single linkage. Bags with ``n >= 512`` and ``d >= 64`` use one BLAS Gram product
        instead (pdist alone takes ~2 s for 5000 x 512 on one core): the minimum spanning tree found
        on it is certified exact with a rigorous floating-point error bound, every pair the bound
        cannot separate is recomputed exactly, and the pdist route is used if certification fails
        or too many pairs are uncertain (massive ties). Either way the result is Algorithm 1's.

    Raises:
        ValueError: no instances, fewer than two dimensions, or non-finite features or distances.
    """
    x = _as_features(features)
    n = x.shape[0]
    if n == 1:
        return np.empty((0, 3), dtype=np.int64)
    use_gram = n >= _GRAM_MIN_N and x.shape[1] >= _GRAM_MIN_DIM
    spanning = _gram_spanning(x) if use_gram else None
    if spanning is None:
        spanning, direct = _pdist_spanning(x)
        if direct is not None:
            return direct
    return _replay(n, spanning)


def tree_levels(triplets: np.ndarray, n: int) -> np.ndarray:
    """Level of every merge: leaves are level 0, a merge is ``1 + max(level of its two children)``.

    Merges of equal level depend only on lower levels, so each level can run as one batched call.

    Args:
        triplets: ``(n - 1, 3)`` merge rows ``(a, b, c)`` as returned by :func:`merge_order`.
        n: number of leaves.

    Returns:
        int64 array of shape ``(n - 1,)``.
    """
    rows = _check_triplets(triplets, n)
    level = np.zeros(2 * n - 1, dtype=np.int64)
    for a, b, c in rows.tolist():
        level[c] = 1 + max(level[a], level[b])
    return level[n:].copy()


def tree_height(triplets: np.ndarray, n: int) -> int:
    """Number of merge levels of the tree (the root's level); 0 for a single instance."""
    levels = tree_levels(triplets, n)
    return int(levels.max()) if levels.size else 0


# ----------------------------------------------------------------------------------------------------
# input handling


def random_merge_order(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random pairing order on ``n`` leaves, as ``(n - 1, 3)`` triplets like ``merge_order``."""
    active = list(range(n))
    rows = np.empty((max(n - 1, 0), 3), dtype=np.int64)
    for k in range(n - 1):
        i, j = sorted(rng.choice(len(active), size=2, replace=False))
        a, b = active[i], active[j]
        del active[j], active[i]
        active.append(n + k)
        rows[k] = (min(a, b), max(a, b), n + k)
    return rows


def canonical_children(triplets: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Order each merge's children independently of the instances' order in the bag.

    Algorithm 1 gives ``a < b`` by cluster id. Ids of merged clusters follow merge height, which does not
    depend on the instance order, but leaf ids are instance indices. So where both children are leaves,
    they are ordered by their feature vectors (lexicographically) instead; everything else is kept. With
    distinct distances the unit (which is not symmetric in its inputs) then sees the same (left, right) for
    any permutation of the bag: HAMIL is permutation invariant, as the paper states.
    """
    n = len(points)
    out = triplets.copy()
    both = np.flatnonzero((out[:, 0] < n) & (out[:, 1] < n))
    if len(both):
        diff = points[out[both, 0]] - points[out[both, 1]]  # (m, D)
        first = np.argmax(diff != 0, axis=1)
        swap = diff[np.arange(len(both)), first] > 0
        out[both[swap], :2] = out[both[swap], 1::-1]
    return out


def _as_features(features: np.ndarray | torch.Tensor) -> np.ndarray:
    """Validate features and return them as a C-contiguous float64 ``(n, d)`` array."""
    if hasattr(features, "detach") and hasattr(features, "cpu"):  # torch.Tensor without importing torch
        features = features.detach().cpu().double().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"features must have shape (n, d) (or (n, ...)), got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("features must contain at least one instance, got n == 0")
    if x.ndim > 2:
        x = x.reshape(x.shape[0], -1)
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(
            f"features contain non-finite values (NaN or inf) in {bad.size} instance(s), "
            f"first at index {int(bad[0])}"
        )
    return np.ascontiguousarray(x)


def _check_triplets(triplets: np.ndarray, n: int) -> np.ndarray:
    """Validate merge rows for ``n`` leaves: shape ``(n - 1, 3)``, ``c = n + k``, children below ``c``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rows = np.asarray(triplets)
    if rows.shape != (n - 1, 3):
        raise ValueError(f"triplets must have shape ({n - 1}, 3) for n = {n}, got {rows.shape}")
    rows = rows.astype(np.int64, copy=False)
    new = rows[:, 2]
    if not np.array_equal(new, np.arange(n, 2 * n - 1)):
        raise ValueError("triplets[:, 2] must be n, n + 1, ..., 2n - 2")
    children = rows[:, :2]
    if (children < 0).any() or (children >= new[:, None]).any():
        raise ValueError("every child id must be >= 0 and smaller than the id of the cluster it forms")
    if np.unique(children).size != children.size:
        raise ValueError("every cluster id must be merged at most once")
    return rows


def _overflow_error() -> ValueError:
    return ValueError("pairwise distances overflow float64; rescale the features")


# ----------------------------------------------------------------------------------------------------
# exact distances


def _exact_distances(x: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``sqrt(sum((x[u] - x[v]) ** 2))`` per pair, from differences (exact 0 for duplicates)."""
    out = np.empty(u.size, dtype=np.float64)
    step = max(1, _EXACT_CHUNK_ELEMENTS // max(1, x.shape[1]))
    for start in range(0, u.size, step):
        stop = min(start + step, u.size)
        diff = x[u[start:stop]] - x[v[start:stop]]
        np.multiply(diff, diff, out=diff)
        np.sqrt(diff.sum(axis=1), out=out[start:stop])
    return out


def _condensed_to_pairs(index: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row/column ``(i, j)``, ``i < j``, of positions in a condensed distance vector."""
    rows = np.arange(n - 1, dtype=np.int64)
    row_start = rows * n - rows * (rows + 1) // 2
    i = np.searchsorted(row_start, index, side="right") - 1
    j = index - row_start[i] + i + 1
    return i, j


# ----------------------------------------------------------------------------------------------------
# route 1: pdist + scipy single linkage


def _pdist_spanning(x: np.ndarray) -> tuple[_Spanning, np.ndarray | None]:
    """Skeleton from ``pdist`` + scipy's single linkage; also the triplets directly when heights differ."""
    n = x.shape[0]
    dist = pdist(x)
    if not np.isfinite(dist).all():
        raise _overflow_error()
    z = linkage(dist, method="single")
    left = z[:, 0].astype(np.int64)
    right = z[:, 1].astype(np.int64)
    height = z[:, 2]
    if np.all(height[1:] > height[:-1]):
        # One merge per height: every merge is forced, and scipy numbers new clusters n + k like us.
        out = np.empty((n - 1, 3), dtype=np.int64)
        out[:, 0] = np.minimum(left, right)
        out[:, 1] = np.maximum(left, right)
        out[:, 2] = np.arange(n, 2 * n - 1)
        return _Spanning(left, right, height, _no_pairs), out
    rep = np.empty(2 * n - 1, dtype=np.int64)  # one leaf of every scipy cluster
    rep[:n] = np.arange(n)
    rep_list = rep.tolist()
    for k, child in enumerate(left.tolist()):
        rep_list[n + k] = rep_list[child]
    rep = np.asarray(rep_list, dtype=np.int64)

    def pairs_at(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        index = np.flatnonzero(np.isin(dist, levels))
        i, j = _condensed_to_pairs(index, n)
        return i, j, dist[index]

    return _Spanning(rep[left], rep[right], height, pairs_at), None


def _no_pairs(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    empty = np.empty(0, dtype=np.int64)
    return empty, empty, np.empty(0, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------
# route 2: Gram matrix + certified minimum spanning tree


def _gram_spanning(x: np.ndarray) -> _Spanning | None:
    """Skeleton from a BLAS Gram matrix, certified exact; ``None`` when too many pairs are uncertain.

    1. ``S ~ ||x_i - x_j||^2`` from centred features via one matrix product (error bounded below).
    2. Prim's minimum spanning tree ``T`` on ``S``; exact distances ``w`` of its ``n - 1`` edges.
    3. ``B[i, j]`` = largest exact ``w`` on the tree path i..j (single-linkage cophenetic height).
       ``T`` is a minimum spanning tree for the exact distances iff ``d(i, j) >= B[i, j]`` for all
       pairs. The bound proves ``d > B`` for almost all pairs; the rest (candidates) are computed
       exactly, and if one has ``d < B`` the tree is recomputed on T + candidates.
    4. A pair can be a tied candidate at some merge level only if ``d`` equals its minimax distance
       (<= B); such pairs are all among T + candidates, which is what the tie handling gets.
    """
    n, dim = x.shape
    xc = x - x.mean(axis=0)
    sq_norm = np.einsum("ij,ij->i", xc, xc)
    if not np.isfinite(sq_norm).all() or float(sq_norm.max()) > np.finfo(np.float64).max / 8:
        return None
    gram = xc @ xc.T
    gram *= -2.0
    gram += sq_norm[:, None]
    gram += sq_norm[None, :]
    tree_u, tree_v = _prim(gram)
    w = _exact_distances(x, tree_u, tree_v)
    if not np.isfinite(w).all():
        raise _overflow_error()
    order = np.argsort(w, kind="stable")
    tree_u, tree_v, w = tree_u[order], tree_v[order], w[order]
    leaf_order, gaps = _leaf_order(n, tree_u, tree_v, w)
    slack = _distance_error_factor(dim) * np.sqrt(sq_norm) + _underflow_slack(dim)
    found = _uncertified_pairs(
        gram, leaf_order, gaps, slack, limit=n + int(_MAX_CHECKED_FRACTION * n * n / 2)
    )
    if found is None:
        return None
    cand_u, cand_v, cand_b = found
    is_tree = np.isin(_pair_keys(cand_u, cand_v, n), _pair_keys(tree_u, tree_v, n))
    cand_u, cand_v, cand_b = cand_u[~is_tree], cand_v[~is_tree], cand_b[~is_tree]
    cand_d = _exact_distances(x, cand_u, cand_v)
    pair_u = np.concatenate([tree_u, cand_u])
    pair_v = np.concatenate([tree_v, cand_v])
    pair_d = np.concatenate([w, cand_d])
    if (cand_d < cand_b).any():
        # T is not minimal for the exact distances (near-ties within the error bound). Every certified
        # pair is the strict maximum of its cycle with T, so it is in no minimum spanning tree: one of
        # T + candidates, with exact weights, is a minimum spanning tree of the whole bag.
        tree_u, tree_v, w = _minimum_spanning_tree(n, pair_u, pair_v, pair_d)

    def pairs_at(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Every pair at distance == its minimax distance is in T + candidates; others are filtered later.
        keep = np.isin(pair_d, levels)
        return pair_u[keep], pair_v[keep], pair_d[keep]

    return _Spanning(tree_u, tree_v, w, pairs_at)


def _minimum_spanning_tree(
    n: int, u: np.ndarray, v: np.ndarray, d: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimum spanning tree of a sparse connected graph, edges sorted by weight ``d`` (exact copies).

    scipy's csgraph drops zero weights, so it runs on dense ranks ``1, 2, ...`` of the distinct
    weights: order and ties are preserved exactly.
    """
    values, rank = np.unique(d, return_inverse=True)
    graph = coo_matrix((rank.astype(np.float64) + 1.0, (u, v)), shape=(n, n)).tocsr()
    tree = minimum_spanning_tree(graph).tocoo()
    if tree.nnz != n - 1:
        raise RuntimeError("internal error: the candidate graph is not connected")
    weight = values[tree.data.astype(np.int64) - 1]
    order = np.argsort(weight, kind="stable")
    return tree.row[order].astype(np.int64), tree.col[order].astype(np.int64), weight[order]


def _distance_error_factor(dim: int) -> float:
    """``K`` with ``|approx - exact distance| <= K (||xc_i|| + ||xc_j||)`` for the Gram route.

    Error sources (unit roundoff ``u = eps / 2``, here bounded with ``eps``): centring ``x - mean``
    (``eps (r_i + r_j)``); Gram entries and squared norms, any summation order (``gamma_d r_i r_j``,
    ``gamma_d r_i^2``) plus two additions, together ``(d + 3) eps (r_i + r_j)^2`` on the squared
    distance, i.e. ``sqrt((d + 3) eps) (r_i + r_j)`` on the distance; the exact difference formula
    itself (``(d / 2 + 3) eps`` relative). A factor 2 on top covers the rounding of the norms.
    """
    return 2.0 * (np.sqrt(1.01 * (dim + 3) * _EPS) + (dim / 2.0 + 5.0) * _EPS)


def _underflow_slack(dim: int) -> float:
    """Absolute distance error from gradual underflow: each of ``d + 8`` operations loses < 2^-1074."""
    return float(np.sqrt(4.0 * (dim + 8) * 2.0**-1074))


def _prim(sq_dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum spanning tree of a dense symmetric matrix (Prim, O(n^2)); edges ``(parent, child)``."""
    n = sq_dist.shape[0]
    active = np.arange(1, n, dtype=np.int64)
    best = sq_dist[0, 1:].copy()
    parent = np.zeros(n - 1, dtype=np.int64)
    tree_u = np.empty(n - 1, dtype=np.int64)
    tree_v = np.empty(n - 1, dtype=np.int64)
    closer = np.empty(n - 1, dtype=bool)
    for k in range(n - 1):
        m = n - 1 - k
        t = int(np.argmin(best[:m]))
        vertex = int(active[t])
        tree_u[k], tree_v[k] = parent[t], vertex
        m -= 1
        active[t], best[t], parent[t] = active[m], best[m], parent[m]
        if m == 0:
            break
        row = sq_dist[vertex].take(active[:m])
        np.less(row, best[:m], out=closer[:m])
        np.putmask(best[:m], closer[:m], row)
        np.putmask(parent[:m], closer[:m], vertex)
    return tree_u, tree_v


def _leaf_order(
    n: int, tree_u: np.ndarray, tree_v: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Dendrogram leaf order of the tree (edges sorted by ``w``) and the heights between neighbours.

    Every cluster is contiguous in ``order``; the cophenetic height of positions ``p < q`` is
    ``max(gaps[p:q])``.
    """
    root = list(range(n))
    head = list(range(n))
    tail = list(range(n))
    nxt = [-1] * n
    gap_after = [0.0] * n
    for a, b, h in zip(tree_u.tolist(), tree_v.tolist(), w.tolist(), strict=True):
        ra, rb = _find(root, a), _find(root, b)
        nxt[tail[ra]] = head[rb]
        gap_after[tail[ra]] = h
        root[rb] = ra
        tail[ra] = tail[rb]
    order = [head[_find(root, 0)]]
    for _ in range(n - 1):
        order.append(nxt[order[-1]])
    gaps = [gap_after[leaf] for leaf in order[:-1]]
    return np.asarray(order, dtype=np.int64), np.asarray(gaps, dtype=np.float64)


def _find(root: list[int], a: int) -> int:
    """Union-find root with path halving."""
    while root[a] != a:
        root[a] = root[root[a]]
        a = root[a]
    return a


def _uncertified_pairs(
    sq_dist: np.ndarray, order: np.ndarray, gaps: np.ndarray, slack: np.ndarray, limit: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Pairs whose approximate distance does not prove ``d > B``: ``(u, v, B)``; ``None`` past ``limit``."""
    n = order.size
    found_u: list[np.ndarray] = []
    found_v: list[np.ndarray] = []
    found_b: list[np.ndarray] = []
    total = 0
    widen = 1.0 + 16.0 * _EPS
    for p in range(n - 1):
        leaf = int(order[p])
        others = order[p + 1 :]
        bottleneck = np.maximum.accumulate(gaps[p:])
        threshold = slack.take(others)
        threshold += slack[leaf]
        threshold += bottleneck
        np.multiply(threshold, threshold, out=threshold)
        threshold *= widen
        hits = np.flatnonzero(sq_dist[leaf].take(others) <= threshold)
        if hits.size:
            total += hits.size
            if total > limit:
                return None
            found_u.append(np.full(hits.size, leaf, dtype=np.int64))
            found_v.append(others[hits])
            found_b.append(bottleneck[hits])
    if not found_u:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.float64)
    return np.concatenate(found_u), np.concatenate(found_v), np.concatenate(found_b)


def _pair_keys(u: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    """Order-independent integer key of each pair."""
    return np.minimum(u, v) * n + np.maximum(u, v)


# ----------------------------------------------------------------------------------------------------
# replaying Algorithm 1 on a skeleton


class _Partition:
    """Active clusters as sets of leaves, with HAMIL ids; merges relabel the smaller side only."""

    def __init__(self, n: int) -> None:
        self.slot_of_leaf = np.arange(n, dtype=np.int64)
        self.members: list[list[int]] = [[i] for i in range(n)]
        self.id_of_slot = np.arange(n, dtype=np.int64)
        self.slot_of_id = list(range(n)) + [-1] * (n - 1)

    def ids(self, leaves: np.ndarray) -> np.ndarray:
        """Current cluster id of each leaf."""
        return self.id_of_slot[self.slot_of_leaf[leaves]]

    def merge(self, a: int, b: int, c: int) -> None:
        """Merge clusters ``a`` and ``b`` into the new cluster ``c``."""
        keep, drop = self.slot_of_id[a], self.slot_of_id[b]
        if len(self.members[keep]) < len(self.members[drop]):
            keep, drop = drop, keep
        moved = self.members[drop]
        self.slot_of_leaf[moved] = keep
        self.members[keep].extend(moved)
        self.members[drop] = []
        self.id_of_slot[keep] = c
        self.slot_of_id[c] = keep


def _replay(n: int, spanning: _Spanning) -> np.ndarray:
    """Run Algorithm 1 level by level: forced merges directly, repeated heights by contraction."""
    w = spanning.w
    starts = np.flatnonzero(np.concatenate([[True], w[1:] != w[:-1]]))
    sizes = np.diff(np.concatenate([starts, [n - 1]]))
    levels = w[starts[sizes > 1]]
    pair_u, pair_v, bounds = _group_by_level(spanning.pairs_at(levels), levels)
    part = _Partition(n)
    out = np.empty((n - 1, 3), dtype=np.int64)
    k = 0
    level = 0
    for start, size in zip(starts.tolist(), sizes.tolist(), strict=True):
        if size == 1:
            a, b = part.ids(np.array([spanning.u[start], spanning.v[start]])).tolist()
            merges = [(min(a, b), max(a, b))]
        else:
            lo, hi = bounds[level], bounds[level + 1]
            level += 1
            cu, cv = part.ids(pair_u[lo:hi]), part.ids(pair_v[lo:hi])
            cross = cu != cv
            merges = _contract_level(cu[cross], cv[cross], n + k)
            if len(merges) != size:
                raise RuntimeError(
                    f"internal error: {len(merges)} merges at height {w[start]!r}, expected {size}"
                )
        for a, b in merges:
            out[k] = (a, b, n + k)
            part.merge(a, b, n + k)
            k += 1
    return out


def _group_by_level(
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray], levels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Pairs ordered by level (index into sorted ``levels``); level ``t`` is ``bounds[t]:bounds[t + 1]``."""
    u, v, d = pairs
    index = np.searchsorted(levels, d)
    if index.size and (index.max() >= levels.size or not np.array_equal(levels[index], d)):
        raise RuntimeError("internal error: a tied pair is not at one of the requested levels")
    if levels.size > 1:
        small = np.uint16 if levels.size <= np.iinfo(np.uint16).max else np.int64
        order = np.argsort(index.astype(small), kind="stable")  # radix sort for small integers
        u, v = u[order], v[order]
    counts = np.bincount(index, minlength=levels.size)
    bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
    return u, v, bounds


def _contract_level(cu: np.ndarray, cv: np.ndarray, next_id: int) -> list[tuple[int, int]]:
    """Algorithm 1 restricted to one distance level.

    ``(cu[e], cv[e])`` are the active clusters joined by a point pair at exactly this level (no
    active pair is closer). While such edges remain, Algorithm 1's minimum equals the level, and its
    scan picks the smallest cluster id ``a`` with any edge (all its neighbours are larger) and that
    cluster's smallest neighbour ``b``. The new cluster takes id ``next_id`` (larger than all others)
    and inherits the edges of ``a`` and ``b``. Dense adjacency: O(m) per merge for m clusters.
    """
    if cu.size == 0:
        return []
    present = np.zeros(next_id, dtype=bool)  # every active id is below next_id
    present[cu] = True
    present[cv] = True
    nodes = np.flatnonzero(present)
    m = nodes.size
    local = np.zeros(next_id, dtype=np.int64)
    local[nodes] = np.arange(m)
    lu, lv = local[cu], local[cv]
    adj = np.zeros((m, m), dtype=bool)
    adj[lu, lv] = True
    adj[lv, lu] = True
    ident = nodes.astype(np.int64)
    degree = adj.sum(axis=1)
    merges: list[tuple[int, int]] = []
    while True:
        key = np.where(degree > 0, ident, _NO_ID)
        i = int(np.argmin(key))
        if key[i] == _NO_ID:
            return merges
        row_i = adj[i]
        j = int(np.argmin(np.where(row_i, ident, _NO_ID)))
        merges.append((int(ident[i]), int(ident[j])))
        row_j = adj[j]
        degree -= row_i & row_j  # common neighbours lose one of their two edges
        joined = row_i | row_j
        joined[i] = joined[j] = False
        adj[i] = joined
        adj[:, i] = joined
        adj[j] = False
        adj[:, j] = False
        degree[i] = int(joined.sum())
        degree[j] = 0
        ident[i] = next_id
        next_id += 1

"""How a batch of merge trees runs: one unit call per tree level, each node copied a constant number of times.

A batch holds ``B`` bags and one binary merge tree per bag (``(n - 1, 3)`` triplets from :mod:`hamil.tree`).
Merges of the same level (``1 + max(level of the children)``, leaves are level 0) of *all* bags run in one
call of the aggregation unit, so a batch costs as many unit calls as its tallest tree is high.

Every node of a tree is produced once and consumed once (by its parent's merge, or as a bag's root), so each
level's output is reordered once by the level that consumes each row and cut with one ``torch.split``; a
level's inputs are the pieces addressed to it, concatenated and put in merge order with one index. Nothing
ever copies all earlier nodes: cost and memory are linear in the number of instances, also when trees are
chains (single-linkage trees on real features often are), where growing one node tensor level by level
would be quadratic. The plan is pure NumPy; :meth:`TreePlan.device_indices` moves all its index arrays to
the device in one copy.

Rows of a level's unit call are in the order of the merges in the batch (bag by bag, then merge by merge),
so outputs, batch-norm statistics and gradients are those of a plain level-by-level execution.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TreePlan:
    """Level-by-level execution of one batch of trees (see the module docstring).

    ``height`` levels of merges; level ``height + 1`` stands for the bag roots. For every source level ``s``
    (0 = leaves) ``route[s]`` lists ``(consumer level, rows)``: after the rows of level ``s``'s output are
    put in ``order[s]`` (``None``: already in order) they split into consecutive pieces of these sizes, one
    per consumer. For every consumer ``l`` the pieces are concatenated by increasing source and indexed by
    ``gather[l]`` (``None``: already in order) to give the children of its merges in merge order, left and
    right interleaved (``(2M, ...)`` viewed as ``(M, 2, ...)`` pairs), or the roots in bag order for
    ``l = height + 1``.
    """

    height: int
    order: list[np.ndarray | None]  # per source level: row permutation of its output
    route: list[list[tuple[int, int]]]  # per source level: (consumer level, rows) in order
    gather: list[np.ndarray | None]  # per consumer level: permutation of its concatenated inputs

    @functools.cached_property
    def feeds(self) -> list[list[tuple[int, int, int]]]:
        """Per consumer level: its pieces in concatenation order as ``(source level, first row, rows)``,
        rows counted in the source's output after ``order``."""
        feeds: list[list[tuple[int, int, int]]] = [[] for _ in range(self.height + 2)]
        for source, pieces in enumerate(self.route):
            start = 0
            for consumer, rows in pieces:
                feeds[consumer].append((source, start, rows))
                start += rows
        return feeds

    def device_indices(
        self, device: torch.device
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """``order`` and ``gather`` as int64 tensors on ``device``, moved in one host-to-device copy."""
        arrays = [a for a in (*self.order, *self.gather) if a is not None]
        if not arrays:
            return list(self.order), list(self.gather)  # all None
        flat = torch.from_numpy(np.concatenate(arrays)).to(device, non_blocking=True)
        pieces = iter(torch.split(flat, [len(a) for a in arrays]))
        order = [None if a is None else next(pieces) for a in self.order]
        gather = [None if a is None else next(pieces) for a in self.gather]
        return order, gather


class Routing:
    """The rows in flight while a plan runs forward: each level's output is cut into pieces for the levels
    that consume it (:meth:`publish`), and a level's inputs are its pieces put together (:meth:`collect`).
    ``order`` and ``gather`` are the plan's index tensors on the device (:meth:`TreePlan.device_indices`)."""

    def __init__(
        self, plan: TreePlan, order: list[torch.Tensor | None], gather: list[torch.Tensor | None]
    ) -> None:
        self.plan, self.order, self.gather = plan, order, gather
        self._inbox: list[list[torch.Tensor]] = [[] for _ in range(plan.height + 2)]  # per consumer level

    def publish(self, level: int, out: torch.Tensor) -> None:
        """Route the output rows of ``level`` to their consumers."""
        out = out if self.order[level] is None else out.index_select(0, self.order[level])
        route = self.plan.route[level]
        pieces = (out,) if len(route) == 1 else torch.split(out, [rows for _, rows in route])
        for (consumer, _), piece in zip(route, pieces, strict=True):
            self._inbox[consumer].append(piece)

    def collect(self, level: int) -> torch.Tensor:
        """The inputs of ``level`` in merge order, pairs interleaved (the roots in bag order for
        ``height + 1``); its pieces are let go (nothing is kept past its use)."""
        pieces, self._inbox[level] = self._inbox[level], []
        x = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return x if self.gather[level] is None else x.index_select(0, self.gather[level])


def plan_trees(trees: list[np.ndarray], sizes: np.ndarray) -> TreePlan:
    """The execution plan of ``trees`` (one ``(n_b - 1, 3)`` triplet array per bag, ``c = n_b + k`` for row
    ``k``, as :func:`hamil.tree.merge_order` returns) for bags of ``sizes`` (B,) packed in that order."""
    merges, roots = _global_ids(trees, sizes)  # (M, 3), (B,)
    total = int(np.sum(sizes))
    level = _levels(merges, total)  # (M,) level of each merge
    height = int(level.max(initial=0))
    # position of each merge within its level, keeping batch order
    by_level = np.argsort(level, kind="stable")  # (M,)
    starts = np.concatenate([[0], np.cumsum(np.bincount(level, minlength=height + 1))])  # (height + 2,)
    position = np.empty(len(level), dtype=np.int64)
    position[by_level] = np.arange(len(level)) - starts[level[by_level]]
    node_level = np.concatenate([np.zeros(total, np.int64), level])  # (N + M,) node id -> its level
    node_row = np.concatenate([np.arange(total), position])  # (N + M,) node id -> row in its level
    # every node is consumed exactly once: by its parent's merge (left or right half) or as a root
    node = np.concatenate([merges[:, 0], merges[:, 1], roots])  # (2M + B,)
    consumer = np.concatenate([level, level, np.full(len(roots), height + 1)])
    slot = np.concatenate([2 * position, 2 * position + 1, np.arange(len(roots))])  # pairs interleaved
    source = node_level[node]
    records = np.lexsort((slot, consumer, source))  # by source, then consumer, then slot
    return TreePlan(
        height=height,
        order=_orders(node_row[node[records]], source[records], height),
        route=_routes(source[records], consumer[records], height),
        gather=_gathers(source, consumer, slot, height),
    )


def _global_ids(trees: list[np.ndarray], sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Triplets in batch ids (leaves ``0..N-1`` bag by bag, then merges bag by bag) and each bag's root."""
    total = int(np.sum(sizes))
    merges, roots = [], []
    offset, next_id = 0, total
    for tri, n in zip(trees, np.asarray(sizes).tolist(), strict=True):
        local_to_global = np.concatenate([np.arange(offset, offset + n), np.arange(next_id, next_id + n - 1)])
        merges.append(local_to_global[tri])
        roots.append(local_to_global[-1])
        offset, next_id = offset + n, next_id + n - 1
    return np.concatenate(merges).reshape(-1, 3).astype(np.int64), np.asarray(roots, dtype=np.int64)


def _levels(merges: np.ndarray, leaves: int) -> np.ndarray:
    """``(M,)`` level of each merge: ``1 + max(level of its children)``; merges come after their children."""
    level = np.zeros(leaves + len(merges), dtype=np.int64)
    for k, (a, b) in enumerate(merges[:, :2].tolist()):
        level[leaves + k] = 1 + max(level[a], level[b])
    return level[leaves:]


def _orders(rows: np.ndarray, source: np.ndarray, height: int) -> list[np.ndarray | None]:
    """Per source level: its output rows in consumption order, ``None`` where that is already the order."""
    return _cut(rows, source, height + 1)


def _routes(source: np.ndarray, consumer: np.ndarray, height: int) -> list[list[tuple[int, int]]]:
    """Per source level: ``(consumer level, rows)`` pieces in order (records sorted by source, consumer)."""
    keys, counts = np.unique(source * (height + 2) + consumer, return_counts=True)
    route: list[list[tuple[int, int]]] = [[] for _ in range(height + 1)]
    for key, k in zip(keys.tolist(), counts.tolist(), strict=True):
        route[key // (height + 2)].append((key % (height + 2), k))
    return route


def _gathers(
    source: np.ndarray, consumer: np.ndarray, slot: np.ndarray, height: int
) -> list[np.ndarray | None]:
    """Per consumer level: the index putting its concatenated pieces (by source, then slot) in slot order."""
    records = np.lexsort((slot, source, consumer))  # by consumer, then source, then slot
    starts = np.searchsorted(consumer[records], np.arange(height + 3))  # (height + 3,)
    within = np.arange(len(records)) - starts[consumer[records]]  # row of each record in its level's input
    index = np.empty(len(records), dtype=np.int64)
    index[starts[consumer[records]] + slot[records]] = within  # per level: index[slot] = row
    by_level = np.empty(len(records), dtype=np.int64)
    by_level[starts[consumer[records]] + slot[records]] = consumer[records]
    return [None, *_cut(index, by_level, height + 2)[1:]]  # level 0 consumes nothing


def _cut(values: np.ndarray, group: np.ndarray, groups: int) -> list[np.ndarray | None]:
    """``values`` (sorted by ``group``) cut into ``groups`` pieces, those equal to ``arange`` as ``None``."""
    starts = np.searchsorted(group, np.arange(groups + 1))  # (groups + 1,)
    moved = values != np.arange(len(values)) - starts[group]  # (n,) not where an identity would put it
    changed = np.bincount(group[moved], minlength=groups) > 0  # (groups,)
    return [values[starts[g] : starts[g + 1]] if changed[g] else None for g in range(groups)]


def leaf_depths(triplets: np.ndarray, n: int) -> np.ndarray:
    """``(n,)`` depth of each leaf below the root of one bag's tree (0 for a single instance)."""
    depth = np.zeros(2 * n - 1, dtype=np.int64)
    for a, b, c in triplets[::-1].tolist():  # root first
        depth[a] = depth[b] = depth[c] + 1
    return depth[:n]

"""HAMIL, HAMIL-A and RAMIL: aggregate a bag along a binary merge tree, all bags of a batch level by level."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from hamil.models import fused_tree as fused
from hamil.models.ops import pool, weighted_sum
from hamil.models.registry import Aggregator, AggregatorOutput, register
from hamil.models.tree_plan import Routing, leaf_depths, plan_trees
from hamil.models.units import AggregationUnit, MeanUnit, banded_matrix
from hamil.tree import canonical_children, merge_order, random_merge_order
from preprocessing.errors import InputError

TREE_FEATURES = ("flatten", "pooled")


class TreeAggregator(Aggregator):
    """Shared machinery: build one tree per bag, then run merges level by level across the whole batch.

    All merges whose children are ready run in one call of the unit, so a batch costs as many unit calls as
    its tallest tree is high (``self.last_unit_calls`` records it); cost is linear in the number of
    instances (:mod:`hamil.models.tree_plan`). Tree building needs one device-to-host copy per batch.
    """

    needs_points = True  # trees are built from the instances' features (False: from bag sizes alone)
    tree_features = "flatten"  # which features: "flatten" (whole maps) or "pooled" (pooled vectors)

    def __init__(self, channels: int, unit: nn.Module) -> None:
        super().__init__()
        self.out_channels = channels
        self.unit = unit
        self.last_unit_calls = 0

    def tree(self, points: np.ndarray | None, n: int) -> np.ndarray:
        """Merge triplets ``(n - 1, 3)`` of one bag from its tree features ``(n, D)`` float64 or ``None``."""
        raise NotImplementedError

    def tree_points(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` float64 features the trees are built from (detached)."""
        return _tree_input(features.detach(), self.tree_features).double()

    def bag_tree(self, features: torch.Tensor) -> np.ndarray:
        """Merge triplets for one bag's features ``(n, C, h, w)`` (no gradients)."""
        trees, _ = self.batch_trees(features, torch.tensor([features.shape[0]], device=features.device))
        return trees[0]

    def batch_trees(
        self, features: torch.Tensor, bag_sizes: torch.Tensor
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """One tree per bag and the bag sizes on the host, from one device-to-host copy."""
        with torch.no_grad():
            sizes, points = _to_host(bag_sizes, self.tree_points(features) if self.needs_points else None)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        trees = [
            self.tree(None if points is None else points[s:e], int(e - s))
            for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
        ]
        return trees, sizes

    def forward(self, features: torch.Tensor, bag_sizes: torch.Tensor) -> AggregatorOutput:
        if len(bag_sizes) == 0:
            return AggregatorOutput(features[:0] + _zero_touch(self.unit), None)  # (0, C, h, w): no bags
        trees, sizes = self.batch_trees(features, bag_sizes)
        plan = plan_trees(trees, sizes)
        order, gather = plan.device_indices(features.device)
        if fused.applies(self.unit, features):  # the 1-D L1Agg: all levels as one autograd node
            matrix, bias = banded_matrix(self.unit.layers[0], features.shape[1])  # (2D, D), (D,) | None
            bags = fused.fused_tree(self.unit, features, matrix, bias, plan, order, gather)  # (B, D)
        else:
            bags = self._run_levels(features, Routing(plan, order, gather))  # (B, C, h, w) or (B, D)
        self.last_unit_calls = plan.height
        if plan.height == 0:  # keep DDP's gradient hooks firing for all-singleton batches
            bags = bags + _zero_touch(self.unit)
        return AggregatorOutput(bags, None)

    def _run_levels(self, features: torch.Tensor, rows: Routing) -> torch.Tensor:
        """The unit level by level, all bags of the batch in each call: the roots in bag order."""
        merge = self.unit.merger()
        rows.publish(0, merge.nodes(features))  # leaves (N, C, h, w) or (N, 1, D)
        for level in range(1, rows.plan.height + 1):
            children = rows.collect(level)  # (2M, C, h, w): left and right child of each merge, interleaved
            rows.publish(level, merge(children))  # (M, C, h, w)
        merge.close()
        return merge.features(rows.collect(rows.plan.height + 1))


def _to_host(bag_sizes: torch.Tensor, points: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Bag sizes ``(B,)`` and tree features ``(N, D)`` on the host in one device-to-host copy."""
    if points is None or points.device.type == "cpu":
        return bag_sizes.cpu().numpy(), None if points is None else points.numpy()
    sizes = bag_sizes.to(points.device, torch.float64, non_blocking=True)  # (B,) exact as float64
    packed = torch.cat([sizes, points.reshape(-1)]).cpu().numpy()  # the one device-to-host copy
    b = len(bag_sizes)
    return packed[:b].astype(np.int64), packed[b:].reshape(points.shape)


def _zero_touch(module: nn.Module) -> torch.Tensor | float:
    params = [p for p in module.parameters() if p.requires_grad]
    return sum(p.sum() for p in params) * 0.0 if params else 0.0


def _tree_input(features: torch.Tensor, mode: str) -> torch.Tensor:
    return pool(features) if mode == "pooled" else features.flatten(1)  # (n, C) or (n, C*h*w)


@register("hamil", paper_name="HAMIL")
class Hamil(TreeAggregator):
    """HAMIL (Tu et al.): the aggregation unit applied along the single-linkage tree (paper Alg. 1, Eqs. 2-4).

    Options: ``depth`` (1 = L1Agg, 2 = L2Agg, 3 = L3Agg), ``kernel_size`` (7), ``batch_norm`` (True),
    ``hidden`` (width of inner layers for depth > 1), ``tree_features`` ("flatten": Euclidean distances
    between flattened feature maps, the paper's wording; or "pooled": between pooled vectors), ``init``
    ("average": the unit starts as the mean of its two inputs, so training starts from HAMIL-A; "default":
    PyTorch's random init, which learns much more slowly from a random backbone, see docs/design-notes.md),
    ``dims`` (2: feature maps ``(N, C, h, w)``; 1: feature vectors ``(N, D)`` with the 1-D unit).
    """

    def __init__(
        self,
        channels: int,
        depth: int = 1,
        kernel_size: int = 7,
        batch_norm: bool = True,
        hidden: int = 2,
        tree_features: str = "flatten",
        init: str = "average",
        dims: int = 2,
        unit: nn.Module | None = None,
    ) -> None:
        if tree_features not in TREE_FEATURES:
            raise InputError(f"tree_features must be one of {TREE_FEATURES}, got {tree_features!r}")
        unit = unit or AggregationUnit(depth, kernel_size, batch_norm, hidden, dims, init)
        super().__init__(channels, unit)
        self.tree_features = tree_features

    def tree(self, points: np.ndarray | None, n: int) -> np.ndarray:
        return canonical_children(merge_order(points), points)


@register("hamil_a", paper_name="HAMIL-A")
class HamilA(Hamil):
    """HAMIL-A (ablation): HAMIL's single-linkage tree with the element-wise mean as the unit."""

    def __init__(self, channels: int, tree_features: str = "flatten") -> None:
        super().__init__(channels, tree_features=tree_features, unit=MeanUnit())

    def forward(self, features: torch.Tensor, bag_sizes: torch.Tensor) -> AggregatorOutput:
        """The root of a tree of pairwise means is the mean of the leaves weighted by ``2 ** -depth``:
        one segment operation instead of one unit call per level (same result up to rounding)."""
        if len(bag_sizes) == 0:
            return AggregatorOutput(features[:0], None)  # (0, C, h, w): no bags
        trees, sizes = self.batch_trees(features, bag_sizes)
        depth = np.concatenate([leaf_depths(t, n) for t, n in zip(trees, sizes.tolist(), strict=True)])
        weights = torch.from_numpy(np.ldexp(1.0, -depth))  # (N,) 2 ** -depth
        weights = weights.to(features.device, features.dtype, non_blocking=True)
        self.last_unit_calls = 0
        return AggregatorOutput(weighted_sum(features, weights, bag_sizes), None)  # (B, C, h, w)


@register("ramil", paper_name="RAMIL")
class Ramil(TreeAggregator):
    """RAMIL (ablation): HAMIL's unit applied along a random pairing order.

    In training the order is redrawn at every step. In evaluation each bag's order comes from a generator
    seeded with ``(seed, bag size)``, so a bag's prediction does not depend on the batch it is in.
    """

    def __init__(
        self,
        channels: int,
        depth: int = 1,
        kernel_size: int = 7,
        batch_norm: bool = True,
        hidden: int = 2,
        seed: int = 0,
        init: str = "average",
        dims: int = 2,
    ) -> None:
        super().__init__(channels, AggregationUnit(depth, kernel_size, batch_norm, hidden, dims, init))
        self.seed = seed
        self._train_rng = np.random.default_rng(seed)

    def rng_state(self) -> str:
        """The training pairing-order generator's state (JSON), saved in checkpoints for exact resume."""
        return json.dumps(self._train_rng.bit_generator.state)

    def set_rng_state(self, state: str) -> None:
        self._train_rng.bit_generator.state = json.loads(state)

    needs_points = False

    def tree(self, points: np.ndarray | None, n: int) -> np.ndarray:
        rng = self._train_rng if self.training else np.random.default_rng([self.seed, n])
        return random_merge_order(n, rng)

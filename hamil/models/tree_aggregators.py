"""HAMIL, HAMIL-A and RAMIL: aggregate a bag along a binary merge tree, all bags of a batch level by level."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from hamil.models.ops import bag_slices, pool
from hamil.models.registry import Aggregator, AggregatorOutput, register
from hamil.models.units import AggregationUnit, MeanUnit
from hamil.tree import canonical_children, merge_order, random_merge_order, tree_levels
from preprocessing.errors import InputError

TREE_FEATURES = ("flatten", "pooled")


class TreeAggregator(Aggregator):
    """Shared machinery: build one tree per bag, then run merges level by level across the whole batch.

    All merges whose children are ready run in one call of the unit, so a batch costs as many unit calls as
    its tallest tree is high (``self.last_unit_calls`` records it).
    """

    def __init__(self, channels: int, unit: nn.Module) -> None:
        super().__init__()
        self.out_channels = channels
        self.unit = unit
        self.last_unit_calls = 0

    def bag_tree(self, features: torch.Tensor) -> np.ndarray:
        """Merge triplets for one bag's features ``(n, C, h, w)`` (no gradients)."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor, bag_sizes: torch.Tensor) -> AggregatorOutput:
        merges, levels, roots = [], [], []
        offset, next_id = 0, features.shape[0]
        for part in bag_slices(bag_sizes):
            n = part.stop - part.start
            with torch.no_grad():
                tri = self.bag_tree(features[part].detach())  # (n - 1, 3) local ids
            # local ids -> global ids: leaves are rows of `features`, new nodes are appended after them
            local_to_global = np.concatenate(
                [np.arange(offset, offset + n), np.arange(next_id, next_id + n - 1)]
            )
            merges.append(local_to_global[tri])
            levels.append(tree_levels(tri, n))
            roots.append(local_to_global[-1] if n > 1 else offset)
            offset, next_id = offset + n, next_id + n - 1
        merges_all = np.concatenate(merges) if merges else np.empty((0, 3), np.int64)
        levels_all = np.concatenate(levels) if levels else np.empty(0, np.int64)

        nodes = features  # (N + merges so far, C, h, w): leaves, then merged nodes level by level
        # node ids are assigned bag by bag, but computed level by level: keep a map id -> row of `nodes`
        row_of = np.full(next_id, -1, dtype=np.int64)
        row_of[: features.shape[0]] = np.arange(features.shape[0])
        self.last_unit_calls = 0
        for level in range(1, int(levels_all.max(initial=0)) + 1):
            todo = merges_all[levels_all == level]  # (M, 3)
            left = nodes[torch.as_tensor(row_of[todo[:, 0]], device=features.device)]
            right = nodes[torch.as_tensor(row_of[todo[:, 1]], device=features.device)]
            merged = self.unit(left, right)  # (M, C, h, w)
            row_of[todo[:, 2]] = nodes.shape[0] + np.arange(len(todo))
            nodes = torch.cat([nodes, merged])
            self.last_unit_calls += 1
        bags = nodes[torch.as_tensor(row_of[np.asarray(roots, dtype=np.int64)], device=features.device)]
        if self.last_unit_calls == 0:  # keep DDP's gradient hooks firing for all-singleton batches
            bags = bags + _zero_touch(self.unit)
        return AggregatorOutput(bags, None)


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

    def bag_tree(self, features: torch.Tensor) -> np.ndarray:
        points = _tree_input(features, self.tree_features).double().cpu().numpy()  # (n, D)
        return canonical_children(merge_order(points), points)


@register("hamil_a", paper_name="HAMIL-A")
class HamilA(Hamil):
    """HAMIL-A (ablation): HAMIL's single-linkage tree with the element-wise mean as the unit."""

    def __init__(self, channels: int, tree_features: str = "flatten") -> None:
        super().__init__(channels, tree_features=tree_features, unit=MeanUnit())


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

    def bag_tree(self, features: torch.Tensor) -> np.ndarray:
        n = features.shape[0]
        rng = self._train_rng if self.training else np.random.default_rng([self.seed, n])
        return random_merge_order(n, rng)

"""A synthetic classical-MIL set (bags of feature vectors) for ``hamil mil-bench``, written as the common CSV.

Shaped like MUSK1 (92 bags, about 5 instances of 166 features): every instance is drawn around one of a few
shared *background concepts* (Gaussian clusters that all bags contain); a positive bag also holds 1 to
``witnesses`` instances of the *target concept*, a cluster whose centre is ``shift`` standard deviations
away from a background concept in ``informative`` of the features. Negative bags hold none, but a fraction
``decoys`` of them hold one instance half-way to the target (so that a bag is not told by one feature).
The standard MIL assumption holds: a bag is positive exactly when it holds a target instance.

Rows are ``label,bag,f1,...,fD`` without a header, labels 0/1, bags in order, so ``mil-bench`` reads it as
it reads the classical sets. The whole file follows from the parameters (same seed, same bytes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocessing.errors import InputError
from preprocessing.io import atomic_path
from preprocessing.options import opt


@dataclass(frozen=True)
class MilSynthParams:
    """Size and difficulty of a synthetic MIL set; checked on creation."""

    bags: int = opt(100, "number of bags (half positive)")
    instances_min: int = opt(2, "instances per bag at least")
    instances_max: int = opt(10, "instances per bag at most (uniform in [min, max])")
    features: int = opt(166, "features per instance (MUSK: 166; Fox, Tiger, Elephant: 230)")
    concepts: int = opt(4, "background concepts shared by all bags")
    informative: int = opt(8, "features in which the target concept differs from its background concept")
    shift: float = opt(1.5, "distance of the target concept in those features, in standard deviations")
    witnesses: int = opt(2, "target instances per positive bag at most (at least 1)")
    decoys: float = opt(0.3, "fraction of negative bags with one instance half-way to the target")
    seed: int = opt(0, "random seed")

    def __post_init__(self) -> None:
        checks = {
            "bags >= 4": self.bags >= 4,
            "1 <= instances_min <= instances_max": 1 <= self.instances_min <= self.instances_max,
            "1 <= informative <= features": 1 <= self.informative <= self.features,
            "concepts >= 1": self.concepts >= 1,
            "shift > 0": self.shift > 0,
            "1 <= witnesses <= instances_min": 1 <= self.witnesses <= self.instances_min,
            "0 <= decoys <= 1": 0 <= self.decoys <= 1,
            "seed >= 0": self.seed >= 0,
        }
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise InputError(f"synthetic MIL set: need {failed[0]}")


def generate_mil(params: MilSynthParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``features (N, D)``, ``bag (N,)`` ids 0..B-1 in order and ``label (N,)`` 0/1 of each instance."""
    rng = np.random.default_rng(params.seed)
    centres = rng.standard_normal((params.concepts, params.features))  # (K, D) background concepts
    target = centres[0].copy()
    target[: params.informative] += params.shift  # (D,) the target concept, near background concept 0
    labels = rng.permutation(np.arange(params.bags) % 2)  # (B,) half positive
    sizes = rng.integers(params.instances_min, params.instances_max + 1, params.bags)  # (B,)
    rows = []
    for label, n in zip(labels.tolist(), sizes.tolist(), strict=True):
        x = centres[rng.integers(params.concepts, size=n)]  # (n, D) background instances
        if label == 1:
            k = int(rng.integers(1, params.witnesses + 1))
            x[:k] = target
        elif rng.random() < params.decoys:
            x[0] = (centres[0] + target) / 2
        x = x + rng.standard_normal(x.shape)  # unit noise around each concept
        rows.append(x[rng.permutation(n)])
    ids = np.repeat(np.arange(params.bags), sizes)  # (N,)
    return np.concatenate(rows), ids, labels[ids]


def write_mil_csv(path: str | os.PathLike[str], params: MilSynthParams) -> dict[str, int]:
    """Write the set as ``label,bag,f1,...`` rows (no header) to ``path``, atomically; returns its size."""
    features, bags, labels = generate_mil(params)
    with atomic_path(path) as tmp, Path(tmp).open("w") as f:
        for x, bag, label in zip(features, bags.tolist(), labels.tolist(), strict=True):
            f.write(f"{label},{bag}," + ",".join(f"{v:.6g}" for v in x) + "\n")
    return {"bags": int(params.bags), "instances": len(labels), "positive_bags": int(params.bags // 2)}

"""Aggregator interface and the registry that selects one by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn


class AggregatorOutput(NamedTuple):
    """What every aggregator returns for a batch of ``B`` bags holding ``N`` instances in total."""

    bags: torch.Tensor  # (B, C, h, w) bag maps or (B, D) bag vectors
    scores: torch.Tensor | None  # (N,) per-instance scores, or None to use cosine similarity


class Aggregator(nn.Module):
    """Maps instance features ``(N, C, h, w)`` and ``bag_sizes (B,)`` (bags contiguous) to bag features."""

    out_channels: int

    def forward(self, features: torch.Tensor, bag_sizes: torch.Tensor) -> AggregatorOutput:
        raise NotImplementedError


_REGISTRY: dict[str, Callable[..., Aggregator]] = {}


def register(name: str) -> Callable[[type[Aggregator]], type[Aggregator]]:
    """Class decorator adding an aggregator to the registry under ``name``."""

    def wrap(cls: type[Aggregator]) -> type[Aggregator]:
        if name in _REGISTRY:
            raise ValueError(f"aggregator {name!r} registered twice")
        _REGISTRY[name] = cls
        return cls

    return wrap


#: The paper's names of the registered models, for tables and figures.
PAPER_NAMES: dict[str, str] = {
    "hamil": "HAMIL",
    "hamil_a": "HAMIL-A",
    "ramil": "RAMIL",
    "si": "SI",
    "mean": "Mean",
    "max": "Max",
    "sum": "Sum",
    "nan": "NAN",
    "attention": "Attention",
    "gated_attention": "Gated attention",
    "deepmiml": "DeepMIML",
}


def paper_name(name: str) -> str:
    """The paper's name of model ``name`` (the name itself when the paper has none)."""
    return PAPER_NAMES.get(name, name)


def available() -> list[str]:
    """Names of all registered aggregators (the valid ``model`` values in config)."""
    return sorted(_REGISTRY)


def create(name: str, channels: int, num_classes: int | None = None, **options: object) -> Aggregator:
    """Instantiate the aggregator ``name`` for ``channels`` input channels.

    ``num_classes`` is passed on only to aggregators that take it (those that output logits themselves).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(available())}")
    cls = _REGISTRY[name]
    params = inspect.signature(cls).parameters
    if "num_classes" in params:
        if num_classes is None:
            raise ValueError(f"model {name!r} needs num_classes")
        options = {**options, "num_classes": num_classes}
    accepted = set(params) - {"channels", "unit"}
    unknown = sorted(set(options) - accepted - {"num_classes"})
    if unknown:
        takes = ", ".join(sorted(accepted - {"num_classes"})) or "none"
        raise ValueError(f"model {name!r} has no option(s) {', '.join(unknown)}; its options: {takes}")
    return cls(channels, **options)


def bag_slices(bag_sizes: torch.Tensor) -> list[slice]:
    """Python slices of each bag's instances in the concatenated batch."""
    ends = torch.cumsum(bag_sizes, 0).tolist()
    starts = [0, *ends[:-1]]
    return [slice(s, e) for s, e in zip(starts, ends, strict=True)]

"""Aggregator interface and the registry that selects one by name, with what differs between models."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from preprocessing.errors import InputError

#: What an instance score is when the aggregator has none of its own (paper Fig. 7).
COSINE_SCORE = "cosine similarity with the bag feature"


@runtime_checkable
class Stochastic(Protocol):
    """A module with a random generator of its own (e.g. RAMIL's pairing order) that checkpoints save."""

    def rng_state(self) -> str: ...

    def set_rng_state(self, state: str) -> None: ...


class AggregatorOutput(NamedTuple):
    """What every aggregator returns for a batch of ``B`` bags holding ``N`` instances in total."""

    bags: torch.Tensor  # (B, C, h, w) bag maps or (B, D) bag vectors
    scores: torch.Tensor | None  # (N,) per-instance scores, or None to use cosine similarity


class Aggregator(nn.Module):
    """Maps instance features ``(N, C, h, w)`` and ``bag_sizes (B,)`` (bags contiguous) to bag features."""

    out_channels: int

    def forward(self, features: torch.Tensor, bag_sizes: torch.Tensor) -> AggregatorOutput:
        raise NotImplementedError


@dataclass(frozen=True)
class ModelInfo:
    """Registry metadata: what the rest of the code needs to know about a model, by name.

    ``provides_logits``: the aggregator outputs the K logits itself (no linear head, e.g. DeepMIML);
    ``instance_level``: instances are trained alone with their bag's labels and a bag's probability is the
    mean of theirs (SI); ``score_kind``: what its per-instance scores are, for figure titles.
    """

    name: str
    cls: type[Aggregator]
    paper_name: str
    score_kind: str = COSINE_SCORE
    provides_logits: bool = False
    instance_level: bool = False


_REGISTRY: dict[str, ModelInfo] = {}


def register(
    name: str,
    *,
    paper_name: str,
    score_kind: str = COSINE_SCORE,
    provides_logits: bool = False,
    instance_level: bool = False,
) -> Callable[[type[Aggregator]], type[Aggregator]]:
    """Class decorator adding an aggregator to the registry under ``name`` with its :class:`ModelInfo`."""

    def wrap(cls: type[Aggregator]) -> type[Aggregator]:
        if name in _REGISTRY:
            raise ValueError(f"aggregator {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(name, cls, paper_name, score_kind, provides_logits, instance_level)
        return cls

    return wrap


def model_info(name: str) -> ModelInfo:
    """The registry entry of model ``name``; an unknown name is an :class:`InputError` listing the valid."""
    if name not in _REGISTRY:
        raise InputError(f"unknown model {name!r}; valid names: {', '.join(available())}")
    return _REGISTRY[name]


def paper_name(name: str) -> str:
    """The paper's name of model ``name`` (the name itself when it is not registered)."""
    return _REGISTRY[name].paper_name if name in _REGISTRY else name


def available() -> list[str]:
    """Names of all registered aggregators (the valid ``model`` values in config)."""
    return sorted(_REGISTRY)


def create(name: str, channels: int, num_classes: int | None = None, **options: object) -> Aggregator:
    """Instantiate the aggregator ``name`` for ``channels`` input channels.

    ``num_classes`` is passed on only to aggregators that take it (those that output logits themselves).
    """
    info = model_info(name)
    accepted = set(inspect.signature(info.cls).parameters) - {"channels", "unit", "num_classes"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        takes = ", ".join(sorted(accepted)) or "none"
        raise InputError(f"model {name!r} has no option(s) {', '.join(unknown)}; its options: {takes}")
    if info.provides_logits:  # the aggregator outputs the K logits itself
        if num_classes is None:
            raise ValueError(f"model {name!r} needs num_classes")
        options = {**options, "num_classes": num_classes}
    try:
        return info.cls(channels, **options)
    except (TypeError, ValueError) as err:  # option values of the wrong type or range
        raise InputError(f"model {name!r}: invalid option value(s) {options} ({err})") from None

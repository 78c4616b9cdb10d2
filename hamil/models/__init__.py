"""Model zoo: a ResNet18 backbone, an aggregator chosen by name, and a linear head."""

from __future__ import annotations

from torch import nn

from hamil.models import attention, pooling, tree_aggregators  # noqa: F401  (register the aggregators)
from hamil.models.backbone import Backbone
from hamil.models.model import Explanation, Head, MILModel
from hamil.models.registry import (
    Aggregator,
    AggregatorOutput,
    ModelInfo,
    available,
    create,
    model_info,
    paper_name,
    register,
)

__all__ = [
    "Aggregator",
    "AggregatorOutput",
    "Backbone",
    "Explanation",
    "Head",
    "MILModel",
    "ModelInfo",
    "available",
    "build_model",
    "model_info",
    "paper_name",
    "register",
]


def build_model(
    name: str,
    num_classes: int,
    pretrained: str | None = None,
    dropout: float = 0.0,
    in_chans: int = 3,
    **options: object,
) -> MILModel:
    """Build the model ``name`` (see :func:`available`) with ``num_classes`` sigmoid outputs.

    ``in_chans``: channels of the instances (the bag store's). ``options`` go to the aggregator (e.g.
    ``depth``, ``kernel_size``, ``tree_features`` for HAMIL).
    """
    info = model_info(name)
    backbone = Backbone(pretrained, in_chans)
    aggregator = create(name, backbone.out_channels, num_classes=num_classes, **options)
    head = nn.Identity() if info.provides_logits else Head(aggregator.out_channels, num_classes, dropout)
    return MILModel(backbone, aggregator, head, info)

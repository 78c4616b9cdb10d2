"""The full model: backbone -> aggregator -> head, plus per-instance scores for figures."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hamil.models.backbone import Backbone
from hamil.models.ops import bag_index, pool, segment_sum, widen
from hamil.models.registry import Aggregator, AggregatorOutput, ModelInfo


class Head(nn.Module):
    """Global average pooling (for maps) and a linear layer to ``K`` logits."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, bags: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(pool(bags)))  # (B, K)


class Explanation(NamedTuple):
    logits: torch.Tensor  # (B, K)
    bag_features: torch.Tensor  # (B, C) pooled aggregated features
    instance_features: torch.Tensor  # (N, C) pooled instance features
    instance_scores: torch.Tensor  # (N,)


class MILModel(nn.Module):
    """A bag classifier in timm's shape: ``forward_features`` (backbone + aggregator), ``forward_head``.

    ``forward(images (N, 3, H, W), bag_sizes (B,), labels (B, K) | None) -> (logits (B, K), loss | None)``;
    the loss is the BCE averaged over the K classes and *summed* over the training items: bags, or
    instances (each with its bag's labels) for instance-level models such as SI. What differs between
    models comes from the registry (``info``), never from probing attributes.
    """

    def __init__(self, backbone: Backbone, aggregator: Aggregator, head: nn.Module, info: ModelInfo) -> None:
        super().__init__()
        self.backbone = backbone
        self.aggregator = aggregator
        self.head = head
        self.info = info

    @property
    def instance_level(self) -> bool:
        return self.info.instance_level

    @property
    def score_kind(self) -> str:
        """What :meth:`explain`'s instance scores are, for figure titles."""
        return self.info.score_kind

    def forward_features(self, images: torch.Tensor, bag_sizes: torch.Tensor) -> AggregatorOutput:
        """Instance feature maps through the aggregator: bag features ``(B, C, h, w)`` or ``(B, D)``."""
        return self.aggregator(self.backbone(images), bag_sizes)

    def forward_head(self, bags: torch.Tensor) -> torch.Tensor:
        """Bag features -> logits ``(B, K)``."""
        return self.head(bags)

    def forward(
        self, images: torch.Tensor, bag_sizes: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.instance_level:
            instance_logits = self.head(self.backbone(images))  # (N, K)
            logits = self._mean_probability_logits(instance_logits, bag_sizes)  # (B, K)
            if labels is None:
                return logits, None
            target = labels[bag_index(bag_sizes.to(labels.device), images.shape[0])]  # (N, K)
            return logits, _summed_bce(instance_logits, target)
        logits = self.forward_head(self.forward_features(images, bag_sizes).bags)  # (B, K)
        return logits, (None if labels is None else _summed_bce(logits, labels))

    @staticmethod
    def _mean_probability_logits(instance_logits: torch.Tensor, bag_sizes: torch.Tensor) -> torch.Tensor:
        probs = segment_sum(torch.sigmoid(widen(instance_logits)), bag_sizes)  # (B, K)
        probs = probs / bag_sizes.to(probs.device, probs.dtype).view(-1, 1)
        return torch.logit(probs, eps=1e-7)

    def explain(self, images: torch.Tensor, bag_sizes: torch.Tensor) -> Explanation:
        """Logits plus pooled instance and bag features and per-instance scores.

        Scores are the aggregator's own (e.g. attention weights) or, when it has none, the cosine
        similarity between each instance's pooled feature and its bag's aggregated feature (paper Fig. 7).
        """
        features = self.backbone(images)  # (N, C, h, w)
        out = self.aggregator(features, bag_sizes)
        inst, bags = pool(features), pool(out.bags)  # (N, C), (B, C)
        scores = out.scores
        if self.instance_level:
            instance_logits = self.head(features)  # (N, K)
            logits = self._mean_probability_logits(instance_logits, bag_sizes)
            scores = torch.sigmoid(instance_logits).amax(dim=1)  # (N,)
        else:
            logits = self.forward_head(out.bags)
        if scores is None:
            index = bag_index(bag_sizes.to(inst.device), inst.shape[0])
            scores = F.cosine_similarity(inst, bags[index], dim=1)  # (N,)
        return Explanation(logits, bags, inst, scores)


def _summed_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE of ``(M, K)`` logits, averaged over the K classes, summed over the M items (float32 at least)."""
    logits = widen(logits)
    per_item = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    return per_item.mean(dim=1).sum()

"""The full model: backbone -> aggregator -> head, plus per-instance scores for figures."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hamil.models.backbone import Backbone
from hamil.models.pooling import bag_index
from hamil.models.registry import Aggregator


class Head(nn.Module):
    """Global average pooling (for maps) and a linear layer to ``K`` logits."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, bags: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(pool(bags)))  # (B, K)


def pool(x: torch.Tensor) -> torch.Tensor:
    """``(M, C, h, w)`` -> ``(M, C)`` by global average pooling; vectors pass through."""
    return x.flatten(2).mean(-1) if x.dim() > 2 else x


class Explanation(NamedTuple):
    logits: torch.Tensor  # (B, K)
    bag_features: torch.Tensor  # (B, C) pooled aggregated features
    instance_features: torch.Tensor  # (N, C) pooled instance features
    instance_scores: torch.Tensor  # (N,)


class MILModel(nn.Module):
    """A bag classifier: ``forward(images (N, 3, H, W), bag_sizes (B,)) -> logits (B, K)``."""

    def __init__(self, backbone: Backbone, aggregator: Aggregator, head: Head) -> None:
        super().__init__()
        self.backbone = backbone
        self.aggregator = aggregator
        self.head = head

    def forward(self, images: torch.Tensor, bag_sizes: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)  # (N, C, h, w)
        return self.head(self.aggregator(features, bag_sizes).bags)  # (B, K)

    def explain(self, images: torch.Tensor, bag_sizes: torch.Tensor) -> Explanation:
        """Logits plus pooled instance and bag features and per-instance scores.

        Scores are the aggregator's own (e.g. attention weights) or, when it has none, the cosine
        similarity between each instance's pooled feature and its bag's aggregated feature (paper Fig. 7).
        """
        features = self.backbone(images)  # (N, C, h, w)
        out = self.aggregator(features, bag_sizes)
        logits = self.head(out.bags)
        inst, bags = pool(features), pool(out.bags)  # (N, C), (B, C)
        scores = out.scores
        if scores is None:
            scores = F.cosine_similarity(inst, bags[bag_index(bag_sizes.to(inst.device))], dim=1)  # (N,)
        return Explanation(logits, bags, inst, scores)

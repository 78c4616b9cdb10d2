"""The full model: backbone -> aggregator -> head, plus per-instance scores for figures."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hamil.models.backbone import Backbone
from hamil.models.pooling import bag_index, pool, segment_sum
from hamil.models.registry import Aggregator


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
    """A bag classifier: ``forward(images (N, 3, H, W), bag_sizes (B,)) -> logits (B, K)``."""

    def __init__(self, backbone: Backbone, aggregator: Aggregator, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.aggregator = aggregator
        self.head = head
        self.instance_level = bool(getattr(aggregator, "instance_level", False))

    @property
    def score_kind(self) -> str:
        """What :meth:`explain`'s instance scores are, for figure titles."""
        if self.instance_level:
            return "largest class probability"
        return getattr(self.aggregator, "score_kind", "cosine similarity with the bag feature")

    def forward(self, images: torch.Tensor, bag_sizes: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)  # (N, C, h, w)
        if self.instance_level:
            return self._mean_probability_logits(self.head(features), bag_sizes)  # (B, K)
        return self.head(self.aggregator(features, bag_sizes).bags)  # (B, K)

    def loss(
        self, images: torch.Tensor, bag_sizes: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """BCE averaged over the K classes of each bag, or of each instance (with its bag's labels) for
        instance-level models; then the ``"mean"`` or the ``"sum"`` over bags (instances)."""
        if self.instance_level:
            logits = self.head(self.backbone(images))  # (N, K)
            target = labels[bag_index(bag_sizes.to(labels.device))]  # (N, K)
        else:
            logits, target = self(images, bag_sizes), labels  # (B, K)
        per_item = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
        per_item = per_item.mean(dim=1)  # (B,) or (N,)
        return per_item.sum() if reduction == "sum" else per_item.mean()

    @staticmethod
    def _mean_probability_logits(instance_logits: torch.Tensor, bag_sizes: torch.Tensor) -> torch.Tensor:
        sizes = bag_sizes.to(instance_logits.device, torch.float32).view(-1, 1)
        probs = segment_sum(torch.sigmoid(instance_logits.float()), bag_sizes) / sizes  # (B, K)
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
            logits = self.head(out.bags)
        if scores is None:
            scores = F.cosine_similarity(inst, bags[bag_index(bag_sizes.to(inst.device))], dim=1)  # (N,)
        return Explanation(logits, bags, inst, scores)

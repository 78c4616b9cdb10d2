"""Parameter-free pooling baselines over the instances of each bag."""

from __future__ import annotations

import torch

from hamil.models.registry import Aggregator, AggregatorOutput, register


def bag_index(bag_sizes: torch.Tensor) -> torch.Tensor:
    """``(N,)`` index of the bag each instance belongs to."""
    return torch.repeat_interleave(torch.arange(len(bag_sizes), device=bag_sizes.device), bag_sizes)


def segment_sum(features: torch.Tensor, bag_sizes: torch.Tensor) -> torch.Tensor:
    """Sum of each bag's instance features: ``(N, ...)`` -> ``(B, ...)``."""
    out = features.new_zeros((len(bag_sizes), *features.shape[1:]))
    return out.index_add(0, bag_index(bag_sizes.to(features.device)), features)


@register("mean")
class MeanPool(Aggregator):
    """MI baseline: the element-wise mean of a bag's instance feature maps."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_channels = channels

    def forward(self, features: torch.Tensor, bag_sizes: torch.Tensor) -> AggregatorOutput:
        sizes = bag_sizes.to(features.device, features.dtype).view(-1, *[1] * (features.dim() - 1))
        return AggregatorOutput(segment_sum(features, bag_sizes) / sizes, None)  # (B, C, h, w)

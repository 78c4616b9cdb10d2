"""Parameter-free pooling baselines over the instances of each bag."""

from __future__ import annotations

import torch

from hamil.models.ops import bag_index, segment_sum
from hamil.models.registry import Aggregator, AggregatorOutput, register


@register("mean", paper_name="Mean")
class MeanPool(Aggregator):
    """MI baseline (mean pooling, e.g. Wang et al., Pattern Recognit. 2018, "Revisiting multiple instance
    neural networks"): the element-wise mean of a bag's instance maps, ``z = (1/n) sum_i f_i``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_channels = channels

    def forward(self, features: torch.Tensor, bag_sizes: torch.Tensor) -> AggregatorOutput:
        sizes = bag_sizes.to(features.device, features.dtype).view(-1, *[1] * (features.dim() - 1))
        return AggregatorOutput(segment_sum(features, bag_sizes) / sizes, None)  # (B, C, h, w)


@register("max", paper_name="Max")
class MaxPool(Aggregator):
    """MVCNN baseline (Su et al., ICCV 2015, "view pooling"): element-wise max over a bag's instance maps,
    ``z[c, y, x] = max_i f_i[c, y, x]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_channels = channels

    def forward(self, features: torch.Tensor, bag_sizes: torch.Tensor) -> AggregatorOutput:
        index = bag_index(bag_sizes.to(features.device), features.shape[0])
        index = index.view(-1, *[1] * (features.dim() - 1))
        out = features.new_zeros((len(bag_sizes), *features.shape[1:]))
        out = out.scatter_reduce(0, index.expand_as(features), features, reduce="amax", include_self=False)
        return AggregatorOutput(out, None)  # (B, C, h, w)


@register("sum", paper_name="Sum")
class SumPool(Aggregator):
    """SPoC baseline (Babenko & Lempitsky, ICCV 2015, sum pooling of convolutional features): the
    element-wise sum of a bag's instance maps, ``z = sum_i f_i``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_channels = channels

    def forward(self, features: torch.Tensor, bag_sizes: torch.Tensor) -> AggregatorOutput:
        return AggregatorOutput(segment_sum(features, bag_sizes), None)  # (B, C, h, w)

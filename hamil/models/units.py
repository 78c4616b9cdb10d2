"""Aggregation units of HAMIL (paper Eqs. 2-4): two maps in, one map out, one kernel for all channels."""

from __future__ import annotations

import torch
from torch import nn

from preprocessing.errors import InputError

UNIT_INITS = ("default", "average")


class AggregationUnit(nn.Module):
    """L1Agg / L2Agg / L3Agg: ``depth`` layers of Conv(k) -> BN, with ReLU between layers.

    The two inputs ``(M, C, H, W)`` are seen as ``M * C`` two-channel images ``(2, H, W)``; every layer is a
    single small convolution applied to all of them, so the same kernel serves every channel of every merge.
    Layer widths: ``2 -> hidden -> ... -> hidden -> 1`` (``depth == 1`` gives the paper's L1Agg ``2 -> 1``).
    ``dims`` = 2 for feature maps, 1 for feature vectors ``(M, C)`` seen as ``M`` two-channel signals of
    length ``C`` (the 1-D unit of the classical MIL experiments).
    """

    def __init__(
        self,
        depth: int = 1,
        kernel_size: int = 7,
        batch_norm: bool = True,
        hidden: int = 2,
        dims: int = 2,
        init: str = "default",
    ) -> None:
        super().__init__()
        if init not in UNIT_INITS:
            raise InputError(f"unit init must be one of {UNIT_INITS}, got {init!r}")
        if depth < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise InputError(f"need depth >= 1 and an odd kernel size, got depth={depth}, k={kernel_size}")
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]
        self.dims = dims
        widths = [2] + [hidden] * (depth - 1) + [1]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(conv(cin, cout, kernel_size, padding=kernel_size // 2, bias=not batch_norm))
            if batch_norm:
                layers.append(norm(cout))
            if i < depth - 1:
                layers.append(nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*layers)
        if init == "average":
            self.reset_to_average()

    def reset_to_average(self) -> None:
        """Start as the mean of the two inputs: zero kernels but equal centre taps (``1 / in_channels``)."""
        with torch.no_grad():
            for layer in self.layers:
                if isinstance(layer, nn.Conv1d | nn.Conv2d):
                    layer.weight.zero_()
                    centre = tuple(k // 2 for k in layer.kernel_size)
                    layer.weight[(slice(None), slice(None), *centre)] = 1.0 / layer.in_channels
                    if layer.bias is not None:
                        layer.bias.zero_()

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        if self.dims == 2:
            m, c, h, w = left.shape  # (M, C, H, W)
            pairs = torch.stack((left, right), dim=2).reshape(m * c, 2, h, w)  # (M*C, 2, H, W)
            return self.layers(pairs).reshape(m, c, h, w)  # (M, C, H, W)
        m, c = left.shape  # (M, C)
        pairs = torch.stack((left, right), dim=1)  # (M, 2, C)
        return self.layers(pairs).reshape(m, c)  # (M, C)


class MeanUnit(nn.Module):
    """HAMIL-A's unit: the element-wise mean of the two children (no parameters)."""

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return (left + right) * 0.5

"""Aggregation units of HAMIL (paper Eqs. 2-4): two maps in, one map out, one kernel for all channels."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
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
        """Merge ``left`` and ``right`` ``(M, C, H, W)`` (or ``(M, C)``) into one node of the same shape."""
        if self.dims == 2:
            m, c, h, w = left.shape
            pairs = torch.stack((left, right), dim=2).reshape(m * c, 2, h, w)  # (M*C, 2, H, W)
            return self.layers(pairs).view(m, c, h, w)  # (M, C, H, W)
        return self.layers(torch.stack((left, right), dim=1)).squeeze(1)  # (M, 2, C) -> (M, C)

    def merger(self) -> PairMerger:
        """This unit for one batch of trees (see :class:`PairMerger`)."""
        return PairMerger(self)


class PairMerger:
    """An :class:`AggregationUnit` as a function of children ``(2M, C, H, W)`` (or ``(2M, C)``), left and
    right child of each merge interleaved, for one batch of trees: ``merger(children) -> (M, C, H, W)``.

    A tree calls the unit once per level, often hundreds of times per batch, so the per-call overhead is
    cut: layers run as plain functions with their parameters looked up once, and a 1-D convolution is one
    product with a banded (Toeplitz) matrix built once per batch (the same values up to rounding). Call
    :meth:`close` after the last level (batch-norm layers count their calls there).
    """

    def __init__(self, unit: AggregationUnit) -> None:
        self.dims = unit.dims
        self.calls = 0
        self._norms = [m for m in unit.layers if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d)]
        self._steps = [self._step(layer) for layer in unit.layers]

    def __call__(self, children: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        m = children.shape[0] // 2
        if self.dims == 2:
            _, c, h, w = children.shape
            x = children.view(m, 2, c, h, w).transpose(1, 2).reshape(m * c, 2, h, w)  # (M*C, 2, H, W)
        else:
            x = children.reshape(m, -1)  # (M, 2*C): the pairs (M, 2, C) of (2M, 1, C) nodes, flattened
        for step in self._steps:
            x = step(x)
        shape = (m, *children.shape[1:])
        return x if x.shape == shape else x.view(shape)  # (M, C, H, W) or (M, 1, C) nodes

    def nodes(self, features: torch.Tensor) -> torch.Tensor:
        """Tree nodes from features: ``(N, C, H, W)`` as they are, vectors ``(N, C)`` as ``(N, 1, C)``."""
        return features.unsqueeze(1) if self.dims == 1 else features

    def features(self, nodes: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`nodes`."""
        return nodes.squeeze(1) if self.dims == 1 else nodes

    def close(self) -> None:
        """Count this batch's calls in the batch-norm layers' ``num_batches_tracked``."""
        for bn in self._norms:
            state = BatchNormState.of(bn)
            if state.counts and state.momentum is not None:  # else counted per call
                bn.num_batches_tracked.add_(self.calls)
        self.calls = 0

    def _step(self, layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        if isinstance(layer, nn.Conv1d):
            return _conv1d_as_matmul(layer)
        if isinstance(layer, nn.Conv2d):
            weight, bias = layer.weight, layer.bias
            return lambda x: layer._conv_forward(x, weight, bias)
        if type(layer) in (nn.BatchNorm1d, nn.BatchNorm2d):
            return _batch_norm(layer)
        if type(layer) is nn.ReLU:
            return torch.relu
        return layer  # anything else (e.g. SyncBatchNorm after a conversion) as the module itself


def _conv1d_as_matmul(conv: nn.Conv1d) -> Callable[[torch.Tensor], torch.Tensor]:
    """``conv`` (stride 1, 'same' zero padding) on ``(M, C_in, L)`` (or flattened) as one product of the input
    with a banded matrix ``(C_in*L, C_out*L)``, built on the first call for that length (a differentiable
    gather of the kernel) and reused; returns ``(M, C_out, L)``."""
    cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    c_out, c_in, _ = conv.weight.shape

    def step(x: torch.Tensor) -> torch.Tensor:  # (M, C_in, L) or flattened (M, C_in*L) -> (M, C_out, L)
        m, length = x.shape[0], (x.shape[1] // c_in if x.dim() == 2 else x.shape[2])
        if length not in cache:
            cache[length] = banded_matrix(conv, length)
        matrix, long_bias = cache[length]
        flat_x = x if x.dim() == 2 else x.reshape(m, c_in * length)  # (M, C_in*L)
        y = flat_x @ matrix if long_bias is None else torch.addmm(long_bias, flat_x, matrix)
        return y.view(m, c_out, length)

    return step


def banded_matrix(conv: nn.Conv1d, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``conv`` (stride 1, 'same' zero padding) on inputs of ``length`` as a matrix ``(C_in*L, C_out*L)``
    (a differentiable gather of its kernel) and its bias repeated per position ``(C_out*L,)`` or None."""
    weight, bias = conv.weight, conv.bias
    c_out, c_in, k = weight.shape
    index = torch.from_numpy(_toeplitz_index(c_out, c_in, k, length))  # cached: may copy async
    index = index.to(weight.device, non_blocking=True)
    flat = torch.cat([weight.flatten(), weight.new_zeros(1)])  # the last entry is the zero
    long_bias = None if bias is None else bias.repeat_interleave(length)  # (C_out*L,)
    return flat[index], long_bias  # (C_in*L, C_out*L)


@functools.lru_cache(maxsize=32)
def _toeplitz_index(c_out: int, c_in: int, k: int, length: int) -> np.ndarray:
    """``(c_in*L, c_out*L)`` index into the flattened weight ``(c_out, c_in, k)`` plus one zero at the end:
    ``T[(i, s), (o, j)] = w[o, i, s - j + k // 2]`` where the tap exists, else the zero."""
    axes = (np.arange(c_in), np.arange(length), np.arange(c_out), np.arange(length))
    i, s, o, j = np.meshgrid(*axes, indexing="ij")
    tap = s - j + k // 2
    index = np.where((tap >= 0) & (tap < k), (o * c_in + i) * k + tap, c_out * c_in * k)
    return index.reshape(c_in * length, c_out * length)


class BatchNormState(NamedTuple):
    """What ``_BatchNorm.forward`` reads from a batch-norm layer, looked up once per batch of trees."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    batch_stats: bool  # normalise with the batch's statistics (training, or no running statistics)
    momentum: float | None
    eps: float
    counts: bool  # num_batches_tracked counts the calls (training with running statistics)

    @classmethod
    def of(cls, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> BatchNormState:
        use_running = not bn.training or bn.track_running_stats
        return cls(
            bn.weight,
            bn.bias,
            bn.running_mean if use_running else None,
            bn.running_var if use_running else None,
            bn.training or (bn.running_mean is None and bn.running_var is None),
            bn.momentum,
            bn.eps,
            bn.training and bn.track_running_stats,
        )


def _batch_norm(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> Callable[[torch.Tensor], torch.Tensor]:
    """``bn`` as a plain function (what ``_BatchNorm.forward`` computes; ``num_batches_tracked`` is
    counted by :meth:`PairMerger.close`, or per call when ``momentum`` is None and it is needed)."""
    state, cudnn = BatchNormState.of(bn), torch.backends.cudnn.enabled
    stats = (state.running_mean, state.running_var, state.batch_stats)

    def step(x: torch.Tensor) -> torch.Tensor:
        momentum = state.momentum
        if momentum is None:
            momentum = 0.0
            if state.counts:
                bn.num_batches_tracked.add_(1)
                momentum = 1.0 / float(bn.num_batches_tracked)
        return torch.batch_norm(x, state.weight, state.bias, *stats, momentum, state.eps, cudnn)

    return step


class MeanUnit(nn.Module):
    """HAMIL-A's unit: the element-wise mean of the two children (no parameters)."""

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return (left + right) * 0.5

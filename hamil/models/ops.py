"""Segment operations on packed bags: a batch is ``(N, ...)`` instances, bags contiguous, ``bag_sizes (B,)``.

No padding anywhere: every per-bag reduction is an index operation over the instance axis.
"""

from __future__ import annotations

import torch


def widen(x: torch.Tensor) -> torch.Tensor:
    """Half-precision values as float32 for losses and probabilities; float32 and float64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def pool(x: torch.Tensor) -> torch.Tensor:
    """``(M, C, h, w)`` -> ``(M, C)`` by global average pooling; vectors ``(M, C)`` pass through."""
    return x.flatten(2).mean(-1) if x.dim() > 2 else x


def bag_index(bag_sizes: torch.Tensor, total: int) -> torch.Tensor:
    """``(N,)`` index of the bag each instance belongs to; ``total`` is ``N`` (given, so that a GPU need
    not report the sum of ``bag_sizes`` back to the host: no synchronisation)."""
    bags = torch.arange(len(bag_sizes), device=bag_sizes.device)
    return torch.repeat_interleave(bags, bag_sizes, output_size=total)


def bag_slices(bag_sizes: torch.Tensor) -> list[slice]:
    """Python slices of each bag's instances in the concatenated batch."""
    ends = torch.cumsum(bag_sizes, 0).tolist()
    starts = [0, *ends[:-1]]
    return [slice(s, e) for s, e in zip(starts, ends, strict=True)]


def segment_sum(features: torch.Tensor, bag_sizes: torch.Tensor) -> torch.Tensor:
    """Sum of each bag's instance features: ``(N, ...)`` -> ``(B, ...)``."""
    out = features.new_zeros((len(bag_sizes), *features.shape[1:]))
    return out.index_add(0, bag_index(bag_sizes.to(features.device), features.shape[0]), features)


def segment_softmax(scores: torch.Tensor, bag_sizes: torch.Tensor) -> torch.Tensor:
    """Softmax of ``scores (N,)`` within each bag (instances contiguous)."""
    index = bag_index(bag_sizes.to(scores.device), scores.shape[0])
    top = scores.new_full((len(bag_sizes),), -torch.inf).scatter_reduce(0, index, scores, reduce="amax")
    exp = torch.exp(scores - top[index])
    return exp / segment_sum(exp, bag_sizes)[index]


def weighted_sum(values: torch.Tensor, weights: torch.Tensor, bag_sizes: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[k] * values[k]`` per bag: ``(N, ...)`` and ``(N,)`` -> ``(B, ...)``."""
    shape = (-1, *[1] * (values.dim() - 1))
    return segment_sum(values * weights.view(shape), bag_sizes)

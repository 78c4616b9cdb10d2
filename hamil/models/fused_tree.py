"""A whole batch of trees as one autograd node, for the 1-D L1Agg unit (the classical MIL benchmarks).

With one bag per step (the paper's setting) a bag of ~65 instances has a tree of ~50 levels, each a few
tiny operations; PyTorch's per-operation and per-autograd-node overhead, not arithmetic, is then the cost.
Here the forward pass runs every level without recording a graph, and :meth:`FusedTree.backward` walks the
levels back with direct calls (batch-norm backward, two matrix products, and the routing of gradients to
the children), so a level costs a handful of kernel calls instead of a handful of graph nodes.

It computes what :class:`hamil.models.units.PairMerger` computes along :class:`TreePlan` (the same
operations in the same order; outputs and gradients equal to rounding, tested against the level-by-level
reference) and is used only where it applies: ``dims = 1``, one convolution with or without batch norm, no
autocast, float32/float64 (:func:`applies`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from hamil.models.tree_plan import Routing, TreePlan
from hamil.models.units import BatchNormState


def applies(unit: nn.Module, features: torch.Tensor) -> bool:
    """Whether :func:`fused_tree` can run ``unit`` on ``features`` ``(N, C)``."""
    layers = list(getattr(unit, "layers", ()))
    kinds = [type(layer) for layer in layers]
    return (
        getattr(unit, "dims", 0) == 1
        and kinds in ([nn.Conv1d], [nn.Conv1d, nn.BatchNorm1d])
        and layers[0].out_channels == 1
        and features.dim() == 2
        and features.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled(features.device.type)
        and all(getattr(layer, "momentum", 0.1) is not None for layer in layers)  # per-call momentum
    )


def fused_tree(
    unit: nn.Module,
    features: torch.Tensor,
    matrix: torch.Tensor,
    bias: torch.Tensor | None,
    plan: TreePlan,
    order: list[torch.Tensor | None],
    gather: list[torch.Tensor | None],
) -> torch.Tensor:
    """Roots ``(B, C)`` of the trees of ``plan`` over leaves ``features`` ``(N, C)``: each merge is
    ``BN(pairs @ matrix + bias)`` with ``matrix`` ``(2C, C)`` the unit's convolution as a banded matrix."""
    bn = unit.layers[1] if len(unit.layers) > 1 else None
    norm = None if bn is None else BatchNormState.of(bn)
    weight, shift = (None, None) if norm is None else (norm.weight, norm.bias)
    roots = FusedTree.apply(features, matrix, bias, weight, shift, (plan, order, gather, norm))
    if norm is not None and norm.counts:
        bn.num_batches_tracked.add_(plan.height)
    return roots


class FusedTree(torch.autograd.Function):
    """Forward and backward of all levels of a batch of trees (see the module docstring). Nodes are
    ``(rows, 1, C)``: one channel, as the batch norm sees them."""

    @staticmethod
    def forward(ctx: Any, features, matrix, bias, weight, shift, routing):  # noqa: ANN001, ANN205
        plan, order, gather, norm = routing
        rows = Routing(plan, order, gather)
        saved: list[tuple[torch.Tensor, ...]] = [()]
        width = 2 * features.shape[1]
        if norm is not None:
            stats = (norm.running_mean, norm.running_var, norm.batch_stats, norm.momentum, norm.eps)
        rows.publish(0, features.unsqueeze(1))  # (N, 1, C)
        for level in range(1, plan.height + 1):
            pairs = rows.collect(level).reshape(-1, 1, width)  # (M, 1, 2C)
            y = torch.matmul(pairs, matrix)  # (M, 1, C)
            if bias is not None:
                y = y + bias
            out, mean, invstd = y, None, None  # (M, 1, C)
            if norm is not None:
                out, mean, invstd = torch.native_batch_norm(y, weight, shift, *stats)
            saved.append((pairs, y, mean, invstd))
            rows.publish(level, out)
        ctx.routing, ctx.saved_levels, ctx.has_bias = routing, saved, bias is not None
        ctx.save_for_backward(matrix, weight)
        return rows.collect(plan.height + 1).squeeze(1)  # (B, C)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_roots):  # noqa: ANN001, ANN205
        plan, order, gather, norm = ctx.routing
        matrix, weight = ctx.saved_tensors
        channels, across = matrix.shape[1], matrix.t()  # (C, 2C)
        outbox: list[list[torch.Tensor]] = [[] for _ in range(plan.height + 1)]  # per source: grad pieces
        _route_back(outbox, plan.feeds[plan.height + 1], gather[plan.height + 1], grad_roots.unsqueeze(1))
        pairs_all, g_all, g_norm = [], [], []
        mask = [True, weight is not None, weight is not None]
        for level in range(plan.height, 0, -1):
            pairs, y, mean, invstd = ctx.saved_levels[level]
            g_y = _gathered(outbox, order, level)  # (M, 1, C)
            if norm is not None:
                g_y, gw, gb = torch.ops.aten.native_batch_norm_backward(
                    g_y, y, weight, norm.running_mean, norm.running_var, mean, invstd, norm.batch_stats,
                    norm.eps, mask,
                )  # fmt: skip
                g_norm.append((gw, gb))
            pairs_all.append(pairs)
            g_all.append(g_y)
            g_pairs = torch.matmul(g_y, across).view(-1, 1, channels)  # (2M, 1, C)
            _route_back(outbox, plan.feeds[level], gather[level], g_pairs)
        ctx.saved_levels = None
        g_features = _gathered(outbox, order, 0).squeeze(1)  # (N, C)
        if not g_all:
            g_y_all, g_matrix = matrix.new_zeros((0, channels)), torch.zeros_like(matrix)
        else:
            g_y_all = torch.cat(g_all).view(-1, channels)  # (merges, C)
            g_matrix = torch.cat(pairs_all).view(len(g_y_all), -1).t() @ g_y_all  # (2C, C)
        g_bias = g_y_all.sum(0) if ctx.has_bias else None
        g_weight = g_shift = None
        if weight is not None:
            g_weight = torch.stack([gw for gw, _ in g_norm]).sum(0) if g_norm else torch.zeros_like(weight)
            g_shift = torch.stack([gb for _, gb in g_norm]).sum(0) if g_norm else torch.zeros_like(weight)
        return g_features, g_matrix, g_bias, g_weight, g_shift, None


def _route_back(outbox, feeds, gather, grad: torch.Tensor) -> None:  # noqa: ANN001
    """The gradient of a level's inputs ``(2M, 1, C)`` (or of the roots) cut into its sources' pieces."""
    if gather is not None:
        grad = grad.new_empty(grad.shape).index_copy_(0, gather, grad)
    pieces = (grad,) if len(feeds) == 1 else torch.split(grad, [rows for _, _, rows in feeds])
    for (source, _, _), piece in zip(feeds, pieces, strict=True):
        outbox[source].append(piece)


def _gathered(outbox, order, level: int) -> torch.Tensor:  # noqa: ANN001
    """A level's output gradient: its pieces (they arrive from the last consumer first) in routing order,
    then undone the routing permutation."""
    pieces, outbox[level] = outbox[level], []
    grad = pieces[0] if len(pieces) == 1 else torch.cat(pieces[::-1])
    return grad if order[level] is None else grad.new_empty(grad.shape).index_copy_(0, order[level], grad)

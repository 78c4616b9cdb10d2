"""Running a trained model over bags: probabilities, and features and scores for figures."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from hamil.models import MILModel
from hamil.models.ops import widen


@torch.no_grad()
def predict_batches(
    model: MILModel, batches: Iterable[tuple[torch.Tensor, ...]], device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Evaluate ``model`` on batches of ``(images, bag_sizes, labels, bag_index)``.

    Returns ``(bag_index (B,), labels (B, K), probabilities (B, K), mean BCE loss)``.
    """
    model.eval()
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")
    index, labels, probs, total = [], [], [], 0.0
    for images, sizes, y, idx in batches:
        logits, _ = model(images.to(device, non_blocking=True), sizes.to(device))  # (B, K)
        logits = widen(logits)  # (B, K)
        total += float(loss_fn(logits, y.to(device, logits.dtype)))
        probs.append(torch.sigmoid(logits).float().cpu().numpy())
        labels.append(y.numpy())
        index.append(idx.numpy())
    if not index:
        raise ValueError("no bags to evaluate")
    y_all = np.concatenate(labels)
    return np.concatenate(index), y_all, np.concatenate(probs), total / y_all.size


@dataclass
class Explained:
    """Per-bag and per-instance outputs of :meth:`MILModel.explain` over a set of bags."""

    bags: np.ndarray  # (B,) bag indices in the store
    labels: np.ndarray  # (B, K)
    probs: np.ndarray  # (B, K)
    bag_features: np.ndarray  # (B, C) pooled aggregated features
    instance_bag: np.ndarray  # (N,) position in ``bags`` of each instance's bag
    instance_features: np.ndarray  # (N, C) pooled instance features
    instance_scores: np.ndarray  # (N,)
    loss: float = float("nan")  # mean BCE over bags and classes, as :func:`predict_batches` gives it


@torch.no_grad()
def explain_batches(
    model: MILModel,
    batches: Iterable[tuple[torch.Tensor, ...]],
    device: torch.device,
    features: bool = True,
) -> Explained:
    """Features before and after aggregation, instance scores, probabilities and the mean BCE loss for
    batches of ``(images, bag_sizes, labels, bag_index)`` (evaluation mode, whole bags), in one pass.

    Without ``features`` the feature arrays are left empty (``(B, 0)``, ``(N, 0)``), so scoring many bags
    (``hamil evaluate``) holds only probabilities and scores.
    """
    model.eval()
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("bags", "labels", "probs", "bf", "ib", "if", "is")}
    seen, total = 0, 0.0
    for images, sizes, y, idx in batches:
        out = model.explain(images.to(device, non_blocking=True), sizes.to(device))
        logits = out.logits.float()  # (B, K)
        total += float(loss_fn(logits, y.to(device)))
        parts["bags"].append(idx.numpy())
        parts["labels"].append(y.numpy())
        parts["probs"].append(torch.sigmoid(logits).cpu().numpy())
        bag_features, instance_features = out.bag_features.float(), out.instance_features.float()
        if not features:
            bag_features, instance_features = bag_features[:, :0], instance_features[:, :0]
        parts["bf"].append(bag_features.cpu().numpy())
        parts["ib"].append(seen + np.repeat(np.arange(len(sizes)), sizes.numpy()))
        parts["if"].append(instance_features.cpu().numpy())
        parts["is"].append(out.instance_scores.float().cpu().numpy())
        seen += len(sizes)
    if not seen:
        raise ValueError("no bags to explain")
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    loss = total / cat["labels"].size
    return Explained(
        cat["bags"], cat["labels"], cat["probs"], cat["bf"], cat["ib"], cat["if"], cat["is"], loss
    )

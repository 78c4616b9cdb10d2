"""Running a trained model over bags: probabilities, and features and scores for figures."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from hamil.models import MILModel


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
        logits = model(images.to(device, non_blocking=True), sizes.to(device))  # (B, K)
        total += float(loss_fn(logits.float(), y.to(device)))
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        labels.append(y.numpy())
        index.append(idx.numpy())
    if not index:
        raise ValueError("no bags to evaluate")
    y_all = np.concatenate(labels)
    return np.concatenate(index), y_all, np.concatenate(probs), total / y_all.size

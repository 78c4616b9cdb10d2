"""Multi-label metrics of the paper (macro AUC, macro F1, micro F1), computed with scikit-learn."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score


def per_class_auc(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """ROC AUC of each class; NaN where a class has only positives or only negatives."""
    out = np.full(y_true.shape[1], np.nan)
    for k in range(y_true.shape[1]):
        if 0 < y_true[:, k].sum() < len(y_true):
            out[k] = roc_auc_score(y_true[:, k], probs[:, k])
    return out


def compute_metrics(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], threshold: float | np.ndarray = 0.5
) -> dict[str, Any]:
    """Macro AUC (over classes where it is defined), macro and micro F1 at ``threshold``, and per-class rows.

    ``y_true`` and ``probs`` are ``(B, K)``; ``threshold`` is a scalar or one value per class.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if y_true.shape != probs.shape or y_true.ndim != 2:
        raise ValueError(f"labels {y_true.shape} and probabilities {probs.shape} must both be (B, K)")
    pred = (probs >= np.asarray(threshold)).astype(np.int64)
    auc = per_class_auc(y_true, probs)
    kw = {"zero_division": 0}
    per_class = [
        {
            "class": name,
            "support": int(y_true[:, k].sum()),
            "auc": None if np.isnan(auc[k]) else float(auc[k]),
            "f1": float(f1_score(y_true[:, k], pred[:, k], **kw)),
            "precision": float(precision_score(y_true[:, k], pred[:, k], **kw)),
            "recall": float(recall_score(y_true[:, k], pred[:, k], **kw)),
        }
        for k, name in enumerate(class_names)
    ]
    return {
        "macro_auc": float(np.nanmean(auc)) if np.isfinite(auc).any() else None,
        # per column, so a single-class task is not read by scikit-learn as binary over {0, 1}
        "macro_f1": float(np.mean([row["f1"] for row in per_class])) if per_class else 0.0,
        "micro_f1": float(f1_score(y_true.ravel(), pred.ravel(), **kw)),
        "subset_accuracy": float((pred == y_true).all(axis=1).mean()) if len(y_true) else None,
        "auc_classes": int(np.isfinite(auc).sum()),
        "bags": len(y_true),
        "per_class": per_class,
    }


#: the candidate thresholds: a coarse grid, so that a few validation bags cannot pick a value like 0.998
TUNE_GRID = tuple(round(0.1 * k, 1) for k in range(1, 10))
#: a class is tuned only with at least this many positive bags in the tuning split
MIN_TUNE_POSITIVES = 10


@dataclass(frozen=True)
class TunedThresholds:
    """Per-class thresholds ``(K,)``, the tuning split's positives per class and which classes moved."""

    thresholds: np.ndarray
    positives: np.ndarray
    tuned: np.ndarray  # (K,) bool: the threshold differs from the default

    def summary(self, class_names: Sequence[str], split: str, default: float) -> str:
        """One line: the tuned classes with their thresholds and positives, and how many kept ``default``."""
        moved = [
            f"{name} {t:g} ({n} positives)"
            for name, t, n, m in zip(class_names, self.thresholds, self.positives, self.tuned, strict=True)
            if m
        ]
        few = int((self.positives < MIN_TUNE_POSITIVES).sum())
        return (
            f"thresholds tuned on {split}: {', '.join(moved) or 'none'}; {default:g} kept for "
            f"{len(class_names) - len(moved)} class(es), {few} of them with fewer than "
            f"{MIN_TUNE_POSITIVES} positives"
        )


def _f1_at(y: np.ndarray, p: np.ndarray, threshold: float) -> float:
    predicted = p >= threshold
    return 2 * float((predicted & (y == 1)).sum()) / (float(predicted.sum()) + float(y.sum()))


def tune_thresholds(
    y_true: np.ndarray, probs: np.ndarray, default: float = 0.5, min_positives: int = MIN_TUNE_POSITIVES
) -> TunedThresholds:
    """Per-class thresholds for F1 on ``(y_true, probs)`` (a validation split), guarded against overfitting.

    A bag is predicted positive when ``prob >= threshold``. A class moves from ``default`` only when the
    split holds at least ``min_positives`` of its positives, to the value of :data:`TUNE_GRID` with the
    best F1, and only when that F1 beats the one at ``default`` by more than ``1 / positives``: about what
    one positive bag changing side moves F1 by, so a smaller gain is one bag's noise. Ties go to the grid
    value closest to ``default``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    positives = y_true.sum(axis=0)  # (K,)
    out = np.full(y_true.shape[1], float(default))
    for k in np.flatnonzero(positives >= max(min_positives, 1)):
        y, p = y_true[:, k], probs[:, k]
        at_default = _f1_at(y, p, default)
        scored = sorted(TUNE_GRID, key=lambda t: (-_f1_at(y, p, t), abs(t - default)))
        if _f1_at(y, p, scored[0]) - at_default > 1.0 / positives[k]:
            out[k] = scored[0]
    return TunedThresholds(out, positives, out != default)

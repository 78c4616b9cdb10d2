"""Multi-label metrics of the paper (macro AUC, macro F1, micro F1), computed with scikit-learn."""

from __future__ import annotations

from collections.abc import Sequence
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


def tune_thresholds(y_true: np.ndarray, probs: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per-class thresholds that maximise each class's F1 on ``(y_true, probs)`` (a validation split).

    A bag is predicted positive when ``prob >= threshold``. Candidates are the observed probabilities; among
    equal F1 the candidate closest to ``default`` wins. Classes without positives keep ``default``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    out = np.full(y_true.shape[1], float(default))
    for k in range(y_true.shape[1]):
        positives = int(y_true[:, k].sum())
        if positives == 0:
            continue
        order = np.argsort(-probs[:, k], kind="stable")
        p, tp = probs[order, k], np.cumsum(y_true[order, k])
        last = np.flatnonzero(np.append(p[1:] != p[:-1], True))  # last index of each run of equal scores
        f1 = 2 * tp[last] / (last + 1 + positives)  # 2TP / (2TP + FP + FN), predicted = last + 1
        best = np.flatnonzero(np.isclose(f1, f1.max(), rtol=0, atol=1e-12))
        out[k] = p[last[best[np.argmin(np.abs(p[last[best]] - default))]]]
    return out

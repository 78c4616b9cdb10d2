"""Metrics against independent reference computations (rank-sum AUC, F1 from counts)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata

from hamil.metrics import compute_metrics


def rank_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney U statistic / (n_pos * n_neg), ties counted half (via average ranks)."""
    ranks = rankdata(p)
    pos = y == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return (ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def f1_counts(y: np.ndarray, pred: np.ndarray) -> float:
    tp = int((y & pred).sum())
    fp = int((~y & pred).sum())
    fn = int((y & ~pred).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("seed", range(5))
def test_against_reference(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random((60, 6)) < 0.3).astype(int)
    y[:, 5] = 0  # a class without positives: AUC undefined, excluded from the macro mean
    p = np.clip(y * 0.3 + rng.random((60, 6)) * 0.7, 0, 1).round(2)  # rounded: ties in scores
    m = compute_metrics(y, p, [f"c{k}" for k in range(6)])
    aucs = [rank_auc(y[:, k], p[:, k]) for k in range(5)]
    assert m["macro_auc"] == pytest.approx(np.mean(aucs))
    assert m["auc_classes"] == 5 and m["per_class"][5]["auc"] is None
    yb, pb = y.astype(bool), p >= 0.5
    assert m["macro_f1"] == pytest.approx(np.mean([f1_counts(yb[:, k], pb[:, k]) for k in range(6)]))
    assert m["micro_f1"] == pytest.approx(f1_counts(yb.ravel(), pb.ravel()))
    assert m["subset_accuracy"] == pytest.approx((yb == pb).all(axis=1).mean())


def test_per_class_thresholds_and_single_class():
    y = np.array([[1], [0], [1], [0]])
    p = np.array([[0.9], [0.6], [0.4], [0.1]])
    assert compute_metrics(y, p, ["x"])["macro_f1"] == pytest.approx(0.5)
    assert compute_metrics(y, p, ["x"], threshold=np.array([0.3]))["macro_f1"] == pytest.approx(0.8)
    assert compute_metrics(y, p, ["x"])["macro_auc"] == pytest.approx(0.75)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="must both be"):
        compute_metrics(np.zeros((3, 2)), np.zeros((3, 3)), ["a", "b"])

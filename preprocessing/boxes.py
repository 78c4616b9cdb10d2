"""Axis-aligned box arithmetic: IoU, non-maximum suppression and recall, vectorised with numpy.

Boxes are ``(x0, y0, x1, y1)`` rows with ``x1``/``y1`` exclusive: a box's area is ``(x1 - x0) * (y1 - y0)``.
"""

from __future__ import annotations

import numpy as np


def as_boxes(boxes: np.ndarray | list) -> np.ndarray:
    """Return ``boxes`` as a float64 ``(n, 4)`` array (an empty input gives ``(0, 4)``)."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape (n, 4), got {arr.shape}")
    return arr


def area(boxes: np.ndarray) -> np.ndarray:
    """Areas of ``(n, 4)`` boxes; degenerate (inverted) boxes have area 0."""
    b = as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # (n,)


def intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise intersection areas of ``a`` (n, 4) and ``b`` (m, 4): an ``(n, m)`` array."""
    a, b = as_boxes(a), as_boxes(b)
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])  # (n, m)
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])  # (n, m)
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise intersection over union of ``a`` (n, 4) and ``b`` (m, 4): an ``(n, m)`` array in [0, 1].

    Two empty boxes have IoU 0.
    """
    inter = intersection(a, b)  # (n, m)
    union = area(a)[:, None] + area(b)[None, :] - inter  # (n, m)
    out = np.zeros_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression.

    Visits boxes by decreasing score (ties: lower index first) and keeps a box unless its IoU with an
    already kept box is strictly greater than ``iou_threshold``. Returns the kept indices (int64) in
    the order they were kept, i.e. by decreasing score.
    """
    b = as_boxes(boxes)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(s) != len(b):
        raise ValueError(f"{len(b)} boxes but {len(s)} scores")
    order = np.argsort(-s, kind="stable")  # (n,)
    overlaps = iou(b[order], b[order]) > iou_threshold  # (n, n) in visiting order
    suppressed = np.zeros(len(order), dtype=bool)
    kept: list[int] = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed |= overlaps[i]
    return order[np.asarray(kept, dtype=np.int64)].astype(np.int64)


def matched(pred: np.ndarray, true: np.ndarray, iou_threshold: float = 0.5) -> np.ndarray:
    """``(m,)`` bool: whether each true box is matched by some predicted box with IoU >= threshold."""
    t = as_boxes(true)
    if len(t) == 0:
        return np.zeros(0, dtype=bool)
    p = as_boxes(pred)
    if len(p) == 0:
        return np.zeros(len(t), dtype=bool)
    return (iou(p, t) >= iou_threshold).any(axis=0)


def recall(pred: np.ndarray, true: np.ndarray, iou_threshold: float = 0.5) -> float:
    """Fraction of ``true`` boxes matched by some ``pred`` box with IoU >= ``iou_threshold``.

    Returns ``nan`` when there are no true boxes.
    """
    hits = matched(pred, true, iou_threshold)
    return float(hits.mean()) if len(hits) else float("nan")


def clip(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boxes ``(n, 4)`` clipped to a ``width`` x ``height`` image (a copy)."""
    out = np.array(boxes, copy=True)
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, width)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, height)
    return out

"""Cell boxes of a field of view: selective search (scored, filtered, NMS) or nucleus-seeded segmentation.

Boxes are computed on a downscaled copy of the field (longest side ``downscale`` of
:class:`preprocessing.crop.CropParams`) with one of three backends: OpenCV's ``cv2.ximgproc.segmentation``
selective search, the ``selectivesearch`` PyPI package (the one the HAMIL paper used), or ``seeded``: cells
grown from their nuclei (:mod:`preprocessing.seeded`), one box per cell region, no proposals to score.

Selective-search candidates are filtered by size, aspect and nucleus signal and scored by how well they
frame one whole, isolated cell:

* ``fill``: fraction of the box covered by foreground (cells: triangle threshold on the brightest channel);
* ``clear``: fraction of a thin ring just outside the box that is background -- low for fragments that cut
  through a cell;
* ``nuclei``: number of nucleus blobs (Otsu on the nucleus channel, HPA: blue) whose centroid lies in the
  box -- boxes holding several cells are penalised, boxes holding none are dropped.

``score = fill * clear**2 / max(nuclei, 1)``; greedy NMS on that score keeps whole cells over fragments and
multi-cell boxes. Kept boxes are mapped back to full resolution.

Each proposal is also scored in a version snapped to the foreground (``refine``): the bounding box of the
foreground components reaching into it, within a small margin. This repairs proposals that cut a little off
a cell (common with the ``selectivesearch`` package, whose regions merge by bounding-box overlap).

Selective search runs on a brightness-normalised copy of the field with the background (outside the
foreground mask) set to zero: on raw fluorescence fields the noisy dark background and the HSV hue of
near-black pixels fragment the segmentation, and blurred or noisy fields lose most whole-cell proposals.

The ``seeded`` boxes go through the same size, aspect, nucleus-signal and border filters and the per-field
cap, ordered by the fraction of the box their cell fills; they are not scored against a ring nor put through
NMS (cells are disjoint regions; the boxes of touching cells may overlap and are all kept).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from preprocessing import boxes as bx
from preprocessing import seeded
from preprocessing.errors import InputError

if TYPE_CHECKING:
    from preprocessing.crop import CropParams  # the crop stage owns its parameters; only read here

BACKENDS = ("opencv", "selectivesearch", "seeded")
OPENCV_MODES = ("fast", "single", "quality")


# --------------------------------------------------------------------------------------------- proposals


def propose_boxes(field: np.ndarray, params: CropParams) -> np.ndarray:
    """Cell boxes of one field: ``(n, 4)`` int64 ``x0, y0, x1, y1`` (exclusive) at full resolution.

    ``field`` is ``(H, W, 3)`` uint8 RGB (or ``(H, W)`` grey). Boxes come after all filtering, NMS and the
    per-field cap, in decreasing score order, and before any square expansion. The result is deterministic.
    """
    small, factor = _downscale(field, params.downscale)  # (h, w, 3), full = small * factor
    if params.backend == "seeded":
        keep_small, finer = _seeded_boxes(small, params)  # (n, 4) at 1 / finer of small's resolution
        factor *= finer
    else:
        if small.ndim == 2:
            small = np.repeat(small[:, :, None], 3, axis=2)  # (h, w, 3) grey as RGB
        masks = _masks(small, params.nucleus_channel)
        keep_small, _ = _select(_candidates(small, masks, params), masks, params)  # (n, 4)
    return _to_full(keep_small, factor, field.shape[:2])


def _seeded_boxes(small: np.ndarray, params: CropParams) -> tuple[np.ndarray, float]:
    """Boxes ``(n, 4)`` of the cells of :func:`preprocessing.seeded.segment` on the downscaled field, after
    the size, aspect, nucleus-signal and border filters and the per-field cap, fullest boxes first, and the
    factor from the segmentation's resolution to ``small``'s."""
    seg = seeded.segment(small, params)
    h, w = seg.cells.shape
    boxes, fill = seeded.region_boxes(seg.cells)  # (c, 4), (c,)
    nucleus_integral = cv2.integral((seg.nuclei > 0).astype(np.uint8), sdepth=cv2.CV_64F)
    keep = _filters(boxes, nucleus_integral, w, h, params)  # (c,)
    order = np.argsort(-fill[keep], kind="stable")[: params.max_patches_per_field]
    return boxes[keep][order], seg.factor


def _filters(
    boxes: np.ndarray, nucleus_integral: np.ndarray, w: int, h: int, params: CropParams
) -> np.ndarray:
    """``(c,)`` bool: the filters every backend applies to boxes ``(c, 4)`` on a ``w`` x ``h`` field: size
    range and aspect, off the border (``drop_border``), at least ``min_nucleus_fraction`` nucleus pixels."""
    keep = _shape_ok(boxes, min(h, w), params)
    if params.drop_border:
        keep &= ~_on_border(boxes, w, h)
    return keep & (_box_sum(nucleus_integral, boxes) / _box_area(boxes) >= params.min_nucleus_fraction)


def _on_border(b: np.ndarray, w: int, h: int) -> np.ndarray:
    """``(c,)`` bool: boxes ``(c, 4)`` touching the edge of a ``w`` x ``h`` field (cells cut by it)."""
    return (b[:, 0] <= 0) | (b[:, 1] <= 0) | (b[:, 2] >= w) | (b[:, 3] >= h)


def _downscale(field: np.ndarray, longest: int) -> tuple[np.ndarray, float]:
    h, w = field.shape[:2]
    factor = max(h, w) / longest
    if factor <= 1:
        return np.ascontiguousarray(field), 1.0
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    small = cv2.resize(field, size, interpolation=cv2.INTER_AREA)
    return small, max(h / small.shape[0], w / small.shape[1])


def _candidates(small: np.ndarray, masks: _Masks, params: CropParams) -> np.ndarray:
    """Unique raw proposals ``(c, 4)`` (x0, y0, x1, y1) on the downscaled field, sorted."""
    return _unique(_raw_proposals(_proposal_image(small, masks, params), params))


def _proposal_image(small: np.ndarray, masks: _Masks, params: CropParams) -> np.ndarray:
    """The image selective search sees: background zeroed (``mask_background``), intensities normalised to
    the 99.5th percentile of the brightest channel, then optionally gamma-stretched and smoothed."""
    img = small.astype(np.float32)
    if params.mask_background:
        img *= masks.foreground[:, :, None]
    top = float(np.percentile(img.max(axis=2), 99.5))
    img = np.clip(img / max(top, 1.0), 0.0, 1.0) ** params.gamma
    sigma = params.smooth * min(small.shape[:2])
    if sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    return (img * 255.0 + 0.5).astype(np.uint8)


def _raw_proposals(small: np.ndarray, params: CropParams) -> np.ndarray:
    if params.backend == "opencv":
        return _opencv_proposals(small, params)
    return _selectivesearch_proposals(small, params)


def _opencv_proposals(small: np.ndarray, params: CropParams) -> np.ndarray:
    seg = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    seg.setBaseImage(np.ascontiguousarray(small[:, :, ::-1]))  # OpenCV wants BGR
    if params.opencv_mode == "fast":
        seg.switchToSelectiveSearchFast(params.opencv_k, params.opencv_k, params.opencv_sigma)
    elif params.opencv_mode == "quality":
        seg.switchToSelectiveSearchQuality(params.opencv_k, params.opencv_k, params.opencv_sigma)
    else:
        seg.switchToSingleStrategy(params.opencv_k, params.opencv_sigma)
    rects = np.asarray(seg.process(), dtype=np.int64).reshape(-1, 4)  # (c, 4) x, y, w, h
    return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)


def _selectivesearch_proposals(small: np.ndarray, params: CropParams) -> np.ndarray:
    import selectivesearch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage warns about LBP on float images inside the package
        _, regions = selectivesearch.selective_search(
            small, scale=params.ss_scale, sigma=params.ss_sigma, min_size=params.ss_min_size
        )
    # 'rect' is (min_x, min_y, max_x - min_x, max_y - min_y) with inclusive max: +1 for exclusive ends.
    rects = np.asarray([r["rect"] for r in regions], dtype=np.int64).reshape(-1, 4)  # (c, 4)
    return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:] + 1], axis=1)


def _unique(candidates: np.ndarray) -> np.ndarray:
    """Deduplicate and sort rows so the result does not depend on the backend's output order."""
    if len(candidates) == 0:
        return np.zeros((0, 4), dtype=np.int64)
    return np.unique(candidates.astype(np.int64), axis=0)  # (c, 4), lexicographic


# --------------------------------------------------------------------------------------------- scoring


def _select(cand: np.ndarray, masks: _Masks, params: CropParams) -> tuple[np.ndarray, np.ndarray]:
    """Filter, score and NMS candidates on the downscaled field; returns kept boxes and their scores."""
    h, w = masks.foreground.shape
    cand = bx.clip(cand, w, h)  # (c, 4)
    if params.refine > 0 and len(cand):
        cand = _unique(np.concatenate([cand, _refine(cand, masks.foreground, params.refine)]))
    cand = cand[_filters(cand, masks.nucleus_integral, w, h, params)]  # (c', 4)
    if len(cand) == 0 or params.max_patches_per_field == 0:
        return np.zeros((0, 4), dtype=np.int64), np.zeros(0)
    scores = _scores(cand, masks, ring=max(2, round(params.ring * min(h, w))))  # (c,)
    good = scores >= params.min_score
    cand, scores = cand[good], scores[good]
    kept = bx.nms(cand, scores, params.nms_iou)[: params.max_patches_per_field]
    return cand[kept], scores[kept]


def _refine(cand: np.ndarray, fg: np.ndarray, margin: float) -> np.ndarray:
    """Snap boxes to the foreground: within each box grown by ``margin`` x its longer side, the bounding box
    of the foreground components that reach into the original box (grows cut-off boxes, trims loose ones).
    Boxes without foreground are returned unchanged. ``(c, 4)`` -> ``(c, 4)``."""
    h, w = fg.shape
    pad = np.maximum(2, np.round(margin * np.maximum(cand[:, 2] - cand[:, 0], cand[:, 3] - cand[:, 1])))
    grown = bx.clip(cand + (pad[:, None] * np.array([-1, -1, 1, 1])).astype(np.int64), w, h)  # (c, 4)
    fg8 = fg.astype(np.uint8)
    out = cand.copy()
    for i, ((gx0, gy0, gx1, gy1), (x0, y0, x1, y1)) in enumerate(zip(grown, cand, strict=True)):
        n, labels = cv2.connectedComponents(fg8[gy0:gy1, gx0:gx1], connectivity=8)
        if n < 2:
            continue
        inner = np.unique(labels[y0 - gy0 : y1 - gy0, x0 - gx0 : x1 - gx0])
        ys, xs = np.nonzero(np.isin(labels, inner[inner > 0]))
        if len(xs):
            out[i] = (gx0 + xs.min(), gy0 + ys.min(), gx0 + xs.max() + 1, gy0 + ys.max() + 1)
    return out


def _shape_ok(b: np.ndarray, short_side: int, params: CropParams) -> np.ndarray:
    bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]  # (c,)
    lo, hi = params.min_size * short_side, params.max_size * short_side
    sized = (bw >= lo) & (bh >= lo) & (bw <= hi) & (bh <= hi)
    return sized & (np.maximum(bw, bh) <= params.max_aspect * np.maximum(np.minimum(bw, bh), 1))


@dataclass(frozen=True)
class _Masks:
    foreground: np.ndarray  # (h, w) bool
    foreground_integral: np.ndarray  # (h + 1, w + 1) float64
    nucleus_integral: np.ndarray  # (h + 1, w + 1) float64
    nucleus_centroids: np.ndarray  # (k, 2) x, y


def _masks(small: np.ndarray, nucleus_channel: int = 2) -> _Masks:
    """Foreground (triangle threshold on the brightest channel: cells are dim next to nuclei, so Otsu would
    keep only nuclei) and nucleus (Otsu on the nucleus channel, HPA: blue) masks, as integral images, plus
    nucleus blob centroids."""
    if not 0 <= nucleus_channel < small.shape[2]:
        raise InputError(f"nucleus_channel {nucleus_channel} out of range for {small.shape[2]} channels")
    sigma = max(1.0, 0.004 * min(small.shape[:2]))
    fg = _threshold(cv2.GaussianBlur(small.max(axis=2), (0, 0), sigma), cv2.THRESH_TRIANGLE)
    nucleus = _threshold(
        cv2.GaussianBlur(np.ascontiguousarray(small[:, :, nucleus_channel]), (0, 0), sigma), cv2.THRESH_OTSU
    )
    # nucleus blobs: opening removes speckle, tiny blobs are ignored
    opened = cv2.morphologyEx(nucleus.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, _, stats, centroids = cv2.connectedComponentsWithStats(opened, connectivity=8)
    min_blob = max(4.0, (0.01 * min(small.shape[:2])) ** 2)
    big = stats[1:, cv2.CC_STAT_AREA] >= min_blob
    return _Masks(
        foreground=fg,
        foreground_integral=cv2.integral(fg.astype(np.uint8), sdepth=cv2.CV_64F),
        nucleus_integral=cv2.integral(nucleus.astype(np.uint8), sdepth=cv2.CV_64F),
        nucleus_centroids=centroids[1:][big] if n > 1 else np.zeros((0, 2)),
    )


def _threshold(channel: np.ndarray, method: int) -> np.ndarray:
    """Pixels above an automatic threshold (``cv2.THRESH_OTSU`` or ``THRESH_TRIANGLE``); none if constant."""
    if int(channel.max()) == int(channel.min()):
        return np.zeros(channel.shape, dtype=bool)
    thr, _ = cv2.threshold(channel, 0, 255, cv2.THRESH_BINARY + method)
    return channel > thr


def _box_sum(integral: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sums of the mask over boxes ``(c, 4)`` (clipped to the image) from its integral image."""
    x0, y0, x1, y1 = b.T
    return integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]  # (c,)


def _box_area(b: np.ndarray) -> np.ndarray:
    return np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1).astype(np.float64)  # (c,)


def _scores(cand: np.ndarray, masks: _Masks, ring: int) -> np.ndarray:
    """``fill * clear**2 / max(nuclei, 1)`` (0 without a nucleus centroid) for boxes ``(c, 4)``."""
    h, w = masks.foreground_integral.shape[0] - 1, masks.foreground_integral.shape[1] - 1
    fill = _box_sum(masks.foreground_integral, cand) / _box_area(cand)  # (c,)
    outer = bx.clip(cand + np.array([-ring, -ring, ring, ring]), w, h)  # (c, 4)
    ring_area = _box_area(outer) - _box_area(cand)
    ring_fg = _box_sum(masks.foreground_integral, outer) - _box_sum(masks.foreground_integral, cand)
    clear = np.where(ring_area > 0, 1.0 - ring_fg / np.maximum(ring_area, 1), 1.0)  # (c,)
    cx, cy = masks.nucleus_centroids[:, 0], masks.nucleus_centroids[:, 1]  # (k,)
    inside = (
        (cx[None, :] >= cand[:, 0:1])
        & (cx[None, :] < cand[:, 2:3])
        & (cy[None, :] >= cand[:, 1:2])
        & (cy[None, :] < cand[:, 3:4])
    )  # (c, k)
    nuclei = inside.sum(axis=1)  # (c,)
    return np.where(nuclei > 0, fill * clear**2 / np.maximum(nuclei, 1), 0.0)


def _to_full(b: np.ndarray, factor: float, shape: tuple[int, int]) -> np.ndarray:
    """Map boxes from the downscaled field to full resolution (outward rounding, clipped)."""
    h, w = shape
    if len(b) == 0:
        return np.zeros((0, 4), dtype=np.int64)
    out = np.empty_like(b, dtype=np.int64)  # (n, 4)
    out[:, :2] = np.floor(b[:, :2] * factor + 1e-9).astype(np.int64)
    out[:, 2:] = np.ceil(b[:, 2:] * factor - 1e-9).astype(np.int64)
    return bx.clip(out, w, h)

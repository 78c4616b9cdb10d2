"""Single-cell patches from fields of view: selective-search proposals, filtering, NMS, cropping, sharding.

Proposals are computed on a downscaled copy of the field (longest side ``CropParams.downscale``) with one of
two backends: OpenCV's ``cv2.ximgproc.segmentation`` selective search or the ``selectivesearch`` PyPI package
(the one the HAMIL paper used). Candidates are filtered by size, aspect and nucleus signal and scored by how
well they frame one whole, isolated cell:

* ``fill``: fraction of the box covered by foreground (cells: triangle threshold on the brightest channel);
* ``clear``: fraction of a thin ring just outside the box that is background -- low for fragments that cut
  through a cell;
* ``nuclei``: number of nucleus blobs (Otsu on blue) whose centroid lies in the box -- boxes holding several
  cells are penalised, boxes holding none are dropped.

``score = fill * clear**2 / max(nuclei, 1)``; greedy NMS on that score keeps whole cells over fragments and
multi-cell boxes. Kept boxes are mapped back to full resolution, optionally squared, and resized to patches.

Each proposal is also scored in a version snapped to the foreground (``refine``): the bounding box of the
foreground components reaching into it, within a small margin. This repairs proposals that cut a little off
a cell (common with the ``selectivesearch`` package, whose regions merge by bounding-box overlap).

Selective search runs on a brightness-normalised copy of the field with the background (outside the
foreground mask) set to zero: on raw fluorescence fields the noisy dark background and the HSV hue of
near-black pixels fragment the segmentation, and blurred or noisy fields lose most whole-cell proposals.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import dask
import numpy as np
import pandas as pd
import zarr

from preprocessing import boxes as bx
from preprocessing.errors import InputError
from preprocessing.io import (
    IMAGES_COLUMNS,
    atomic_path,
    read_image,
    read_images_table,
    read_table,
    write_json,
    write_tsv,
)
from preprocessing.store import create_patch_array

BACKENDS = ("opencv", "selectivesearch")
OPENCV_MODES = ("fast", "single", "quality")
PATCH_COLUMNS = ("patch_index", "image_id", "group", "labels", "x0", "y0", "x1", "y1")


@dataclass(frozen=True)
class CropParams:
    """Parameters of proposal, filtering and cropping (stored in the Zarr attributes)."""

    backend: str = "opencv"  # "opencv" or "selectivesearch"
    downscale: int = 512  # longest side of the field on which proposals are computed
    patch_size: int = 512  # output patch side
    min_size: float = 0.08  # box side bounds, fractions of the field's shorter side
    max_size: float = 0.45
    max_aspect: float = 2.0
    nms_iou: float = 0.3
    min_nucleus_fraction: float = 0.05  # fraction of box pixels whose blue channel is above Otsu
    max_patches_per_field: int = 50
    square: bool = True  # expand kept boxes to squares around their centre before resizing
    min_score: float = 0.3  # candidates scoring below are dropped (score in [0, 1], see module docstring)
    ring: float = 0.01  # width of the background ring outside a box, fraction of the shorter side (>= 2 px)
    gamma: float = 1.0  # proposal image: intensities (normalised to the 99.5th percentile) ** gamma
    smooth: float = 0.0  # proposal image: Gaussian sigma, fraction of the shorter side (0: none)
    mask_background: bool = True  # proposal image: background pixels (see foreground mask) set to 0
    refine: float = 0.15  # also score proposals snapped to the foreground within this margin (0: off)
    # opencv backend
    opencv_mode: str = "single"  # "fast" (switchToSelectiveSearchFast), "single" or "quality"
    opencv_k: int = 300  # graph-segmentation k (base_k for fast/quality; inc_k = k)
    opencv_sigma: float = 0.8
    # selectivesearch backend (felzenszwalb parameters at the downscaled resolution)
    ss_scale: float = 100.0
    ss_sigma: float = 0.9
    ss_min_size: int = 50

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"crop backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.opencv_mode not in OPENCV_MODES:
            raise InputError(
                f"opencv_mode must be one of {', '.join(OPENCV_MODES)}; got {self.opencv_mode!r}"
            )
        if self.downscale < 16 or self.patch_size < 1 or self.max_patches_per_field < 0:
            raise InputError("crop parameters: downscale >= 16, patch_size >= 1, max_patches_per_field >= 0")
        if not 0 < self.min_size <= self.max_size or self.max_aspect < 1:
            raise InputError("crop parameters: need 0 < min_size <= max_size and max_aspect >= 1")


# --------------------------------------------------------------------------------------------- proposals


def propose_boxes(field: np.ndarray, params: CropParams) -> np.ndarray:
    """Cell boxes of one field: ``(n, 4)`` int64 ``x0, y0, x1, y1`` (exclusive) at full resolution.

    ``field`` is ``(H, W, 3)`` uint8 RGB. Boxes come after all filtering, NMS and the per-field cap, in
    decreasing score order, and before any square expansion. The result is deterministic.
    """
    small, factor = _downscale(field, params.downscale)  # (h, w, 3), full = small * factor
    masks = _masks(small)
    keep_small, _ = _select(_candidates(small, masks, params), masks, params)  # (n, 4)
    return _to_full(keep_small, factor, field.shape[:2])


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
    cand = _clip(cand, w, h)  # (c, 4)
    if params.refine > 0 and len(cand):
        cand = _unique(np.concatenate([cand, _refine(cand, masks.foreground, params.refine)]))
    cand = cand[_shape_ok(cand, min(h, w), params)]
    if len(cand) == 0 or params.max_patches_per_field == 0:
        return np.zeros((0, 4), dtype=np.int64), np.zeros(0)
    nuc_frac = _box_sum(masks.nucleus_integral, cand) / _box_area(cand)  # (c,)
    cand = cand[nuc_frac >= params.min_nucleus_fraction]
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
    grown = _clip(cand + (pad[:, None] * np.array([-1, -1, 1, 1])).astype(np.int64), w, h)  # (c, 4)
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


def _clip(b: np.ndarray, w: int, h: int) -> np.ndarray:
    out = b.copy()
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, w)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, h)
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


def _masks(small: np.ndarray) -> _Masks:
    """Foreground (triangle threshold on the brightest channel: cells are dim next to nuclei, so Otsu would
    keep only nuclei) and nucleus (Otsu on blue) masks, as integral images, plus nucleus blob centroids."""
    sigma = max(1.0, 0.004 * min(small.shape[:2]))
    fg = _threshold(cv2.GaussianBlur(small.max(axis=2), (0, 0), sigma), cv2.THRESH_TRIANGLE)
    nucleus = _threshold(
        cv2.GaussianBlur(np.ascontiguousarray(small[:, :, 2]), (0, 0), sigma), cv2.THRESH_OTSU
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
    outer = _clip(cand + np.array([-ring, -ring, ring, ring]), w, h)  # (c, 4)
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
    return _clip(out, w, h)


# --------------------------------------------------------------------------------------------- patches


def patch_windows(boxes: np.ndarray, shape: tuple[int, int], square: bool) -> tuple[np.ndarray, np.ndarray]:
    """Windows cut for each box: ``(n, 4)`` unclipped (squares around the box centres when ``square``)
    and the same ``(n, 4)`` clipped to a field of ``shape`` (H, W)."""
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)  # (n, 4)
    win = b.copy()
    if square:
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        side = np.maximum(w, h)
        win[:, 0] = b[:, 0] - (side - w) // 2
        win[:, 1] = b[:, 1] - (side - h) // 2
        win[:, 2] = win[:, 0] + side
        win[:, 3] = win[:, 1] + side
    return win, _clip(win, shape[1], shape[0])


def cut_patches(field: np.ndarray, boxes: np.ndarray, patch_size: int, square: bool) -> np.ndarray:
    """Cut and resize one patch per box: ``(n, 3, P, P)`` uint8, channels-first RGB.

    With ``square`` each box is first expanded to a square around its centre; parts of the square outside
    the field are padded with zeros (the cell stays centred). Without it the box is resized as is.
    """
    windows, clipped = patch_windows(boxes, field.shape[:2], square)
    out = np.zeros((len(windows), 3, patch_size, patch_size), dtype=np.uint8)  # (n, 3, P, P)
    for i, (win, cut) in enumerate(zip(windows, clipped, strict=True)):
        out[i] = _resize(_window(field, win, cut), patch_size).transpose(2, 0, 1)
    return out


def _window(field: np.ndarray, win: np.ndarray, cut: np.ndarray) -> np.ndarray:
    """The field's pixels in ``win`` (x0, y0, x1, y1), zero outside the field: ``(h, w, 3)``."""
    x0, y0, x1, y1 = (int(v) for v in win)
    cx0, cy0, cx1, cy1 = (int(v) for v in cut)
    if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
        return field[y0:y1, x0:x1]
    canvas = np.zeros((max(y1 - y0, 1), max(x1 - x0, 1), 3), dtype=field.dtype)
    canvas[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = field[cy0:cy1, cx0:cx1]
    return canvas


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    shrink = img.shape[0] > size or img.shape[1] > size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


# --------------------------------------------------------------------------------------------- shards


@dataclass
class _FieldResult:
    image_id: str
    boxes: np.ndarray  # (n, 4) kept boxes, before square expansion
    windows: np.ndarray  # (n, 4) patch windows clipped to the field
    patches: np.ndarray  # (n, 3, P, P) uint8
    error: str | None = None  # InputError message when the image was unreadable


def _process_field(row: dict[str, str], params: CropParams) -> _FieldResult:
    """Read one field and crop it; an unreadable image gives a result with ``error`` set."""
    empty = np.zeros((0, 4), dtype=np.int64)
    try:
        field = read_image(row["path"])
    except InputError as err:
        return _FieldResult(row["image_id"], empty, empty, np.zeros((0, 3, 1, 1), np.uint8), str(err))
    boxes = propose_boxes(field, params)  # (n, 4)
    _, clipped = patch_windows(boxes, field.shape[:2], params.square)
    patches = cut_patches(field, boxes, params.patch_size, params.square)
    return _FieldResult(row["image_id"], boxes, clipped, patches)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core: no nested OpenCV threads


def _run_fields(rows: list[dict[str, str]], params: CropParams, workers: int) -> Iterator[_FieldResult]:
    """Process fields with dask in batches (bounded memory), yielding results in input order."""
    batch = 2 * workers
    if workers <= 1:
        for start in range(0, len(rows), batch):
            tasks = [dask.delayed(_process_field)(row, params) for row in rows[start : start + batch]]
            yield from dask.compute(*tasks, scheduler="synchronous")
        return
    ctx = multiprocessing.get_context("spawn")  # safe with threads in the parent
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        for start in range(0, len(rows), batch):
            tasks = [dask.delayed(_process_field)(row, params) for row in rows[start : start + batch]]
            yield from dask.compute(*tasks, scheduler="processes", num_workers=workers, pool=pool)


def crop_shard(
    images_tsv: Path,
    shard: int,
    num_shards: int,
    out_zarr: Path,
    out_tsv: Path,
    params: CropParams,
    workers: int = 1,
    boxes_tsv: Path | None = None,
    max_bad_fraction: float = 0.05,
) -> dict[str, Any]:
    """Crop the fields of one shard of ``images.tsv`` (rows ``i`` with ``i % num_shards == shard``).

    Writes (each atomically):

    * ``out_zarr``: Zarr v3 group, array ``patches`` uint8 ``(N, 3, P, P)`` chunked per patch (zstd),
      attributes ``patch_size`` and ``params``;
    * ``out_tsv``: one row per patch, in ``patches`` order: ``patch_index, image_id, group, labels, x0, y0,
      x1, y1`` (the patch window in field pixels, clipped) and the extra columns of ``images.tsv``;
    * ``<stem>.rejected.tsv`` beside ``out_tsv``: unreadable images (``image_id, path, reason``), always;
    * ``<stem>.json`` beside ``out_tsv``: the returned stats (``fields, fields_rejected, patches, recall,
      backend, seconds`` and more). ``recall`` (IoU >= 0.5, boxes before square expansion) needs
      ``boxes_tsv`` (true boxes: ``image_id, x0, y0, x1, y1``), else it is null.

    Raises :class:`InputError` when more than ``max_bad_fraction`` of the shard's images are unreadable (the
    rejected list is written, the patch outputs are not).
    """
    start = time.perf_counter()
    images_tsv, out_zarr, out_tsv = Path(images_tsv), Path(out_zarr), Path(out_tsv)
    if not 0 <= shard < num_shards:
        raise InputError(f"shard must be in [0, {num_shards}); got {shard}")
    if workers < 1:
        raise InputError(f"workers must be >= 1; got {workers}")
    table = read_images_table(images_tsv)
    rows = table.iloc[shard::num_shards].reset_index(drop=True)
    truth = _read_true_boxes(Path(boxes_tsv)) if boxes_tsv is not None else None
    rejected_path = out_tsv.with_name(f"{out_tsv.stem}.rejected.tsv")

    records: list[dict[str, Any]] = []
    rejected: list[dict[str, str]] = []
    hits: dict[str, tuple[int, int]] = {}  # image_id -> (matched, true)
    with atomic_path(out_zarr) as tmp:
        patches = _create_store(tmp, params)
        by_id = {r["image_id"]: r for r in rows.to_dict("records")}
        for result in _run_fields(list(by_id.values()), params, workers):
            row = by_id[result.image_id]
            if result.error is not None:
                rejected.append({"image_id": result.image_id, "path": row["path"], "reason": result.error})
                continue
            if len(result.patches):
                patches.append(result.patches, axis=0)
            records.extend(_patch_records(row, result.windows, first=len(records)))
            if truth is not None:
                true = truth.get(result.image_id, np.zeros((0, 4), np.int64))
                hits[result.image_id] = (int(bx.matched(result.boxes, true).sum()), len(true))
        write_tsv(pd.DataFrame(rejected, columns=["image_id", "path", "reason"]), rejected_path)
        if rows.shape[0] and len(rejected) / rows.shape[0] > max_bad_fraction:
            raise InputError(
                f"{images_tsv}: {len(rejected)} of {rows.shape[0]} images unreadable "
                f"(> {max_bad_fraction:.0%}); see {rejected_path}"
            )
    extra = [c for c in table.columns if c not in IMAGES_COLUMNS]
    write_tsv(pd.DataFrame(records, columns=[*PATCH_COLUMNS, *extra]), out_tsv)
    stats = _stats(shard, num_shards, rows.shape[0], rejected, len(records), hits, truth is not None, params)
    stats["seconds"] = round(time.perf_counter() - start, 3)
    write_json(stats, out_tsv.with_name(f"{out_tsv.stem}.json"))
    return stats


def _create_store(path: Path, params: CropParams) -> Any:
    """A new Zarr v3 group at ``path`` with an empty ``patches`` array to append to."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.attrs.update({"patch_size": params.patch_size, "params": asdict(params)})
    return create_patch_array(group, 0, 3, params.patch_size)


def _patch_records(row: dict[str, str], windows: np.ndarray, first: int) -> list[dict[str, Any]]:
    extra = {k: v for k, v in row.items() if k not in IMAGES_COLUMNS}
    return [
        {
            "patch_index": first + i,
            "image_id": row["image_id"],
            "group": row["group"],
            "labels": row["labels"],
            "x0": int(x0),
            "y0": int(y0),
            "x1": int(x1),
            "y1": int(y1),
            **extra,
        }
        for i, (x0, y0, x1, y1) in enumerate(windows)
    ]


def _read_true_boxes(path: Path) -> dict[str, np.ndarray]:
    """``boxes.tsv`` -> {image_id: (m, 4) int64}."""
    table = read_table(path, ["image_id", "x0", "y0", "x1", "y1"])
    try:
        coords = table[["x0", "y0", "x1", "y1"]].astype(np.int64).to_numpy()  # (rows, 4)
    except ValueError:
        raise InputError(f"{path}: box coordinates must be integers") from None
    groups = pd.Series(np.arange(len(table))).groupby(table["image_id"].to_numpy(), sort=False)
    return {str(image_id): coords[idx.to_numpy()] for image_id, idx in groups}


def _stats(
    shard: int,
    num_shards: int,
    fields: int,
    rejected: list[dict[str, str]],
    patches: int,
    hits: dict[str, tuple[int, int]],
    with_truth: bool,
    params: CropParams,
) -> dict[str, Any]:
    matched = sum(m for m, _ in hits.values())
    true = sum(t for _, t in hits.values())
    return {
        "shard": shard,
        "num_shards": num_shards,
        "fields": fields,
        "fields_rejected": len(rejected),
        "patches": patches,
        "recall": (matched / true if true else None) if with_truth else None,
        "recall_per_field": {k: (m / t if t else None) for k, (m, t) in hits.items()} if with_truth else None,
        "true_boxes": true if with_truth else None,
        "backend": params.backend,
    }

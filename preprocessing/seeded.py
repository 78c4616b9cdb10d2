"""Nucleus-seeded cell segmentation: the ``seeded`` crop backend's regions (scikit-image, no proposals).

1. **Channel roles.** The nucleus channel (``nucleus_channel``, HPA: blue) holds the nuclear stain; the
   cytoplasm channels (``cytoplasm_channels``, HPA: red microtubules and green protein) show the cell
   bodies. A grey field (2-D, or three equal channels) is nuclei only, and so is an empty tuple of
   cytoplasm channels or cytoplasm channels without any signal (constant).
2. **Scale.** The nucleus diameter is estimated on the field itself: the median equivalent diameter of the
   Otsu blobs of the smoothed nucleus channel. A field whose nuclei are over ``_RESCALE_ABOVE`` px across
   is segmented at a resolution where they are ``_WORK_DIAMETER`` px across (the working resolution):
   the same cells, several times faster. The other sizes follow the diameter.
3. **Nuclei.** The nucleus channel is smoothed (Gaussian, ``seeded_sigma`` px) and thresholded
   (``seeded_threshold``: Otsu, Li or triangle over the field, or ``local``: a Gaussian local mean over a
   window of 1.5 nucleus diameters, never below the field's triangle threshold, so dim nuclei beside bright
   ones are kept); holes are filled and specks removed. Touching nuclei are split by a watershed of the
   distance transform, seeded at its local maxima at least ``seeded_split`` nucleus diameters apart.
4. **Cells.** Each cell is grown from its nucleus over the foreground of the cytoplasm channels (triangle
   threshold of their smoothed maximum: cell bodies are dim) by a seeded watershed on the distance to the
   nearest nucleus, so touching cells are divided between their nuclei; foreground that no nucleus reaches
   is no cell. Without cytoplasm the cells are the nuclei.

Thresholds, peaks, watersheds and regions are scikit-image's; Gaussian smoothing and the exact Euclidean
distance transform are OpenCV's (the same results as ``skimage.filters.gaussian`` and
``scipy.ndimage.distance_transform_edt``, several times faster). Everything runs on the downscaled field
that :mod:`preprocessing.proposals` gives it; the result is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import feature, filters, measure, segmentation

from preprocessing.errors import InputError

if TYPE_CHECKING:
    from preprocessing.crop import CropParams  # the crop stage owns its parameters; only read here

THRESHOLDS = ("local", "otsu", "li", "triangle")
_GLOBAL = {"otsu": filters.threshold_otsu, "li": filters.threshold_li, "triangle": filters.threshold_triangle}
_LOCAL_WINDOW = 1.5  # local threshold window, in nucleus diameters
_MIN_BLOB = 9  # px: blobs smaller than this never count as nuclei (noise specks)
_MIN_NUCLEUS = 0.1  # nuclei smaller than this fraction of the median nucleus area are dropped
_WORK_DIAMETER = 20.0  # px: fields with larger nuclei are segmented at a resolution where they are this size
_RESCALE_ABOVE = 32.0  # px: ... when their nuclei are larger than this


@dataclass(frozen=True)
class Segmentation:
    """Label images of one field at the working resolution: nucleus ``i`` grew into cell ``i`` (0:
    background); a pixel of them is ``factor`` pixels of the field."""

    nuclei: np.ndarray  # (h', w') int32
    cells: np.ndarray  # (h', w') int32
    factor: float = 1.0


def channel_roles(
    field: np.ndarray, nucleus_channel: int, cytoplasm_channels: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray | None]:
    """The nucleus image ``(h, w)`` and the cytoplasm image (maximum of the cytoplasm channels, ``(h, w)``)
    of a field ``(h, w)`` or ``(h, w, c)``, in the field's dtype; the cytoplasm is None for a grey field (2-D
    or equal channels), without cytoplasm channels, or when they are constant; bad indices: InputError.
    """
    if field.ndim == 2:
        return field, None
    channels = field.shape[2]
    bad = [c for c in (nucleus_channel, *cytoplasm_channels) if not 0 <= c < channels]
    if bad:
        raise InputError(f"channel index {bad[0]} out of range for a field with {channels} channels")
    if all(np.array_equal(field[:, :, 0], field[:, :, c]) for c in range(1, channels)):
        return field[:, :, 0], None  # grey, stored as RGB
    nucleus = np.ascontiguousarray(field[:, :, nucleus_channel])  # (h, w)
    if not cytoplasm_channels:
        return nucleus, None
    cytoplasm = field[:, :, list(cytoplasm_channels)].max(axis=2)  # (h, w)
    if cytoplasm.max() == cytoplasm.min():
        return nucleus, None
    return nucleus, cytoplasm


def segment(field: np.ndarray, params: CropParams) -> Segmentation:
    """Nuclei and the cells grown from them, on a field ``(h, w)`` or ``(h, w, c)`` (see the module doc).

    Fields whose nuclei are more than ``_RESCALE_ABOVE`` px across are segmented at a resolution where they
    are ``_WORK_DIAMETER`` px across (``Segmentation.factor`` > 1): the same cells, several times faster.
    """
    nucleus, cytoplasm = channel_roles(field, params.nucleus_channel, params.cytoplasm_channels)
    diameter = nucleus_diameter(nucleus, params.seeded_sigma)
    empty = np.zeros(nucleus.shape, np.int32)
    if diameter == 0:
        return Segmentation(empty, empty)
    factor = diameter / _WORK_DIAMETER if diameter > _RESCALE_ABOVE else 1.0
    if factor > 1:
        nucleus, factor = _shrink(nucleus, factor)
        if cytoplasm is not None:  # exactly the nucleus image's size (rounding could differ by a pixel)
            size = (nucleus.shape[1], nucleus.shape[0])
            cytoplasm = cv2.resize(np.ascontiguousarray(cytoplasm), size, interpolation=cv2.INTER_AREA)
        diameter /= factor
    nuclei = segment_nuclei(nucleus, diameter, params)  # (h', w') int32
    if cytoplasm is None or nuclei.max() == 0:
        return Segmentation(nuclei, nuclei, factor)
    return Segmentation(nuclei, grow_cells(nuclei, cytoplasm, params.seeded_sigma), factor)


def nucleus_diameter(nucleus: np.ndarray, sigma: float) -> float:
    """Median equivalent diameter (px) of the Otsu blobs (at least ``_MIN_BLOB`` px) of a nucleus image
    ``(h, w)`` after smoothing; 0 when there are none (a constant image)."""
    smooth = _smooth(nucleus, sigma)  # (h, w)
    if smooth.max() == smooth.min():
        return 0.0
    labels, n = ndi.label(smooth > filters.threshold_otsu(smooth))
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # (n,)
    areas = areas[areas >= _MIN_BLOB]
    return float(np.sqrt(4 * np.median(areas) / np.pi)) if len(areas) else 0.0


def segment_nuclei(nucleus: np.ndarray, diameter: float, params: CropParams) -> np.ndarray:
    """Nucleus labels ``(h, w)`` int32 (0: background) of a nucleus image ``(h, w)`` whose nuclei are about
    ``diameter`` px across: threshold, fill, split touching nuclei by a distance-transform watershed."""
    smooth = _smooth(nucleus, params.seeded_sigma)  # (h, w)
    if smooth.max() == smooth.min():
        return np.zeros(nucleus.shape, np.int32)
    mask = ndi.binary_fill_holes(smooth > _threshold(smooth, params.seeded_threshold, diameter))  # (h, w)
    mask = _without_small(mask, max(_MIN_BLOB, _MIN_NUCLEUS * np.pi * diameter**2 / 4))
    return _split(mask, min_distance=max(1, round(params.seeded_split * diameter)))


def grow_cells(nuclei: np.ndarray, cytoplasm: np.ndarray, sigma: float) -> np.ndarray:
    """Cell labels ``(h, w)`` int32: each nucleus of ``nuclei`` (labels) grown over the foreground of
    ``cytoplasm`` ``(h, w)`` (triangle threshold after smoothing), touching cells divided where they are as
    far from either nucleus (watershed on the distance to the nearest nucleus)."""
    smooth = _smooth(cytoplasm, sigma)  # (h, w)
    foreground = nuclei > 0  # (h, w) bool
    if smooth.max() > smooth.min():
        foreground |= smooth > filters.threshold_triangle(smooth)
    distance = _distance(nuclei == 0)  # (h, w) px to the nearest nucleus
    return segmentation.watershed(distance, markers=nuclei, mask=foreground).astype(np.int32)


def region_boxes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``(n, 4)`` int64 ``x0, y0, x1, y1`` (exclusive) of the regions of a label image, in label
    order, and the fraction ``(n,)`` of each box that its region covers."""
    props = measure.regionprops(labels)
    if not props:
        return np.zeros((0, 4), np.int64), np.zeros(0)
    rows = np.array([p.bbox for p in props], dtype=np.int64)  # (n, 4) min_row, min_col, max_row, max_col
    boxes = rows[:, [1, 0, 3, 2]]  # (n, 4)
    area = np.array([p.area for p in props], dtype=np.float64)  # (n,)
    return boxes, area / ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing ``(h, w)`` -> ``(h, w)``, same dtype (OpenCV: uint8 stays uint8, so the
    thresholds below take their fast integer-histogram path)."""
    image = np.ascontiguousarray(image)
    if image.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        image = image.astype(np.float32)
    return cv2.GaussianBlur(image, (0, 0), sigma) if sigma > 0 else image


def _distance(mask: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance ``(h, w)`` float32 of each pixel of ``mask`` to the nearest pixel outside
    it (as ``scipy.ndimage.distance_transform_edt``, computed by OpenCV about 6x faster)."""
    return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def _threshold(smooth: np.ndarray, method: str, diameter: float) -> np.ndarray | float:
    """A global threshold, or (``local``) a per-pixel one: the Gaussian-weighted local mean over a window of
    ``_LOCAL_WINDOW`` nucleus diameters (``skimage.filters.threshold_local``'s ``gaussian`` method, computed
    by OpenCV), floored at the field's triangle threshold (no nuclei in the background)."""
    if method != "local":
        return float(_GLOBAL[method](smooth))
    window = max(3, 2 * round(_LOCAL_WINDOW * diameter / 2) + 1)  # odd
    local = cv2.GaussianBlur(smooth.astype(np.float32), (0, 0), (window - 1) / 6)  # (h, w)
    return np.maximum(local, float(filters.threshold_triangle(smooth)))


def _shrink(image: np.ndarray, factor: float) -> tuple[np.ndarray, float]:
    """``image`` ``(h, w)`` resized by ``1 / factor`` (area averaging) and the exact factor of the result."""
    h, w = image.shape
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    small = cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA)
    return small, max(h / small.shape[0], w / small.shape[1])


def _without_small(mask: np.ndarray, min_area: float) -> np.ndarray:
    """The mask ``(h, w)`` without its connected components smaller than ``min_area`` px."""
    labels, n = ndi.label(mask)
    areas = np.bincount(labels.ravel(), minlength=n + 1)  # (n + 1,)
    keep = areas >= min_area
    keep[0] = False
    return keep[labels]


def _split(mask: np.ndarray, min_distance: int) -> np.ndarray:
    """Nucleus labels ``(h, w)`` int32 of ``mask``: each connected component, or, where the (lightly
    smoothed) distance transform has several local maxima at least ``min_distance`` px apart, its watershed
    from those maxima (touching nuclei)."""
    components, n = ndi.label(mask)  # (h, w) int32
    distance = cv2.GaussianBlur(_distance(mask), (0, 0), 1.0)  # (h, w) float32
    peaks = feature.peak_local_max(
        distance, min_distance=min_distance, labels=components, exclude_border=False
    )  # (k, 2) row, col
    multi = np.bincount(components[tuple(peaks.T)], minlength=n + 1) >= 2  # (n + 1,) components to split
    multi[0] = False
    peaks = peaks[multi[components[tuple(peaks.T)]]]  # (k', 2)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(n + 1, n + 1 + len(peaks))  # after the component labels
    split = segmentation.watershed(-distance, markers, mask=multi[components])  # (h, w)
    return np.where(multi[components], split, components).astype(np.int32)

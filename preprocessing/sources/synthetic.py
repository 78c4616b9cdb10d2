"""Synthetic HPA-like immunofluorescence fields of view.

Each field is an RGB image: red = microtubules, green = the protein of interest, blue = nuclei. A protein
(a *group*) has 1-3 subcellular locations from :data:`LOCATIONS`; every cell of every field of that protein
shows the same green pattern(s), with per-cell variation in shape and intensity. Some fields are of poor
quality (blurred, dim, noisy, or without specific green signal). Cells are kept apart by a gap unless
``touching`` is set: then their bodies touch and overlap a little (with many cells per field, the dense
setting of ``benchmarks/bench_crop.py``).

:func:`generate` writes the images (lossless PNG), ``images.tsv`` and ``boxes.tsv`` (the true cell
bounding boxes). The output is byte-identical for a given seed whatever the number of workers: every field
draws from its own random generator, seeded by ``(seed, protein, field)``.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from preprocessing.errors import InputError
from preprocessing.io import BOX_COLUMNS, atomic_path, write_tsv
from preprocessing.options import opt

LOCATIONS: tuple[str, ...] = (
    "Nucleoplasm",
    "Cytosol",
    "Nucleus",
    "Mitochondria",
    "Plasma membrane",
    "Nucleoli",
    "Vesicles",
    "Golgi apparatus",
    "Endoplasmic reticulum",
    "Nuclear speckles",
)

QUALITIES: tuple[str, ...] = ("good", "blur", "dim", "noisy", "nosignal")
IMAGES_COLUMNS: tuple[str, ...] = ("image_id", "group", "path", "labels", "quality")
BOXES_COLUMNS: tuple[str, ...] = ("image_id", *BOX_COLUMNS)

# HPA-like imbalance: frequencies decrease roughly along LOCATIONS.
_LOCATION_WEIGHTS = np.array([0.24, 0.17, 0.10, 0.09, 0.08, 0.08, 0.07, 0.06, 0.06, 0.05])
_LABEL_COUNT_P = np.array([0.55, 0.33, 0.12])  # P(1, 2, 3 labels)
# "Nucleus" means the whole nucleus is stained without resolvable substructure: a nuclear
# substructure as a second label would contradict it.
_INCOMPATIBLE: frozenset[frozenset[str]] = frozenset(
    {frozenset({"Nucleus", "Nucleoli"}), frozenset({"Nucleus", "Nuclear speckles"})}
)
_BOX_IOU_MAX = 0.05  # placement limit; callers may rely on IoU < 0.1
_BOX_IOU_MAX_TOUCHING = 0.3  # the same with ``touching``: neighbours' boxes overlap, less than half
_PLACEMENT_TRIES = 300


@dataclass(frozen=True)
class SynthParams:
    """Size and randomness of a synthetic data set."""

    proteins: int = opt(60, "number of proteins (groups)")
    fields_min: int = opt(3, "fields per protein at least")
    fields_max: int = opt(4, "fields per protein at most (drawn uniformly in [fields_min, fields_max])")
    cells_min: int = opt(4, "cells per field at least")
    cells_max: int = opt(7, "cells per field at most")
    field_size: int = opt(512, "square field side in pixels")
    cell_size: int = opt(110, "typical cell diameter in pixels (varies +-20 %)")
    poor_fraction: float = opt(0.2, "fraction of fields of poor quality")
    label_skew: float = opt(1.0, "class imbalance: 1 = HPA-like (Nucleoplasm ~5x Golgi), 0 = uniform")
    seed: int = opt(0, "random seed of the whole data set")
    touching: float | None = opt(
        None,
        "dense fields: cells may touch, their bodies overlapping by up to this fraction of cell_size "
        "(0: touching, no overlap; default none: a gap between cells)",
    )

    def __post_init__(self) -> None:
        """Raise :class:`InputError` naming the first inconsistent parameter."""
        if self.proteins < 1:
            raise InputError(f"proteins must be >= 1, got {self.proteins}")
        if not 1 <= self.fields_min <= self.fields_max:
            raise InputError(f"need 1 <= fields_min <= fields_max, got {self.fields_min}, {self.fields_max}")
        if not 1 <= self.cells_min <= self.cells_max:
            raise InputError(f"need 1 <= cells_min <= cells_max, got {self.cells_min}, {self.cells_max}")
        if self.cell_size < 16:
            raise InputError(f"cell_size must be >= 16, got {self.cell_size}")
        if self.field_size < 2 * self.cell_size:
            raise InputError(f"field_size ({self.field_size}) must be >= 2 * cell_size ({self.cell_size})")
        if not 0.0 <= self.poor_fraction <= 1.0:
            raise InputError(f"poor_fraction must be in [0, 1], got {self.poor_fraction}")
        if self.label_skew < 0:
            raise InputError(f"label_skew must be >= 0, got {self.label_skew}")
        if self.seed < 0:
            raise InputError(f"seed must be >= 0, got {self.seed}")
        if self.touching is not None and not 0.0 <= self.touching <= 0.25:
            raise InputError(f"touching must be in [0, 0.25] (or none), got {self.touching}")


@dataclass(frozen=True)
class _Protein:
    index: int
    group: str
    labels: tuple[str, ...]  # in LOCATIONS order
    weights: tuple[float, ...]  # relative brightness of each label's pattern
    intensity: float  # overall green brightness of this protein


@dataclass(frozen=True)
class _FieldSpec:
    image_id: str
    protein: _Protein
    field_index: int
    quality: str
    params: SynthParams


@dataclass
class _Cell:
    """One cell drawn on a local canvas (float32 masks in [0, 1]); coordinates are local (x, y)."""

    scale: float  # cell_size / 110: pattern sizes scale with it
    radius: float  # mean radius of the cell body
    body: np.ndarray  # binary uint8 mask of the cell body
    body_soft: np.ndarray
    nucleus: np.ndarray  # binary uint8 mask of the nucleus
    nucleus_soft: np.ndarray
    cyto_soft: np.ndarray  # body minus nucleus
    nuc_dist: np.ndarray  # distance (px) from the nucleus, 0 inside
    nuc_center: tuple[float, float]
    nuc_axes: tuple[float, float]
    nuc_angle: float  # degrees, as cv2.ellipse
    nucleoli: np.ndarray  # (k, 3): x, y, radius
    mtoc_dir: float  # radians: side of the nucleus facing most cytoplasm (Golgi, centrosome)

    @property
    def shape(self) -> tuple[int, int]:
        return self.body.shape  # type: ignore[return-value]


@dataclass
class _FieldResult:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: list[tuple[int, int, int, int]]  # x0, y0, x1, y1 (exclusive)
    cell_masks: np.ndarray | None = None  # int16 (H, W): 0 background, i + 1 for cell i
    nucleus_masks: np.ndarray | None = None


# --------------------------------------------------------------------------------------------- public


def generate(out_dir: str | Path, params: SynthParams, workers: int = 1) -> pd.DataFrame:
    """Generate a synthetic data set under ``out_dir`` and return its images table.

    Writes ``images/<image_id>.png`` (RGB), ``images.tsv`` (columns ``image_id, group, path, labels,
    quality``; ``path`` relative to ``out_dir``) and ``boxes.tsv`` (``image_id, x0, y0, x1, y1``, one row
    per cell, x1/y1 exclusive). Every write is atomic. ``workers > 1`` renders fields in parallel processes
    and gives byte-identical output; the processes are *spawned* (safe when the caller has threads, e.g.
    torch), so a calling script needs the usual ``if __name__ == "__main__":`` guard. Files of an earlier
    run with other parameters are not removed.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    specs = _plan(params)
    tasks = [(spec, str(out_dir)) for spec in specs]
    if workers > 1 and len(specs) > 1:
        ctx = multiprocessing.get_context("spawn")  # safe even if the caller has threads (torch)
        with ProcessPoolExecutor(min(workers, len(specs)), mp_context=ctx, initializer=_init_worker) as pool:
            chunk = max(1, len(tasks) // (8 * workers))
            all_boxes = list(pool.map(_write_field, tasks, chunksize=chunk))
    else:
        all_boxes = [_write_field(task) for task in tasks]

    images = pd.DataFrame(
        {
            "image_id": [s.image_id for s in specs],
            "group": [s.protein.group for s in specs],
            "path": [f"images/{s.image_id}.png" for s in specs],
            "labels": [";".join(s.protein.labels) for s in specs],
            "quality": [s.quality for s in specs],
        },
        columns=list(IMAGES_COLUMNS),
    )
    rows = [(s.image_id, *box) for s, boxes in zip(specs, all_boxes, strict=True) for box in boxes]
    boxes_table = pd.DataFrame(rows, columns=list(BOXES_COLUMNS))
    write_tsv(boxes_table, out_dir / "boxes.tsv")
    write_tsv(images, out_dir / "images.tsv")
    return images


# ------------------------------------------------------------------------------------------- planning


def _plan(params: SynthParams) -> list[_FieldSpec]:
    """Draw proteins, their labels and field counts, and which fields are of poor quality."""
    proteins: list[_Protein] = []
    counts: list[int] = []
    for p in range(params.proteins):
        rng = np.random.default_rng([params.seed, 1, p])
        proteins.append(_draw_protein(p, rng, params.label_skew))
        counts.append(int(rng.integers(params.fields_min, params.fields_max + 1)))

    n_fields = sum(counts)
    rng = np.random.default_rng([params.seed, 0])
    n_poor = int(round(params.poor_fraction * n_fields))
    poor_kinds = [QUALITIES[1 + i % 4] for i in range(n_poor)]
    rng.shuffle(poor_kinds)
    quality = ["good"] * n_fields
    for idx, kind in zip(rng.permutation(n_fields)[:n_poor], poor_kinds, strict=True):
        quality[int(idx)] = kind

    specs: list[_FieldSpec] = []
    for protein, count in zip(proteins, counts, strict=True):
        for f in range(count):
            image_id = f"{protein.group}_F{f + 1:02d}"
            specs.append(_FieldSpec(image_id, protein, f, quality[len(specs)], params))
    return specs


def _draw_protein(index: int, rng: np.random.Generator, skew: float = 1.0) -> _Protein:
    """Draw 1-3 compatible labels with HPA-like class imbalance (``skew``: 1 HPA-like, 0 uniform)."""
    n_labels = int(rng.choice(3, p=_LABEL_COUNT_P)) + 1
    chosen: list[str] = []
    p = _LOCATION_WEIGHTS**skew / (_LOCATION_WEIGHTS**skew).sum()
    while len(chosen) < n_labels:
        name = LOCATIONS[int(rng.choice(len(LOCATIONS), p=p))]
        if name in chosen or any(frozenset({name, c}) in _INCOMPATIBLE for c in chosen):
            continue
        chosen.append(name)
    return _make_protein(index, chosen, rng)


def _make_protein(index: int, labels: Sequence[str], rng: np.random.Generator) -> _Protein:
    ordered = tuple(name for name in LOCATIONS if name in labels)
    unknown = set(labels) - set(LOCATIONS)
    if unknown or not ordered:
        raise ValueError(f"labels must be a non-empty subset of LOCATIONS, got {list(labels)}")
    weights = tuple(float(w) for w in rng.uniform(0.7, 1.0, len(ordered)))
    intensity = float(rng.uniform(0.55, 1.0))
    return _Protein(index, f"P{index + 1:04d}", ordered, weights, intensity)


# ------------------------------------------------------------------------------------------ rendering


def _init_worker() -> None:
    cv2.setNumThreads(1)


def _write_field(task: tuple[_FieldSpec, str]) -> list[tuple[int, int, int, int]]:
    """Render one field and write its PNG atomically; return its cell boxes."""
    spec, out_dir = task
    result = _render_field(spec)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(result.image[:, :, ::-1]))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {spec.image_id}")
    with atomic_path(Path(out_dir) / "images" / f"{spec.image_id}.png") as tmp:
        tmp.write_bytes(buf.tobytes())
    return result.boxes


def _field_rng(spec: _FieldSpec) -> np.random.Generator:
    return np.random.default_rng([spec.params.seed, 2, spec.protein.index, spec.field_index])


def _render_field(spec: _FieldSpec, with_masks: bool = False) -> _FieldResult:
    """Place cells without overlap, draw the three channels, then degrade the field per its quality."""
    params = spec.params
    rng = _field_rng(spec)
    size = params.field_size
    img = np.empty((size, size, 3), np.float32)
    img[:] = rng.uniform(0.015, 0.035, 3).astype(np.float32)  # dark background, per channel
    occupied = np.zeros((size, size), np.uint8)
    cell_masks = np.zeros((size, size), np.int16) if with_masks else None
    nucleus_masks = np.zeros((size, size), np.int16) if with_masks else None
    boxes: list[tuple[int, int, int, int]] = []
    n_cells = int(rng.integers(params.cells_min, params.cells_max + 1))
    for _ in range(n_cells):
        cell = _make_cell(rng, params.cell_size)
        iou_max = _BOX_IOU_MAX if params.touching is None else _BOX_IOU_MAX_TOUCHING
        where = _place(cell, occupied, boxes, rng, iou_max)
        if where is None:
            continue
        x, y = where
        h, w = cell.shape
        window = (slice(y, y + h), slice(x, x + w))
        img[window] += _render_cell(cell, spec.protein, spec.quality == "nosignal", rng)
        occupied[window] |= _claimed(cell, params.touching, params.cell_size)
        ys, xs = np.nonzero(cell.body)
        boxes.append((x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1))
        if cell_masks is not None and nucleus_masks is not None:
            cell_masks[window][cell.body > 0] = len(boxes)
            nucleus_masks[window][cell.nucleus > 0] = len(boxes)

    img += _gaussian(img.shape, 0.008, rng)
    img = _degrade(img, spec.quality, params.cell_size, rng)
    img *= 255.0
    img += 0.5
    image = np.clip(img, 0.0, 255.0, out=img).astype(np.uint8)
    return _FieldResult(image, boxes, cell_masks, nucleus_masks)


def _claimed(cell: _Cell, touching: float | None, cell_size: int) -> np.ndarray:
    """The pixels of the cell's canvas that no later cell body may cover, ``(h, w)`` uint8: the body grown by
    a gap (``touching`` None), or the body shrunk by ``touching * cell_size`` (neighbours touch, overlap)."""
    if touching is None:
        gap = max(2, int(round(3 * cell.scale)))
        return cv2.dilate(cell.body, np.ones((2 * gap + 1, 2 * gap + 1), np.uint8))
    shrink = int(round(touching * cell_size))
    if shrink == 0:
        return cell.body
    return cv2.erode(cell.body, np.ones((2 * shrink + 1, 2 * shrink + 1), np.uint8))


def _place(
    cell: _Cell,
    occupied: np.ndarray,
    boxes: list[tuple[int, int, int, int]],
    rng: np.random.Generator,
    iou_max: float = _BOX_IOU_MAX,
) -> tuple[int, int] | None:
    """Find a top-left corner where the cell's canvas fits, its body is free and its box overlaps the other
    boxes by IoU < ``iou_max``."""
    h, w = cell.shape
    size = occupied.shape[0]
    if h > size or w > size:
        return None
    ys, xs = np.nonzero(cell.body)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    for _ in range(_PLACEMENT_TRIES):
        x = int(rng.integers(0, size - w + 1))
        y = int(rng.integers(0, size - h + 1))
        if np.any(occupied[y : y + h, x : x + w] & cell.body):
            continue
        shifted = (box[0] + x, box[1] + y, box[2] + x, box[3] + y)
        if all(_iou(shifted, other) < iou_max for other in boxes):
            return x, y
    return None


def _iou(a: Sequence[int], b: Sequence[int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


# ------------------------------------------------------------------------------------------- geometry


def _make_cell(rng: np.random.Generator, cell_size: int) -> _Cell:
    """An irregular elliptical cell body with an off-centre nucleus and 2-4 nucleoli, on its own canvas."""
    scale = cell_size / 110.0
    a = cell_size / 2.0 * rng.uniform(0.8, 1.2)
    b = a * rng.uniform(0.65, 0.95)
    angle = rng.uniform(0.0, math.pi)
    theta = np.linspace(0.0, 2 * math.pi, 72, endpoint=False)
    wobble = np.ones_like(theta)
    for k in range(2, 6):
        wobble += rng.uniform(0.0, 0.12 / k) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    ex, ey = a * wobble * np.cos(theta), b * wobble * np.sin(theta)
    ca, sa = math.cos(angle), math.sin(angle)
    outline = np.stack([ex * ca - ey * sa, ex * sa + ey * ca], axis=1)

    pad = int(math.ceil(3 * scale)) + 3
    outline -= outline.min(axis=0) - pad
    w, h = (np.ceil(outline.max(axis=0)).astype(int) + pad + 1).tolist()
    body = np.zeros((h, w), np.uint8)
    cv2.fillPoly(body, [_fixed(outline)], 1, lineType=cv2.LINE_8, shift=4)
    center = outline.mean(axis=0)

    nuc_center, nuc_axes, nuc_angle = _place_nucleus(body, center, min(a, b), math.degrees(angle), rng)
    nucleus = np.zeros_like(body)
    _draw_ellipse(nucleus, nuc_center, nuc_axes, nuc_angle, 1, -1)
    body_soft = _soft(body, 0.8)
    nucleus_soft = _soft(nucleus, 0.8)
    nuc_dist = cv2.distanceTransform(1 - nucleus, cv2.DIST_L2, 3)

    offset = center - np.asarray(nuc_center)
    if np.hypot(*offset) > 0.05 * b:
        mtoc_dir = math.atan2(offset[1], offset[0]) + rng.normal(0.0, 0.4)
    else:
        mtoc_dir = rng.uniform(0.0, 2 * math.pi)
    return _Cell(
        scale=scale,
        radius=float(math.sqrt(a * b)),
        body=body,
        body_soft=body_soft,
        nucleus=nucleus,
        nucleus_soft=nucleus_soft,
        cyto_soft=body_soft * (1.0 - nucleus_soft),
        nuc_dist=nuc_dist,
        nuc_center=nuc_center,
        nuc_axes=nuc_axes,
        nuc_angle=nuc_angle,
        nucleoli=_draw_nucleoli(nuc_center, nuc_axes, nuc_angle, rng),
        mtoc_dir=mtoc_dir,
    )


def _place_nucleus(
    body: np.ndarray, center: np.ndarray, minor: float, cell_angle: float, rng: np.random.Generator
) -> tuple[tuple[float, float], tuple[float, float], float]:
    """An elliptical nucleus offset from the cell centre, kept well inside the body."""
    na = minor * rng.uniform(0.5, 0.62)
    nb = na * rng.uniform(0.75, 0.95)
    angle = cell_angle + rng.normal(0.0, 20.0)
    direction = rng.uniform(0.0, 2 * math.pi)
    shift = minor * rng.uniform(0.08, 0.25)
    margin = max(3, int(round(0.12 * minor)))
    inner = cv2.erode(body, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8))
    for _ in range(8):
        c = (float(center[0] + shift * math.cos(direction)), float(center[1] + shift * math.sin(direction)))
        test = np.zeros_like(body)
        _draw_ellipse(test, c, (na, nb), angle, 1, -1)
        if not np.any(test & (1 - inner)):
            return c, (na, nb), angle
        shift *= 0.6
        na, nb = na * 0.95, nb * 0.95
    return (float(center[0]), float(center[1])), (na, nb), angle


def _draw_nucleoli(
    center: tuple[float, float], axes: tuple[float, float], angle: float, rng: np.random.Generator
) -> np.ndarray:
    """2-4 nucleoli (x, y, radius) inside the nucleus, roughly apart from each other."""
    k = int(rng.integers(2, 5))
    out: list[tuple[float, float, float]] = []
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    for _ in range(40):
        if len(out) == k:
            break
        t, r = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0.0, 0.35))
        ex, ey = axes[0] * r * math.cos(t), axes[1] * r * math.sin(t)
        x, y = center[0] + ex * ca - ey * sa, center[1] + ex * sa + ey * ca
        rad = min(axes) * rng.uniform(0.15, 0.22)
        if all(math.hypot(x - ox, y - oy) > 1.2 * (rad + orad) for ox, oy, orad in out):
            out.append((x, y, rad))
    return np.asarray(out, np.float64).reshape(-1, 3)


def _ellipse_radius(axes: tuple[float, float], angle_deg: float, direction: float) -> float:
    """Distance from an ellipse's centre to its outline in image direction ``direction`` (radians)."""
    t = direction - math.radians(angle_deg)
    a, b = axes
    return a * b / math.hypot(b * math.cos(t), a * math.sin(t))


# ---------------------------------------------------------------------------------------- cell pixels


def _render_cell(cell: _Cell, protein: _Protein, nosignal: bool, rng: np.random.Generator) -> np.ndarray:
    """The cell's (h, w, 3) float contribution: red microtubules, green pattern(s), blue nucleus."""
    red = _microtubules(cell, rng) * rng.uniform(0.8, 1.2)
    blue = _nucleus_stain(cell, rng) * rng.uniform(0.75, 1.15)
    if nosignal:
        green = cell.body_soft * rng.uniform(0.02, 0.05)  # unspecific autofluorescence
    else:
        green = np.zeros(cell.shape, np.float32)
        for name, weight in zip(protein.labels, protein.weights, strict=True):
            green += weight * PATTERNS[name](cell, rng)
        green *= protein.intensity * float(np.clip(rng.lognormal(0.0, 0.2), 0.6, 1.5))
    return np.stack([red, green, blue], axis=2)


def _nucleus_stain(cell: _Cell, rng: np.random.Generator) -> np.ndarray:
    """DAPI-like: bright nucleus with chromatin texture, darker nucleoli."""
    texture = 0.85 + 0.1 * _smooth_noise(cell.shape, 2.0 * cell.scale, rng)
    holes = _soft(_disks(cell.shape, cell.nucleoli), 1.0)
    return 0.7 * cell.nucleus_soft * texture * (1.0 - 0.4 * holes)


def _microtubules(cell: _Cell, rng: np.random.Generator) -> np.ndarray:
    """Faint filaments radiating from the nucleus and centrosome, curving out to the cell edge."""
    n = int(round(34 * cell.scale**0.5))
    steps = int(cell.radius * 2.4 / (3.0 * cell.scale)) + 2
    step = 3.0 * cell.scale
    from_mtoc = rng.random(n) < 0.45
    around = rng.uniform(0.0, 2 * math.pi, n)
    start_dir = np.where(from_mtoc, cell.mtoc_dir + rng.normal(0.0, 0.25, n), around)
    radii = np.array([_ellipse_radius(cell.nuc_axes, cell.nuc_angle, d) for d in start_dir])
    cx, cy = cell.nuc_center
    x = cx + (radii + 2.0) * np.cos(start_dir)
    y = cy + (radii + 2.0) * np.sin(start_dir)
    heading = np.where(from_mtoc, rng.uniform(0.0, 2 * math.pi, n), start_dir + rng.normal(0.0, 0.5, n))
    bend = rng.normal(0.0, 0.06, n)
    points = np.empty((n, steps + 1, 2))
    points[:, 0] = np.stack([x, y], axis=1)
    for i in range(1, steps + 1):
        heading = heading + bend + rng.normal(0.0, 0.12, n)
        points[:, i, 0] = points[:, i - 1, 0] + step * np.cos(heading)
        points[:, i, 1] = points[:, i - 1, 1] + step * np.sin(heading)
    canvas = np.zeros(cell.shape, np.uint8)
    for group in np.array_split(np.arange(n), 3):
        cv2.polylines(
            canvas, [_fixed(points[j]) for j in group], False, int(rng.integers(120, 256)), 1, cv2.LINE_AA, 4
        )
    filaments = cv2.GaussianBlur(canvas.astype(np.float32) / 255.0, (0, 0), 0.6 * cell.scale + 0.2)
    haze = 0.05 + 0.05 * np.exp(-cell.nuc_dist / (0.4 * cell.radius))
    return cell.body_soft * (haze + 0.25 * filaments)


# ------------------------------------------------------------------------------------- green patterns


def _nucleoplasm(cell: _Cell, rng: np.random.Generator) -> np.ndarray:
    """Smooth fill of the nucleus with dark holes at the nucleoli."""
    fill = 0.85 + 0.15 * _smooth_noise(cell.shape, 3.0 * cell.scale, rng)
    holes = _soft(_disks(cell.shape, cell.nucleoli, grow=1.1), 0.8)
    return 0.8 * cell.nucleus_soft * fill * (1.0 - 0.85 * holes)


def _nucleus(cell: _Cell, rng: np.random.Generator) -> np.ndarray:
    """Whole nucleus fill (nucleoli included) with a brighter nuclear rim."""
    fill = 0.45 * cell.nucleus_soft * (0.9 + 0.1 * _smooth_noise(cell.shape, 3.0 * cell.scale, rng))
    rim = np.zeros(cell.shape, np.uint8)
    thick = max(2, int(round(2.5 * cell.scale)))
    inner = (cell.nuc_axes[0] - thick / 2, cell.nuc_axes[1] - thick / 2)
    _draw_ellipse(rim, cell.nuc_center, inner, cell.nuc_angle, 255, thick)
    rim_f = _soft(rim, 0.5 + 0.4 * cell.scale) / 255.0
    return np.maximum(fill, rim_f)


def _nucleoli(cell: _Cell, rng: np.random.Generator) -> np.ndarray:
    """2-4 bright round blobs inside the nucleus over a faint nucleoplasm."""
    blobs = _soft(_disks(cell.shape, cell.nucleoli, values=rng.uniform(0.75, 1.0, len(cell.nucleoli))), 0.8)
    return np.maximum(blobs, 0.07 * cell.nucleus_soft)


def _nuclear_speckles(cell: _Cell, rng: np.random.Generator) -> np.ndarray:
    """10-25 small bright dots in the nucleus (outside nucleoli) over a faint diffuse nucleoplasm."""
    allowed = cell.nucleus & (1 - _disks(cell.shape, cell.nucleoli, grow=1.2))
    allowed = cv2.erode(allowed, np.ones((3, 3), np.uint8))
    n = int(rng.integers(10, 26))
    xy = _sample_pixels(allowed, n, rng)
    radius = rng.uniform(1.3, 2.3, len(xy)) * cell.scale
    dots = _disks(cell.shape, np.column_stack([xy, radius]), values=rng.uniform(0.65, 1.0, len(xy)))
    return np.maximum(_soft(dots, 0.6 * cell.scale), 0.12 * cell.nucleus_soft)


def _cytosol(cell: _Cell, rng: np.random.Generator) -> np.ndarray:
    """Smooth diffuse fill of the cytoplasm, excluding the nucleus."""
    fill = 0.7 + 0.15 * _smooth_noise(cell.shape, 6.0 * cell.scale, rng)
    return 0.75 * cell.cyto_soft * fill


def _mitochondria(cell: _Cell, rng: np.random.Generator) -> np.ndarray:
    """Many short thick wormy segments in the cytoplasm, denser around the nucleus."""
    area = float(cell.cyto_soft.sum())
    n = int(area / (75.0 * cell.scale**2))
    weight = np.exp(-cell.nuc_dist / (0.6 * cell.radius)) * (cell.cyto_soft > 0.5)
    start = _sample_pixels(weight, n, rng).astype(np.float64)
    heading = rng.uniform(0.0, 2 * math.pi, len(start))
    step = rng.uniform(2.5, 4.0, len(start))[:, None] * cell.scale
    points = [start]
    for _ in range(3):
        heading = heading + rng.normal(0.0, 0.6, len(start))
        points.append(points[-1] + step * np.stack([np.cos(heading), np.sin(heading)], axis=1))
    worms = np.stack(points, axis=1)
    canvas = np.zeros(cell.shape, np.uint8)
    thick = max(2, int(round(2.4 * cell.scale)))
    for group in np.array_split(np.arange(len(worms)), 3):
        cv2.polylines(
            canvas,
            [_fixed(worms[j]) for j in group],
            False,
            int(rng.integers(150, 256)),
            thick,
            cv2.LINE_AA,
            4,
        )
    return 0.95 * cell.cyto_soft * _soft(canvas, 0.5 * cell.scale) / 255.0


def _plasma_membrane(cell: _Cell, rng: np.random.Generator) -> np.ndarray:
    """A thin bright ring along the cell outline, over a very faint cytosol."""
    thick = max(1, int(round(2.0 * cell.scale)))
    ring = cell.body - cv2.erode(cell.body, np.ones((2 * thick + 1, 2 * thick + 1), np.uint8))
    variation = np.clip(0.8 + 0.25 * _smooth_noise(cell.shape, 5.0 * cell.scale, rng), 0.3, 1.0)
    ring_f = _soft(ring.astype(np.float32), 0.6) * variation * cell.body_soft
    return np.maximum(ring_f, 0.05 * cell.cyto_soft)


def _vesicles(cell: _Cell, rng: np.random.Generator) -> np.ndarray:
    """Many small round dots scattered in the cytoplasm, over a faint cytosol."""
    area = float(cell.cyto_soft.sum())
    n = int(area / (140.0 * cell.scale**2))
    allowed = cv2.erode((cell.cyto_soft > 0.5).astype(np.uint8), np.ones((3, 3), np.uint8))
    xy = _sample_pixels(allowed, n, rng)
    radius = rng.uniform(1.4, 2.6, len(xy)) * cell.scale
    dots = _disks(cell.shape, np.column_stack([xy, radius]), values=rng.uniform(0.5, 1.0, len(xy)))
    return np.maximum(_soft(dots, 0.5 * cell.scale) * cell.cyto_soft, 0.05 * cell.cyto_soft)


def _golgi(cell: _Cell, rng: np.random.Generator) -> np.ndarray:
    """A compact bright crescent of broken arcs and blobs, hugging one side of the nucleus."""
    canvas = np.zeros(cell.shape, np.uint8)
    gap = 2.5 * cell.scale
    mid = math.degrees(cell.mtoc_dir) - cell.nuc_angle  # ellipse parameter angle facing the MTOC
    half = rng.uniform(30.0, 55.0)
    center = (int(round(cell.nuc_center[0] * 16)), int(round(cell.nuc_center[1] * 16)))
    edges = np.sort(rng.uniform(mid - half, mid + half, 2 * int(rng.integers(2, 4))))
    for start, stop in edges.reshape(-1, 2):  # 2-3 arc pieces at slightly different distances
        thick = max(2, int(round(rng.uniform(2.5, 4.5) * cell.scale)))
        dist = gap + thick / 2 + rng.uniform(0.0, 2.0) * cell.scale
        axes = (int(round((cell.nuc_axes[0] + dist) * 16)), int(round((cell.nuc_axes[1] + dist) * 16)))
        value = int(rng.integers(180, 256))
        cv2.ellipse(canvas, center, axes, cell.nuc_angle, start, stop, value, thick, cv2.LINE_AA, 4)
    n_blobs = int(rng.integers(6, 13))
    arc = np.radians(mid + rng.uniform(-1.2 * half, 1.2 * half, n_blobs) + cell.nuc_angle)
    dist = np.array([_ellipse_radius(cell.nuc_axes, cell.nuc_angle, t) for t in arc])
    dist = dist + gap + rng.uniform(1.0, 8.0, n_blobs) * cell.scale
    xy = np.asarray(cell.nuc_center) + dist[:, None] * np.stack([np.cos(arc), np.sin(arc)], axis=1)
    radius = rng.uniform(1.5, 3.0, n_blobs) * cell.scale
    blobs = _disks(cell.shape, np.column_stack([xy, radius]), values=rng.uniform(0.6, 1.0, n_blobs))
    golgi = np.maximum(canvas.astype(np.float32) / 255.0, blobs)
    return np.maximum(_soft(golgi, 0.8 * cell.scale) * cell.cyto_soft, 0.04 * cell.cyto_soft)


def _endoplasmic_reticulum(cell: _Cell, rng: np.random.Generator) -> np.ndarray:
    """A fine reticular net (zero crossings of a smooth random field), densest around the nucleus."""
    field = _smooth_noise(cell.shape, 2.6 * cell.scale, rng)
    net = np.exp(-((field / 0.35) ** 2))
    fade = np.exp(-cell.nuc_dist / (0.35 * cell.radius))
    return cell.cyto_soft * fade * (0.2 + 0.8 * net)


PATTERNS: dict[str, Callable[[_Cell, np.random.Generator], np.ndarray]] = {
    "Nucleoplasm": _nucleoplasm,
    "Cytosol": _cytosol,
    "Nucleus": _nucleus,
    "Mitochondria": _mitochondria,
    "Plasma membrane": _plasma_membrane,
    "Nucleoli": _nucleoli,
    "Vesicles": _vesicles,
    "Golgi apparatus": _golgi,
    "Endoplasmic reticulum": _endoplasmic_reticulum,
    "Nuclear speckles": _nuclear_speckles,
}
"""One green pattern per location: ``pattern(cell, rng)`` -> float32 image in about [0, 1]."""


# ------------------------------------------------------------------------------------------ degrading


def _degrade(img: np.ndarray, quality: str, cell_size: int, rng: np.random.Generator) -> np.ndarray:
    """Apply a poor-quality effect to the whole float field (``good`` and ``nosignal`` leave it as is)."""
    if quality == "blur":
        return cv2.GaussianBlur(img, (0, 0), rng.uniform(0.045, 0.065) * cell_size)
    if quality == "dim":
        return img * rng.uniform(0.15, 0.3)
    if quality == "noisy":
        photons = rng.uniform(15.0, 30.0)
        shot = rng.poisson(np.clip(img, 0.0, None) * photons).astype(np.float32) / photons
        return shot + _gaussian(img.shape, rng.uniform(0.06, 0.1), rng)
    if quality == "nosignal":  # the cells already have no pattern: add a faint, uneven haze
        haze = 0.02 + 0.01 * _smooth_noise(img.shape[:2], 0.5 * cell_size, rng)
        img[:, :, 1] += haze + _gaussian(haze.shape, 0.01, rng)
        return img
    return img


# ------------------------------------------------------------------------------------------- helpers


def _fixed(points: np.ndarray) -> np.ndarray:
    """Float (x, y) points -> int32 fixed point with 4 fractional bits (cv2 ``shift=4``)."""
    return np.round(np.asarray(points) * 16.0).astype(np.int32)


def _draw_ellipse(
    img: np.ndarray,
    center: tuple[float, float],
    axes: tuple[float, float],
    angle: float,
    value: int,
    thick: int,
) -> None:
    c = (int(round(center[0] * 16)), int(round(center[1] * 16)))
    ax = (max(1, int(round(axes[0] * 16))), max(1, int(round(axes[1] * 16))))
    line = cv2.LINE_8 if thick < 0 else cv2.LINE_AA
    cv2.ellipse(img, c, ax, angle, 0.0, 360.0, value, thick, line, 4)


def _disks(
    shape: tuple[int, int], disks: np.ndarray, grow: float = 1.0, values: np.ndarray | None = None
) -> np.ndarray:
    """Filled circles (x, y, radius rows); uint8 0/1 without ``values``, else float32 with those values."""
    if values is None:
        out = np.zeros(shape, np.uint8)
        for x, y, r in disks:
            cv2.circle(
                out, (int(round(x * 16)), int(round(y * 16))), int(round(r * grow * 16)), 1, -1, cv2.LINE_8, 4
            )
        return out
    out_f = np.zeros(shape, np.float32)
    for (x, y, r), v in zip(disks, values, strict=True):
        cv2.circle(
            out_f,
            (int(round(x * 16)), int(round(y * 16))),
            int(round(r * grow * 16)),
            float(v),
            -1,
            cv2.LINE_8,
            4,
        )
    return out_f


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smoothed float32 copy of a mask."""
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)


def _gaussian(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Float32 white gaussian noise."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= np.float32(sigma)
    return noise


def _smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (away from the borders)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    smooth = cv2.GaussianBlur(white, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return smooth * np.float32(2.0 * math.sqrt(math.pi) * sigma)


def _sample_pixels(weight: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` (x, y) pixel positions drawn with probability proportional to ``weight`` (sub-pixel jitter)."""
    flat = weight.astype(np.float64).ravel()
    total = flat.sum()
    if n <= 0 or total <= 0:
        return np.zeros((0, 2))
    idx = rng.choice(flat.size, size=n, p=flat / total)
    ys, xs = np.divmod(idx, weight.shape[1])
    return np.column_stack([xs, ys]) + rng.uniform(-0.5, 0.5, (n, 2))


# ------------------------------------------------------------------------------------------- preview


def _preview_field(
    labels: Sequence[str], params: SynthParams, quality: str = "good", field_index: int = 0, protein: int = 0
) -> _FieldResult:
    """Render one field of a protein with the given labels (for previews and tests), with cell masks."""
    rng = np.random.default_rng([params.seed, 3, protein])
    spec = _FieldSpec(
        f"X{protein:04d}_F{field_index + 1:02d}",
        _make_protein(protein, labels, rng),
        field_index,
        quality,
        params,
    )
    return _render_field(spec, with_masks=True)

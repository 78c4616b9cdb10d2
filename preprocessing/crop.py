"""The crop stage: cell patches cut from the fields of one shard of ``images.tsv``, one Zarr store per shard.

:class:`CropParams` (the stage's parameters) lives here. Proposals come from :mod:`preprocessing.proposals`;
kept boxes are optionally squared, cut from the full-resolution field and resized to the patch size.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
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
    BOX_COLUMNS,
    DEFAULT_MAX_BAD_FRACTION,
    IMAGES_COLUMNS,
    PATCH_COLUMNS,
    atomic_path,
    check_rejected,
    read_images_table,
    read_table,
    write_json,
    write_tsv,
)
from preprocessing.microscopy import READ_JSON, ReadSpec, load_read_spec, read_field
from preprocessing.options import opt
from preprocessing.proposals import BACKENDS, OPENCV_MODES, propose_boxes
from preprocessing.seeded import THRESHOLDS
from preprocessing.store import create_patch_array, seal_patches

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "PATCH_COLUMNS",
    "CropParams",
    "crop_field",
    "crop_shard",
    "cut_patches",
    "params_from_attrs",
    "patch_windows",
    "propose_boxes",
]

INSTANCE_MODES = ("cells", "whole")
REJECTED_COLUMNS = ("image_id", "path", "reason")


@dataclass(frozen=True)
class CropParams:
    """Parameters of proposal, filtering and cropping (stored in the Zarr attributes); checked on creation."""

    backend: str = opt(
        "opencv",
        "cell boxes from: opencv (selective search, ximgproc), selectivesearch (the package the paper used) "
        "or seeded (cells grown from their nuclei; see docs/crop-backends.md)",
        choices=BACKENDS,
    )
    downscale: int = opt(512, "longest side of the field on which proposals are computed")
    patch_size: int = opt(512, "output patch side")
    min_size: float = opt(0.08, "smallest box side, fraction of the field's shorter side")
    max_size: float = opt(0.45, "largest box side, fraction of the field's shorter side")
    max_aspect: float = opt(2.0, "largest box aspect ratio (long side / short side)")
    nms_iou: float = opt(
        0.3, "non-maximum suppression: boxes overlapping a better one by more than this IoU are dropped"
    )
    min_nucleus_fraction: float = opt(
        0.05, "boxes with a smaller fraction of nucleus pixels (nucleus channel above threshold) are dropped"
    )
    max_patches_per_field: int = opt(50, "at most this many patches per field (best scores first)")
    square: bool = opt(True, "expand kept boxes to squares around their centre before resizing")
    min_score: float = opt(
        0.3, "candidates scoring below are dropped (in [0, 1], see preprocessing.proposals)"
    )
    ring: float = opt(
        0.01, "width of the background ring outside a box, fraction of the shorter side (>= 2 px)"
    )
    gamma: float = opt(1.0, "proposal image: intensities (normalised to the 99.5th percentile) ** gamma")
    smooth: float = opt(0.0, "proposal image: Gaussian sigma, fraction of the shorter side (0: none)")
    mask_background: bool = opt(True, "proposal image: background pixels (see foreground mask) set to 0")
    refine: float = opt(0.15, "also score proposals snapped to the foreground within this margin (0: off)")
    drop_border: bool = opt(False, "drop boxes touching the field's edge (cells cut by it)")
    # channel roles: indices into the field's channels (RGB: 0 red, 1 green, 2 blue; a grey field, all
    # channels equal, is nuclei only) or names of a read.channels block, made indices by resolve_roles
    nucleus_channel: str | int = opt(
        2, "channel of the nuclear stain: an index (0 red, 1 green, 2 blue; HPA: 2) or a read.channels name"
    )
    cytoplasm_channels: tuple[str | int, ...] = opt(
        (0, 1),
        "seeded backend: channels showing the cell bodies, indices or names (HPA: 0 1; empty: nuclei only)",
        nargs="*",
    )
    # opencv backend
    opencv_mode: str = opt("single", "opencv backend: fast (switchToSelectiveSearchFast), single or quality")
    opencv_k: int = opt(300, "opencv backend: graph-segmentation k (base_k for fast/quality; inc_k = k)")
    opencv_sigma: float = opt(0.8, "opencv backend: graph-segmentation Gaussian sigma")
    # selectivesearch backend (felzenszwalb parameters at the downscaled resolution)
    ss_scale: float = opt(100.0, "selectivesearch backend: felzenszwalb scale at the downscaled resolution")
    ss_sigma: float = opt(0.9, "selectivesearch backend: felzenszwalb sigma")
    ss_min_size: int = opt(50, "selectivesearch backend: felzenszwalb minimum component size")
    # seeded backend (at the downscaled resolution)
    seeded_sigma: float = opt(
        1.0, "seeded backend: Gaussian sigma (px at the working resolution) before thresholding"
    )
    seeded_threshold: str = opt(
        "local",
        "seeded backend: nucleus threshold, local (window 1.5 nucleus diameters) or otsu, li, triangle",
        choices=THRESHOLDS,
    )
    seeded_split: float = opt(
        0.25, "seeded backend: touching nuclei split at centres this many nucleus diameters apart or more"
    )
    # whole images as instances (BDGP embryos, already cropped patches): no proposals, just a resize
    instances: str = opt(
        "cells", "cells (boxes proposed and cut) or whole (each image is one instance, resized)"
    )
    whole_size: tuple[int, int] | None = opt(
        None, "HEIGHT WIDTH of whole-image instances (default: patch_size square)"
    )

    @property
    def instance_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the instances this stage writes."""
        if self.instances == "whole" and self.whole_size is not None:
            return int(self.whole_size[0]), int(self.whole_size[1])
        return self.patch_size, self.patch_size

    def __post_init__(self) -> None:
        if self.instances not in INSTANCE_MODES:
            raise InputError(f"instances must be one of {', '.join(INSTANCE_MODES)}; got {self.instances!r}")
        if self.whole_size is not None and (len(self.whole_size) != 2 or min(self.whole_size) < 1):
            raise InputError(f"whole_size must be (height, width) >= 1; got {self.whole_size!r}")
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
        self._check_roles_and_seeded()

    def _check_roles_and_seeded(self) -> None:
        """Channel roles (digits as indices) and seeded-backend parameters (one line naming the first bad
        one; an index past the field's channels is refused when a field is cut)."""
        object.__setattr__(self, "nucleus_channel", _role(self.nucleus_channel, "nucleus_channel"))
        roles = tuple(_role(c, "cytoplasm_channels") for c in self.cytoplasm_channels)
        object.__setattr__(self, "cytoplasm_channels", roles)
        if self.seeded_threshold not in THRESHOLDS:
            raise InputError(
                f"seeded_threshold must be one of {', '.join(THRESHOLDS)}; got {self.seeded_threshold!r}"
            )
        if self.seeded_sigma < 0 or self.seeded_split <= 0:
            raise InputError("crop parameters: need seeded_sigma >= 0 and seeded_split > 0")


def _role(channel: str | int, name: str) -> str | int:
    """A channel role as given: an index (digits become one) or a name; one line for a negative index."""
    if isinstance(channel, str) and channel.strip().lstrip("-").isdigit():
        channel = int(channel)
    if isinstance(channel, int) and channel < 0:
        raise InputError(f"{name}: channel {channel} is negative (an index from 0, or a channel name)")
    return channel


def resolve_roles(params: CropParams, spec: ReadSpec | None) -> CropParams:
    """``params`` with channel-role names made indices into the chosen channels of ``spec`` (the names
    given in ``read.channels`` or the files' own, case-insensitively); one line for an unknown name."""
    names = _role_names(spec)

    def index(channel: str | int, name: str) -> int:
        if isinstance(channel, int):
            return channel
        for i, known in enumerate(names):
            if channel.lower() in known:
                return i
        given = ", ".join("/".join(sorted(k)) for k in names) or "none: the data set has no read.channels"
        raise InputError(f"{name}: no chosen channel named {channel!r} (chosen: {given})")

    nucleus = index(params.nucleus_channel, "nucleus_channel")
    cytoplasm = tuple(index(c, "cytoplasm_channels") for c in params.cytoplasm_channels)
    return replace(params, nucleus_channel=nucleus, cytoplasm_channels=cytoplasm)


def _role_names(spec: ReadSpec | None) -> list[set[str]]:
    """Per chosen channel, the lower-case names it goes by (as given in read.channels, as the file says)."""
    if spec is None or spec.params.channels is None:
        return []
    files = list(spec.channel_names) + [""] * len(spec.params.channels)
    return [{str(given).lower(), files[i].lower()} - {""} for i, given in enumerate(spec.params.channels)]


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
    return win, bx.clip(win, shape[1], shape[0])


def cut_patches(field: np.ndarray, boxes: np.ndarray, patch_size: int, square: bool) -> np.ndarray:
    """Cut and resize one patch per box of a field ``(H, W, C)``: ``(n, C, P, P)`` uint8, channels first.

    With ``square`` each box is first expanded to a square around its centre; parts of the square outside
    the field are padded with zeros (the cell stays centred). Without it the box is resized as is.
    """
    windows, clipped = patch_windows(boxes, field.shape[:2], square)
    out = np.zeros((len(windows), field.shape[2], patch_size, patch_size), dtype=np.uint8)  # (n, C, P, P)
    for i, (win, cut) in enumerate(zip(windows, clipped, strict=True)):
        out[i] = _resize(_window(field, win, cut), patch_size).transpose(2, 0, 1)
    return out


def _window(field: np.ndarray, win: np.ndarray, cut: np.ndarray) -> np.ndarray:
    """The field's pixels in ``win`` (x0, y0, x1, y1), zero outside the field: ``(h, w, C)``."""
    x0, y0, x1, y1 = (int(v) for v in win)
    cx0, cy0, cx1, cy1 = (int(v) for v in cut)
    if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
        return field[y0:y1, x0:x1]
    canvas = np.zeros((max(y1 - y0, 1), max(x1 - x0, 1), field.shape[2]), dtype=field.dtype)
    canvas[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = field[cy0:cy1, cx0:cx1]
    return canvas


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    shrink = img.shape[0] > size or img.shape[1] > size
    out = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return out.reshape(size, size, img.shape[2])  # OpenCV drops a single channel's axis


# --------------------------------------------------------------------------------------------- shards


@dataclass
class _FieldResult:
    image_id: str
    boxes: np.ndarray  # (n, 4) kept boxes, before square expansion
    windows: np.ndarray  # (n, 4) patch windows clipped to the field
    patches: np.ndarray  # (n, C, H, W) uint8 (H = W = P for cells)
    error: str | None = None  # InputError message when the image was unreadable


def crop_field(field: np.ndarray, params: CropParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The instances of one field ``(H, W, C)`` uint8, exactly as the crop stage cuts them.

    Returns ``(boxes (n, 4), windows (n, 4), patches (n, C, h, w) uint8)``: the kept boxes before square
    expansion, the patch windows clipped to the field (x0, y0, x1, y1) and the patches, ``(h, w)`` being
    ``params.instance_shape``. With ``params.instances == "whole"`` the field is one instance resized to
    that shape (box and window: the whole field); otherwise cells are proposed and cut (``n`` may be 0).
    """
    if params.instances == "whole":
        height, width = params.instance_shape
        box = np.array([[0, 0, field.shape[1], field.shape[0]]], dtype=np.int64)  # (1, 4)
        patch = cv2.resize(field, (width, height), interpolation=cv2.INTER_AREA)  # (H, W, C)
        patch = patch.reshape(height, width, field.shape[2])  # OpenCV drops a single channel's axis
        return box, box, patch.transpose(2, 0, 1)[None]  # (1, C, H, W)
    view, roles = proposal_view(field, params)
    boxes = propose_boxes(view, roles)  # (n, 4)
    _, clipped = patch_windows(boxes, field.shape[:2], params.square)
    patches = cut_patches(field, boxes, params.patch_size, params.square)  # (n, C, P, P)
    return boxes, clipped, patches


def proposal_view(field: np.ndarray, params: CropParams) -> tuple[np.ndarray, CropParams]:
    """What the box finders see of a field ``(H, W, C)``, and the roles pointing into it: the seeded backend
    all channels (its roles index them); OpenCV and selective search, which take colour images, three:
    grey repeated, a second channel's third left black, of more channels two others and the nucleus
    channel last. A role past the field's channels is one line."""
    channels = field.shape[2]
    bad = [c for c in (params.nucleus_channel, *params.cytoplasm_channels) if not 0 <= int(c) < channels]
    if bad and (params.backend != "seeded" or channels != 3):
        raise InputError(
            f"channel role {bad[0]} out of range for fields of {channels} channels: set crop.nucleus_channel "
            "(and cytoplasm_channels) to the chosen channels"
        )
    if params.backend == "seeded" or channels == 3:
        return field, params
    if channels == 1:
        return np.repeat(field, 3, axis=2), params
    if channels == 2:
        return np.concatenate([field, np.zeros_like(field[:, :, :1])], axis=2), params
    nucleus = int(params.nucleus_channel)
    others = [c for c in range(channels) if c != nucleus][:2]
    view = np.ascontiguousarray(field[:, :, [*others, nucleus]])  # (H, W, 3), the nucleus last
    return view, replace(params, nucleus_channel=2)


def read_shard_field(row: dict[str, str], spec: ReadSpec | None) -> np.ndarray:
    """One row's field ``(H, W, C)`` uint8: as ``spec`` (the acquire stage's ``read.json``) reads it, else
    as :func:`preprocessing.io.read_image` (RGB); with ``scene: all`` the scene of the row's ``scene``
    column."""
    scene = int(row["scene"]) if spec is not None and spec.params.scene == "all" else None
    return read_field(row["path"], spec, scene)


def _process_field(row: dict[str, str], params: CropParams, spec: ReadSpec | None) -> _FieldResult:
    """Read one field and crop it; an unreadable image gives a result with ``error`` set."""
    empty = np.zeros((0, 4), dtype=np.int64)
    try:
        field = read_shard_field(row, spec)
    except InputError as err:
        channels = spec.channels_out if spec is not None else 3
        return _FieldResult(row["image_id"], empty, empty, np.zeros((0, channels, 1, 1), np.uint8), str(err))
    boxes, clipped, patches = crop_field(field, params)
    return _FieldResult(row["image_id"], boxes, clipped, patches)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core: no nested OpenCV threads


def _run_fields(
    rows: list[dict[str, str]], params: CropParams, workers: int, spec: ReadSpec | None
) -> Iterator[_FieldResult]:
    """Process fields with dask in batches (bounded memory), yielding results in input order."""
    batch = 2 * workers
    if workers <= 1:
        for start in range(0, len(rows), batch):
            tasks = [dask.delayed(_process_field)(row, params, spec) for row in rows[start : start + batch]]
            yield from dask.compute(*tasks, scheduler="synchronous")
        return
    ctx = multiprocessing.get_context("spawn")  # safe with threads in the parent
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        for start in range(0, len(rows), batch):
            tasks = [dask.delayed(_process_field)(row, params, spec) for row in rows[start : start + batch]]
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
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
) -> dict[str, Any]:
    """Crop the fields of one shard of ``images.tsv`` (rows ``i`` with ``i % num_shards == shard``).

    Writes (each atomically):

    * ``out_zarr``: Zarr v3 group, array ``patches`` uint8 ``(N, 3, H, W)`` chunked per patch (zstd),
      attributes ``patch_shape`` and ``params``; with ``params.instances == "whole"`` every image is one
      instance resized to ``params.instance_shape`` (no proposals);
    * ``out_tsv``: one row per patch, in ``patches`` order: ``patch_index, image_id, group, labels, x0, y0,
      x1, y1`` (the patch window in field pixels, clipped) and the extra columns of ``images.tsv``;
    * ``<stem>.rejected.tsv`` beside ``out_tsv``: unreadable images (``image_id, path, reason``), always;
    * ``<stem>.json`` beside ``out_tsv``: the returned stats (``fields, fields_rejected, patches, recall,
      backend, seconds`` and more). ``recall`` (IoU >= 0.5, boxes before square expansion) needs
      ``boxes_tsv`` (true boxes: ``image_id, x0, y0, x1, y1``), else it is null.

    Raises :class:`InputError` when more than ``max_bad_fraction`` of the shard's images (or all of them) are
    unreadable (the rejected list is written, the patch outputs are not).
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
    spec = load_read_spec(images_tsv.parent / READ_JSON)
    params = resolve_roles(params, spec)  # names of read.channels -> indices (recorded so in the store)

    with atomic_path(out_zarr) as tmp:
        run = _crop_rows(rows, tmp, params, workers, truth, spec)
        seal_patches(tmp)
        check_rejected(
            pd.DataFrame(run.rejected, columns=list(REJECTED_COLUMNS)),
            len(rows),
            out_tsv.with_name(f"{out_tsv.stem}.rejected.tsv"),
            max_bad_fraction,
            str(images_tsv),
            problem="unreadable",
        )
    extra = [c for c in table.columns if c not in IMAGES_COLUMNS]
    write_tsv(pd.DataFrame(run.records, columns=[*PATCH_COLUMNS, *extra]), out_tsv)
    stats = _stats(shard, num_shards, len(rows), run, truth is not None, params)
    stats.update(_patch_yield(rows, run, str(images_tsv), shard))
    stats["seconds"] = round(time.perf_counter() - start, 3)
    write_json(stats, out_tsv.with_name(f"{out_tsv.stem}.json"))
    return stats


@dataclass
class _ShardRun:
    """What cropping one shard produced, in ``patches`` order."""

    records: list[dict[str, Any]]  # one row of the patch table per patch
    rejected: list[dict[str, str]]  # one row per unreadable image (REJECTED_COLUMNS)
    hits: dict[str, tuple[int, int]]  # image_id -> (true boxes matched, true boxes)


def _crop_rows(
    rows: pd.DataFrame,
    store: Path,
    params: CropParams,
    workers: int,
    truth: dict[str, np.ndarray] | None,
    spec: ReadSpec | None,
) -> _ShardRun:
    """Crop every row's field, appending its patches to a new Zarr store at ``store``."""
    run = _ShardRun([], [], {})
    patches = _create_store(store, params, spec)
    by_id = {r["image_id"]: r for r in rows.to_dict("records")}
    for result in _run_fields(list(by_id.values()), params, workers, spec):
        row = by_id[result.image_id]
        if result.error is not None:
            run.rejected.append({"image_id": result.image_id, "path": row["path"], "reason": result.error})
            continue
        if len(result.patches):
            patches.append(result.patches, axis=0)
        run.records.extend(_patch_records(row, result.windows, first=len(run.records)))
        if truth is not None:
            true = truth.get(result.image_id, np.zeros((0, 4), np.int64))
            run.hits[result.image_id] = (int(bx.matched(result.boxes, true).sum()), len(true))
    return run


#: warn when more than this fraction of a shard's readable fields give no patch (a bad read or crop setting)
FEW_PATCHES_FRACTION = 0.25


def _patch_yield(rows: pd.DataFrame, run: _ShardRun, origin: str, shard: int) -> dict[str, Any]:
    """The shard's readable fields without any patch, and the groups it saw (the bag stage counts the
    groups that got no patch in any shard); a warning when many fields gave none."""
    rejected = {r["image_id"] for r in run.rejected}
    readable = rows[~rows["image_id"].isin(rejected)]
    with_patches = {r["image_id"] for r in run.records}
    empty = int((~readable["image_id"].isin(with_patches)).sum())
    if len(readable) and empty > FEW_PATCHES_FRACTION * len(readable):
        log.warning(
            "%s shard %d: %d of %d fields gave no patch (%d patches in all): check the read block and the "
            "crop settings on a few fields (hamil crop-preview)",
            origin,
            shard,
            empty,
            len(readable),
            len(run.records),
        )
    return {"fields_without_patches": empty, "groups": sorted(set(readable["group"]))}


def params_from_attrs(values: Mapping[str, Any], origin: str = "crop parameters") -> CropParams:
    """:class:`CropParams` from the JSON form stored in Zarr attributes (lists become tuples).

    Unknown keys raise :class:`InputError` naming them and ``origin`` (the file they came from).
    """
    known = {f.name for f in fields(CropParams)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"{origin}: unknown crop parameter(s): {', '.join(unknown)}")
    return CropParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _create_store(path: Path, params: CropParams, spec: ReadSpec | None) -> Any:
    """A new Zarr v3 group at ``path`` with an empty ``patches`` array to append to (attributes: patch
    shape, crop parameters and, when the acquire stage recorded one, the read spec)."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.attrs.update({"patch_shape": list(params.instance_shape), "params": asdict(params)})
    if spec is not None:
        group.attrs["read"] = spec.to_dict()
    return create_patch_array(group, 0, spec.channels_out if spec else 3, params.instance_shape)


def _patch_records(row: dict[str, str], windows: np.ndarray, first: int) -> list[dict[str, Any]]:
    extra = {k: v for k, v in row.items() if k not in IMAGES_COLUMNS}
    return [
        {
            "patch_index": first + i,
            "image_id": row["image_id"],
            "group": row["group"],
            "labels": row["labels"],
            **{name: int(v) for name, v in zip(BOX_COLUMNS, window, strict=True)},
            **extra,
        }
        for i, window in enumerate(windows)
    ]


def _read_true_boxes(path: Path) -> dict[str, np.ndarray]:
    """``boxes.tsv`` -> {image_id: (m, 4) int64}."""
    table = read_table(path, ["image_id", *BOX_COLUMNS])
    try:
        coords = table[list(BOX_COLUMNS)].astype(np.int64).to_numpy()  # (rows, 4)
    except ValueError:
        raise InputError(f"{path}: box coordinates must be integers") from None
    groups = pd.Series(np.arange(len(table))).groupby(table["image_id"].to_numpy(), sort=False)
    return {str(image_id): coords[idx.to_numpy()] for image_id, idx in groups}


def _stats(
    shard: int, num_shards: int, fields: int, run: _ShardRun, with_truth: bool, params: CropParams
) -> dict[str, Any]:
    hits = run.hits
    matched = sum(m for m, _ in hits.values())
    true = sum(t for _, t in hits.values())
    return {
        "shard": shard,
        "num_shards": num_shards,
        "fields": fields,
        "fields_rejected": len(run.rejected),
        "patches": len(run.records),
        "recall": (matched / true if true else None) if with_truth else None,
        "recall_per_field": {k: (m / t if t else None) for k, (m, t) in hits.items()} if with_truth else None,
        "true_boxes": true if with_truth else None,
        "backend": params.backend,
    }

"""``hamil predict``: a trained checkpoint applied to your own images, grouped into bags.

Input is either a folder with one sub-folder per bag (the sub-folder's name is the bag id; images with the
extensions of :data:`preprocessing.sources.folder.EXTENSIONS` inside it), or a TSV with the columns ``bag``
and ``path`` (relative paths resolved against the TSV's folder). Every image is checked before anything
runs; a missing or unreadable one stops with one line naming the file.

Instances are made the way the checkpoint's training data were: with the crop parameters the bag store
recorded (``ckpt["store_attrs"]["crop"]``) cells are proposed and cut (``instances: cells``) or each image
is resized to the instance shape (``instances: whole``); a checkpoint without them (older versions) gets
whole images resized to its ``patch_shape``, with a warning. Bags are read, cropped and classified a batch
at a time, so memory holds one batch of bags, never the whole input.

Outputs in ``out_dir`` (each written atomically): ``predictions.tsv`` (``bag, n_instances, p_<class>...,
labels``), ``skipped.tsv`` (``bag, n_images, reason``: bags that gave no instance) and, on request,
``instances.tsv`` (``bag, path, x0, y0, x1, y1, score``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hamil.checkpoint import load_checkpoint, model_from_checkpoint
from hamil.models import MILModel
from hamil.runtime import select_device
from hamil.tables import INSTANCE_COLUMNS, SKIPPED_COLUMNS, add_probabilities, label_lists
from preprocessing.crop import CropParams, crop_field, params_from_attrs
from preprocessing.errors import InputError
from preprocessing.io import read_image, read_table, resolve_path, write_tsv
from preprocessing.sources.folder import EXTENSIONS, check_image

__all__ = [
    "BagImages",
    "InstanceBag",
    "bag_instances",
    "crop_params_of",
    "predict_images",
    "read_bags",
    "read_thresholds",
    "thresholds_for",
]

log = logging.getLogger(__name__)

PREDICTION_FILE = "predictions.tsv"
INSTANCE_FILE = "instances.tsv"
SKIPPED_FILE = "skipped.tsv"


@dataclass(frozen=True)
class BagImages:
    """One input bag: its id and its images (``paths`` to read, ``shown`` as written to the outputs)."""

    bag: str
    paths: tuple[Path, ...]
    shown: tuple[str, ...]


@dataclass
class InstanceBag:
    """The instances of one bag: ``patches (n, 3, H, W)`` uint8, ``boxes (n, 4)`` and each one's image."""

    bag: str
    n_images: int
    patches: np.ndarray
    boxes: np.ndarray
    sources: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ input


def read_bags(inputs: str | os.PathLike[str], skip: Path | None = None) -> list[BagImages]:
    """The bags of ``inputs`` (a folder of bag sub-folders, or a ``bag``/``path`` TSV), every image checked.

    ``skip`` is a folder to leave out when it lies inside ``inputs`` (the output folder). Raises
    :class:`InputError` with one line for a missing input, no bags, an empty bag, or the first unusable
    image (missing, not an image, undecodable), naming it.
    """
    inputs = Path(inputs)
    if inputs.is_dir():
        bags = _bags_from_folder(inputs, skip)
    elif inputs.is_file():
        bags = _bags_from_table(inputs)
    else:
        raise InputError(f"{inputs}: input not found (give a folder of bag folders or a bag/path TSV)")
    _check_images(bags)
    return bags


def _bags_from_folder(root: Path, skip: Path | None) -> list[BagImages]:
    """One bag per visible sub-folder of ``root``, sorted by name; images sorted by file name."""
    skip = skip.resolve() if skip is not None else None
    folders = sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.resolve() != skip
    )
    if not folders:
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in EXTENSIONS]
        hint = (
            f"; {len(loose)} images lie directly in it: put each bag's images in a sub-folder"
            if loose
            else ""
        )
        raise InputError(f"{root}: no bags (no sub-folders){hint}")
    bags = []
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in EXTENSIONS]
        if not images:
            raise InputError(
                f"{folder}: no images in this bag folder (accepted: {' '.join(sorted(EXTENSIONS))})"
            )
        if len(images) < len(files):
            log.warning("%s: ignored %d file(s) that are not images", folder, len(files) - len(images))
        shown = tuple(str(p.relative_to(root)) for p in images)
        bags.append(BagImages(folder.name, tuple(images), shown))
    return bags


def _bags_from_table(table: Path) -> list[BagImages]:
    """Bags of a ``bag``/``path`` TSV in order of first appearance; images in table order."""
    rows = read_table(table, ["bag", "path"])
    if rows.empty:
        raise InputError(f"{table}: no images listed (the table has a header but no rows)")
    base = table.resolve().parent
    grouped: dict[str, list[str]] = {}
    for line, (bag, cell) in enumerate(zip(rows["bag"], rows["path"], strict=True), start=2):
        if not bag.strip() or not cell.strip():
            raise InputError(f"{table}: line {line}: empty {'bag' if not bag.strip() else 'path'}")
        grouped.setdefault(bag.strip(), []).append(cell.strip())
    bags = []
    for bag, cells in grouped.items():
        paths = tuple(resolve_path(cell, base) for cell in cells)
        bags.append(BagImages(bag, paths, tuple(cells)))
    return bags


def _check_images(bags: Sequence[BagImages]) -> None:
    """Check every image (extension, existence, full decode); one line naming the first bad file."""
    bad = []
    for bag in bags:
        for path in bag.paths:
            reason = check_image(path)
            if reason is not None:
                bad.append(f"{path}: {reason.replace(f' ({path})', '')}")
    if bad:
        more = f" (and {len(bad) - 1} more unusable image(s))" if len(bad) > 1 else ""
        raise InputError(bad[0] + more)


def read_thresholds(path: str | os.PathLike[str], class_names: Sequence[str]) -> np.ndarray:
    """Per-class thresholds ``(K,)`` from a ``per_class.tsv`` of ``hamil evaluate``.

    The tuned column (``threshold_tuned``) is required: a table evaluated with ``--tune-split none`` has
    none. Every checkpoint class must have a row with a number in ``[0, 1]``.
    """
    table = read_table(path, ["class"])
    if "threshold_tuned" not in table.columns:
        raise InputError(f"{path}: no threshold_tuned column (evaluate with a tune split to get one)")
    values = dict(zip(table["class"], table["threshold_tuned"], strict=True))
    missing = [c for c in class_names if c not in values]
    if missing:
        raise InputError(f"{path}: no threshold for class(es) {', '.join(missing)}")
    try:
        out = np.array([float(values[c]) for c in class_names], dtype=np.float64)  # (K,)
    except ValueError:
        raise InputError(f"{path}: threshold_tuned must hold numbers") from None
    if not np.all((out >= 0) & (out <= 1)):
        raise InputError(f"{path}: thresholds must be in [0, 1]")
    return out


# ------------------------------------------------------------------------------------------ instances


def crop_params_of(store_attrs: dict, checkpoint: str | os.PathLike[str]) -> CropParams:
    """The crop parameters to cut instances with, from a checkpoint's ``store_attrs``.

    Without recorded parameters (checkpoints of older versions) each image becomes one instance resized to
    the checkpoint's ``patch_shape``, and a warning says so.
    """
    height, width = (int(v) for v in store_attrs["patch_shape"])
    crop = store_attrs.get("crop")
    if crop is None:
        log.warning(
            "%s: the checkpoint does not record how its data were cropped; each image is used whole, "
            "resized to %dx%d",
            checkpoint,
            height,
            width,
        )
        return CropParams(instances="whole", whole_size=(height, width), patch_size=height)
    params = params_from_attrs(crop, f"{checkpoint}: store_attrs.crop")
    if params.instance_shape != (height, width):
        raise InputError(
            f"{checkpoint}: crop instance shape {params.instance_shape} differs from patch_shape "
            f"{(height, width)}"
        )
    return params


def bag_instances(bag: BagImages, params: CropParams) -> InstanceBag:
    """Read and crop every image of one bag as the crop stage does: patches ``(n, 3, H, W)`` uint8."""
    patches, boxes, sources = [], [], []
    for path, shown in zip(bag.paths, bag.shown, strict=True):
        _, windows, cut = crop_field(read_image(path), params)  # (m, 4), (m, 3, H, W)
        patches.append(cut)
        boxes.append(windows)
        sources.extend([shown] * len(cut))
    height, width = params.instance_shape
    return InstanceBag(
        bag.bag,
        len(bag.paths),
        np.concatenate(patches) if patches else np.zeros((0, 3, height, width), np.uint8),  # (n, 3, H, W)
        np.concatenate(boxes).reshape(-1, 4),  # (n, 4)
        sources,
    )


def _batches(bags: Sequence[BagImages], size: int) -> Iterator[Sequence[BagImages]]:
    for start in range(0, len(bags), size):
        yield bags[start : start + size]


# ------------------------------------------------------------------------------------------ the model


@torch.no_grad()
def _score_batch(
    model: MILModel, batch: Sequence[InstanceBag], device: torch.device, explain: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities ``(B, K)`` of the bags of ``batch`` and, with ``explain``, instance scores ``(N,)``."""
    images = torch.from_numpy(np.concatenate([b.patches for b in batch])).to(device)  # (N, 3, H, W) uint8
    sizes = torch.tensor([len(b.patches) for b in batch], dtype=torch.long, device=device)  # (B,)
    if explain:
        out = model.explain(images, sizes)
        logits, scores = out.logits, out.instance_scores.float().cpu().numpy()  # (B, K), (N,)
    else:
        logits, scores = model(images, sizes)[0], None  # (B, K)
    return torch.sigmoid(logits.float()).cpu().numpy(), scores


def _instance_rows(batch: Sequence[InstanceBag], scores: np.ndarray) -> list[dict]:
    rows, offset = [], 0
    for b in batch:
        for source, box, score in zip(
            b.sources, b.boxes, scores[offset : offset + len(b.patches)], strict=True
        ):
            x0, y0, x1, y1 = (int(v) for v in box)
            rows.append(
                {
                    "bag": b.bag,
                    "path": source,
                    "x0": x0,
                    "y0": y0,
                    "x1": x1,
                    "y1": y1,
                    "score": round(float(score), 6),
                }
            )
        offset += len(b.patches)
    return rows


def _prediction_table(
    done: Sequence[tuple[str, int]], probs: np.ndarray, class_names: Sequence[str], thresholds: np.ndarray
) -> pd.DataFrame:
    """``bag, n_instances, p_<class>..., labels`` from probabilities ``(B, K)`` and thresholds ``(K,)``."""
    table = add_probabilities(pd.DataFrame(done, columns=["bag", "n_instances"]), probs, class_names)
    table["labels"] = label_lists(probs >= thresholds, class_names)
    return table


# ------------------------------------------------------------------------------------------ entry point


def predict_images(
    checkpoint: str | os.PathLike[str],
    inputs: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    threshold: float = 0.5,
    thresholds: str | os.PathLike[str] | None = None,
    instance_scores: bool = False,
    device: str = "auto",
    batch_bags: int = 8,
) -> Path:
    """Classify the bags of ``inputs`` with ``checkpoint``; write the outputs into ``out_dir``, return it.

    ``labels`` holds the classes whose probability is ``>= threshold``, or ``>=`` the per-class tuned
    thresholds of a ``per_class.tsv`` given as ``thresholds``. ``instance_scores`` also writes
    ``instances.tsv``: each instance's window in its image and its score (:meth:`MILModel.explain`: the
    aggregator's own scores, or the cosine similarity to the bag feature). Bags that give no instance (no
    cell found) are left out of ``predictions.tsv`` and listed in ``skipped.tsv``.
    """
    out = Path(out_dir)
    ckpt = load_checkpoint(checkpoint)
    class_names = list(ckpt["class_names"])
    cut = thresholds_for(class_names, threshold, thresholds)
    params = crop_params_of(ckpt.get("store_attrs") or {}, checkpoint)
    bags = read_bags(inputs, skip=out)
    dev = select_device(device)
    model = model_from_checkpoint(ckpt, dev)
    log.info(
        "predict: %d bags, %d images, instances: %s %s, on %s",
        len(bags),
        sum(len(b.paths) for b in bags),
        params.instances,
        params.instance_shape,
        dev,
    )
    limit = ((ckpt.get("store_attrs") or {}).get("bags") or {}).get("max_bag_size")
    done, probs, instance_rows, skipped = _run(model, bags, params, dev, batch_bags, instance_scores, limit)
    _write_outputs(out, done, probs, class_names, cut, instance_rows, skipped, instance_scores)
    return out


def _warn_large_bags(batch: Sequence[InstanceBag], limit: int | None) -> None:
    """Training bags held at most ``max_bag_size`` instances; bags with many more instances are out of
    distribution (and slow for tree models, whose depth grows with the bag). Said as soon as a batch is
    cut, before it is classified."""
    if limit is None:
        return
    large = [b.bag for b in batch if len(b.patches) > int(limit)]
    if large:
        log.warning(
            "%d bag(s) have more instances than the training bags had (max_bag_size %d), e.g. %s; "
            "consider splitting them",
            len(large),
            int(limit),
            ", ".join(large[:3]),
        )


def thresholds_for(
    class_names: Sequence[str], threshold: float, path: str | os.PathLike[str] | None
) -> np.ndarray:
    """Per-class thresholds ``(K,)``: tuned ones from ``path`` (a ``per_class.tsv``), else ``threshold``."""
    if path is None:
        return np.full(len(class_names), float(threshold))
    return read_thresholds(path, class_names)


def _run(
    model: MILModel,
    bags: Sequence[BagImages],
    params: CropParams,
    device: torch.device,
    batch_bags: int,
    explain: bool,
    max_bag_size: int | None = None,
) -> tuple[list[tuple[str, int]], np.ndarray, list[dict], list[dict]]:
    """Crop and classify batch by batch; only one batch's patches are in memory at a time.

    Returns ``(bag, n_instances)`` of the scored bags, their probabilities ``(B, K)``, instance rows and
    skipped-bag rows.
    """
    done: list[tuple[str, int]] = []
    probs: list[np.ndarray] = []
    instance_rows: list[dict] = []
    skipped: list[dict] = []
    for chunk in _batches(bags, batch_bags):
        batch = []
        for item in (bag_instances(bag, params) for bag in chunk):
            if len(item.patches):
                batch.append(item)
                continue
            log.warning("bag %s: no instance found in its %d image(s); skipped", item.bag, item.n_images)
            skipped.append(
                {"bag": item.bag, "n_images": item.n_images, "reason": "no cell found in any image"}
            )
        if not batch:
            continue
        _warn_large_bags(batch, max_bag_size)
        p, scores = _score_batch(model, batch, device, explain)  # (b, K), (n,)
        probs.append(p)
        if scores is not None:
            instance_rows.extend(_instance_rows(batch, scores))
        done.extend((b.bag, len(b.patches)) for b in batch)
    return done, (np.concatenate(probs) if probs else np.zeros((0, 0))), instance_rows, skipped


def _write_outputs(
    out: Path,
    done: Sequence[tuple[str, int]],
    probs: np.ndarray,
    class_names: Sequence[str],
    thresholds: np.ndarray,
    instance_rows: list[dict],
    skipped: list[dict],
    instance_scores: bool,
) -> None:
    """Write ``skipped.tsv`` (always), then ``predictions.tsv`` and ``instances.tsv`` if a bag was scored."""
    out.mkdir(parents=True, exist_ok=True)
    write_tsv(pd.DataFrame(skipped, columns=list(SKIPPED_COLUMNS)), out / SKIPPED_FILE)
    if skipped:
        log.warning(
            "%d bag(s) gave no instance and were skipped, listed in %s", len(skipped), out / SKIPPED_FILE
        )
    if not done:
        raise InputError(f"no bag gave any instance; nothing to predict (see {out / SKIPPED_FILE})")
    write_tsv(_prediction_table(done, probs, class_names, thresholds), out / PREDICTION_FILE)
    if instance_scores:
        write_tsv(pd.DataFrame(instance_rows, columns=list(INSTANCE_COLUMNS)), out / INSTANCE_FILE)
    log.info("predictions for %d bag(s) in %s", len(done), out / PREDICTION_FILE)

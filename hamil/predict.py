"""``hamil predict``: a trained checkpoint applied to your own images, grouped into bags.

Input is either a folder with one sub-folder per bag (the sub-folder's name is the bag id; images with the
extensions of :data:`preprocessing.sources.folder.EXTENSIONS` inside it), or a TSV with a ``path`` column
and a ``bag`` or ``group`` column (relative paths resolved against the TSV's folder). The training table of
the ``folder`` source (``path, group, labels[, split]``) is such a TSV: each group is one bag (a ``bag``
column, when present, is the bag and ``group`` the group it belongs to); with a ``labels`` column
(``;``-separated, empty for a negative bag) the bags' labels are known and metrics are written; ``split``
with a ``split`` column keeps only that split's rows. Every image is checked before anything runs; a
missing or unreadable one stops with one line naming the file.

Instances are made the way the checkpoint's training data were: with the crop parameters the bag store
recorded (``ckpt["store_attrs"]["crop"]``) cells are proposed and cut (``instances: cells``) or each image
is resized to the instance shape (``instances: whole``); a checkpoint without them (older versions) gets
whole images resized to its ``patch_shape``, with a warning. Bags are read, cropped and classified a batch
at a time, so memory holds one batch of bags, never the whole input.

Outputs in ``out_dir`` (each written atomically), in the layouts ``hamil evaluate`` writes
(:mod:`hamil.tables`): ``predictions.tsv`` (``bag_id, group, n_instances[, true_labels],
predicted_labels[, predicted_labels_tuned], p_<class>...``), ``skipped.tsv`` (``bag_id, n_images, reason``:
bags that gave no instance), on request ``instances.tsv`` (``bag_id, group, instance, source_image, x0,
y0, x1, y1, score``) and, when the labels are known, ``metrics.json`` and ``per_class.tsv`` computed as
``hamil evaluate`` computes them (:func:`hamil.evaluate.score_report`) over the bags scored.
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
from hamil.evaluate import INSTANCE_FILE, METRICS_FILE, PER_CLASS_FILE, PREDICTION_FILE, score_report
from hamil.metrics import TunedThresholds
from hamil.models import MILModel
from hamil.runtime import select_device
from hamil.tables import SKIPPED_COLUMNS, instance_table, prediction_table
from preprocessing.crop import CropParams, crop_field, params_from_attrs
from preprocessing.errors import InputError
from preprocessing.io import read_table, resolve_path, split_labels, write_json, write_tsv
from preprocessing.microscopy import ReadParams, ReadSpec, channel_indices, open_stack, read_fields
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

SKIPPED_FILE = "skipped.tsv"


@dataclass(frozen=True)
class BagImages:
    """One input bag: its id and its images (``paths`` to read, ``shown`` as written to the outputs), the
    group it belongs to ("": the bag itself) and its labels (None: not known)."""

    bag: str
    paths: tuple[Path, ...]
    shown: tuple[str, ...]
    group: str = ""
    labels: tuple[str, ...] | None = None

    @property
    def group_id(self) -> str:
        return self.group or self.bag


@dataclass
class InstanceBag:
    """The instances of one bag: ``patches (n, 3, H, W)`` uint8, ``boxes (n, 4)`` and each one's image."""

    bag: str
    n_images: int
    patches: np.ndarray
    boxes: np.ndarray
    sources: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ input


def read_bags(
    inputs: str | os.PathLike[str],
    skip: Path | None = None,
    split: str | None = None,
    read: ReadParams | None = None,
) -> list[BagImages]:
    """The bags of ``inputs`` (a folder of bag sub-folders, or a TSV), every image checked (as ``read``,
    the training data's read block, chooses its planes).

    ``skip`` is a folder to leave out when it lies inside ``inputs`` (the output folder); ``split`` keeps
    only a table's rows with that value in its ``split`` column. Raises :class:`InputError` with one line
    for a missing input, no bags, an empty bag, or the first unusable image (missing, not an image,
    undecodable), naming it.
    """
    inputs = Path(inputs)
    if inputs.is_dir():
        if split is not None:
            raise InputError(f"{inputs}: a split can only be chosen from a table with a split column")
        bags = _bags_from_folder(inputs, skip)
    elif inputs.is_file():
        bags = _bags_from_table(inputs, split)
    else:
        raise InputError(
            f"{inputs}: input not found (give a folder of bag folders or a TSV with path and bag or group)"
        )
    _check_names(bags)
    _check_images(bags, read)
    return bags


def _check_names(bags: Sequence[BagImages]) -> None:
    """Refuse, before anything is written, a bag or image name that is not valid UTF-8 (the output
    tables are UTF-8; such a name used to fail half-way through writing them)."""
    for bag in bags:
        for name in (bag.bag, bag.group, *bag.shown, *map(str, bag.paths)):
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                shown = os.fsencode(name).decode("utf-8", "backslashreplace")
                raise InputError(
                    f"{shown}: a name that is not valid UTF-8; rename it (e.g. convmv -f latin1 -t utf8)"
                ) from None


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


def _bags_from_table(table: Path, split: str | None = None) -> list[BagImages]:
    """Bags of a TSV (``path`` and ``bag`` or ``group``; optional ``labels``, ``split``) in order of first
    appearance; images in table order. A bag's labels are its first row's (as the bag stage takes a
    group's); rows of one bag that disagree are warned about."""
    rows = read_table(table, ["path"])
    key = "bag" if "bag" in rows.columns else "group"
    if key not in rows.columns:
        raise InputError(f"{table}: missing columns: bag or group (the bag each image belongs to)")
    if split is not None:
        if "split" not in rows.columns:
            raise InputError(f"{table}: no split column to choose the {split} split from")
        rows = rows[rows["split"].str.strip() == split]
        if rows.empty:
            raise InputError(f"{table}: no rows in the {split} split")
    if rows.empty:
        raise InputError(f"{table}: no images listed (the table has a header but no rows)")
    base = table.resolve().parent
    grouped: dict[str, list[str]] = {}
    group_of: dict[str, str] = {}
    labels_of: dict[str, list[tuple[str, ...]]] = {}
    groups = rows["group"] if "group" in rows.columns else rows[key]
    labels = rows["labels"] if "labels" in rows.columns else None
    for k, (bag, cell, group) in enumerate(zip(rows[key], rows["path"], groups, strict=True)):
        line = int(rows.index[k]) + 2
        if not bag.strip() or not cell.strip():
            raise InputError(f"{table}: line {line}: empty {key if not bag.strip() else 'path'}")
        bag, group = bag.strip(), group.strip() or bag.strip()
        if group_of.setdefault(bag, group) != group:
            raise InputError(f"{table}: line {line}: bag {bag} lies in groups {group_of[bag]} and {group}")
        grouped.setdefault(bag, []).append(cell.strip())
        if labels is not None:
            labels_of.setdefault(bag, []).append(tuple(split_labels(labels.iloc[k])))
    bags = []
    for bag, cells in grouped.items():
        paths = tuple(resolve_path(cell, base) for cell in cells)
        known = labels_of.get(bag)
        if known is not None and len(set(known)) > 1:
            log.warning("%s: bag %s has rows with different labels; its first row's are used", table, bag)
        group = group_of[bag] if group_of[bag] != bag else ""
        bags.append(BagImages(bag, paths, tuple(cells), group, known[0] if known is not None else None))
    return bags


def _check_images(bags: Sequence[BagImages], read: ReadParams | None) -> None:
    """Check every image (extension, existence, full decode); one line naming the first bad file."""
    bad = []
    for bag in bags:
        for path in bag.paths:
            reason = check_image(path, read)
            if reason is not None:
                bad.append(f"{path}: {reason.replace(f' ({path})', '')}")
    if bad:
        more = f" (and {len(bad) - 1} more unusable image(s))" if len(bad) > 1 else ""
        raise InputError(bad[0] + more)


def read_thresholds(
    path: str | os.PathLike[str], class_names: Sequence[str], default: float = 0.5
) -> TunedThresholds:
    """Per-class tuned thresholds from a ``per_class.tsv`` of ``hamil evaluate``.

    The tuned column (``threshold_tuned``) is required: a table evaluated with ``--tune-split none`` has
    none. Every checkpoint class must have a row with a number in ``[0, 1]``. The tuning split's positives
    come from ``tune_positives`` (-1 where a table of an older evaluate lacks it); a class counts as tuned
    where its threshold differs from ``default``.
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
    positives = np.full(len(class_names), -1, dtype=np.int64)
    if "tune_positives" in table.columns:
        counts = dict(zip(table["class"], table["tune_positives"], strict=True))
        try:
            positives = np.array([int(counts[c]) for c in class_names], dtype=np.int64)  # (K,)
        except ValueError:
            raise InputError(f"{path}: tune_positives must hold whole numbers") from None
    return TunedThresholds(out, positives, out != default)


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


def read_spec_of(store_attrs: dict, checkpoint: str | os.PathLike[str]) -> ReadSpec | None:
    """How the training fields were read (the folder source's ``read:`` block and intensity ranges), from
    a checkpoint's ``store_attrs``; ``None`` where the data set recorded none (RGB as read_image reads)."""
    recorded = store_attrs.get("read")
    if recorded is None:
        return None
    try:
        return ReadSpec.from_dict(recorded)
    except (InputError, TypeError, ValueError, KeyError) as err:
        raise InputError(f"{checkpoint}: unreadable store_attrs.read ({err})") from None


def warn_if_unlike_training(path: str | os.PathLike[str], spec: ReadSpec | None, store_attrs: dict) -> None:
    """Warn (once, for the first image) when new images name other channels or have another pixel size
    than the training fields (beyond 1 %)."""
    if spec is None:
        return
    stack = open_stack(path)
    if any(spec.channel_names):  # the training files named their channels
        names = [stack.channel_names[i] for i in channel_indices(stack, spec.params)]
        if [n.lower() for n in names] != [n.lower() for n in spec.channel_names]:
            log.warning("%s: channels %s, the model was trained on %s", path, names, list(spec.channel_names))
    trained = [tuple(p) for p in store_attrs.get("pixel_sizes_um") or []]
    if stack.pixel_size_um is not None and trained:
        x, y = stack.pixel_size_um
        if not any(abs(x - tx) <= 0.01 * tx and abs(y - ty) <= 0.01 * ty for tx, ty in trained):
            log.warning("%s: pixel size %.4g x %.4g µm, the training fields had %s", path, x, y, trained)


def bag_instances(bag: BagImages, params: CropParams, spec: ReadSpec | None = None) -> InstanceBag:
    """Read and crop every image of one bag as the crop stage does: patches ``(n, C, H, W)`` uint8."""
    patches, boxes, sources = [], [], []
    for path, shown in zip(bag.paths, bag.shown, strict=True):
        for image in read_fields(path, spec):  # every chosen scene, from one reading
            _, windows, cut = crop_field(image, params)  # (m, 4), (m, C, H, W)
            patches.append(cut)
            boxes.append(windows)
            sources.extend([shown] * len(cut))
    height, width = params.instance_shape
    channels = spec.channels_out if spec is not None else 3
    return InstanceBag(
        bag.bag,
        len(bag.paths),
        np.concatenate(patches)
        if patches
        else np.zeros((0, channels, height, width), np.uint8),  # (n, C, H, W)
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
    """Logits ``(B, K)`` of the bags of ``batch`` and, with ``explain``, instance scores ``(N,)``."""
    images = torch.from_numpy(np.concatenate([b.patches for b in batch])).to(device)  # (N, 3, H, W) uint8
    sizes = torch.tensor([len(b.patches) for b in batch], dtype=torch.long, device=device)  # (B,)
    if explain:
        out = model.explain(images, sizes)
        logits, scores = out.logits, out.instance_scores.float().cpu().numpy()  # (B, K), (N,)
    else:
        logits, scores = model(images, sizes)[0], None  # (B, K)
    return logits.float().cpu().numpy(), scores


def _instance_rows(batch: Sequence[tuple[BagImages, InstanceBag]], scores: np.ndarray) -> pd.DataFrame:
    """``instances.tsv`` rows of one batch: each instance's bag, position, image, window and score."""
    bag_id, group, instance, source = [], [], [], []
    for bag, item in batch:
        n = len(item.patches)
        bag_id += [bag.bag] * n
        group += [bag.group_id] * n
        instance += range(n)
        source += item.sources
    boxes = np.concatenate([item.boxes for _, item in batch])  # (N, 4)
    return instance_table(bag_id, group, instance, source, boxes, scores)


def _known_labels(bags: Sequence[BagImages], class_names: Sequence[str]) -> np.ndarray | None:
    """Multi-hot labels ``(B, K)`` of ``bags`` when every bag's labels are known, else None. Labels that
    are not checkpoint classes are ignored (as the bag stage ignores classes it did not keep), with a
    warning naming them."""
    if not bags or any(b.labels is None for b in bags):
        return None
    other = sorted({label for b in bags for label in b.labels} - set(class_names))
    if other:
        shown = ", ".join(other[:10]) + (f", ... ({len(other)} in all)" if len(other) > 10 else "")
        log.warning("labels that are not classes of the checkpoint are ignored: %s", shown)
    return np.array([[c in b.labels for c in class_names] for b in bags], dtype=np.float32)  # (B, K)


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
    split: str | None = None,
) -> Path:
    """Classify the bags of ``inputs`` with ``checkpoint``; write the outputs into ``out_dir``, return it.

    ``predicted_labels`` holds the classes whose probability is ``>= threshold``; with ``thresholds`` (a
    ``per_class.tsv`` of ``hamil evaluate``) ``predicted_labels_tuned`` those ``>=`` its tuned thresholds.
    ``instance_scores`` also writes ``instances.tsv``: each instance's window in its image and its score
    (:meth:`MILModel.explain`: the aggregator's own scores, or the cosine similarity to the bag feature).
    Bags that give no instance (no cell found) are left out of ``predictions.tsv`` and listed in
    ``skipped.tsv``. When the input table has labels, ``metrics.json`` and ``per_class.tsv`` are those
    ``hamil evaluate`` would write for the bags scored. ``split`` keeps a table's rows of that split.
    """
    out = Path(out_dir)
    ckpt = load_checkpoint(checkpoint)
    class_names = list(ckpt["class_names"])
    tuned = None if thresholds is None else read_thresholds(thresholds, class_names, threshold)
    params = crop_params_of(ckpt.get("store_attrs") or {}, checkpoint)
    spec = read_spec_of(ckpt.get("store_attrs") or {}, checkpoint)
    dev = select_device(device)
    model = model_from_checkpoint(ckpt, dev, checkpoint)  # before the images: a misfit fails at once
    bags = read_bags(inputs, skip=out, split=split, read=spec.params if spec is not None else None)
    if bags and bags[0].paths:
        warn_if_unlike_training(bags[0].paths[0], spec, ckpt.get("store_attrs") or {})
    log.info(
        "predict: %d bags, %d images, instances: %s %s, on %s",
        len(bags),
        sum(len(b.paths) for b in bags),
        params.instances,
        params.instance_shape,
        dev,
    )
    limit = ((ckpt.get("store_attrs") or {}).get("bags") or {}).get("max_bag_size")
    done, logits, instance_rows, skipped = _run(
        model, bags, params, dev, batch_bags, instance_scores, limit, spec
    )
    _write_skipped(out, skipped, len(done))
    probs = torch.sigmoid(torch.from_numpy(logits)).numpy()  # (B, K), float32 as in evaluate
    scored = [bag for bag, _ in done]
    y = _known_labels(scored, class_names)  # (B, K) or None
    table = prediction_table(
        [b.bag for b in scored],
        [b.group_id for b in scored],
        [n for _, n in done],
        probs,
        class_names,
        threshold,
        y,
        None if tuned is None else tuned.thresholds,
    )
    write_tsv(table, out / PREDICTION_FILE)
    if instance_scores:
        write_tsv(pd.concat(instance_rows, ignore_index=True), out / INSTANCE_FILE)
    log.info("predictions for %d bag(s) in %s", len(done), out / PREDICTION_FILE)
    if y is not None:
        metrics, per_class = score_report(
            y, probs, class_names, threshold, tuned, None if thresholds is None else str(thresholds)
        )
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            torch.from_numpy(logits), torch.from_numpy(y)
        )
        metrics.update(
            {
                "model": ckpt["config"].model,
                "seed": ckpt["config"].seed,
                "split": split,
                "threshold": threshold,
                "loss": float(loss),
                "epoch": ckpt["epoch"],
                "inputs": str(inputs),
                "bags_skipped": len(skipped),
            }
        )
        write_tsv(per_class, out / PER_CLASS_FILE)
        write_json(metrics, out / METRICS_FILE)
        log.info(
            "metrics of %d labelled bag(s) in %s: macro AUC %s, macro F1 %.4f, micro F1 %.4f",
            len(done),
            out / METRICS_FILE,
            metrics["macro_auc"],
            metrics["macro_f1"],
            metrics["micro_f1"],
        )
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
    return read_thresholds(path, class_names, threshold).thresholds


def _run(
    model: MILModel,
    bags: Sequence[BagImages],
    params: CropParams,
    device: torch.device,
    batch_bags: int,
    explain: bool,
    max_bag_size: int | None = None,
    spec: ReadSpec | None = None,
) -> tuple[list[tuple[BagImages, int]], np.ndarray, list[pd.DataFrame], list[dict]]:
    """Crop and classify batch by batch; only one batch's patches are in memory at a time.

    Returns ``(bag, n_instances)`` of the scored bags, their logits ``(B, K)``, instance tables (one per
    batch) and skipped-bag rows.
    """
    done: list[tuple[BagImages, int]] = []
    logits: list[np.ndarray] = []
    instance_rows: list[pd.DataFrame] = []
    skipped: list[dict] = []
    for chunk in _batches(bags, batch_bags):
        batch = []
        for bag in chunk:
            item = bag_instances(bag, params, spec)
            if len(item.patches):
                batch.append((bag, item))
                continue
            log.warning("bag %s: no instance found in its %d image(s); skipped", item.bag, item.n_images)
            skipped.append(
                {"bag_id": item.bag, "n_images": item.n_images, "reason": "no cell found in any image"}
            )
        if not batch:
            continue
        items = [item for _, item in batch]
        _warn_large_bags(items, max_bag_size)
        z, scores = _score_batch(model, items, device, explain)  # (b, K), (n,)
        logits.append(z)
        if scores is not None:
            instance_rows.append(_instance_rows(batch, scores))
        done.extend((bag, len(item.patches)) for bag, item in batch)
    return done, (np.concatenate(logits) if logits else np.zeros((0, 0))), instance_rows, skipped


def _write_skipped(out: Path, skipped: list[dict], scored: int) -> None:
    """Write ``skipped.tsv`` (always); :class:`InputError` when no bag was left to score."""
    out.mkdir(parents=True, exist_ok=True)
    write_tsv(pd.DataFrame(skipped, columns=list(SKIPPED_COLUMNS)), out / SKIPPED_FILE)
    if skipped:
        log.warning(
            "%d bag(s) gave no instance and were skipped, listed in %s", len(skipped), out / SKIPPED_FILE
        )
    if not scored:
        raise InputError(f"no bag gave any instance; nothing to predict (see {out / SKIPPED_FILE})")

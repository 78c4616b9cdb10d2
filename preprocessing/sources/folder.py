"""The ``folder`` source: a user's own images listed in a TSV, turned into the pipeline's ``images.tsv``.

The input TSV has the columns ``path``, ``group`` and ``labels`` (``;``-separated, may be empty: a negative
bag for binary or screening tasks), optionally ``image_id`` and ``split``, and any extra columns, which are
carried over. Paths are relative to ``image_root`` (default: the TSV's folder) or absolute.

``split`` (``train``, ``val`` or ``test``, any case; empty: none) is the data set's own split, kept by the
bag stage; groups left empty are drawn by its ``split_ratio``. It is checked here (one line naming the row
of an invalid value, or a group whose rows give two splits) and written in lower case.

Every image is checked (extension, existence, full decode with :mod:`preprocessing.microscopy`, as the
``read:`` block chooses its planes) before anything is written: a file with more channels, Z planes, time
points or scenes than chosen is refused with one line saying what it holds. Problems are listed in
``<out_dir>/rejected.tsv`` (columns ``path, reason``); unless ``max_bad_fraction`` allows skipping them,
one :class:`InputError` reports them all.

The output ``<out_dir>/images.tsv`` has ``image_id, group, path, labels``, the extra columns, then
``pixel_size_um_x, pixel_size_um_y`` (empty where the file does not say) and, with ``scene: all``, a
``scene`` column (each scene its own field, ``<image_id>_s<k>``). Paths are **absolute** (images are not
copied, so the table stays valid wherever ``out_dir`` lies). ``<out_dir>/read.json`` records how the crop
stage reads the fields (:class:`preprocessing.microscopy.ReadSpec`: the ``read:`` block, the intensity
range of each channel; percentiles are computed here over the ``train`` rows of a ``split`` column, else
over all images). A rerun first removes the ``images.tsv``, ``rejected.tsv`` and ``read.json`` of an
earlier run, so a failed rerun never leaves an earlier ``images.tsv`` behind for the next stage. An image
listed more than once (in one group or in several) is kept but warned about, naming the file and its
groups: it could end up in two splits.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from preprocessing.bags import SPLIT_COLUMN
from preprocessing.errors import InputError
from preprocessing.io import (
    DEFAULT_MAX_BAD_FRACTION,
    IMAGES_COLUMNS,
    check_rejected,
    read_table,
    resolve_path,
    split_labels,
    write_json,
    write_tsv,
)
from preprocessing.microscopy import (
    BIOIO_FORMATS,
    READ_JSON,
    FileInfo,
    ReadParams,
    ReadSpec,
    inspect_file,
    percentile_ranges,
    spec_ranges,
    summary_line,
)
from preprocessing.store import SPLITS

__all__ = ["EXTENSIONS", "REJECTED_COLUMNS", "REQUIRED_COLUMNS", "check_image", "prepare_folder"]

EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", *BIOIO_FORMATS})
REQUIRED_COLUMNS: tuple[str, ...] = ("path", "group", "labels")
REJECTED_COLUMNS: tuple[str, ...] = ("path", "reason")

log = logging.getLogger(__name__)


def prepare_folder(
    table: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    workers: int = 1,
    read: ReadParams | dict | None = None,
) -> pd.DataFrame:
    """Check every image listed in ``table`` and write ``<out_dir>/images.tsv``; return that table.

    ``image_id`` comes from the table when it has that column (empty cells are filled), else from the
    file stem; clashing stems get ``_2``, ``_3``, ... suffixes in table order, so ids do not depend on
    which rows are later rejected. Labels are normalised (whitespace stripped, empty parts dropped).

    ``rejected.tsv`` is always written (header only when every image is fine). When the fraction of
    unusable images exceeds ``max_bad_fraction`` (default 0: none allowed), or no image is usable,
    :class:`InputError` is raised with one line and ``images.tsv`` is not written. ``workers`` threads
    decode images in parallel. ``read``: the data set's ``read:`` block (channels, z, time, scene,
    intensity; default: none chosen).
    """
    params = read if isinstance(read, ReadParams) else ReadParams.from_dict(read)
    table = Path(table)
    out_dir = Path(out_dir)
    _remove_earlier_outputs(out_dir, table)
    rows = read_table(table, REQUIRED_COLUMNS)
    if rows.empty:
        raise InputError(f"{table}: no images listed (the table has a header but no rows)")
    reserved = [c for c in ("scene", "pixel_size_um_x", "pixel_size_um_y") if c in rows.columns]
    if reserved:
        raise InputError(f"{table}: column {reserved[0]!r} is written by this stage; rename it in the table")
    if SPLIT_COLUMN in rows.columns:
        rows[SPLIT_COLUMN] = _checked_splits(rows, table)
    root = (Path(image_root) if image_root is not None else table.parent).resolve()

    ids = _image_ids(rows, table)
    resolved = [str(resolve_path(p.strip(), root)) for p in rows["path"]]
    _warn_repeated_images(rows, resolved, table)
    checked = _check_all(rows, resolved, workers, params)
    reasons = [r for r, _ in checked]
    out_dir.mkdir(parents=True, exist_ok=True)
    _reject_unusable(rows, reasons, table, out_dir, max_bad_fraction)
    keep = [r is None for r in reasons]
    infos = [info for (_, info), k in zip(checked, keep, strict=True) if k]
    out = _images_table(rows, ids, resolved)[keep].reset_index(drop=True)
    spec = _read_spec(params, infos, out)
    out = _with_read_columns(out, infos, params)
    summary = summary_line(infos[0], spec)
    write_json({**spec.to_dict(), "summary": summary}, out_dir / READ_JSON)  # the workflow prints it
    log.info("%s: %s", table, summary)
    write_tsv(out, out_dir / "images.tsv")
    return out


def _read_spec(params: ReadParams, infos: list[FileInfo], out: pd.DataFrame) -> ReadSpec:
    """The spec the crop stage reads with: fixed ranges, or percentiles over the training images (the
    ``train`` rows of a ``split`` column when there are any, else all)."""
    names = tuple(infos[0].channel_names) if params.channels is not None else ()
    ranges = spec_ranges(params, ReadSpec(params).channels_out)
    if params.intensity is not None and "percentiles" in params.intensity:
        train = out[SPLIT_COLUMN].eq("train").to_numpy() if SPLIT_COLUMN in out.columns else None
        pick = train if train is not None and train.any() else [True] * len(infos)
        samples = [info.samples for info, k in zip(infos, pick, strict=True) if k]
        ranges = percentile_ranges(samples, params.intensity["percentiles"])
    return ReadSpec(params, ranges, names)


def _with_read_columns(out: pd.DataFrame, infos: list[FileInfo], params: ReadParams) -> pd.DataFrame:
    """Pixel size columns; with ``scene: all`` one row per scene (``<image_id>_s<k>``, column ``scene``)."""
    out = out.assign(
        pixel_size_um_x=[i.pixel_size["pixel_size_um_x"] for i in infos],
        pixel_size_um_y=[i.pixel_size["pixel_size_um_y"] for i in infos],
    )
    if params.scene != "all":
        return out
    scenes = [i.scenes for i in infos]
    out = out.loc[out.index.repeat([len(s) for s in scenes])].reset_index(drop=True)
    flat = [k for s in scenes for k in s]
    out["image_id"] = [f"{image_id}_s{k}" for image_id, k in zip(out["image_id"], flat, strict=True)]
    out["scene"] = [str(k) for k in flat]
    return out


def _checked_splits(rows: pd.DataFrame, table: Path) -> list[str]:
    """The ``split`` column in lower case; :class:`InputError` (one line) naming the line of the first
    invalid value, or the first group whose rows give two different splits."""
    values = [v.strip().lower() for v in rows[SPLIT_COLUMN]]
    for i, value in enumerate(values):
        if value not in ("", *SPLITS):
            given = rows[SPLIT_COLUMN].iloc[i]
            raise InputError(f"{table}: line {i + 2}: split must be train, val, test or empty, got {given!r}")
    seen: dict[str, str] = {}
    for group, value in zip(rows["group"].str.strip(), values, strict=True):
        if value and seen.setdefault(group, value) != value:
            shown = " and ".join(sorted({seen[group], value}, key=SPLITS.index))
            raise InputError(
                f"{table}: group {group!r} straddles splits {shown}: all rows of a group must give one "
                "split, or none"
            )
    return values


def _remove_earlier_outputs(out_dir: Path, table: Path) -> None:
    """Remove the ``images.tsv`` and ``rejected.tsv`` of an earlier run (never the input ``table``): a
    failed rerun must not leave the earlier ``images.tsv`` beside its own ``rejected.tsv``."""
    for name in ("images.tsv", "rejected.tsv", READ_JSON):
        earlier = out_dir / name
        if earlier.resolve() == table.resolve():
            continue
        if earlier.is_file() or earlier.is_symlink():
            earlier.unlink()
            log.info("removed %s of an earlier run", earlier)


def _warn_repeated_images(rows: pd.DataFrame, resolved: list[str], table: Path, shown: int = 10) -> None:
    """Warn about every image file listed more than once (the first ``shown``), naming its groups."""
    groups: dict[str, list[str]] = {}
    for cell, path, group in zip(rows["path"], resolved, rows["group"], strict=True):
        if cell.strip():
            groups.setdefault(os.path.normpath(path), []).append(group.strip())
    repeated = [(path, names) for path, names in groups.items() if len(names) > 1]
    for path, names in repeated[:shown]:
        if len(set(names)) == 1:
            effect = f"in group {names[0]!r}: its instances count {len(names)} times in that bag"
        else:
            listed = ", ".join(sorted(set(names)))
            effect = f"in groups {listed}: the same image can then sit in train and test"
        log.warning("%s: %s is listed %d times %s", table, path, len(names), effect)
    if len(repeated) > shown:
        log.warning("%s: %d more images are listed more than once", table, len(repeated) - shown)


def _reject_unusable(
    rows: pd.DataFrame, reasons: list[str | None], table: Path, out_dir: Path, max_bad_fraction: float
) -> None:
    """Write ``<out_dir>/rejected.tsv`` (``path, reason``); :class:`InputError` when too many are bad."""
    bad = [i for i, r in enumerate(reasons) if r is not None]
    rejected = pd.DataFrame(
        [(rows["path"].iloc[i], reasons[i]) for i in bad], columns=list(REJECTED_COLUMNS), dtype=str
    )
    check_rejected(
        rejected,
        len(rows),
        out_dir / "rejected.tsv",
        max_bad_fraction,
        str(table),
        problem="unusable",
        first_key="path",
    )


def _images_table(rows: pd.DataFrame, ids: list[str], resolved: list[str]) -> pd.DataFrame:
    """``image_id, group, path, labels`` (absolute paths, normalised labels), then the extra columns."""
    out = pd.DataFrame(
        {
            "image_id": ids,
            "group": rows["group"].str.strip(),
            "path": resolved,
            "labels": [";".join(split_labels(s)) for s in rows["labels"]],
        }
    )
    for col in (c for c in rows.columns if c not in IMAGES_COLUMNS):
        out[col] = rows[col].to_numpy()
    return out


def check_image(path: str | os.PathLike[str], read: ReadParams | None = None) -> str | None:
    """Why the image at ``path`` cannot be used (extension, missing, undecodable, planes not chosen), or
    ``None`` if fine."""
    reason, _ = _inspect(Path(path), read or ReadParams(), 0)
    return reason


def _inspect(path: Path, params: ReadParams, seed: int) -> tuple[str | None, FileInfo | None]:
    if path.suffix.lower() not in EXTENSIONS:
        allowed = " ".join(sorted(EXTENSIONS))
        return f"unsupported extension {path.suffix or '(none)'!r} (accepted: {allowed})", None
    if not (path.is_file() or (path.suffix.lower() == ".zarr" and path.is_dir())):  # OME-Zarr: a folder
        return (f"file not found ({path})" if not path.exists() else f"not a file ({path})"), None
    try:
        return None, inspect_file(path, params, seed)
    except InputError as err:
        msg = str(err)
        prefix = f"{path}: "
        return (msg[len(prefix) :] if msg.startswith(prefix) else msg), None


def _check_all(
    rows: pd.DataFrame, resolved: list[str], workers: int, params: ReadParams
) -> list[tuple[str | None, FileInfo | None]]:
    """One ``(reason, info)`` per row: empty cells first, then the image itself."""

    def one(i: int) -> tuple[str | None, FileInfo | None]:
        if not rows["path"].iloc[i].strip():
            return "empty path", None
        if not rows["group"].iloc[i].strip():
            return "empty group", None
        return _inspect(Path(resolved[i]), params, seed=i)

    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, range(len(rows))))
    return [one(i) for i in range(len(rows))]


def _image_ids(rows: pd.DataFrame, table: Path) -> list[str]:
    """Ids from the ``image_id`` column (empty cells filled from the stem) or from file stems, all unique.

    Explicit ids must be unique (:class:`InputError` otherwise). A derived id is the file stem for the
    first row with that stem; later rows get ``<stem>_2``, ``<stem>_3``, ... skipping any explicit id or
    stem of another row, so the result depends only on the table.
    """
    given = [s.strip() for s in rows["image_id"]] if "image_id" in rows.columns else [""] * len(rows)
    explicit = [g for g in given if g]
    seen: set[str] = set()
    for g in explicit:
        if g in seen:
            raise InputError(f"{table}: duplicate image_id {g!r}")
        seen.add(g)
    stems = [Path(cell.strip()).stem or "image" for cell in rows["path"]]
    taken = set(explicit) | {s for g, s in zip(given, stems, strict=True) if not g}
    first_use = set(explicit)  # a stem is used as is by its first row, unless an explicit id holds it
    ids = []
    for g, stem in zip(given, stems, strict=True):
        if g:
            ids.append(g)
        elif stem not in first_use:
            first_use.add(stem)
            ids.append(stem)
        else:
            k = 2
            while f"{stem}_{k}" in taken:
                k += 1
            taken.add(f"{stem}_{k}")
            ids.append(f"{stem}_{k}")
    return ids

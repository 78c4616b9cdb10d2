"""Atomic writes, table reading with column checks, path cells, the rejected-items check, and image reading
that fails with one clear line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from preprocessing.errors import InputError

log = logging.getLogger(__name__)

IMAGES_COLUMNS = ("image_id", "group", "path", "labels")
# one row per instance written by the crop stage and read by the bag stage (then the extra image columns)
BOX_COLUMNS = ("x0", "y0", "x1", "y1")
PATCH_COLUMNS = ("patch_index", "image_id", "group", "labels", *BOX_COLUMNS)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds.

    Works for files and directories (e.g. a Zarr store). An interrupted write never leaves ``dest``
    looking complete.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    tmp.rmdir()  # the caller creates a file or a directory at this name
    try:
        yield tmp
        if dest.is_dir() and not dest.is_symlink():
            _remove(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def write_tsv(table: pd.DataFrame, dest: str | os.PathLike[str]) -> None:
    """Write a table as TSV atomically (temp name, then rename)."""
    with atomic_path(dest) as tmp:
        table.to_csv(tmp, sep="\t", index=False)


def write_json(obj: Any, dest: str | os.PathLike[str]) -> None:
    """Write JSON atomically, pretty-printed."""
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_table(path: str | os.PathLike[str], required: Sequence[str] = (), sep: str = "\t") -> pd.DataFrame:
    """Read a TSV (or ``sep``-separated) table with a header; :class:`InputError` names missing columns.

    All columns are read as strings (``labels`` may be empty: kept as ``""``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: empty table (no header)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a readable TSV ({_first_line(err)})") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing columns: {', '.join(missing)}")
    return table


def read_images_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read an ``images.tsv`` (``image_id, group, path, labels``); paths resolved against its folder."""
    table = read_table(path, IMAGES_COLUMNS)
    dup = table["image_id"][table["image_id"].duplicated()]
    if len(dup):
        raise InputError(f"{path}: duplicate image_id {dup.iloc[0]!r}")
    base = Path(path).resolve().parent
    table["path"] = [str(resolve_path(p, base)) for p in table["path"]]
    return table


def resolve_path(cell: str, base: Path) -> Path:
    """The path in a table cell: ``~`` expanded, then taken as is when absolute, else relative to ``base``."""
    path = Path(cell).expanduser()
    return path if path.is_absolute() else Path(base) / path


def check_fraction(value: float, name: str = "max_bad_fraction") -> float:
    """``value`` if it lies in [0, 1], else :class:`InputError` naming ``name`` and the value."""
    if not 0.0 <= value <= 1.0:
        raise InputError(f"{name} must be in [0, 1], got {value}")
    return value


def check_rejected(
    rejected: pd.DataFrame,
    total: int,
    path: str | os.PathLike[str],
    max_bad_fraction: float,
    what: str,
    error: type[InputError] = InputError,
    *,
    items: str = "images",
    problem: str = "failed",
    first_key: str | None = None,
) -> None:
    """Write the failures of a stage to ``path`` and stop when there are too many of them.

    ``rejected`` has one row per failed item out of ``total`` and a ``reason`` column; it is written as a
    TSV atomically, header only when nothing failed. When more than ``max_bad_fraction`` of the items (or
    all of them) failed, ``error`` is raised with one line: ``"<what>: <k> of <total> <items> <problem>,
    first: [<first_key value>: ]<reason>; full list in <path>"``. Otherwise a warning is logged for any
    skipped item.
    """
    write_tsv(rejected, path)
    k = len(rejected)
    if not k:
        return
    if k >= total or k / total > max_bad_fraction:
        row = rejected.iloc[0]
        first = f"{row[first_key]}: {row['reason']}" if first_key else str(row["reason"])
        raise error(f"{what}: {k} of {total} {items} {problem}, first: {first}; full list in {path}")
    log.warning("%s: skipped %d of %d %s (%s), listed in %s", what, k, total, items, problem, path)


def split_labels(cell: str) -> list[str]:
    """``"a;b"`` -> ``["a", "b"]``; empty cell -> ``[]``."""
    return [s.strip() for s in cell.split(";") if s.strip()]


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image fully as ``(H, W, 3)`` uint8 RGB. Grayscale is repeated, 16-bit is scaled to 8 bits.

    Raises :class:`InputError` (one line, naming the file) when it is missing, unreadable or truncated.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decodes everything: a truncated file raises here
            arr = np.asarray(img)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{path}: unreadable image ({_first_line(err)})") from None
    return to_rgb8(arr, path)


def to_rgb8(arr: np.ndarray, path: str | os.PathLike[str] = "<array>") -> np.ndarray:
    """Convert a decoded image array to ``(H, W, 3)`` uint8."""
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.integer):
            arr = (arr.astype(np.float64) / max(int(np.iinfo(arr.dtype).max), 1) * 255.0).round()
        elif arr.dtype == bool:
            arr = arr.astype(np.float64) * 255.0
        else:
            arr = np.clip(np.asarray(arr, dtype=np.float64), 0.0, 1.0) * 255.0
        arr = arr.astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    elif arr.ndim == 3 and arr.shape[2] == 2:
        arr = np.concatenate([arr, np.zeros_like(arr[:, :, :1])], axis=2)
    elif not (arr.ndim == 3 and arr.shape[2] == 3):
        raise InputError(f"{path}: unsupported image shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__

"""Atomic writes, table reading with column checks, path cells, the rejected-items check, and image reading
that fails with one clear line."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from preprocessing.errors import InputError
from preprocessing.locks import writer_lock

log = logging.getLogger(__name__)

IMAGES_COLUMNS = ("image_id", "group", "path", "labels")
# one row per instance written by the crop stage and read by the bag stage (then the extra image columns)
BOX_COLUMNS = ("x0", "y0", "x1", "y1")
PATCH_COLUMNS = ("patch_index", "image_id", "group", "labels", *BOX_COLUMNS)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds.

    Works for files and directories (e.g. a Zarr store). An interrupted write never leaves ``dest``
    looking complete. One writer per destination: the block holds ``dest``'s :func:`writer_lock` (a
    second writer is refused with one line), and under it the temporary names left beside ``dest`` by a
    killed earlier writer are removed first. A full disk or a read-only folder is an :class:`InputError`
    naming the file.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _write_error(err, dest, denied=True) from None
    with writer_lock(dest):
        try:
            remove_stale_temps(dest)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        except OSError as err:
            raise _write_error(err, dest, denied=True) from None
        tmp.rmdir()  # the caller creates a file or a directory at this name
        try:
            yield tmp
            if dest.is_dir() and not dest.is_symlink():
                _remove(dest)
            os.replace(tmp, dest)
        except OSError as err:
            raise _write_error(err, dest) from None
        finally:
            if tmp.exists():
                settle_zarr_writes()  # a failed Zarr write leaves its sibling chunk writes running
                _remove(tmp)


def settle_zarr_writes() -> None:
    """Wait for the chunk writes still running on Zarr's event loop (when Zarr is loaded).

    Zarr writes a slice's chunks concurrently and raises on the first failure (a full disk) while the
    others go on: removing the temporary store before they end races them (files reappear, the removal
    fails). Their exceptions are collected here, so none is reported as never retrieved.
    """
    zarr_sync = sys.modules.get("zarr.core.sync")
    if zarr_sync is None:
        return

    async def drain() -> None:
        current = asyncio.current_task()
        await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not current), return_exceptions=True)

    zarr_sync.sync(drain())


def remove_stale_temps(dest: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary names :func:`atomic_path` leaves beside ``dest`` when its writer is killed
    (``.<name>.<random>.tmp``, files or folders); returns what was removed."""
    dest = Path(dest)
    stale = sorted(dest.parent.glob(f".{glob.escape(dest.name)}.*.tmp")) if dest.parent.is_dir() else []
    for path in stale:
        _remove(path)
        log.info("removed %s, left by an interrupted write of %s", path, dest)
    return stale


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Create ``folder`` if needed and check that a file can be written in it (one line if not)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check.", suffix=".tmp"):
            pass
    except OSError as err:
        raise InputError(f"{folder}: output folder is not writable ({err.strerror or err})") from None


def _write_error(err: OSError, dest: Path, denied: bool = False) -> Exception:
    """One line for the write failures a user can act on: a full disk or quota, a read-only file system,
    and (``denied``: while creating the folder or the temporary name) a permission error."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return InputError(f"no space left on device ({_mount_point(dest)}) writing {dest}")
    if err.errno == errno.EFBIG:
        return InputError(f"{dest}: cannot write (file too large for the file system or a size limit)")
    if err.errno == errno.EROFS or (denied and err.errno in (errno.EACCES, errno.EPERM)):
        return InputError(f"{dest}: cannot write ({err.strerror})")
    return err


def _mount_point(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


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
        raise InputError(f"{path}: not a readable TSV ({first_line(err)})") from None
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


#: Fraction of a data set's items (images, genes, archives) that may fail and be skipped, in every stage
#: that skips bad items (acquire, crop), unless the data set sets its own ``max_bad_fraction``.
DEFAULT_MAX_BAD_FRACTION = 0.05


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


# Images with more pixels than this are refused before decoding (PIL's own default limit, about 9459 x 9459):
# a header that claims huge dimensions must not take down a stage. The environment variable overrides it.
MAX_IMAGE_PIXELS: int = 89_478_485
MAX_IMAGE_PIXELS_ENV = "HAMIL_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int:
    """The pixel limit of :func:`read_image`: ``$HAMIL_MAX_IMAGE_PIXELS`` when set, else
    :data:`MAX_IMAGE_PIXELS`; :class:`InputError` when the variable is not a positive whole number."""
    return env_positive_int(MAX_IMAGE_PIXELS_ENV, MAX_IMAGE_PIXELS, "pixels")


def env_positive_int(name: str, default: int, unit: str) -> int:
    """The environment variable ``name`` as a positive whole number of ``unit``, ``default`` when it is
    unset or empty; :class:`InputError` (one line) when it is anything else."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"{name} must be a positive whole number of {unit}, got {raw!r}")
    return value


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image fully as ``(H, W, 3)`` uint8 RGB, whatever its colour mode.

    * grey (``L``) and 1-bit (``1``: 0 or 255) are repeated to 3 channels; grey+alpha (``LA``) and RGBA
      lose their alpha;
    * palette images (``P``, ``PA``) take their colours from the palette; CMYK (e.g. a CMYK JPEG), YCbCr,
      HSV and LAB are converted to RGB by PIL;
    * 16-bit grey (``I;16``) is scaled by its type's range (0-65535 -> 0-255); 32-bit integer (``I``) and
      float (``F``) images are scaled the same way when all their values lie in 0-65535 (integer) or 0-1
      (float), else by the image's own value range (min -> 0, max -> 255; a constant image is clipped to
      the range instead, so nothing divides by zero; NaN becomes 0);
    * a multi-page (multi-frame) file gives its first page, with a warning in the log.

    Raises :class:`InputError` (one line, naming the file) when it is missing, unreadable, truncated, in a
    colour mode with no conversion to RGB, or too large: more pixels than :func:`max_image_pixels` (the
    module constant :data:`MAX_IMAGE_PIXELS`, overridden by the environment variable
    ``HAMIL_MAX_IMAGE_PIXELS``), checked on the header before anything is decoded. PIL's own
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is raised to that limit when it is lower, and
    its error is reported the same way.
    """
    return to_rgb8(read_image_array(path), path)


def read_image_array(path: str | os.PathLike[str]) -> np.ndarray:
    """The decoded pixels of an image file as PIL gives them (grey ``(H, W)``, colour ``(H, W, 3|4)``,
    16-bit and float kept), with every check of :func:`read_image`."""
    path = Path(path)
    limit = max_image_pixels()
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit  # PIL warns above this and refuses above twice this
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > limit:
                raise InputError(
                    f"{path}: image too large ({width} x {height} = {width * height} pixels, more than the "
                    f"limit of {limit}; set {MAX_IMAGE_PIXELS_ENV} to change it)"
                )
            img.load()  # decodes everything: a truncated file raises here
            arr = _rgb_array(img, path)
            pages = getattr(img, "n_frames", 1)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InputError(
            f"{path}: image too large ({first_line(err)}; set {MAX_IMAGE_PIXELS_ENV} to change the limit)"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{path}: unreadable image ({first_line(err)})") from None
    if pages > 1:
        log.warning("%s: %d pages, only the first page is used", path, pages)
    return arr


# modes whose array to_rgb8 takes as is (grey, 1-bit, RGB, RGBA, 16/32-bit integer, float)
_DIRECT_MODES = frozenset({"1", "L", "RGB", "RGBA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


def _rgb_array(img: Image.Image, path: Path) -> np.ndarray:
    """The decoded pixels of ``img`` as an array :func:`to_rgb8` understands (no palette indices, no CMYK)."""
    mode = img.mode
    if mode == "LA":
        return np.asarray(img.getchannel("L"))  # grey; the alpha is dropped
    if mode in ("P", "PA"):
        return np.asarray(img.convert("RGBA"))  # the palette's colours (alpha dropped by to_rgb8)
    if mode in _DIRECT_MODES:
        return np.asarray(img)
    try:
        return np.asarray(img.convert("RGB"))  # CMYK, YCbCr, HSV, LAB, RGBX, RGBa, La, ...
    except ValueError:
        raise InputError(f"{path}: unsupported colour mode {mode!r} (no conversion to RGB)") from None


def to_rgb8(arr: np.ndarray, path: str | os.PathLike[str] = "<array>") -> np.ndarray:
    """Convert a decoded image array to ``(H, W, 3)`` uint8 (values scaled as :func:`read_image` says).

    ``(H, W)`` is grey, ``(H, W, 2)`` grey+alpha, ``(H, W, 3)`` RGB, ``(H, W, 4)`` RGBA; alpha is dropped.
    """
    if arr.dtype != np.uint8:
        arr = _scale_to_uint8(np.asarray(arr))
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        arr = arr[:, :, :1] if arr.shape[2] == 2 else arr[:, :, :3]  # drop alpha
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif not (arr.ndim == 3 and arr.shape[2] == 3):
        raise InputError(f"{path}: unsupported image shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Bool -> 0/255; 8/16-bit integers by their type's range; wider integers and floats by 0-65535 or 0-1
    when they fit, else by the image's own (finite) min..max; a constant image is clipped instead."""
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    values = arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.unsignedinteger) and arr.dtype.itemsize <= 2:
        lo, hi = 0.0, float(np.iinfo(arr.dtype).max)
    else:
        lo, hi = (0.0, 65535.0) if np.issubdtype(arr.dtype, np.integer) else (0.0, 1.0)
        finite = values[np.isfinite(values)]
        if finite.size and (finite.min() < lo or finite.max() > hi) and finite.max() > finite.min():
            lo, hi = float(finite.min()), float(finite.max())
    scaled = np.nan_to_num((values - lo) / (hi - lo), nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(scaled, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), for one-line reports."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__

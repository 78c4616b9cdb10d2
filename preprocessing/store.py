"""The bag store: one Zarr v3 group per dataset holding every patch, ordered by bag.

Layout (format version 3, ``FORMAT_VERSION``)::

    patches       uint8  (N, C, H, W)  one chunk per patch, lz4 by default (H = W = P for cell patches)
    bag_offsets   int64  (B + 1,)      bag b is patches[bag_offsets[b]:bag_offsets[b + 1]]
    labels        uint8  (B, K)        multi-hot
    split         int8   (B,)          0 train, 1 val, 2 test
    group, bag_id str    (B,)
    source_image  str    (N,)          the field each patch was cut from
    box           int32  (N, 4)        x0, y0, x1, y1 in that field

Attributes: ``format_version``, ``class_names``, ``source``, ``patch_shape`` ``[H, W]``, ``params``,
``patch_chunks`` (count, total bytes and SHA-256 of the patch chunk files, :func:`seal_patches`: every
open checks count and sizes, ``verify`` the hash too, so a store with chunks missing or truncated by an
interrupted copy is refused instead of reading zeros) and ``metadata_sha256``: the SHA-256 of the class
names and the bag arrays (offsets, labels, split, group, bag id; :func:`metadata_digest`), checked on
opening. It is also the store's fingerprint: a checkpoint records
it, and a run resumes only on the same bags, splits and labels.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from preprocessing.errors import InputError
from preprocessing.io import atomic_path

FORMAT_VERSION = 3  # 2: patch_shape [H, W] replaces patch_size; 3: patch_chunks, one file for every patch
SPLITS = ("train", "val", "test")
#: the arrays of a bag store
STORE_ARRAYS = ("patches", "bag_offsets", "labels", "split", "group", "bag_id", "source_image", "box")
_BLOCK = 256  # patches copied per task


CODECS = ("lz4", "zstd", "none")


def _compressors(codec: str = "zstd") -> tuple[Any, ...]:
    """Patch compression: ``zstd`` (smallest; crop shards, written once), ``lz4`` (Blosc, no shuffle:
    decodes ~10x faster, for the bag store that training reads every epoch) or ``none``."""
    if codec == "zstd":
        return (zarr.codecs.ZstdCodec(level=3),)
    if codec == "lz4":
        return (zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle", typesize=1),)
    if codec == "none":
        return ()
    raise InputError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")


def create_patch_array(
    group: zarr.Group, n: int, channels: int, patch_shape: int | tuple[int, int], codec: str = "zstd"
) -> zarr.Array:
    """The ``patches`` array: uint8 ``(n, C, H, W)``, one chunk per patch (n = 0: append later).

    ``patch_shape`` is ``P`` for square patches or ``(H, W)`` (e.g. whole 180x320 embryo images).
    """
    height, width = (patch_shape, patch_shape) if isinstance(patch_shape, int) else patch_shape
    return group.create_array(
        "patches",
        shape=(n, channels, height, width),
        chunks=(1, channels, height, width),
        dtype="uint8",
        compressors=_compressors(codec),
        config={"write_empty_chunks": True},  # a file for every patch, a black one too: countable
    )


#: the attribute that records a group's patch chunk files (:func:`seal_patches`)
CHUNKS_ATTR = "patch_chunks"


def _chunk_file(folder: Path, row: int) -> Path:
    return folder / "patches" / "c" / str(row) / "0" / "0" / "0"


def seal_patches(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Record in the group at ``folder`` the count, total size and SHA-256 of its patch chunk files."""
    folder = Path(folder)
    rows = zarr.open_array(folder / "patches", mode="r").shape[0]
    sha, total = hashlib.sha256(), 0
    for row in range(rows):
        data = _chunk_file(folder, row).read_bytes()
        sha.update(data)
        total += len(data)
    record = {"count": rows, "bytes": total, "sha256": sha.hexdigest()}
    zarr.open_group(folder, mode="r+").attrs[CHUNKS_ATTR] = record
    return record


def check_patches(folder: str | os.PathLike[str], attrs: Mapping[str, Any], verify: bool = False) -> None:
    """Refuse (one line) a group whose patch chunk files are not all there with the sizes written;
    ``verify`` also compares their SHA-256 (reads every file). Cheap otherwise: one ``stat`` a patch."""
    folder = Path(folder)
    record = attrs.get(CHUNKS_ATTR)
    if not isinstance(record, dict):
        raise InputError(f"{folder}: no record of its patch chunk files ({CHUNKS_ATTR}); write it again")
    missing, total = [], 0
    for row in range(int(record["count"])):
        try:
            total += _chunk_file(folder, row).stat().st_size
        except FileNotFoundError:
            missing.append(row)
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise InputError(
            f"{folder}: {len(missing)} of {record['count']} patch chunk files missing (patches {shown}); "
            "an interrupted copy? copy or rebuild it"
        )
    if total != record["bytes"]:
        raise InputError(
            f"{folder}: patch chunk files hold {total} bytes, {record['bytes']} were written (truncated "
            "or replaced); copy or rebuild it"
        )
    if verify:
        sha = hashlib.sha256()
        for row in range(int(record["count"])):
            sha.update(_chunk_file(folder, row).read_bytes())
        if sha.hexdigest() != record["sha256"]:
            raise InputError(f"{folder}: patch chunk files differ from those written (corrupt); rebuild it")


def write_bag_store(
    dest: str | os.PathLike[str],
    sources: Sequence[zarr.Array],
    picks: np.ndarray,
    bag_offsets: np.ndarray,
    labels: np.ndarray,
    split: np.ndarray,
    group: Sequence[str],
    bag_id: Sequence[str],
    source_image: Sequence[str],
    box: np.ndarray,
    attrs: Mapping[str, Any],
    workers: int = 1,
    codec: str = "lz4",
) -> None:
    """Write a bag store atomically.

    ``picks`` is ``(N, 2)``: output patch i is ``sources[picks[i, 0]][picks[i, 1]]``. Patches are copied in
    blocks by ``workers`` threads (decoding and file I/O release the GIL); when one block fails (a full
    disk) the others are waited for before the temporary store is removed, so no write outlives it.
    ``codec`` compresses the patches (see :func:`_compressors`; lz4 by default for fast training reads).
    """
    n = len(picks)
    if len(bag_offsets) != len(labels) + 1 or bag_offsets[-1] != n:
        raise ValueError("bag_offsets do not match labels and picks")
    channels, patch_shape = _patch_geometry(sources)
    with atomic_path(dest) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        patches = create_patch_array(root, n, channels, patch_shape, codec)
        with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
            futures = [
                pool.submit(_copy_block, sources, picks[start : start + _BLOCK], patches, start)
                for start in range(0, n, _BLOCK)
            ]
            wait(futures)  # every block finished or failed: nothing still writing into ``tmp``
        for future in futures:
            future.result()  # the first failure, if any
        root.create_array("bag_offsets", data=np.asarray(bag_offsets, dtype=np.int64))
        root.create_array("labels", data=np.asarray(labels, dtype=np.uint8).reshape(len(labels), -1))
        root.create_array("split", data=np.asarray(split, dtype=np.int8))
        root.create_array("group", data=_strings(group))
        root.create_array("bag_id", data=_strings(bag_id))
        root.create_array("source_image", data=_strings(source_image))
        root.create_array("box", data=np.asarray(box, dtype=np.int32).reshape(n, 4))
        digest = metadata_digest(attrs.get("class_names", []), bag_offsets, labels, split, group, bag_id)
        root.attrs.update(
            {
                **attrs,
                "format_version": FORMAT_VERSION,
                "patch_shape": list(patch_shape),
                "metadata_sha256": digest,
            }
        )
        seal_patches(tmp)


def metadata_digest(
    class_names: Sequence[str],
    bag_offsets: np.ndarray,
    labels: np.ndarray,
    split: np.ndarray,
    group: Sequence[str],
    bag_id: Sequence[str],
) -> str:
    """SHA-256 of what defines a store's bags: class names, offsets, labels, split, group and bag ids."""
    sha = hashlib.sha256(json.dumps(list(class_names)).encode())
    for array, dtype in ((bag_offsets, np.int64), (labels, np.uint8), (split, np.int8)):
        sha.update(np.ascontiguousarray(np.asarray(array, dtype=dtype)).tobytes())
    for strings in (group, bag_id):
        sha.update("\x00".join(map(str, strings)).encode())
    return sha.hexdigest()


def _strings(values: Sequence[str]) -> np.ndarray:
    """Variable-length UTF-8 strings (Zarr v3 ``string`` data type), not fixed-width UTF-32."""
    return np.asarray(list(values), dtype=np.dtypes.StringDType())


def _patch_geometry(sources: Sequence[zarr.Array]) -> tuple[int, tuple[int, int]]:
    shapes = {tuple(s.shape[1:]) for s in sources if s.shape[0] > 0} or {tuple(sources[0].shape[1:])}
    if len(shapes) != 1:
        raise InputError(f"patch shards disagree on patch shape: {sorted(shapes)}")
    channels, height, width = shapes.pop()
    return channels, (height, width)


def _copy_block(sources: Sequence[zarr.Array], picks: np.ndarray, out: zarr.Array, start: int) -> None:
    block = np.empty((len(picks), *out.shape[1:]), dtype=np.uint8)  # (b, C, H, W)
    for src in np.unique(picks[:, 0]):
        rows = np.flatnonzero(picks[:, 0] == src)
        block[rows] = sources[src].oindex[picks[rows, 1]]
    out[start : start + len(picks)] = block


class BagStore:
    """Read-only view of a bag store. Metadata is loaded on first use; patches are read per bag.

    Safe to create in the parent process and use in forked DataLoader workers: the Zarr group is
    (re)opened lazily in whichever process first reads from it.
    """

    def __init__(self, path: str | os.PathLike[str], verify: bool = False) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise InputError(f"{self.path}: not a bag store (no zarr.json)")
        self._root: zarr.Group | None = None
        self._pid = -1
        self._chunks: ChunkFileReader | bool | None = None  # None: not probed yet; False: use Zarr
        meta = zarr.open_group(self.path, mode="r")
        version = meta.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise InputError(f"{self.path}: bag store format {version!r}, expected {FORMAT_VERSION}")
        self.attrs: dict[str, Any] = dict(meta.attrs)
        absent = [n for n in STORE_ARRAYS if not (self.path / n / "zarr.json").is_file()]
        if absent:
            raise InputError(f"{self.path}: incomplete bag store (no {', '.join(absent)}); rebuild it")
        self.bag_offsets: np.ndarray = meta["bag_offsets"][:]  # (B + 1,)
        self.labels: np.ndarray = meta["labels"][:]  # (B, K)
        self.split: np.ndarray = meta["split"][:]  # (B,)
        self.group: np.ndarray = meta["group"][:]
        self.bag_id: np.ndarray = meta["bag_id"][:]
        #: SHA-256 of the class names and bag arrays (see :func:`metadata_digest`)
        self.fingerprint = metadata_digest(
            self.class_names, self.bag_offsets, self.labels, self.split, self.group, self.bag_id
        )
        recorded = self.attrs.get("metadata_sha256")
        if recorded is not None and recorded != self.fingerprint:
            raise InputError(
                f"{self.path}: bag metadata does not match its checksum (corrupt or edited); "
                "rebuild the store with hamil bags"
            )
        check_patches(self.path, self.attrs, verify)

    @property
    def root(self) -> zarr.Group:
        if self._root is None or self._pid != os.getpid():
            self._root = zarr.open_group(self.path, mode="r")
            self._pid = os.getpid()
        return self._root

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_root"] = None
        return state

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    @property
    def num_bags(self) -> int:
        return len(self.split)

    @property
    def patch_shape(self) -> tuple[int, int]:
        """``(H, W)`` of every instance."""
        height, width = self.attrs["patch_shape"]
        return int(height), int(width)

    @property
    def channels(self) -> int:
        """Channels of every instance (3 for RGB; a ``read.channels`` choice gives that many)."""
        return int(self.root["patches"].shape[1])

    def bag_sizes(self) -> np.ndarray:
        return np.diff(self.bag_offsets)

    def bags_in(self, split: str) -> np.ndarray:
        """Indices of the bags in ``split`` ("train", "val" or "test")."""
        return np.flatnonzero(self.split == SPLITS.index(split))

    def patches(self, bag: int, subset: np.ndarray | None = None) -> np.ndarray:
        """The patches of one bag, ``(n, C, H, W)`` uint8; ``subset`` selects instances within the bag.

        Patch arrays in the layout this module writes are read chunk file by chunk file (about 9x faster
        than Zarr's general read path for one-patch chunks); any other layout goes through Zarr.
        """
        start, stop = int(self.bag_offsets[bag]), int(self.bag_offsets[bag + 1])
        rows = (
            np.arange(start, stop) if subset is None else start + np.sort(np.asarray(subset, dtype=np.int64))
        )
        if self._chunks is None:
            self._chunks = ChunkFileReader.open(self.path / "patches") or False
        if self._chunks:
            return self._chunks.read(rows)
        arr = self.root["patches"]
        return arr[start:stop] if subset is None else arr.oindex[rows]

    def instance_info(self, bag: int) -> tuple[np.ndarray, np.ndarray]:
        """``(source_image (n,), box (n, 4))`` of one bag's patches."""
        start, stop = int(self.bag_offsets[bag]), int(self.bag_offsets[bag + 1])
        return self.root["source_image"][start:stop], self.root["box"][start:stop]


class ChunkFileReader:
    """Reads whole patches of a local Zarr v3 ``patches`` array straight from its chunk files.

    Only for the layout :func:`create_patch_array` writes: uint8, one ``(1, C, H, W)`` chunk per patch,
    default "/" chunk keys, no sharding, and the bytes codec followed by nothing, Blosc or Zstd (whose
    frames numcodecs decodes). Every chunk has its file (``write_empty_chunks``); a missing or undecodable
    one is an :class:`InputError` naming it.
    """

    def __init__(self, folder: Path, shape: tuple[int, ...], decoder: Any) -> None:
        self.folder, self.shape, self.decoder = folder, shape, decoder

    @classmethod
    def open(cls, folder: Path) -> ChunkFileReader | None:
        """A reader for the array in ``folder``, or ``None`` when its layout is not the one above."""
        import json

        import numcodecs

        try:
            meta = json.loads((folder / "zarr.json").read_text())
        except (OSError, ValueError):
            return None
        shape = tuple(meta.get("shape", ()))
        grid = meta.get("chunk_grid", {})
        keys = meta.get("chunk_key_encoding", {})
        codecs = [c.get("name") for c in meta.get("codecs", [])]
        decoders = {(): None, ("blosc",): numcodecs.Blosc(), ("zstd",): numcodecs.Zstd()}
        if (
            meta.get("zarr_format") != 3
            or meta.get("node_type") != "array"
            or meta.get("storage_transformers")
            or meta.get("data_type") != "uint8"
            or len(shape) != 4
            or grid.get("name") != "regular"
            or grid.get("configuration", {}).get("chunk_shape") != [1, *shape[1:]]
            or keys.get("name") != "default"
            or keys.get("configuration", {}).get("separator", "/") != "/"
            or not codecs
            or codecs[0] != "bytes"
            or tuple(codecs[1:]) not in decoders
        ):
            return None
        return cls(folder, shape, decoders[tuple(codecs[1:])])

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Patches ``rows`` as ``(len(rows), C, H, W)`` uint8."""
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        if len(rows) and (int(np.min(rows)) < 0 or int(np.max(rows)) >= self.shape[0]):
            raise IndexError(f"{self.folder}: patch rows outside 0..{self.shape[0] - 1}")
        for k, row in enumerate(rows):
            path = self.folder / "c" / str(int(row)) / "0" / "0" / "0"
            try:
                data = path.read_bytes()
                if self.decoder is None:
                    out[k] = np.frombuffer(data, dtype=np.uint8).reshape(self.shape[1:])
                else:
                    self.decoder.decode(data, out=out[k])
            except FileNotFoundError:
                raise InputError(f"{path}: patch chunk file missing (the store is incomplete)") from None
            except (RuntimeError, ValueError, TypeError) as err:  # a truncated or garbled frame
                raise InputError(f"{path}: corrupt patch chunk ({err})") from None
        return out

"""The ``hpa_paper`` source: the HAMIL authors' published 512x512 HPA patches (an Azure blob container).

The container is listed (``?restype=container&comp=list``, page by page through ``NextMarker``, parsed
without relying on XML namespaces); the chosen zip blobs are downloaded with their listed size and
``Content-MD5`` checked, and extracted with :func:`preprocessing.download.safe_extract_zip` into
``<out_dir>/data``. Blob names come from a remote listing: one that could escape the data folder is
refused. Patches are laid out ``hpa/<ENSG>/<plate>_<well>_<field>_blue_red_green.jpg_<k>.jpg``; each
becomes one row of ``images.tsv`` with ``group`` = the ENSG id and ``source_field`` = the field name.

Labels come from a user-given ``Gene,label`` table. Its exact form is *unconfirmed*, so: comma or tab
delimited; ``Gene`` may be an ENSG id or a gene name; ``label`` may hold location names separated by
``;``, ``|`` or ``,``, or integer class indices (mapped through ``label_names`` when given). With the HPA
location table (``location_table``, the zipped or plain TSV), gene names are mapped to ENSG ids and genes
with an empty label take their locations from it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from preprocessing.download import Downloader, DownloadError, DownloadPolicy, safe_extract_zip, sniff
from preprocessing.errors import InputError
from preprocessing.io import DEFAULT_MAX_BAD_FRACTION, check_rejected, write_tsv
from preprocessing.sources import hpa

__all__ = [
    "IMAGES_TSV_COLUMNS",
    "BlobInfo",
    "HpaPaperOptions",
    "acquire",
    "blob_url",
    "check_blob_name",
    "list_blobs",
    "parse_listing",
    "read_labels_table",
    "scan_patches",
]

log = logging.getLogger(__name__)

IMAGES_TSV_COLUMNS: tuple[str, ...] = ("image_id", "group", "path", "labels", "source_field")
REJECTED_COLUMNS: tuple[str, ...] = ("blob", "url", "reason")
PATCH_RE = re.compile(r"^(?P<field>(?P<stem>.+?)_blue_red_green\.jpg)_(?P<k>\d+)\.jpg$", re.IGNORECASE)
GENE_DIR_RE = re.compile(r"^ENSG\d{11}$")  # the real form: every gene of the authors' labels table


@dataclass(frozen=True)
class HpaPaperOptions:
    """Which container and blobs to fetch, and where the per-gene labels come from."""

    container_url: str = "https://bioimagestore.blob.core.windows.net/dataset"
    blobs: tuple[str, ...] = (
        "hpa dataSet_part1.zip",
        "hpa_dataSet_part2.zip",
        "hpa_dataSet_part3.zip",
        "hpa_dataSet_part4.zip",
    )  # empty: every .zip blob of the listing
    labels_table: Path | None = None  # the Gene,label table (required)
    location_table: Path | None = None  # HPA subcellular_location.tsv(.zip): names -> ENSG, empty labels
    reliability: tuple[str, ...] = ("Enhanced", "Validated", "Supported", "Approved")
    label_names: tuple[str, ...] = ()  # class names when the labels table holds integer indices
    x_ms_version: str = "2020-10-02"

    def __post_init__(self) -> None:
        unsafe = [b for b in self.blobs if _unsafe_name(b)]
        if unsafe:
            raise InputError(f"hpa_paper blobs must be safe relative names, got {unsafe[0]!r}")
        if len(set(self.label_names)) != len(self.label_names):
            raise InputError(f"hpa_paper label_names must be distinct, got {list(self.label_names)}")


@dataclass(frozen=True)
class BlobInfo:
    """One blob of a container listing."""

    name: str
    size: int | None
    md5_b64: str | None


# --------------------------------------------------------------------------------------------- listing


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(elem: ET.Element, name: str) -> str:
    for child in elem:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return ""


def parse_listing(data: bytes, url: str = "listing") -> tuple[list[BlobInfo], str]:
    """Blobs of one ``List Blobs`` page and its ``NextMarker`` (``""`` on the last page).

    Elements are matched by local name, so a namespaced answer parses the same.
    """
    try:
        root = ET.fromstring(data.lstrip(b"\xef\xbb\xbf"))
    except ET.ParseError as err:
        raise DownloadError(f"{url}: not a blob listing ({err})") from None
    if _local(root.tag) != "EnumerationResults":
        raise DownloadError(f"{url}: not a blob listing (root <{_local(root.tag)}>)")
    blobs, marker = [], ""
    for elem in root.iter():
        tag = _local(elem.tag)
        if tag == "NextMarker":
            marker = (elem.text or "").strip()
        elif tag == "Blob":
            props = next((c for c in elem if _local(c.tag) == "Properties"), None)
            length = _child_text(props, "Content-Length") if props is not None else ""
            md5 = _child_text(props, "Content-MD5") if props is not None else ""
            blobs.append(
                BlobInfo(_child_text(elem, "Name"), int(length) if length.isdigit() else None, md5 or None)
            )
    return blobs, marker


def list_blobs(downloader: Downloader, container_url: str, x_ms_version: str) -> list[BlobInfo]:
    """Every blob of the container, following ``NextMarker`` page after page."""
    base = container_url.rstrip("/") + "?restype=container&comp=list"
    blobs: list[BlobInfo] = []
    marker, seen = "", set()
    while True:
        url = base + (f"&marker={urllib.parse.quote(marker, safe='')}" if marker else "")
        page, marker = parse_listing(downloader.get_bytes(url, {"x-ms-version": x_ms_version}), url)
        blobs += page
        if not marker:
            return blobs
        if marker in seen:
            raise DownloadError(f"{url}: listing repeats marker {marker!r}")
        seen.add(marker)


def check_blob_name(name: str, container_url: str = "") -> str:
    """Return ``name`` if it is a safe relative path; :class:`DownloadError` if it could escape a folder."""
    if _unsafe_name(name):
        raise DownloadError(f"{container_url}: unsafe blob name {name!r}")
    return name


def _unsafe_name(name: str) -> bool:
    """Whether a blob name is empty, absolute, a drive path, or holds ``.``/``..``/empty parts or a NUL."""
    parts = name.replace("\\", "/").split("/")
    return (
        not name.strip()
        or name.startswith(("/", "\\"))
        or re.match(r"^[A-Za-z]:", name) is not None
        or "\x00" in name
        or any(p in ("", ".", "..") for p in parts)
    )


def blob_url(container_url: str, name: str) -> str:
    """URL of a blob: the name percent-encoded (a space becomes ``%20``), ``/`` kept."""
    return f"{container_url.rstrip('/')}/{urllib.parse.quote(name, safe='/')}"


# ---------------------------------------------------------------------------------------------- labels


def _read_any_table(path: Path) -> pd.DataFrame:
    """A comma- or tab-separated table (or a zip holding one), all strings."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    data = path.read_bytes()
    if sniff(data[:8]) == "zip":
        return hpa.read_location_zip(data, str(path))
    text = data.decode("utf-8-sig", errors="replace")
    first = text.split("\n", 1)[0]
    try:
        return pd.read_csv(
            io.StringIO(text), sep="\t" if "\t" in first else ",", dtype=str, keep_default_na=False
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"{path}: not a readable table ({str(err).splitlines()[0]})") from None


def _column(table: pd.DataFrame, names: tuple[str, ...], path: Path) -> str:
    found = {c.strip().lower(): c for c in table.columns}
    for name in names:
        if name in found:
            return found[name]
    raise InputError(f"{path}: missing column {names[0]!r} (columns: {', '.join(map(str, table.columns))})")


def read_labels_table(path: Path, options: HpaPaperOptions) -> dict[str, str]:
    """``{ENSG: "loc1;loc2"}`` from the user's ``Gene,label`` table (see the module docstring)."""
    table = _read_any_table(Path(path))
    gene_col = _column(table, ("gene", "ensg", "gene id"), path)
    label_col = _column(table, ("label", "labels", "location", "locations"), path)
    names: dict[str, str] = {}
    locations: dict[str, str] = {}
    if options.location_table is not None:
        raw = _read_any_table(Path(options.location_table))
        locs = hpa.parse_location_table(raw, options.reliability, str(options.location_table))
        locations = dict(zip(locs["gene"], locs["labels"], strict=True))
        if "Gene name" in raw.columns:
            names = {
                n.strip(): g.strip() for g, n in zip(raw["Gene"], raw["Gene name"], strict=True) if n.strip()
            }
    out: dict[str, str] = {}
    for gene, cell in zip(table[gene_col], table[label_col], strict=True):
        gene = gene.strip()
        gene = gene if GENE_DIR_RE.match(gene) else names.get(gene, gene)
        tokens = [t.strip() for t in re.split(r"[;|,]", cell) if t.strip()]
        tokens = [_label_name(t, options.label_names, path) for t in tokens]
        labels = ";".join(sorted(set(tokens))) if tokens else locations.get(gene, "")
        if gene:
            out[gene] = labels
    return out


def _label_name(token: str, label_names: tuple[str, ...], path: Path) -> str:
    if label_names and token.isdigit():
        if int(token) >= len(label_names):
            raise InputError(f"{path}: label index {token} out of range for {len(label_names)} label_names")
        return label_names[int(token)]
    return token


# -------------------------------------------------------------------------------------------- patches


def scan_patches(data_dir: Path, files: Iterable[str] | None = None) -> pd.DataFrame:
    """``image_id, group, path, source_field`` of every ``<ENSG>/<field>_blue_red_green.jpg_<k>.jpg``.

    ``files``: only these paths (relative to ``data_dir``; the current archives' contents), else every
    ``.jpg`` below ``data_dir``. ``path`` is relative to ``data_dir``; ``image_id`` is
    ``<field stem>_<k>`` (prefixed with the gene when two genes share it). Sorted by group, field and
    patch number.
    """
    rows = []
    data_dir = Path(data_dir)
    paths = data_dir.rglob("*.jpg") if files is None else (data_dir / f for f in files)
    for path in sorted(paths):
        match = PATCH_RE.match(path.name)
        if not match or not GENE_DIR_RE.match(path.parent.name):
            continue
        rel = path.relative_to(data_dir).as_posix()
        rows.append((f"{match['stem']}_{match['k']}", path.parent.name, rel, match["field"], int(match["k"])))
    table = pd.DataFrame(rows, columns=["image_id", "group", "path", "source_field", "k"])
    table = table.sort_values(["group", "source_field", "k"], ignore_index=True).drop(columns="k")
    dup = table["image_id"].duplicated(keep=False)
    table.loc[dup, "image_id"] = table.loc[dup, "group"] + "_" + table.loc[dup, "image_id"]
    return table


# ------------------------------------------------------------------------------------------ acquisition


def _select(listing: list[BlobInfo], wanted: tuple[str, ...], container_url: str) -> list[BlobInfo]:
    by_name = {b.name: b for b in listing}
    if not wanted:
        wanted = tuple(b.name for b in listing if b.name.lower().endswith(".zip"))
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise DownloadError(f"{container_url}: blob(s) not in the listing: {', '.join(missing)}")
    chosen = [by_name[check_blob_name(w, container_url)] for w in wanted]
    folders = {"/".join(w.split("/")[:k]) for w in wanted for k in range(1, w.count("/") + 1)}
    clash = next((w for w in wanted if w in folders), None)
    if clash is not None:
        inner = next(w for w in wanted if w.startswith(clash + "/"))
        raise DownloadError(
            f"{container_url}: blob names {clash!r} and {inner!r} clash (one is a folder of the other)"
        )
    return chosen


def acquire(
    out_dir: Path,
    options: HpaPaperOptions,
    downloader: Downloader | None = None,
    limit: int | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    retries: int = 5,
) -> pd.DataFrame:
    """Download and unpack the authors' patch archives and write ``<out_dir>/images.tsv``; return it.

    Archives go to ``<out_dir>/raw/blobs/<name>`` (size and Content-MD5 checked; resumed if interrupted)
    and are unpacked once into ``<out_dir>/data``; ``images.tsv`` lists exactly the patches of the current
    archives (a re-published archive is unpacked again and the files it dropped are deleted). Two blob
    names where one is a folder of the other are refused. Here the unit that can fail is an archive, not
    an image: archives that fail to download are listed in ``<out_dir>/rejected.tsv`` (``blob, url,
    reason``) and left out; if more than ``max_bad_fraction`` of them (or all) fail,
    :class:`DownloadError` is raised (the patches themselves are decoded, and unreadable ones rejected, by
    the crop stage). Genes without a label are left out (logged). ``limit`` keeps the first ``limit``
    genes of the table; the archives are still downloaded whole.
    ``retries``: attempts after the first for transient failures (when no ``downloader`` is given).
    """
    if options.labels_table is None:
        raise InputError("hpa_paper: labels_table (a Gene,label table) is required")
    labels = read_labels_table(Path(options.labels_table), options)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if downloader is None:
        downloader = Downloader(
            DownloadPolicy(concurrency=4, retries=retries), manifest=out_dir / "manifest.tsv"
        )
    chosen = _select(
        list_blobs(downloader, options.container_url, options.x_ms_version),
        options.blobs,
        options.container_url,
    )
    data_dir = out_dir / "data"
    fetched = _fetch_archives(chosen, options, out_dir, downloader, max_bad_fraction)
    listed = {archive: set(_read_marker(archive).get("files", [])) for archive, _ in fetched}
    current: set[str] = set()
    for archive, url in fetched:
        others = set().union(*(f for a, f in listed.items() if a != archive))
        current |= _unpack(archive, url, data_dir, others)
    patches = scan_patches(data_dir, current)
    if patches.empty:
        raise InputError(f"{data_dir}: no patch named <ENSG>/<field>_blue_red_green.jpg_<k>.jpg found")
    patches["labels"] = [labels.get(g, "") for g in patches["group"]]
    unlabelled = sorted(set(patches.loc[patches["labels"] == "", "group"]))
    if unlabelled:
        log.warning(
            "hpa_paper: %d genes without a label left out (first: %s)", len(unlabelled), unlabelled[0]
        )
    patches = patches[patches["labels"] != ""]
    if limit is not None:
        patches = patches[patches["group"].isin(sorted(patches["group"].unique())[: max(0, limit)])]
    if patches.empty:
        raise InputError(f"{options.labels_table}: no gene of the patches has a label")
    table = patches.assign(path=["data/" + p for p in patches["path"]])[list(IMAGES_TSV_COLUMNS)]
    table = table.reset_index(drop=True)
    write_tsv(table, out_dir / "images.tsv")
    return table


def _marker(archive: Path) -> Path:
    return archive.with_name(archive.name + ".extracted")


def _read_marker(archive: Path) -> dict:
    """What ``<archive>.extracted`` says was unpacked (``{}`` if absent or of an older format)."""
    try:
        record = json.loads(_marker(archive).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and isinstance(record.get("files"), list) else {}


def _unpack(archive: Path, url: str, data_dir: Path, others: set[str]) -> set[str]:
    """Unpack ``archive`` into ``data_dir`` unless this very archive was unpacked already; its files.

    The files (relative to ``data_dir``) are recorded in ``<archive>.extracted`` with the archive's size
    and mtime. When a re-published archive is unpacked, files of its previous version that it no longer
    holds (and no other archive lists in ``others``) are deleted, so patches of removed genes go away.
    """
    old = _read_marker(archive)
    stat = archive.stat()
    if old.get("url") == url and old.get("size") == stat.st_size and old.get("mtime_ns") == stat.st_mtime_ns:
        return set(old["files"])
    files = {p.relative_to(data_dir).as_posix() for p in safe_extract_zip(archive, data_dir)}
    root = data_dir.resolve()
    for stale in sorted(set(old.get("files", [])) - files - others):
        path = data_dir / str(stale)
        if path.resolve().is_relative_to(root) and path.is_file():
            path.unlink()
    record = {"url": url, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "files": sorted(files)}
    tmp = _marker(archive).with_name(_marker(archive).name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, _marker(archive))
    return files


def _fetch_archives(
    chosen: list[BlobInfo],
    options: HpaPaperOptions,
    out_dir: Path,
    downloader: Downloader,
    max_bad_fraction: float,
) -> list[tuple[Path, str]]:
    """Download the chosen blobs; ``(archive path, URL)`` of each that arrived, failures checked and listed
    in ``<out_dir>/rejected.tsv``."""
    headers = {"x-ms-version": options.x_ms_version}
    fetched, failed = [], []
    for blob in chosen:
        archive = out_dir / "raw" / "blobs" / blob.name
        url = blob_url(options.container_url, blob.name)
        if not archive.resolve().is_relative_to((out_dir / "raw" / "blobs").resolve()):
            raise DownloadError(
                f"{options.container_url}: unsafe blob name {blob.name!r} (leaves the folder)"
            )
        try:
            downloader.fetch(
                url, archive, expect="zip", size=blob.size, md5_b64=blob.md5_b64, headers=headers
            )
        except DownloadError as err:
            failed.append((blob.name, url, str(err).splitlines()[0] if str(err) else type(err).__name__))
            continue
        fetched.append((archive, url))
    rejected = pd.DataFrame(failed, columns=list(REJECTED_COLUMNS), dtype=str)
    check_rejected(
        rejected,
        len(chosen),
        out_dir / "rejected.tsv",
        max_bad_fraction,
        options.container_url,
        DownloadError,
        items="archives",
    )
    return fetched

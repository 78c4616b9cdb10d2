"""The ``hpa_paper`` source: the HAMIL authors' published 512x512 HPA patches (an Azure blob container).

The container is listed (``?restype=container&comp=list``, page by page through ``NextMarker``, parsed
without relying on XML namespaces); the chosen zip blobs are downloaded with their listed size and
``Content-MD5`` checked, and extracted with :func:`preprocessing.download.safe_extract_zip` into
``<out_dir>/data``. Blob names come from a remote listing: one that could escape the data folder is
refused. Azure refuses to list a container whose public access is at blob level (anonymous clients get
403/404, ``ResourceNotFound``/``AuthorizationFailure``): then the four known blob names are fetched
without the listing, their sizes taken from the responses (no ``Content-MD5`` to check), and that is
logged.

Patches are laid out ``hpa/<ENSG>/<plate>_<well>_<field>_blue_red_green.jpg_<k>.jpg`` (the authors'
README) or ``..._blue_red_green_<k>.jpg`` (their loader's docstring); both are read. Each becomes one row
of ``images.tsv`` with ``group`` = the ENSG id and ``source_field`` = ``<field>_blue_red_green.jpg``.
Any other file is left out with a warning and listed in ``<out_dir>/skipped.tsv``; macOS archive
debris (``__MACOSX/``, ``._*``, ``.DS_Store``) is ignored without one.

Labels: by default the authors' own ``Gene,label`` table (``enhanced.csv`` of Outliers1106/AVA_hpa,
shipped in ``preprocessing/sources/data/``: 1,600 genes, class indices 0-26), with the index -> name
mapping derived from their group's named copy of the same table (see ``data/README.md``). A user's
table (``labels_table``) may be comma or tab delimited; ``Gene`` may be an ENSG id or a gene name;
``label`` may hold location names separated by ``;``, ``|`` or ``,``, or integer class indices, which
need ``label_names`` (the name of each index, in order) unless every row is one of the authors' rows
(then the shipped mapping applies); indices without a mapping are refused. With the HPA location table
(``location_table``, the zipped or plain TSV), gene names are mapped to ENSG ids and genes with an empty
label take their locations from it.
"""

from __future__ import annotations

import importlib.resources
import io
import json
import logging
import os
import re
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from preprocessing.download import (
    IMAGE_KINDS,
    Downloader,
    DownloadError,
    DownloadPolicy,
    safe_extract_zip,
    sniff,
)
from preprocessing.errors import InputError
from preprocessing.io import DEFAULT_MAX_BAD_FRACTION, check_rejected, write_tsv
from preprocessing.sources import hpa

__all__ = [
    "IMAGES_TSV_COLUMNS",
    "KNOWN_BLOBS",
    "BlobInfo",
    "HpaPaperOptions",
    "ListingRefused",
    "acquire",
    "authors_label_names",
    "authors_labels",
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
SKIPPED_COLUMNS: tuple[str, ...] = ("item", "reason")
# Both published spellings: <stem>_blue_red_green.jpg_<k>.jpg (the authors' README) and
# <stem>_blue_red_green_<k>.jpg (the docstring of their loader, src/datasets.py); which one the zips hold
# is unconfirmed, so either is read.
PATCH_RE = re.compile(r"^(?P<stem>.+?)_blue_red_green(?:\.jpg)?_(?P<k>\d+)\.jpg$", re.IGNORECASE)
PATCH_FORM = "<ENSG>/<field>_blue_red_green.jpg_<k>.jpg or <ENSG>/<field>_blue_red_green_<k>.jpg"
GENE_DIR_RE = re.compile(r"^ENSG\d{11}$")  # the real form: every gene of the authors' labels table
DEBRIS_NAMES = frozenset({".DS_Store", "Thumbs.db"})  # with __MACOSX/ and ._*: archive debris, no patch
# The blobs named in the authors' README (real_samples/hpa_paper/AVA_hpa_README_dataset_section.txt):
# fetched by name when the container cannot be listed.
KNOWN_BLOBS: tuple[str, ...] = (
    "hpa dataSet_part1.zip",
    "hpa_dataSet_part2.zip",
    "hpa_dataSet_part3.zip",
    "hpa_dataSet_part4.zip",
)
# The authors' labels table and the derived index -> name mapping (origins in data/README.md).
AUTHORS_LABELS_FILE = "hpa_paper_enhanced.csv"
AUTHORS_LABEL_NAMES_FILE = "hpa_paper_label_names.tsv"
# What Azure answers an anonymous List Blobs it refuses: the status (the error body is not read) or,
# when the body is read, <Error><Code>.
REFUSED_STATUS_RE = re.compile(r"\bHTTP (401|403|404|409)\b")


@dataclass(frozen=True)
class HpaPaperOptions:
    """Which container and blobs to fetch, and where the per-gene labels come from."""

    container_url: str = "https://bioimagestore.blob.core.windows.net/dataset"
    blobs: tuple[str, ...] = KNOWN_BLOBS  # empty: every .zip blob of the listing (the known four if refused)
    labels_table: Path | None = None  # a Gene,label table; None: the authors' table, shipped
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
    """One blob of a container listing (``size``/``md5_b64`` None when not listed)."""

    name: str
    size: int | None
    md5_b64: str | None


class ListingRefused(DownloadError):
    """The service refused to list the container (anonymous access at blob level, or none)."""


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

    Elements are matched by local name, so a namespaced answer parses the same. An Azure error document
    (``<Error><Code>ResourceNotFound</Code>...``) raises :class:`ListingRefused` with its code.
    """
    try:
        root = ET.fromstring(data.lstrip(b"\xef\xbb\xbf"))
    except ET.ParseError as err:
        raise DownloadError(f"{url}: not a blob listing ({err})") from None
    if _local(root.tag) == "Error":
        code, message = _child_text(root, "Code"), _child_text(root, "Message").split("\n")[0]
        raise ListingRefused(
            f"{url}: listing refused ({code or 'no code'}{': ' + message if message else ''})"
        )
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
    """Every blob of the container, following ``NextMarker`` page after page.

    Raises :class:`ListingRefused` when the first page is refused (HTTP 401/403/404/409 or an Azure
    ``<Error>`` document), :class:`DownloadError` for other failures.
    """
    base = container_url.rstrip("/") + "?restype=container&comp=list"
    blobs: list[BlobInfo] = []
    marker, seen = "", set()
    while True:
        first = not marker
        url = base + (f"&marker={urllib.parse.quote(marker, safe='')}" if marker else "")
        try:
            page, marker = parse_listing(downloader.get_bytes(url, {"x-ms-version": x_ms_version}), url)
        except DownloadError as err:
            line = str(err).splitlines()[0] if str(err) else type(err).__name__
            refused = isinstance(err, ListingRefused) or REFUSED_STATUS_RE.search(line)
            if refused and first:
                raise ListingRefused(line) from None
            if isinstance(err, ListingRefused):  # a later page: no fallback from half a listing
                raise DownloadError(line) from None
            raise
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
    return _parse_table(path.read_bytes(), str(path))


def _parse_table(data: bytes, name: str) -> pd.DataFrame:
    if sniff(data[:8]) == "zip":
        return hpa.read_location_zip(data, name)
    text = data.decode("utf-8-sig", errors="replace")
    first = text.split("\n", 1)[0]
    try:
        return pd.read_csv(
            io.StringIO(text), sep="\t" if "\t" in first else ",", dtype=str, keep_default_na=False
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"{name}: not a readable table ({str(err).splitlines()[0]})") from None


def _shipped(name: str) -> bytes:
    return (importlib.resources.files("preprocessing.sources") / "data" / name).read_bytes()


def _shipped_name(name: str) -> str:
    return f"preprocessing/sources/data/{name}"


@cache
def authors_label_names() -> tuple[str, ...]:
    """The class name of each index 0-26 of the authors' labels table (shipped, derived: data/README.md)."""
    where = _shipped_name(AUTHORS_LABEL_NAMES_FILE)
    table = _parse_table(_shipped(AUTHORS_LABEL_NAMES_FILE), where)
    if list(table.columns) != ["index", "name"] or table["index"].tolist() != [
        str(i) for i in range(len(table))
    ]:
        raise InputError(f"{where}: expected columns index, name with indices 0, 1, ... in order")
    names = tuple(n.strip() for n in table["name"])
    if len(set(names)) != len(names) or not all(names):
        raise InputError(f"{where}: class names must be distinct and non-empty")
    return names


@cache
def authors_labels() -> tuple[tuple[str, str], ...]:
    """``(Gene, label)`` rows of the authors' published table as shipped (class indices, unmapped)."""
    where = _shipped_name(AUTHORS_LABELS_FILE)
    table = _parse_table(_shipped(AUTHORS_LABELS_FILE), where)
    return tuple((g.strip(), c.strip()) for g, c in zip(table["Gene"], table["label"], strict=True))


def _column(table: pd.DataFrame, names: tuple[str, ...], path: Path | str) -> str:
    found = {c.strip().lower(): c for c in table.columns}
    for name in names:
        if name in found:
            return found[name]
    raise InputError(f"{path}: missing column {names[0]!r} (columns: {', '.join(map(str, table.columns))})")


def _split(cell: str) -> list[str]:
    return [t.strip() for t in re.split(r"[;|,]", cell) if t.strip()]


def read_labels_table(path: Path | None, options: HpaPaperOptions) -> dict[str, str]:
    """``{ENSG: "loc1;loc2"}`` from a ``Gene,label`` table (see the module docstring).

    ``path`` None: the authors' table shipped with the source, its indices named through the shipped
    mapping (or ``options.label_names`` when given). A table whose labels are class indices needs
    ``label_names``, unless every one of its rows is a row of the authors' table; otherwise it is refused.
    """
    if path is None:
        where = _shipped_name(AUTHORS_LABELS_FILE)
        table = _parse_table(_shipped(AUTHORS_LABELS_FILE), where)
    else:
        where = str(path)
        table = _read_any_table(Path(path))
    gene_col = _column(table, ("gene", "ensg", "gene id"), where)
    label_col = _column(table, ("label", "labels", "location", "locations"), where)
    rows = [(g.strip(), c.strip()) for g, c in zip(table[gene_col], table[label_col], strict=True)]
    label_names = _label_names_for(rows, path, where, options)
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
    for gene, cell in rows:
        gene = gene if GENE_DIR_RE.match(gene) else names.get(gene, gene)
        tokens = [_label_name(t, label_names, where) for t in _split(cell)]
        labels = ";".join(sorted(set(tokens))) if tokens else locations.get(gene, "")
        if gene:
            out[gene] = labels
    return out


def _label_names_for(
    rows: list[tuple[str, str]], path: Path | None, where: str, options: HpaPaperOptions
) -> tuple[str, ...]:
    """The names for class indices in ``rows``: the user's, the shipped mapping, or a refusal."""
    if options.label_names:
        return options.label_names
    numeric = next(((g, c) for g, c in rows if any(t.isdigit() for t in _split(c))), None)
    if numeric is None:
        return ()
    if path is None:
        return authors_label_names()
    authors = set(authors_labels())
    if all(row in authors for row in rows):
        log.info(
            "hpa_paper: %s: all %d rows are rows of the authors' enhanced.csv: class indices named through "
            "the shipped %s",
            where,
            len(rows),
            _shipped_name(AUTHORS_LABEL_NAMES_FILE),
        )
        return authors_label_names()
    raise InputError(
        f"{where}: labels are class indices (first: {numeric[0]},{numeric[1]}) and no label_names name them; "
        "give label_names (the class name of each index, in order), or leave labels_table unset to use "
        "the authors' table with its names"
    )


def _label_name(token: str, label_names: tuple[str, ...], where: str) -> str:
    if label_names and token.isdigit():
        if int(token) >= len(label_names):
            raise InputError(f"{where}: label index {token} out of range for {len(label_names)} label_names")
        return label_names[int(token)]
    return token


# -------------------------------------------------------------------------------------------- patches


def _is_debris(rel: str) -> bool:
    """macOS (and Windows) archive debris: ``__MACOSX/...``, ``._name`` resource forks, ``.DS_Store``."""
    parts = rel.split("/")
    return "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] in DEBRIS_NAMES


def _drop_non_images(patches: pd.DataFrame, data_dir: Path) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The patches whose files are images (sniffed as downloads are), and ``(path, kind)`` of the others."""
    kinds = []
    for rel in patches["path"]:
        with (data_dir / rel).open("rb") as fh:
            kinds.append(sniff(fh.read(16)))
    bad = np.array([k not in IMAGE_KINDS for k in kinds], dtype=bool)
    if bad.any():
        log.warning("hpa_paper: %d file(s) named as patches are not images, left out", int(bad.sum()))
    others = [(p, k) for p, k, b in zip(patches["path"], kinds, bad, strict=True) if b]
    return patches[~bad].reset_index(drop=True), others


def _scan(data_dir: Path, files: Iterable[str] | None) -> tuple[pd.DataFrame, list[str], int]:
    """The patch table, the other files (relative paths) and the number of debris files ignored."""
    rows, odd, debris = [], [], 0
    data_dir = Path(data_dir)
    if files is None:
        files = (p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*") if p.is_file())
    for rel in sorted(files):
        if _is_debris(rel):
            debris += 1
            continue
        path = Path(rel)
        match = PATCH_RE.match(path.name)
        if not match or not GENE_DIR_RE.match(path.parent.name):
            odd.append(rel)
            continue
        field = f"{match['stem']}_blue_red_green.jpg"
        rows.append((f"{match['stem']}_{match['k']}", path.parent.name, rel, field, int(match["k"])))
    table = pd.DataFrame(rows, columns=["image_id", "group", "path", "source_field", "k"])
    table = table.sort_values(["group", "source_field", "k", "path"], ignore_index=True).drop(columns="k")
    dup = table["image_id"].duplicated(keep=False)
    table.loc[dup, "image_id"] = table.loc[dup, "group"] + "_" + table.loc[dup, "image_id"]
    dup = table["image_id"].duplicated(keep=False)  # one patch under both spellings: the file name decides
    table.loc[dup, "image_id"] = [
        g + "_" + Path(r).name.removesuffix(".jpg")
        for g, r in zip(table.loc[dup, "group"], table.loc[dup, "path"], strict=True)
    ]
    return table, odd, debris


def _log_scan(odd: list[str], debris: int, where: str) -> None:
    if odd:
        log.warning(
            "hpa_paper: %d file(s) that are not patches (%s) left out%s, e.g. %s",
            len(odd),
            PATCH_FORM,
            where,
            ", ".join(odd[:3]),
        )
    if debris:
        log.debug("hpa_paper: %d archive debris file(s) ignored (__MACOSX/, ._*, .DS_Store)", debris)


def scan_patches(data_dir: Path, files: Iterable[str] | None = None) -> pd.DataFrame:
    """``image_id, group, path, source_field`` of every patch ``<ENSG>/<field>_blue_red_green.jpg_<k>.jpg``
    or ``<ENSG>/<field>_blue_red_green_<k>.jpg``.

    ``files``: only these paths (relative to ``data_dir``; the current archives' contents), else every
    file below ``data_dir``. Other files are left out with a warning (count and examples); archive
    debris (``__MACOSX/``, ``._*``, ``.DS_Store``) without one. ``path`` is relative to ``data_dir``;
    ``source_field`` is ``<field>_blue_red_green.jpg`` for both spellings; ``image_id`` is
    ``<field>_<k>`` (prefixed with the gene when two genes share it). Sorted by group, field and patch
    number.
    """
    table, odd, debris = _scan(data_dir, files)
    _log_scan(odd, debris, "")
    return table


# ------------------------------------------------------------------------------------------ acquisition


def _select(listing: list[BlobInfo] | None, wanted: tuple[str, ...], container_url: str) -> list[BlobInfo]:
    """The wanted blobs of the listing (every ``.zip`` when none is named); ``listing`` None (refused):
    the wanted names (or :data:`KNOWN_BLOBS`) with no size or MD5."""
    if listing is None:
        wanted = wanted or KNOWN_BLOBS
        by_name = {w: BlobInfo(w, None, None) for w in wanted}
    else:
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


def _listing_or_none(downloader: Downloader, options: HpaPaperOptions) -> list[BlobInfo] | None:
    """The container listing, or None (logged) when the service refuses to list it."""
    try:
        return list_blobs(downloader, options.container_url, options.x_ms_version)
    except ListingRefused as err:
        names = options.blobs or KNOWN_BLOBS
        log.warning(
            "hpa_paper: listing the container was refused (%s); fetching the %d known blob(s) by name "
            "(%s): sizes from the responses' Content-Length, no Content-MD5 to check",
            err,
            len(names),
            ", ".join(names),
        )
        return None


def _write_skipped(rows: list[tuple[str, str]], path: Path) -> None:
    write_tsv(pd.DataFrame(rows, columns=list(SKIPPED_COLUMNS), dtype=str), path)


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
    names where one is a folder of the other are refused. If the container cannot be listed, the blobs
    are fetched by name (``options.blobs``, or the four known ones) with the size the response announces.
    Here the unit that can fail is an archive, not an image: archives that fail to download are listed in
    ``<out_dir>/rejected.tsv`` (``blob, url, reason``) and left out; if more than ``max_bad_fraction`` of
    them (or all) fail, :class:`DownloadError` is raised (the patches themselves are decoded, and
    unreadable ones rejected, by the crop stage). Files that are not patches and genes without a label
    are left out, logged and listed in ``<out_dir>/skipped.tsv`` (``item, reason``). ``limit`` keeps
    the first ``limit`` genes of the table; the archives are still downloaded whole.
    ``retries``: attempts after the first for transient failures (when no ``downloader`` is given).
    """
    labels_path = Path(options.labels_table) if options.labels_table is not None else None
    labels = read_labels_table(labels_path, options)
    where = str(labels_path) if labels_path else _shipped_name(AUTHORS_LABELS_FILE)
    log.info("hpa_paper: labels of %d genes from %s", len(labels), where)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if downloader is None:
        downloader = Downloader(
            DownloadPolicy(concurrency=4, retries=retries), manifest=out_dir / "manifest.tsv"
        )
    chosen = _select(_listing_or_none(downloader, options), options.blobs, options.container_url)
    data_dir = out_dir / "data"
    fetched = _fetch_archives(chosen, options, out_dir, downloader, max_bad_fraction)
    listed = {archive: set(_read_marker(archive).get("files", [])) for archive, _ in fetched}
    current: set[str] = set()
    for archive, url in fetched:
        others = set().union(*(f for a, f in listed.items() if a != archive))
        current |= _unpack(archive, url, data_dir, others)
    patches, odd, debris = _scan(data_dir, current)
    skipped_path = out_dir / "skipped.tsv"
    _log_scan(odd, debris, f" (listed in {skipped_path})")
    skipped = [(f"data/{f}", f"not a patch: expected {PATCH_FORM}") for f in odd]
    patches, not_images = _drop_non_images(patches, data_dir)
    skipped += [
        (f"data/{f}", f"named as a patch but its bytes are {kind}, not an image") for f, kind in not_images
    ]
    if patches.empty:
        _write_skipped(skipped, skipped_path)
        raise InputError(f"{data_dir}: no patch named {PATCH_FORM} found")
    patches["labels"] = [labels.get(g, "") for g in patches["group"]]
    unlabelled = sorted(set(patches.loc[patches["labels"] == "", "group"]))
    skipped += [(g, f"gene without a label in {where}") for g in unlabelled]
    _write_skipped(skipped, skipped_path)
    if unlabelled:
        log.warning(
            "hpa_paper: %d gene(s) without a label in %s left out (listed in %s), e.g. %s",
            len(unlabelled),
            where,
            skipped_path,
            ", ".join(unlabelled[:3]),
        )
    patches = patches[patches["labels"] != ""]
    if limit is not None:
        patches = patches[patches["group"].isin(sorted(patches["group"].unique())[: max(0, limit)])]
    if patches.empty:
        raise InputError(f"{where}: no gene of the patches has a label")
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
        if blob.size is None:
            log.info(
                "hpa_paper: %s: %d bytes (size announced by the response; no listing to check it against)",
                blob.name,
                archive.stat().st_size,
            )
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

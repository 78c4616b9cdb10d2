"""The ``hpa`` source: immunofluorescence fields of the Human Protein Atlas, one bag per gene.

1. The subcellular location table (a zipped TSV) gives each gene's locations and reliability. It is
   fetched from the documented path of the configured release first (see :func:`location_paths_for`)
   and parsed by header name, so every layout works: the v17/v18 one (``Gene``, ``Gene name``,
   ``Reliability`` and one column per reliability level: ``Validated`` (v17) / ``Enhanced`` (v18+),
   ``Supported``, ``Approved``, ``Uncertain``) and the newer one, which adds ``Main location``,
   ``Additional location``, ... Genes outside ``reliability`` are dropped, and labels are the locations
   listed at the kept levels only. The default keeps ``Enhanced`` genes: on the complete v18 table that is
   1,612 genes, 1,600 of which have an Enhanced-level location, exactly the authors' labels table (the
   other 12 list locations at lower levels only; they are written to ``skipped.tsv``).
2. Each kept gene's XML (``<base_url>/<ENSG>.xml``) is streamed with ``iterparse``: ``entry`` ->
   ``antibody`` -> ``cellExpression[@source="HPA"][@technology="ICC/IF"]`` -> ``subAssay[@type="human"]``
   -> ``data`` -> ``cellLine``, ``location``, ``assayImage/image/imageUrl``. Sub-assays (or data blocks)
   with a ``subtype`` (``subtype="ciliated cell lines"``: z-stacks of 21 planes per field in newer
   releases) are not fields: they are listed in ``skipped.tsv``, not fetched.
3. Images are fetched (<= 4 connections by default) into ``<out_dir>/images/<ENSG>/``; the file name of
   ``imageUrl`` is cut before ``blue`` and ``blue_red_green.jpg`` (or ``<color>.jpg`` per channel)
   appended, since some names carry an extra token (``1843_B2_17_cr5af971a263864_blue_red_green.jpg``).
   An ``imageUrl`` of another shape (no ``_blue`` part) goes to ``rejected.tsv`` with the reason.

Data licence: https://www.proteinatlas.org/about/licence (credit the HPA; each row keeps its image URL).
"""

from __future__ import annotations

import io
import logging
import re
import urllib.parse
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import BinaryIO

import pandas as pd

from preprocessing.download import Downloader, DownloadError, DownloadPolicy, FetchItem
from preprocessing.errors import InputError
from preprocessing.io import DEFAULT_MAX_BAD_FRACTION, check_rejected, write_json, write_tsv
from preprocessing.sources.common import finish_downloads

__all__ = [
    "CHANNELS",
    "IMAGES_TSV_COLUMNS",
    "HpaOptions",
    "IfImage",
    "acquire",
    "channel_urls",
    "fetch_location_table",
    "location_paths_for",
    "parse_gene_xml",
    "parse_location_table",
    "read_location_zip",
]

log = logging.getLogger(__name__)

CHANNELS: tuple[str, ...] = ("blue", "red", "green", "yellow")
COMPOSITE = "blue_red_green"
IMAGES_TSV_COLUMNS: tuple[str, ...] = (
    "image_id",
    "group",
    "path",
    "labels",
    "gene_name",
    "antibody",
    "cell_line",
    "url",
)
LEVELS: tuple[str, ...] = ("Enhanced", "Validated", "Supported", "Approved", "Uncertain")
# the top level was called "Validated" in v17 and "Enhanced" from v18: asking for one accepts both
SYNONYMS: dict[str, str] = {"validated": "enhanced"}
NEW_LOCATION_COLUMNS: tuple[str, ...] = ("Main location", "Additional location")
# Location table paths (DATA_SOURCES.md): the current site serves download/tsv/..., the archived release
# hosts (vNN.proteinatlas.org) the path without tsv/ (documented for v18 by HPAanalyze; for other archived
# releases *unconfirmed*, hence the other path as the fallback either way).
CURRENT_TABLE_PATH = "download/tsv/subcellular_location.tsv.zip"
ARCHIVE_TABLE_PATH = "download/subcellular_location.tsv.zip"
RELEASE_HOST_RE = re.compile(r"^(v\d+)\.proteinatlas\.org$", re.IGNORECASE)
SKIPPED_COLUMNS: tuple[str, ...] = ("item", "url", "reason")
# Names from remote files become file names: they must have the real forms (every Gene of the v17/v18
# location tables and of the authors' labels is "ENSG" + 11 digits; image folders are numbers and field
# names are like 1832_C1_2, si28_H2_13 or 1843_B2_17_cr5af971a263864).
GENE_RE = re.compile(r"^ENSG\d{11}$")
IMAGE_ID_RE = re.compile(r"^[A-Za-z0-9]+(?:[_-][A-Za-z0-9]+)*$")


@dataclass(frozen=True)
class HpaOptions:
    """Where to download from (a pinned release host by default) and what to keep."""

    base_url: str = "https://v18.proteinatlas.org"
    image_base_url: str | None = None  # None: the image host in imageUrl; else a mirror (URL path kept)
    release_note: str = "HPA v18 (v18.proteinatlas.org); licence https://www.proteinatlas.org/about/licence"
    # Enhanced only (Validated in v17): the paper's gene set, see the module docstring
    reliability: tuple[str, ...] = ("Enhanced",)
    channels: str | tuple[str, ...] = COMPOSITE  # "blue_red_green" or a tuple of CHANNELS (one file each)
    max_genes: int | None = None
    genes: tuple[str, ...] = ()  # only these ENSG ids (empty: all that pass the filters)
    # release whose documented table path is tried first: "vNN" (an archived release) or "current";
    # "" = from base_url (a vNN.proteinatlas.org host is that release, any other host "current")
    release: str = ""
    location_paths: tuple[str, ...] = ()  # empty: location_paths_for(base_url, release)

    def __post_init__(self) -> None:
        if isinstance(self.channels, str):
            if self.channels != COMPOSITE:
                raise InputError(f"hpa channels must be {COMPOSITE!r} or a tuple of {CHANNELS}")
            return
        bad = [c for c in self.channels if c not in CHANNELS]
        if bad or not self.channels:
            raise InputError(f"hpa channels must be {COMPOSITE!r} or a tuple of {CHANNELS}, got {bad}")

    def channel_list(self) -> tuple[str, ...]:
        """``("blue_red_green",)`` for the composite, else the per-channel colours."""
        return (COMPOSITE,) if isinstance(self.channels, str) else tuple(self.channels)


@dataclass(frozen=True)
class IfImage:
    """One IF field image of a gene, as listed in the gene's XML (``subtype``: of its sub-assay or data
    block, e.g. ``ciliated cell lines``; empty for the standard human IF assay)."""

    gene: str
    antibody: str
    cell_line: str
    locations: tuple[str, ...]
    image_url: str
    subtype: str = ""


# -------------------------------------------------------------------------------------- location table


def _norm_level(name: str) -> str:
    low = name.strip().lower()
    return SYNONYMS.get(low, low)


def _split(cell: str) -> list[str]:
    return [s.strip() for s in str(cell).split(";") if s.strip()]


def read_location_zip(data: bytes, name: str) -> pd.DataFrame:
    """The TSV inside the location zip (the member ending ``.tsv``, else the only one), all strings."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = [m for m in zf.namelist() if not m.endswith("/")]
            tsv = [m for m in members if m.lower().endswith(".tsv")] or members
            if not tsv:
                raise InputError(f"{name}: empty zip archive")
            with zf.open(tsv[0]) as fh:
                return pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False)
    except zipfile.BadZipFile as err:
        raise InputError(f"{name}: not a valid zip archive ({err})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{name}: not a readable TSV ({str(err).splitlines()[0]})") from None


def parse_location_table(
    table: pd.DataFrame,
    reliability: Sequence[str],
    name: str,
    skipped: list[tuple[str, str]] | None = None,
) -> pd.DataFrame:
    """``gene, gene_name, reliability, labels`` for genes whose reliability is in ``reliability``.

    Labels are the locations listed in the reliability-level columns that are in ``reliability``
    (``Validated`` and ``Enhanced`` are the same level), in every layout that has such columns (v17, v18,
    and v19+ beside ``Main location``): ``Main location``/``Additional location`` list every location
    whatever its level (an Uncertain one too), so they are used only by a table without level columns,
    where the gene's ``Reliability`` is then the only filter. ``Extracellular location`` is not an IF
    location and is never a label. Genes of a kept reliability left without a label are dropped and, when
    ``skipped`` is a list, appended to it as ``(gene, reason)``.
    """
    missing = [c for c in ("Gene", "Reliability") if c not in table.columns]
    if missing:
        raise InputError(f"{name}: missing columns: {', '.join(missing)}")
    wanted = {_norm_level(r) for r in reliability}
    levels = {_norm_level(x) for x in LEVELS}
    level_cols = [c for c in table.columns if _norm_level(c) in levels]
    if level_cols:
        cols = [c for c in level_cols if _norm_level(c) in wanted]
    elif "Main location" in table.columns:
        cols = [c for c in NEW_LOCATION_COLUMNS if c in table.columns]
    else:
        raise InputError(f"{name}: no location columns (neither reliability levels nor 'Main location')")
    rows = []
    for row in table.to_dict("records"):
        if _norm_level(row["Reliability"]) not in wanted:
            continue
        labels: list[str] = []
        for c in cols:
            labels += [x for x in _split(row[c]) if x not in labels]
        gene = row["Gene"].strip()
        if labels:
            rows.append((gene, row.get("Gene name", "").strip(), row["Reliability"].strip(), labels))
        elif skipped is not None:
            skipped.append((gene, _no_label_reason(row, cols, level_cols)))
    out = pd.DataFrame(rows, columns=["gene", "gene_name", "reliability", "labels"])
    out["labels"] = [";".join(sorted(x)) for x in out["labels"]]
    return out


def _no_label_reason(row: dict[str, str], cols: Sequence[str], level_cols: Sequence[str]) -> str:
    kept = "/".join(cols) or "none"
    elsewhere = [f"{c}: {';'.join(_split(row[c]))}" for c in level_cols if c not in cols and _split(row[c])]
    where = f"; listed at {', '.join(elsewhere)}" if elsewhere else ""
    return f"reliability {row['Reliability'].strip()} but no location at the kept levels ({kept}){where}"


def location_paths_for(base_url: str, release: str = "") -> tuple[str, ...]:
    """Location table paths to try, the documented one of the release first.

    ``release`` ``"vNN"`` is an archived release (``https://vNN.proteinatlas.org/download/...``, no
    ``tsv/``), ``"current"`` the current site (``download/tsv/...``); ``""`` takes it from the host of
    ``base_url``: ``vNN.proteinatlas.org`` is release vNN, any other host (a mirror, www) "current".
    """
    rel = release.strip().lower()
    if not rel:
        host = urllib.parse.urlsplit(base_url).hostname or ""
        match = RELEASE_HOST_RE.match(host)
        rel = match.group(1).lower() if match else "current"
    if rel == "current":
        return (CURRENT_TABLE_PATH, ARCHIVE_TABLE_PATH)
    if re.fullmatch(r"v\d+", rel):
        return (ARCHIVE_TABLE_PATH, CURRENT_TABLE_PATH)
    raise InputError(f"hpa release must be 'vNN' (e.g. v18) or 'current', not {release!r}")


def _not_there(err: DownloadError) -> bool:
    """Whether the answer says "not at this path": 403/404, or a body that is not a zip, such as an HTML
    page served with 200 (the downloader sniffs the body; any text/html answer that is not a zip is
    refused the same way)."""
    text = str(err)
    return (
        re.search(r": HTTP 40[34]\b", text) is not None
        or re.search(r"expected zip, got \w+", text) is not None
    )


def fetch_location_table(
    downloader: Downloader, base_url: str, paths: Sequence[str], dest: Path
) -> tuple[bytes, str]:
    """Download the location zip from the first of ``paths`` that holds it: 403/404 or a body that is not
    a zip (an HTML page) moves on to the next path; returns (bytes, URL)."""
    base = base_url.rstrip("/")
    tried: list[str] = []
    for path in paths:
        url = f"{base}/{path.lstrip('/')}"
        try:
            downloader.fetch(url, dest, expect="zip")
            return dest.read_bytes(), url
        except DownloadError as err:
            if not _not_there(err):
                raise
            tried.append(str(err))
    raise DownloadError(f"no location table found: {'; '.join(tried) or 'no path to try'}")


# ----------------------------------------------------------------------------------------------- gene XML


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_gene_xml(source: BinaryIO | Path, gene: str = "", subtypes: bool = False) -> Iterator[IfImage]:
    """Stream the IF images of an HPA XML (one gene's, or the whole atlas), clearing parsed elements.

    ``gene`` names the gene when the XML holds no ``identifier[@db="Ensembl"]``. Images without an
    ``imageUrl`` are skipped. Images of a human sub-assay or data block with a ``subtype`` attribute
    (``subtype="ciliated cell lines"``: z-stack planes, not fields) are left out unless ``subtypes``, when
    they come with :attr:`IfImage.subtype` set. Raises :class:`InputError` naming the source on
    malformed XML.
    """
    name = str(source) if isinstance(source, Path) else (gene or "XML")
    stack: list[str] = []
    current_gene, antibody, subtype = gene, "", ""
    if_depth = human_depth = 0  # stack depth where the IF cellExpression / human subAssay started
    try:
        for event, elem in ET.iterparse(source, events=("start", "end")):
            tag = _local(elem.tag)
            if event == "start":
                stack.append(tag)
                if tag == "entry":
                    current_gene = gene
                elif tag == "antibody":
                    antibody = elem.get("id", "")
                elif (
                    tag == "cellExpression"
                    and elem.get("source") == "HPA"
                    and elem.get("technology") == "ICC/IF"
                ):
                    if_depth = len(stack)
                elif tag == "subAssay" and if_depth and elem.get("type") == "human":
                    human_depth = len(stack)
                    subtype = (elem.get("subtype") or "").strip()
                continue
            if tag == "identifier" and elem.get("db") == "Ensembl" and stack[-2:-1] == ["entry"]:
                current_gene = elem.get("id", current_gene)
            elif tag == "data" and human_depth:
                for im in _data_images(elem, current_gene, antibody):
                    im = replace(im, subtype=subtype or (elem.get("subtype") or "").strip())
                    if subtypes or not im.subtype:
                        yield im
                elem.clear()
            elif tag == "subAssay" and human_depth == len(stack):
                human_depth = 0
            elif tag == "cellExpression" and if_depth == len(stack):
                if_depth = 0
            if tag in ("antibody", "entry"):
                elem.clear()
            stack.pop()
    except ET.ParseError as err:
        raise InputError(f"{name}: malformed XML ({err})") from None


def _data_images(data: ET.Element, gene: str, antibody: str) -> Iterator[IfImage]:
    cell_line, locations, urls = "", [], []
    for child in data:
        tag = _local(child.tag)
        if tag == "cellLine":
            cell_line = (child.text or "").strip()
        elif tag == "location" and (child.text or "").strip():
            locations.append(child.text.strip())
        elif tag == "assayImage":
            for url in child.iter():
                if _local(url.tag) == "imageUrl" and (url.text or "").strip():
                    urls.append(url.text.strip())
    for url in urls:
        yield IfImage(gene, antibody, cell_line, tuple(locations), url)


def channel_urls(
    image_url: str, channels: Sequence[str], image_base_url: str | None = None
) -> dict[str, str]:
    """``{channel: URL}`` from an ``imageUrl``: all up to the ``_`` before ``blue``, then ``<channel>.jpg``.

    ``image_base_url`` replaces scheme and host (and prefixes the path) to use a mirror. Raises
    :class:`InputError` when the file name holds no ``_blue``.
    """
    parts = urllib.parse.urlsplit(image_url)
    folder, _, fname = parts.path.rpartition("/")
    cut = fname.find("_blue")
    if cut < 0:
        raise InputError(f"{image_url}: image name has no '_blue' channel part")
    stem = f"{folder}/{fname[: cut + 1]}"
    if image_base_url:
        prefix = image_base_url.rstrip("/")
    else:
        prefix = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "", "", ""))
    return {c: f"{prefix}{stem}{c}.jpg" for c in channels}


def image_id_of(image_url: str) -> str:
    """``4109/1843_B2_17_cr5af_blue_red_green.jpg`` -> ``4109_1843_B2_17_cr5af`` (folder keeps it unique)."""
    folder, _, fname = urllib.parse.urlsplit(image_url).path.rpartition("/")
    stem = fname[: fname.find("_blue")] if "_blue" in fname else fname.rsplit(".", 1)[0]
    last = folder.rpartition("/")[2]
    return f"{last}_{stem}" if last else stem


# ------------------------------------------------------------------------------------------- acquisition


def check_gene_id(gene: str) -> str | None:
    """Why a gene id from a remote table cannot be used in a file name, or None if it is an ENSG id."""
    return None if GENE_RE.fullmatch(gene) else "not an Ensembl gene id (ENSG + 11 digits)"


def _gene_images(
    genes: pd.DataFrame, out_dir: Path, downloader: Downloader, base: str
) -> tuple[list[IfImage], list[tuple[str, str, str]]]:
    """Fetch and parse each gene's XML; (images, [(gene, url, reason)] for genes refused or failed).

    A gene id that is not an ENSG id (a hostile ``../../x`` or ``/abs`` row) is refused, never used.
    """
    failed = [(g, "", r) for g in genes["gene"] if (r := check_gene_id(g))]
    valid = [g for g in genes["gene"] if check_gene_id(g) is None]
    items = [FetchItem(f"{base}/{g}.xml", out_dir / "raw" / "xml" / f"{g}.xml", expect="xml") for g in valid]
    images = []
    for gene, res in zip(valid, downloader.fetch_many(items), strict=True):
        if res.error:
            failed.append((gene, res.item.url, res.error))
            continue
        try:
            images += [
                replace(im, gene=gene)
                for im in parse_gene_xml(res.path, gene, subtypes=True)
                if im.gene in ("", gene)
            ]
        except InputError as err:
            failed.append((gene, res.item.url, str(err)))
    return images, failed


def acquire(
    out_dir: Path,
    options: HpaOptions,
    downloader: Downloader | None = None,
    limit: int | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    retries: int = 5,
) -> pd.DataFrame:
    """Download HPA IF images for well-localised genes and write ``<out_dir>/images.tsv``; return it.

    ``limit`` (and ``options.max_genes``) keep the first genes of the location table. Composite images
    get the ``path``/``url`` columns; per-channel downloads add ``path_<c>``/``url_<c>`` per colour and
    ``path``/``url`` are those of the first colour. Genes whose XML fails, or whose id is not an ENSG
    id (it would become a file name), are listed in ``<out_dir>/rejected_genes.tsv``; failed or
    badly named images (an ``imageUrl`` with no ``_blue`` part) in ``<out_dir>/rejected.tsv``, with the
    reason. What is left out on purpose is listed in ``<out_dir>/skipped.tsv`` (``item, url, reason``):
    genes of a kept reliability with no location at the kept levels, and images of sub-assays with a
    ``subtype`` (ciliated cell lines), which are not fields. If more than ``max_bad_fraction`` of the
    genes, or of the images, (or all) fail, :class:`DownloadError` is raised and ``images.tsv`` is not
    written; otherwise a warning says how many were left out and where they are listed. Options, the
    location table's URL and the release note are recorded in ``<out_dir>/source.json``.
    ``retries``: attempts after the first for transient failures (when no ``downloader`` is given).
    """
    channels = options.channel_list()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if downloader is None:
        downloader = Downloader(
            DownloadPolicy(concurrency=4, retries=retries), manifest=out_dir / "manifest.tsv"
        )
    base = options.base_url.rstrip("/")
    paths = options.location_paths or location_paths_for(base, options.release)
    data, loc_url = fetch_location_table(
        downloader, base, paths, out_dir / "raw" / "subcellular_location.tsv.zip"
    )
    no_label: list[tuple[str, str]] = []
    genes = parse_location_table(read_location_zip(data, loc_url), options.reliability, loc_url, no_label)
    if options.genes:
        genes = genes[genes["gene"].isin(options.genes)]
        no_label = [(g, r) for g, r in no_label if g in options.genes]
    skipped = [(g, loc_url, reason) for g, reason in no_label]
    caps = [c for c in (limit, options.max_genes) if c is not None]
    if caps:
        genes = genes.head(max(0, min(caps)))
    if genes.empty:
        raise InputError(f"{loc_url}: no gene left after the reliability filter")
    images, bad_genes = _gene_images(genes, out_dir, downloader, base)
    skipped += [
        (
            image_id_of(im.image_url),
            im.image_url,
            f"sub-assay subtype {im.subtype!r}: not a standard IF field",
        )
        for im in images
        if im.subtype
    ]
    images = [im for im in images if not im.subtype]
    _write_skipped(skipped, out_dir, base)
    check_rejected(
        pd.DataFrame(bad_genes, columns=["gene", "url", "reason"], dtype=str),
        len(genes),
        out_dir / "rejected_genes.tsv",
        max_bad_fraction,
        loc_url,
        DownloadError,
        items="genes",
        first_key="gene",
    )
    if not images:
        raise InputError(
            f"{base}: no IF image found for {len(genes)} genes (see {out_dir}/rejected_genes.tsv)"
        )
    table, items, rows, refused, shared = _image_table(
        images, genes.set_index("gene"), channels, options.image_base_url, out_dir
    )
    if shared:
        _write_skipped(skipped + shared, out_dir, base)
    table = finish_downloads(table, items, rows, out_dir, downloader, max_bad_fraction, loc_url, refused)
    record = {**asdict(options), "location_url": loc_url, "max_bad_fraction": max_bad_fraction}
    write_json(record, out_dir / "source.json")
    write_tsv(table, out_dir / "images.tsv")
    return table


def _write_skipped(skipped: list[tuple[str, str, str]], out_dir: Path, what: str) -> None:
    """Write ``<out_dir>/skipped.tsv``: what was left out on purpose (``item, url, reason``)."""
    write_tsv(pd.DataFrame(skipped, columns=list(SKIPPED_COLUMNS), dtype=str), out_dir / "skipped.tsv")
    if skipped:
        log.info(
            "%s: left out %d genes or images on purpose, listed in %s",
            what,
            len(skipped),
            out_dir / "skipped.tsv",
        )


def _image_table(
    images: list[IfImage],
    genes: pd.DataFrame,
    channels: tuple[str, ...],
    image_base: str | None,
    out_dir: Path,
) -> tuple[pd.DataFrame, list[FetchItem], list[int], list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """Rows of images.tsv, their fetch items and rows, ``(image_id, url, reason)`` of images whose name
    (from the XML's ``imageUrl``) cannot be a file name or has no channel part, and of images that another
    gene listed first (one field, one bag: kept in the first gene's)."""
    records, items, rows, refused, shared = [], [], [], [], []
    seen: dict[str, str] = {}
    for im in images:
        image_id = image_id_of(im.image_url)
        if image_id in seen:  # the same field listed twice (e.g. two data blocks, or two genes)
            if seen[image_id] != im.gene:
                shared.append((image_id, im.image_url, f"same field already in the bag of {seen[image_id]}"))
            continue
        seen[image_id] = im.gene
        if not IMAGE_ID_RE.fullmatch(image_id):
            refused.append((image_id, im.image_url, "image name is not <folder>_<plate>_<well>_<field>"))
            continue
        try:
            urls = channel_urls(im.image_url, channels, image_base)
        except InputError as err:  # e.g. ..._selected.jpg: no channel part to build the URLs from
            refused.append((image_id, im.image_url, str(err)))
            continue
        paths = {c: f"images/{im.gene}/{image_id}_{c}.jpg" for c in channels}
        rec = {
            "image_id": image_id,
            "group": im.gene,
            "path": paths[channels[0]],
            "labels": genes.at[im.gene, "labels"],
            "gene_name": genes.at[im.gene, "gene_name"],
            "antibody": im.antibody,
            "cell_line": im.cell_line,
            "url": urls[channels[0]],
        }
        if len(channels) > 1 or channels[0] != COMPOSITE:
            rec |= {f"path_{c}": paths[c] for c in channels} | {f"url_{c}": urls[c] for c in channels}
        for c in channels:
            items.append(FetchItem(urls[c], out_dir / paths[c], expect="jpeg"))
            rows.append(len(records))
        records.append(rec)
    table = pd.DataFrame(records) if records else pd.DataFrame(columns=list(IMAGES_TSV_COLUMNS))
    return table, items, rows, refused, shared

"""The ``hpa`` source: immunofluorescence fields of the Human Protein Atlas, one bag per gene.

1. The subcellular location table (a zipped TSV) gives each gene's locations and reliability. It is
   parsed by header name, so both layouts work: the v17/v18 one (``Gene``, ``Gene name``,
   ``Reliability`` and one column per reliability level: ``Validated`` (v17) / ``Enhanced`` (v18+),
   ``Supported``, ``Approved``, ``Uncertain``) and the newer one (``Main location``,
   ``Additional location``, ...). Genes outside ``reliability`` are dropped.
2. Each kept gene's XML (``<base_url>/<ENSG>.xml``) is streamed with ``iterparse``: ``entry`` ->
   ``antibody`` -> ``cellExpression[@source="HPA"][@technology="ICC/IF"]`` -> ``subAssay[@type="human"]``
   -> ``data`` -> ``cellLine``, ``location``, ``assayImage/image/imageUrl``.
3. Images are fetched (<= 4 connections by default) into ``<out_dir>/images/<ENSG>/``; the file name of
   ``imageUrl`` is cut before ``blue`` and ``blue_red_green.jpg`` (or ``<color>.jpg`` per channel)
   appended, since some names carry an extra token (``1843_B2_17_cr5af971a263864_blue_red_green.jpg``).

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
from dataclasses import asdict, dataclass, field, replace
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
    reliability: tuple[str, ...] = ("Enhanced", "Validated", "Supported", "Approved")
    channels: str | tuple[str, ...] = COMPOSITE  # "blue_red_green" or a tuple of CHANNELS (one file each)
    max_genes: int | None = None
    genes: tuple[str, ...] = ()  # only these ENSG ids (empty: all that pass the filters)
    location_paths: tuple[str, ...] = field(
        default=("download/tsv/subcellular_location.tsv.zip", "download/subcellular_location.tsv.zip")
    )

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
    """One IF field image of a gene, as listed in the gene's XML."""

    gene: str
    antibody: str
    cell_line: str
    locations: tuple[str, ...]
    image_url: str


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


def parse_location_table(table: pd.DataFrame, reliability: Sequence[str], name: str) -> pd.DataFrame:
    """``gene, gene_name, reliability, labels`` for genes whose reliability is in ``reliability``.

    New layout (a ``Main location`` column): labels are main + additional locations (``Extracellular
    location``, whose full meaning is *unconfirmed*, is not an IF location and is left out). Old layout:
    labels are the locations listed in the level columns that are in ``reliability`` (``Validated`` and
    ``Enhanced`` are the same level). Genes left without a label are dropped.
    """
    missing = [c for c in ("Gene", "Reliability") if c not in table.columns]
    if missing:
        raise InputError(f"{name}: missing columns: {', '.join(missing)}")
    wanted = {_norm_level(r) for r in reliability}
    if "Main location" in table.columns:
        cols = [c for c in NEW_LOCATION_COLUMNS if c in table.columns]
    else:
        levels = {_norm_level(x) for x in LEVELS}
        cols = [c for c in table.columns if _norm_level(c) in wanted & levels]
        if not any(_norm_level(c) in levels for c in table.columns):
            raise InputError(f"{name}: no location columns (neither 'Main location' nor reliability levels)")
    rows = []
    for _, row in table.iterrows():
        if _norm_level(row["Reliability"]) not in wanted:
            continue
        labels: list[str] = []
        for c in cols:
            labels += [x for x in _split(row[c]) if x not in labels]
        if labels:
            rows.append(
                (row["Gene"].strip(), row.get("Gene name", "").strip(), row["Reliability"].strip(), labels)
            )
    out = pd.DataFrame(rows, columns=["gene", "gene_name", "reliability", "labels"])
    out["labels"] = [";".join(sorted(x)) for x in out["labels"]]
    return out


def _http_gone(err: DownloadError) -> bool:
    return re.search(r": HTTP 40[34]\b", str(err)) is not None


def fetch_location_table(
    downloader: Downloader, base_url: str, paths: Sequence[str], dest: Path
) -> tuple[bytes, str]:
    """Download the location zip from the first of ``paths`` that exists (404/403 moves on): (bytes, URL)."""
    base = base_url.rstrip("/")
    last: DownloadError | None = None
    for path in paths:
        url = f"{base}/{path.lstrip('/')}"
        try:
            downloader.fetch(url, dest, expect="zip")
            return dest.read_bytes(), url
        except DownloadError as err:
            if not _http_gone(err):
                raise
            last = err
    raise DownloadError(f"no location table found: {last}")


# ----------------------------------------------------------------------------------------------- gene XML


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_gene_xml(source: BinaryIO | Path, gene: str = "") -> Iterator[IfImage]:
    """Stream the IF images of an HPA XML (one gene's, or the whole atlas), clearing parsed elements.

    ``gene`` names the gene when the XML holds no ``identifier[@db="Ensembl"]``. Images without an
    ``imageUrl`` are skipped. Raises :class:`InputError` naming the source on malformed XML.
    """
    name = str(source) if isinstance(source, Path) else (gene or "XML")
    stack: list[str] = []
    current_gene, antibody = gene, ""
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
                continue
            if tag == "identifier" and elem.get("db") == "Ensembl" and stack[-2:-1] == ["entry"]:
                current_gene = elem.get("id", current_gene)
            elif tag == "data" and human_depth:
                yield from _data_images(elem, current_gene, antibody)
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
                replace(im, gene=gene) for im in parse_gene_xml(res.path, gene) if im.gene in ("", gene)
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
    badly named images in ``<out_dir>/rejected.tsv``. If more than ``max_bad_fraction`` of the genes, or
    of the images, (or all) fail, :class:`DownloadError` is raised and ``images.tsv`` is not written;
    otherwise a warning says how many were left out and where they are listed. Options and the release
    note are recorded in ``<out_dir>/source.json``.
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
    data, loc_url = fetch_location_table(
        downloader, base, options.location_paths, out_dir / "raw" / "subcellular_location.tsv.zip"
    )
    genes = parse_location_table(read_location_zip(data, loc_url), options.reliability, loc_url)
    if options.genes:
        genes = genes[genes["gene"].isin(options.genes)]
    caps = [c for c in (limit, options.max_genes) if c is not None]
    if caps:
        genes = genes.head(max(0, min(caps)))
    if genes.empty:
        raise InputError(f"{loc_url}: no gene left after the reliability filter")
    images, bad_genes = _gene_images(genes, out_dir, downloader, base)
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
    table, items, rows, refused = _image_table(
        images, genes.set_index("gene"), channels, options.image_base_url, out_dir
    )
    table = finish_downloads(table, items, rows, out_dir, downloader, max_bad_fraction, loc_url, refused)
    record = {**asdict(options), "location_url": loc_url, "max_bad_fraction": max_bad_fraction}
    write_json(record, out_dir / "source.json")
    write_tsv(table, out_dir / "images.tsv")
    return table


def _image_table(
    images: list[IfImage],
    genes: pd.DataFrame,
    channels: tuple[str, ...],
    image_base: str | None,
    out_dir: Path,
) -> tuple[pd.DataFrame, list[FetchItem], list[int], list[tuple[str, str, str]]]:
    """Rows of images.tsv, their fetch items and rows, and ``(image_id, url, reason)`` of images whose
    name (from the XML's ``imageUrl``) cannot be a file name."""
    records, items, rows, seen, refused = [], [], [], set(), []
    for im in images:
        image_id = image_id_of(im.image_url)
        if image_id in seen:  # the same field listed twice (e.g. two data blocks)
            continue
        seen.add(image_id)
        if not IMAGE_ID_RE.fullmatch(image_id):
            refused.append((image_id, im.image_url, "image name is not <folder>_<plate>_<well>_<field>"))
            continue
        urls = channel_urls(im.image_url, channels, image_base)
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
    return table, items, rows, refused

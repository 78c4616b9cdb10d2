"""The ``bdgp`` source: Drosophila embryo in-situ images of the Berkeley Drosophila Genome Project.

Two tables from the BDGP MySQL dump are read (both gzip, no header):

* ``insitu_annot.csv.gz``: gene symbol, CG id, FBgn, stage-range code, anatomical term. The delimiter has
  been seen as comma and as tab: it is detected.
* ``insitu_images.csv.gz``: one row per image with its storage path (``img_dir_10/insitu10383.jpe``), the
  gene, the stage range and the view. The column order is *unconfirmed*: every column is found by content
  (the path by its pattern, the gene by matching the annotation table's identifiers, the stage by its
  codes, the view by its words) and can be forced with :attr:`BdgpOptions.image_columns`.

One bag (group) per (gene, stage range), named ``<CG id>_s<code>``, labelled with the gene's anatomical
terms at that stage (non-anatomical terms dropped). Images are fetched politely (one connection, one
request per second by default) from ``<base_url>/insitu_image_storage/<path>`` into
``<out_dir>/images/<path>``. Failed images are listed in ``<out_dir>/rejected.tsv``; more than
``max_bad_fraction`` of them is an error.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import re
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pandas as pd

from preprocessing.download import Downloader, DownloadError, DownloadPolicy, FetchItem, sniff
from preprocessing.errors import InputError
from preprocessing.io import DEFAULT_MAX_BAD_FRACTION, write_tsv
from preprocessing.sources.common import finish_downloads

__all__ = [
    "ANNOT_COLUMNS",
    "IMAGES_TSV_COLUMNS",
    "STAGE_RANGES",
    "BdgpOptions",
    "acquire",
    "build_groups",
    "parse_annotations",
    "parse_images",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

STAGE_RANGES: dict[int, str] = {1: "1-3", 2: "4-6", 3: "7-8", 4: "9-10", 5: "11-12", 6: "13-16"}
ANNOT_COLUMNS: tuple[str, ...] = ("symbol", "cg", "fbgn", "stage", "term")
IMAGES_TSV_COLUMNS: tuple[str, ...] = ("image_id", "group", "path", "labels", "gene", "stage", "view", "url")
VIEW_WORDS: tuple[str, ...] = ("lateral", "dorsal", "ventral", "anterior", "posterior")
PATH_RE = re.compile(r"^(?:[\w.-]+/)*[\w.-]+\.(?:jpe|jpg|jpeg|png|tif|tiff)$", re.IGNORECASE)
CG_RE = re.compile(r"^CG\d+$")


@dataclass(frozen=True)
class BdgpOptions:
    """Where to download from and which images and terms to keep."""

    base_url: str = "https://insitu.fruitfly.org"
    annot_path: str = "insitu-mysql-dump/insitu_annot.csv.gz"
    images_path: str = "insitu-mysql-dump/insitu_images.csv.gz"
    image_dir: str = "insitu_image_storage"
    stages: tuple[int, ...] = (2, 3, 4, 5, 6)
    views: tuple[str, ...] = ("lateral", "dorsal", "ventral")
    drop_terms: tuple[str, ...] = (
        "no staining",
        "ubiquitous",
        "faint ubiquitous",
        "maternal",
        "flag_for_volker",
    )
    drop_prefixes: tuple[str, ...] = ("list_",)
    keep_unlabelled: bool = False  # keep (gene, stage) bags whose only terms were dropped (empty labels)
    min_interval: float = 1.0  # seconds between requests (be gentle with this server)
    # (gene, stage, view, path) column indices of the images table, overriding detection by content
    image_columns: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in STAGE_RANGES]
        if bad:
            raise InputError(f"bdgp stages must be codes 1-6, got {bad}")


# ------------------------------------------------------------------------------------------ table reading


def _text(data: bytes, name: str) -> str:
    """Decompress (if gzip) and decode a downloaded table; refuse an HTML page."""
    kind = sniff(data[:1024])
    if kind == "gzip":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise InputError(f"{name}: corrupt gzip ({err})") from None
    elif kind == "html":
        raise InputError(f"{name}: got an HTML page, not a table")
    return data.decode("utf-8", errors="replace")


def detect_delimiter(text: str) -> str:
    """Tab if the first non-empty lines hold tabs, else comma (the dump has been seen in both)."""
    lines = [ln for ln in text.splitlines()[:50] if ln.strip()]
    if not lines:
        return ","
    tabbed = sum("\t" in ln for ln in lines)
    return "\t" if tabbed * 2 >= len(lines) else ","


def _rows(text: str) -> list[list[str]]:
    delimiter = detect_delimiter(text)
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, quotechar='"')
    return [[_clean(c) for c in row] for row in reader if any(c.strip() for c in row)]


def _clean(cell: str) -> str:
    cell = cell.strip()
    return "" if cell in ("\\N", "NULL") else cell


def _stage_code(cell: str) -> int | None:
    """A stage-range code from ``"4"`` or from a range such as ``"9-10"`` / ``"stage 9-10"``."""
    cell = cell.strip()
    if cell.isdigit():
        code = int(cell)
        return code if code in STAGE_RANGES else None
    match = re.search(r"(\d+)\s*-\s*(\d+)", cell)
    if match:
        text = f"{int(match.group(1))}-{int(match.group(2))}"
        for code, rng in STAGE_RANGES.items():
            if rng == text:
                return code
    return None


def parse_annotations(data: bytes, name: str = "insitu_annot.csv.gz") -> pd.DataFrame:
    """Parse the annotation table (gzip or plain; comma or tab) into ``symbol, cg, fbgn, stage, term``.

    ``stage`` is the integer range code. Rows with fewer than five fields or no valid stage code are
    skipped (logged); a comma-delimited row with more than five fields keeps the extra fields in the term
    (an unquoted comma inside it). Raises :class:`InputError` naming ``name`` when no row is valid.
    """
    rows = _rows(_text(data, name))
    good, bad = [], 0
    for row in rows:
        if len(row) < 5:
            bad += 1
            continue
        symbol, cg, fbgn, stage, term = row[0], row[1], row[2], _stage_code(row[3]), ",".join(row[4:]).strip()
        if stage is None or not term or not (cg or fbgn or symbol):
            bad += 1
            continue
        good.append((symbol, cg, fbgn, stage, term))
    if not good:
        raise InputError(
            f"{name}: no valid annotation row (expected 5 columns: symbol, CG, FBgn, stage, term)"
        )
    if bad:
        log.warning("%s: skipped %d malformed annotation rows of %d", name, bad, len(rows))
    table = pd.DataFrame(good, columns=list(ANNOT_COLUMNS))
    table["stage"] = table["stage"].astype(int)
    return table


def _gene_keys(annot: pd.DataFrame) -> dict[str, str]:
    """Any identifier of a gene (CG id, FBgn, symbol) -> the key used for groups (CG id, else FBgn/symbol)."""
    keys: dict[str, str] = {}
    for symbol, cg, fbgn in annot[["symbol", "cg", "fbgn"]].drop_duplicates().itertuples(index=False):
        key = cg or fbgn or symbol
        for ident in (symbol, fbgn, cg):  # CG last: it wins a clash
            if ident:
                keys[ident] = key
    return keys


def _best_column(rows: list[list[str]], score, exclude: Iterable[int] = ()) -> tuple[int | None, float]:
    """Index of the column where ``score(cell)`` is true most often (fraction of non-empty cells)."""
    width = max(len(r) for r in rows)
    best, best_frac = None, 0.0
    for j in range(width):
        if j in exclude:
            continue
        cells = [r[j] for r in rows if j < len(r) and r[j]]
        if not cells:
            continue
        frac = sum(bool(score(c)) for c in cells) / len(cells)
        if frac > best_frac:
            best, best_frac = j, frac
    return best, best_frac


def _stage_score(cell: str) -> bool:
    return _stage_code(cell) is not None and not (cell.isdigit() and len(cell) > 1)


def _view_of(cell: str) -> str | None:
    low = cell.lower()
    return next((w for w in VIEW_WORDS if w in low), None)


def detect_image_columns(
    rows: list[list[str]], gene_keys: dict[str, str], name: str
) -> tuple[int, int, int, int]:
    """``(gene, stage, view, path)`` column indices of the images table, found by content.

    The column order is *unconfirmed*, so each column is recognised by what it holds: the path by the
    ``img_dir_N/insituN.jpe`` pattern, the gene by matching identifiers of the annotation table, the
    stage by range codes 1-6 (or ``"9-10"`` style ranges), the view by words such as ``lateral``.
    """
    sample = rows[:2000]
    path_col, f_path = _best_column(sample, PATH_RE.match)
    used = {path_col}
    gene_col, f_gene = _best_column(sample, lambda c: c in gene_keys, used)
    used.add(gene_col)
    view_col, f_view = _best_column(sample, _view_of, used)
    used.add(view_col)
    stage_col, f_stage = _best_column(sample, _stage_score, used)
    found = {"path": (path_col, f_path), "gene": (gene_col, f_gene), "view": (view_col, f_view)}
    found["stage"] = (stage_col, f_stage)
    weak = [f"{k} ({f:.0%} match)" for k, (j, f) in found.items() if j is None or f < 0.5]
    if weak:
        raise InputError(
            f"{name}: cannot find the {', '.join(weak)} column(s) by content; set image_columns explicitly"
        )
    return gene_col, stage_col, view_col, path_col  # type: ignore[return-value]


def unsafe_path_reason(path: str) -> str | None:
    """Why an image path of the remote images table may not become a file path, or None.

    Real paths are relative, like ``img_dir_10/insitu10383.jpe``; an absolute path, a drive letter, a
    backslash or a ``.``/``..`` part could write outside the data folder.
    """
    if path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", path):
        return "absolute path"
    if "\\" in path or "\x00" in path:
        return "backslash or NUL in path"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "'.', '..' or empty part in path"
    return None


def parse_images(
    data: bytes,
    gene_keys: dict[str, str],
    name: str = "insitu_images.csv.gz",
    columns: tuple[int, int, int, int] | None = None,
    refused: list[tuple[str, str, str]] | None = None,
) -> pd.DataFrame:
    """Parse the images table into ``gene, stage, view, path`` (gene = the key from ``gene_keys``).

    Rows whose path does not look like an image path (a header line, say), whose gene is unknown or
    whose stage is not a code are skipped; :class:`InputError` naming ``name`` if nothing is left. A row
    whose path could leave the data folder (see :func:`unsafe_path_reason`) is refused: appended to
    ``refused`` as ``(path, "", reason)`` (a rejected-table row) and logged with its row number.
    """
    rows = _rows(_text(data, name))
    if not rows:
        raise InputError(f"{name}: empty images table")
    gene_col, stage_col, view_col, path_col = columns or detect_image_columns(rows, gene_keys, name)
    out, bad = [], 0
    for number, row in enumerate(rows, 1):
        cells = [row[j] if j < len(row) else "" for j in (gene_col, stage_col, view_col, path_col)]
        gene, stage, path = gene_keys.get(cells[0]), _stage_code(cells[1]), cells[3]
        reason = unsafe_path_reason(path) if path else None
        if reason:
            log.warning("%s: row %d refused: unsafe image path %r (%s)", name, number, path, reason)
            if refused is not None:
                refused.append((path, "", f"row {number} of {name}: unsafe image path ({reason})"))
            continue
        if gene is None or stage is None or not PATH_RE.match(path):
            bad += 1
            continue
        out.append((gene, stage, _view_of(cells[2]) or cells[2].lower(), path))
    if not out:
        raise InputError(f"{name}: no usable image row")
    if bad:
        log.warning("%s: skipped %d image rows of %d (unknown gene, stage or path)", name, bad, len(rows))
    return pd.DataFrame(out, columns=["gene", "stage", "view", "path"]).drop_duplicates(ignore_index=True)


# ---------------------------------------------------------------------------------------------- grouping


def keep_term(term: str, drop_terms: Sequence[str], drop_prefixes: Sequence[str]) -> bool:
    """Whether an annotation term is anatomical (not in ``drop_terms``, no prefix in ``drop_prefixes``)."""
    low = term.strip().lower()
    return low not in {t.lower() for t in drop_terms} and not low.startswith(
        tuple(p.lower() for p in drop_prefixes)
    )


def build_groups(annot: pd.DataFrame, images: pd.DataFrame, options: BdgpOptions) -> pd.DataFrame:
    """Join images to their (gene, stage) terms: ``group, gene, stage, view, path, labels``, sorted.

    Images outside ``options.stages`` / ``options.views`` are dropped; labels are the sorted anatomical
    terms of the gene at that stage; bags without any are dropped unless ``keep_unlabelled``.
    """
    keys = _gene_keys(annot)
    annot = annot.assign(
        gene=[keys.get(c or f or s) for c, f, s in zip(annot.cg, annot.fbgn, annot.symbol, strict=True)]
    )
    kept = annot[[keep_term(t, options.drop_terms, options.drop_prefixes) for t in annot["term"]]]
    labels = kept.groupby(["gene", "stage"])["term"].agg(lambda s: ";".join(sorted(set(s))))
    views = {v.lower() for v in options.views}
    imgs = images[images["stage"].isin(options.stages) & images["view"].str.lower().isin(views)].copy()
    imgs["labels"] = [labels.get((g, s), "") for g, s in zip(imgs["gene"], imgs["stage"], strict=True)]
    if not options.keep_unlabelled:
        imgs = imgs[imgs["labels"] != ""]
    imgs.insert(0, "group", [f"{g}_s{s}" for g, s in zip(imgs["gene"], imgs["stage"], strict=True)])
    return imgs.sort_values(["group", "path"], ignore_index=True)


def _image_ids(groups: pd.DataFrame) -> list[str]:
    """File stem; ``<group>_<stem>`` where a stem occurs more than once."""
    stems = [Path(p).stem for p in groups["path"]]
    counts = pd.Series(stems).value_counts()
    return [s if counts[s] == 1 else f"{g}_{s}" for g, s in zip(groups["group"], stems, strict=True)]


# ------------------------------------------------------------------------------------------- acquisition


def _fetch_table(downloader: Downloader, url: str, dest: Path, parse: Callable[[bytes], T]) -> T:
    """Download a table (gzip expected, plain text tolerated) and ``parse`` it.

    An HTML page, or a table that does not parse (a corrupt gzip), is deleted with its manifest row
    (:meth:`Downloader.discard`), so that no later run takes it for a good download, and refused.
    """
    downloader.fetch(url, dest)
    data = dest.read_bytes()
    if sniff(data[:1024]) == "html":
        downloader.discard(dest)
        raise DownloadError(f"{url}: got an HTML page, not a table")
    try:
        return parse(data)
    except InputError:
        downloader.discard(dest)
        raise


def acquire(
    out_dir: Path,
    options: BdgpOptions,
    downloader: Downloader | None = None,
    limit: int | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    retries: int = 5,
) -> pd.DataFrame:
    """Download the BDGP tables and images and write ``<out_dir>/images.tsv``; return that table.

    ``limit`` keeps only the first ``limit`` groups (sorted by name) for a quick try. Without a
    ``downloader`` a polite one is made (one connection, ``options.min_interval`` seconds between
    requests, manifest ``<out_dir>/manifest.tsv``). Images that fail (HTTP error, an HTML page instead of
    a JPEG) are listed in ``<out_dir>/rejected.tsv`` (``image_id, url, reason``) and left out; if more than
    ``max_bad_fraction`` of them (or all) fail, :class:`DownloadError` is raised and ``images.tsv`` is not
    written.
    ``retries``: attempts after the first for transient failures (when no ``downloader`` is given).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if downloader is None:
        policy = DownloadPolicy(min_interval=options.min_interval, concurrency=1, retries=retries)
        downloader = Downloader(policy, manifest=out_dir / "manifest.tsv")
    base = options.base_url.rstrip("/")
    annot_url, images_url = f"{base}/{options.annot_path}", f"{base}/{options.images_path}"
    annot = _fetch_table(
        downloader,
        annot_url,
        out_dir / "raw" / "insitu_annot.csv.gz",
        lambda data: parse_annotations(data, annot_url),
    )
    refused: list[tuple[str, str, str]] = []
    images = _fetch_table(
        downloader,
        images_url,
        out_dir / "raw" / "insitu_images.csv.gz",
        lambda data: parse_images(data, _gene_keys(annot), images_url, options.image_columns, refused),
    )
    groups = build_groups(annot, images, options)
    if limit is not None:
        groups = groups[groups["group"].isin(sorted(groups["group"].unique())[: max(0, limit)])]
    if groups.empty:
        raise InputError(f"{images_url}: no image left after the stage/view/term filters")
    table = pd.DataFrame(
        {
            "image_id": _image_ids(groups),
            "group": groups["group"],
            "path": [f"images/{p}" for p in groups["path"]],
            "labels": groups["labels"],
            "gene": groups["gene"],
            "stage": [STAGE_RANGES[s] for s in groups["stage"]],
            "view": groups["view"],
            "url": [f"{base}/{options.image_dir}/{urllib.parse.quote(p)}" for p in groups["path"]],
        },
        columns=list(IMAGES_TSV_COLUMNS),
    )
    table = _download_images(table, out_dir, downloader, max_bad_fraction, images_url, refused)
    write_tsv(table, out_dir / "images.tsv")
    return table


def _download_images(
    table: pd.DataFrame,
    out_dir: Path,
    downloader: Downloader,
    max_bad_fraction: float,
    what: str,
    refused: list[tuple[str, str, str]],
) -> pd.DataFrame:
    items = [
        FetchItem(u, out_dir / p, expect="jpeg") for u, p in zip(table["url"], table["path"], strict=True)
    ]
    return finish_downloads(
        table, items, list(range(len(items))), out_dir, downloader, max_bad_fraction, what, refused
    )

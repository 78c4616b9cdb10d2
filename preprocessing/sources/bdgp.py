"""The ``bdgp`` source: Drosophila embryo in-situ images of the Berkeley Drosophila Genome Project.

Two tables from the BDGP MySQL dump are read (both gzip, no header, latin1-encoded):

* ``insitu_annot.csv.gz``: gene symbol, CG id, FBgn, stage-range code, anatomical term. The delimiter has
  been seen as comma and as tab: it is detected.
* ``insitu_images.csv.gz``: one row per image in ten columns (:data:`IMAGE_LAYOUT`: CG id, symbol,
  annotation symbol, FBgn, cDNA clone, path, stage, view, comment, resolution; the layout documented by a
  notebook that read the real file). The path looks like ``img_dir_10/insitu10383.jpe``; a few rows have
  none. Should a table arrive in another layout, its columns are found by content instead (the path by
  its pattern, the gene by the annotation's identifiers, the stage by its codes, the view by its words),
  and :attr:`BdgpOptions.image_columns` can force them.

The paper's instances are single standardised embryos, so whole-field ``production_images`` rows and
``resolution=high`` close-ups are left out by default (:attr:`BdgpOptions.exclude_path_prefixes`,
:attr:`BdgpOptions.exclude_resolutions`).

Bags: ``bags_from="bdgp"`` (default) makes one bag per (gene, stage range), named ``<CG id>_s<code>``,
labelled with the gene's anatomical terms at that stage (non-anatomical terms dropped).
``bags_from="flyit"`` takes the bag list of the FlyIT data set instead (the paper used "the same dataset
as FlyIT"): (gene, stage range, terms) from the shipped ``data/flyit_bags.tsv``, with BDGP images matched
by gene (any identifier of the images table) and stage range in place of FlyExpress's; bags that find no
image are listed in ``<out_dir>/flyit_unmatched.tsv`` with the reason.

Images are fetched politely (one connection, one request per second by default) from
``<base_url>/insitu_image_storage/<path>`` into ``<out_dir>/images/<path>``. Failed images are listed in
``<out_dir>/rejected.tsv``; more than ``max_bad_fraction`` of them is an error. Every image row left out
before downloading is counted by reason in the log and in ``<out_dir>/source.json``.
"""

from __future__ import annotations

import ast
import csv
import gzip
import importlib.resources
import io
import logging
import re
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import pandas as pd

from preprocessing.download import Downloader, DownloadError, DownloadPolicy, FetchItem, sniff
from preprocessing.errors import InputError
from preprocessing.io import DEFAULT_MAX_BAD_FRACTION, write_json, write_tsv
from preprocessing.sources.common import finish_downloads

__all__ = [
    "ANNOT_COLUMNS",
    "BAGS_FROM",
    "DEFAULT_DROP_PREFIXES",
    "DEFAULT_DROP_TERMS",
    "FLYIT_BAGS_COLUMNS",
    "IMAGES_TSV_COLUMNS",
    "IMAGE_LAYOUT",
    "STAGE_RANGES",
    "BdgpOptions",
    "acquire",
    "build_flyit_groups",
    "build_groups",
    "derive_flyit_bags",
    "load_flyit_bags",
    "parse_annotations",
    "parse_images",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

STAGE_RANGES: dict[int, str] = {1: "1-3", 2: "4-6", 3: "7-8", 4: "9-10", 5: "11-12", 6: "13-16"}
ANNOT_COLUMNS: tuple[str, ...] = ("symbol", "cg", "fbgn", "stage", "term")
#: the documented column order of ``insitu_images.csv`` (no header; tomsing1/fastpages_setup notebook)
IMAGE_LAYOUT: tuple[str, ...] = (
    "cg",
    "symbol",
    "annotation_symbol",
    "fbgn",
    "cdna_clone",
    "path",
    "stage",
    "view",
    "comment",
    "resolution",
)
#: identifier columns of the documented layout, in the order they are tried (CG id first)
ID_COLUMNS: tuple[int, ...] = (0, 3, 1, 2, 4)
IMAGES_TSV_COLUMNS: tuple[str, ...] = ("image_id", "group", "path", "labels", "gene", "stage", "view", "url")
FLYIT_BAGS_COLUMNS: tuple[str, ...] = ("gene", "stage_range", "terms", "n_images")
FLYIT_BAGS_FILE = "flyit_bags.tsv"
BAGS_FROM: tuple[str, ...] = ("bdgp", "flyit")
VIEW_WORDS: tuple[str, ...] = ("lateral", "dorsal", "ventral", "anterior", "posterior")
PATH_RE = re.compile(r"^(?:[\w.-]+/)*[\w.-]+\.(?:jpe|jpg|jpeg|png|tif|tiff)$", re.IGNORECASE)
CG_RE = re.compile(r"^CG\d+$")
ISOFORM_RE = re.compile(r"^(.+)-P[A-Z]$")  # FlyIT names a few genes by a polypeptide: CG15786-PA

#: BDGP terms that name no anatomical structure: staining levels, maternal/ubiquitous patterns, curator
#: flags, and pattern or position words (real strings and counts: BgeeDB/bgee_pipeline
#: pipeline/In_situ/BDGP/annot_info; see shared/real_samples/bdgp/).
DEFAULT_DROP_TERMS: tuple[str, ...] = (
    "no staining",
    "ubiquitous",
    "faint ubiquitous",
    "strong ubiquitous",
    "maternal",
    "rapidly degraded",
    "apically cleared",
    "subset",
    "flag_for_volker",
    "flag_as_nonspecific",
    "epi_combo",
    "pair_rule",
    "pair rule",
    "gap",
    "segment polarity",
    "segmentally repeated",
    "anterior",
    "middle",
    "posterior",
)
#: term prefixes dropped likewise: ``list_...`` and the curators' ``need new term(...)`` placeholders
DEFAULT_DROP_PREFIXES: tuple[str, ...] = ("list_", "need new term")


@dataclass(frozen=True)
class BdgpOptions:
    """Where to download from, which bags, images and terms to keep."""

    base_url: str = "https://insitu.fruitfly.org"
    annot_path: str = "insitu-mysql-dump/insitu_annot.csv.gz"
    images_path: str = "insitu-mysql-dump/insitu_images.csv.gz"
    image_dir: str = "insitu_image_storage"
    encoding: str = "latin1"  # both dump tables are latin1 (not UTF-8)
    # "bdgp": bags and terms from insitu_annot.csv; "flyit": the FlyIT data set's bags (the paper's)
    bags_from: str = "bdgp"
    stages: tuple[int, ...] = (2, 3, 4, 5, 6)
    views: tuple[str, ...] = ("lateral", "dorsal", "ventral")
    # None: DEFAULT_DROP_TERMS / DEFAULT_DROP_PREFIXES for bags_from=bdgp; nothing for bags_from=flyit,
    # whose terms are kept as FlyIT (and the paper) used them ("ubiquitous" is among the paper's top 10)
    drop_terms: tuple[str, ...] | None = None
    drop_prefixes: tuple[str, ...] | None = None
    # whole-field pictures of many embryos (path folder production_images/) are not single embryos
    exclude_path_prefixes: tuple[str, ...] = ("production",)
    exclude_resolutions: tuple[str, ...] = ("high",)  # close-ups of part of an embryo
    keep_unlabelled: bool = False  # keep (gene, stage) bags whose only terms were dropped (empty labels)
    min_interval: float = 1.0  # seconds between requests (be gentle with this server)
    # (gene, stage, view, path[, resolution]) column indices of the images table, overriding its layout
    image_columns: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in STAGE_RANGES]
        if bad:
            raise InputError(f"bdgp stages must be codes 1-6, got {bad}")
        if self.bags_from not in BAGS_FROM:
            raise InputError(f"bdgp bags_from must be one of {', '.join(BAGS_FROM)}, got {self.bags_from!r}")
        if self.image_columns is not None and len(self.image_columns) not in (4, 5):
            raise InputError(
                "bdgp image_columns must be (gene, stage, view, path[, resolution]) column indices, "
                f"got {list(self.image_columns)}"
            )

    def terms_dropped(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The (terms, prefixes) actually dropped: the given ones, else the defaults of ``bags_from``."""
        flyit = self.bags_from == "flyit"
        terms = self.drop_terms if self.drop_terms is not None else (() if flyit else DEFAULT_DROP_TERMS)
        prefixes = self.drop_prefixes
        if prefixes is None:
            prefixes = () if flyit else DEFAULT_DROP_PREFIXES
        return tuple(terms), tuple(prefixes)


# ------------------------------------------------------------------------------------------ table reading


def _text(data: bytes, name: str, encoding: str = "latin1") -> str:
    """Decompress (if gzip) and decode a downloaded table; refuse an HTML page.

    The dump tables are latin1 (a notebook that read the real files found they are not UTF-8): every
    byte decodes, so a non-ASCII symbol comes through as written, never as a replacement character.
    """
    kind = sniff(data[:1024])
    if kind == "gzip":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise InputError(f"{name}: corrupt gzip ({err})") from None
    elif kind == "html":
        raise InputError(f"{name}: got an HTML page, not a table")
    return data.decode(encoding, errors="replace")


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


def parse_annotations(
    data: bytes, name: str = "insitu_annot.csv.gz", encoding: str = "latin1"
) -> pd.DataFrame:
    """Parse the annotation table (gzip or plain; comma or tab) into ``symbol, cg, fbgn, stage, term``.

    ``stage`` is the integer range code. Rows with fewer than five fields or no valid stage code are
    skipped (logged); a comma-delimited row with more than five fields keeps the extra fields in the term
    (an unquoted comma inside it). Raises :class:`InputError` naming ``name`` when no row is valid.
    """
    rows = _rows(_text(data, name, encoding))
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
    """``(gene, stage, view, path)`` column indices of an images table that is not in the documented
    layout, found by content: the path by the ``img_dir_N/insituN.jpe`` pattern, the gene by matching
    identifiers of the bag list, the stage by range codes 1-6 (or ``"9-10"`` style ranges), the view by
    words such as ``lateral``.
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


def _documented_layout(rows: list[list[str]]) -> bool:
    """Whether the rows look like the documented ten-column layout (path in column 6)."""
    sample = rows[:2000]
    ten = sum(len(r) >= len(IMAGE_LAYOUT) for r in sample)
    paths = [r[5] for r in sample if len(r) > 5 and r[5]]
    looks_like_paths = sum(bool(PATH_RE.match(p)) for p in paths) * 2 >= len(paths)
    return ten * 2 >= len(sample) and bool(paths) and looks_like_paths


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


#: reasons an image row is left out, as counted in the log and in ``source.json``
SKIP_NO_PATH = "no image path"
SKIP_UNSAFE = "unsafe image path (listed in rejected.tsv)"
SKIP_NOT_IMAGE = "path is not an image file"
SKIP_WHOLE_FIELD = "whole-field production image (exclude_path_prefixes)"
SKIP_UNKNOWN_GENE = "gene not in the bag list"
SKIP_NO_STAGE = "no valid stage code"
SKIP_HIGH_RES = "close-up resolution (exclude_resolutions)"
SKIP_DUPLICATE = "duplicate row"
SKIP_STAGE = "stage range not selected (stages)"
SKIP_VIEW = "view not selected or missing (views)"
SKIP_NO_LABEL = "no term left after dropping non-anatomical ones"
SKIP_NOT_FLYIT_BAG = "(gene, stage range) not a FlyIT bag"
SKIP_LIMIT = "group beyond --limit"

IMAGE_TABLE_COLUMNS: tuple[str, ...] = ("gene", "stage", "view", "path", "resolution", "skip")


def parse_images(
    data: bytes,
    gene_keys: dict[str, str],
    name: str = "insitu_images.csv.gz",
    columns: Sequence[int] | None = None,
    refused: list[tuple[str, str, str]] | None = None,
    options: BdgpOptions | None = None,
) -> pd.DataFrame:
    """Parse the images table into ``gene, stage, view, path, resolution, skip``, one row per table row.

    ``gene`` is the key from ``gene_keys`` of the first identifier column that has one (CG id, FBgn,
    symbol, annotation symbol, cDNA clone in the documented layout); ``stage`` the range code (0 if none).
    ``skip`` is empty for a usable row, else why it is left out: no path, a path that is no image file,
    a whole-field or close-up image (``options.exclude_path_prefixes`` / ``exclude_resolutions``), an
    unknown gene, no stage code, a duplicate. A row whose path could leave the data folder (see
    :func:`unsafe_path_reason`) is also appended to ``refused`` as ``(path, "", reason)`` (a rejected-table
    row) and logged with its row number. :class:`InputError` naming ``name`` if no row is usable.

    The table's layout is the documented one (:data:`IMAGE_LAYOUT`) unless ``columns`` gives
    ``(gene, stage, view, path[, resolution])`` indices; a table in neither has its columns found by content.
    """
    options = options or BdgpOptions()
    rows = _rows(_text(data, name, options.encoding))
    if not rows:
        raise InputError(f"{name}: empty images table")
    if columns is not None:
        gene_cols, stage_col, view_col, path_col = (columns[0],), columns[1], columns[2], columns[3]
        res_col = columns[4] if len(columns) > 4 else None
    elif _documented_layout(rows):
        gene_cols, stage_col, view_col, path_col, res_col = ID_COLUMNS, 6, 7, 5, 9
    else:
        gene_col, stage_col, view_col, path_col = detect_image_columns(rows, gene_keys, name)
        gene_cols, res_col = (gene_col,), None
        log.warning(
            "%s: not the documented 10-column layout; columns found by content: gene %d, stage %d, view %d, "
            "path %d (no resolution column)",
            name,
            gene_col + 1,
            stage_col + 1,
            view_col + 1,
            path_col + 1,
        )
    prefixes = tuple(p.lower() for p in options.exclude_path_prefixes)
    resolutions = {r.lower() for r in options.exclude_resolutions}
    out, seen = [], set()

    def cell(row: list[str], j: int | None) -> str:
        return row[j] if j is not None and j < len(row) else ""

    for number, row in enumerate(rows, 1):
        path, view_cell, res = cell(row, path_col), cell(row, view_col), cell(row, res_col).lower()
        gene = next((gene_keys[c] for j in gene_cols if (c := cell(row, j)) in gene_keys), "")
        stage = _stage_code(cell(row, stage_col)) or 0
        view = _view_of(view_cell) or view_cell.lower()
        reason = unsafe_path_reason(path) if path else None
        if reason:
            log.warning("%s: row %d refused: unsafe image path %r (%s)", name, number, path, reason)
            if refused is not None:
                refused.append((path, "", f"row {number} of {name}: unsafe image path ({reason})"))
            skip = SKIP_UNSAFE
        elif not path:
            skip = SKIP_NO_PATH
        elif prefixes and path.lower().startswith(prefixes):
            skip = SKIP_WHOLE_FIELD
        elif not PATH_RE.match(path):
            skip = SKIP_NOT_IMAGE
        elif res and res in resolutions:
            skip = SKIP_HIGH_RES
        elif not gene:
            skip = SKIP_UNKNOWN_GENE
        elif not stage:
            skip = SKIP_NO_STAGE
        elif (gene, stage, view, path) in seen:
            skip = SKIP_DUPLICATE
        else:
            skip = ""
            seen.add((gene, stage, view, path))
        out.append((gene, stage, view, path, res, skip))
    table = pd.DataFrame(out, columns=list(IMAGE_TABLE_COLUMNS))
    table["stage"] = table["stage"].astype(int)
    if not (table["skip"] == "").any():
        counts = ", ".join(f"{r}: {n}" for r, n in table["skip"].value_counts().items())
        raise InputError(f"{name}: no usable image row ({counts})")
    return table


# ---------------------------------------------------------------------------------------------- grouping


def keep_term(term: str, drop_terms: Sequence[str], drop_prefixes: Sequence[str]) -> bool:
    """Whether an annotation term is anatomical (not in ``drop_terms``, no prefix in ``drop_prefixes``)."""
    low = term.strip().lower()
    return low not in {t.lower() for t in drop_terms} and not low.startswith(
        tuple(p.lower() for p in drop_prefixes)
    )


def _usable(images: pd.DataFrame, options: BdgpOptions, excluded: Counter[str]) -> pd.DataFrame:
    """The usable rows of ``images`` in the selected stages and views; the others counted by reason."""
    if "skip" not in images.columns:
        images = images.assign(skip="")
    excluded.update(images.loc[images["skip"] != "", "skip"])
    imgs = images[images["skip"] == ""]
    in_stage = imgs["stage"].isin(options.stages)
    excluded[SKIP_STAGE] += int((~in_stage).sum())
    imgs = imgs[in_stage]
    views = {v.lower() for v in options.views}
    in_view = imgs["view"].str.lower().isin(views)
    excluded[SKIP_VIEW] += int((~in_view).sum())
    return imgs[in_view].copy()


def _finish_groups(imgs: pd.DataFrame) -> pd.DataFrame:
    imgs.insert(0, "group", [f"{g}_s{s}" for g, s in zip(imgs["gene"], imgs["stage"], strict=True)])
    cols = ["group", "gene", "stage", "view", "path", "labels"]
    return imgs[cols].sort_values(["group", "path"], ignore_index=True)


def build_groups(
    annot: pd.DataFrame,
    images: pd.DataFrame,
    options: BdgpOptions,
    excluded: Counter[str] | None = None,
) -> pd.DataFrame:
    """Join images to their (gene, stage) terms: ``group, gene, stage, view, path, labels``, sorted.

    Rows with a ``skip`` reason, and images outside ``options.stages`` / ``options.views``, are dropped;
    labels are the sorted anatomical terms of the gene at that stage; bags without any are dropped unless
    ``keep_unlabelled``. Every dropped row is counted by reason in ``excluded``.
    """
    excluded = Counter() if excluded is None else excluded
    drop_terms, drop_prefixes = options.terms_dropped()
    keys = _gene_keys(annot)
    annot = annot.assign(
        gene=[keys.get(c or f or s) for c, f, s in zip(annot.cg, annot.fbgn, annot.symbol, strict=True)]
    )
    kept = annot[[keep_term(t, drop_terms, drop_prefixes) for t in annot["term"]]]
    labels = kept.groupby(["gene", "stage"])["term"].agg(lambda s: ";".join(sorted(set(s))))
    imgs = _usable(images, options, excluded)
    imgs["labels"] = [labels.get((g, s), "") for g, s in zip(imgs["gene"], imgs["stage"], strict=True)]
    if not options.keep_unlabelled:
        excluded[SKIP_NO_LABEL] += int((imgs["labels"] == "").sum())
        imgs = imgs[imgs["labels"] != ""].copy()
    return _finish_groups(imgs)


def _image_ids(groups: pd.DataFrame) -> list[str]:
    """File stem; ``<group>_<stem>`` where a stem occurs more than once."""
    stems = [Path(p).stem for p in groups["path"]]
    counts = pd.Series(stems).value_counts()
    return [s if counts[s] == 1 else f"{g}_{s}" for g, s in zip(groups["group"], stems, strict=True)]


# ----------------------------------------------------------------------------------------- FlyIT bags


def _tuple_cell(cell: str) -> tuple[str, ...]:
    """A FlyIT cell such as ``"('maternal', 'ubiquitous')"`` (a Python tuple literal) as a tuple."""
    try:
        value = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        raise InputError(f"FlyIT table: cannot read {cell[:60]!r} as a tuple of strings") from None
    if isinstance(value, str):
        value = (value,)
    return tuple(str(v) for v in value)


def derive_flyit_bags(annotations_csv: str | Path, images_csv: str | Path) -> pd.DataFrame:
    """The FlyIT data set's bag list from its two tables (yl2019lw/FlyIT ``data/standard_*.csv``).

    ``standard_annotations.csv`` has ``gene, stage, annotation`` (terms as a tuple literal),
    ``standard_images.csv`` has ``gene, stage, direction, image_url`` (FlyExpress-standardised image
    names as a tuple literal). As FlyIT's ``load_by_stage`` does, a bag is a (gene, stage) in both
    tables. Returns :data:`FLYIT_BAGS_COLUMNS`: ``gene``, ``stage_range`` (``"4-6"``; FlyIT's stage codes
    are BDGP's), ``terms`` (the bag's distinct terms, sorted, ``;``-joined, none dropped) and
    ``n_images`` (its distinct FlyExpress images), sorted by gene and stage.
    """
    ann = pd.read_csv(annotations_csv, dtype={"gene": str, "annotation": str})
    img = pd.read_csv(images_csv, dtype={"gene": str, "image_url": str})
    terms: dict[tuple[str, int], set[str]] = {}
    for gene, stage, cell in ann[["gene", "stage", "annotation"]].itertuples(index=False):
        terms.setdefault((gene, int(stage)), set()).update(_tuple_cell(cell))
    images: dict[tuple[str, int], set[str]] = {}
    for gene, stage, cell in img[["gene", "stage", "image_url"]].itertuples(index=False):
        images.setdefault((gene, int(stage)), set()).update(_tuple_cell(cell))
    rows = [
        (gene, STAGE_RANGES[stage], ";".join(sorted(terms[gene, stage])), len(images[gene, stage]))
        for gene, stage in sorted(set(terms) & set(images))
    ]
    return pd.DataFrame(rows, columns=list(FLYIT_BAGS_COLUMNS))


def load_flyit_bags(path: str | Path | None = None) -> pd.DataFrame:
    """The FlyIT bag list (:data:`FLYIT_BAGS_COLUMNS` plus ``stage``, the code), shipped as
    ``preprocessing/sources/data/flyit_bags.tsv`` (origin and derivation in that folder's README.md)."""
    if path is None:
        data = (importlib.resources.files("preprocessing.sources") / "data" / FLYIT_BAGS_FILE).read_bytes()
    else:
        data = Path(path).read_bytes()
    table = pd.read_csv(io.BytesIO(data), sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in FLYIT_BAGS_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"{path or FLYIT_BAGS_FILE}: missing column(s) {', '.join(missing)}")
    table["stage"] = [_stage_code(s) or 0 for s in table["stage_range"]]
    table["n_images"] = table["n_images"].astype(int)
    return table


def flyit_gene_keys(bags: pd.DataFrame) -> dict[str, str]:
    """Identifier -> FlyIT gene name: the name itself, and ``CG15786`` for ``CG15786-PA`` unless taken."""
    keys = {g: g for g in bags["gene"]}
    for gene in bags["gene"]:
        match = ISOFORM_RE.match(gene)
        if match and match.group(1) not in keys:
            keys[match.group(1)] = gene
    return keys


def build_flyit_groups(
    bags: pd.DataFrame,
    images: pd.DataFrame,
    options: BdgpOptions,
    excluded: Counter[str] | None = None,
    unmatched: list[tuple[str, str, str, str]] | None = None,
) -> pd.DataFrame:
    """BDGP images of the FlyIT bags: ``group, gene, stage, view, path, labels``, sorted.

    ``images`` is :func:`parse_images` read with :func:`flyit_gene_keys` (so ``gene`` is the FlyIT name).
    Only bags at ``options.stages`` count; their labels are FlyIT's terms less ``options.terms_dropped()``
    (nothing by default). Image rows left out are counted by reason in ``excluded``; bags that get no
    image are appended to ``unmatched`` as ``(gene, stage_range, terms, reason)``.
    """
    excluded = Counter() if excluded is None else excluded
    drop_terms, drop_prefixes = options.terms_dropped()
    bags = bags[bags["stage"].isin(options.stages)]
    labels: dict[tuple[str, int], str] = {}
    for gene, stage, terms in bags[["gene", "stage", "terms"]].itertuples(index=False):
        kept = sorted({t for t in terms.split(";") if t and keep_term(t, drop_terms, drop_prefixes)})
        labels[gene, stage] = ";".join(kept)
    imgs = _usable(images, options, excluded)
    imgs["labels"] = [labels.get((g, s)) for g, s in zip(imgs["gene"], imgs["stage"], strict=True)]
    excluded[SKIP_NOT_FLYIT_BAG] += int(imgs["labels"].isna().sum())
    imgs = imgs[imgs["labels"].notna()].copy()
    if not options.keep_unlabelled:
        excluded[SKIP_NO_LABEL] += int((imgs["labels"] == "").sum())
        imgs = imgs[imgs["labels"] != ""].copy()
    if unmatched is not None:
        have = set(zip(imgs["gene"], imgs["stage"], strict=True))
        known = set(images.loc[images["gene"] != "", "gene"])
        at_stage = images[images["gene"] != ""].groupby(["gene", "stage"])["skip"].agg(list)
        for gene, stage, terms in bags[["gene", "stage", "terms"]].itertuples(index=False):
            if (gene, stage) in have:
                continue
            if gene not in known:
                reason = "gene not found in insitu_images.csv"
            elif (gene, stage) not in at_stage.index:
                reason = "no BDGP image of the gene at this stage range"
            elif not labels[gene, stage] and not options.keep_unlabelled:
                reason = SKIP_NO_LABEL
            else:
                why = Counter(s or SKIP_VIEW for s in at_stage[gene, stage])
                reason = "images left out: " + ", ".join(f"{n} {r}" for r, n in sorted(why.items()))
            unmatched.append((gene, STAGE_RANGES[stage], terms, reason))
    return _finish_groups(imgs)


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

    Bags come from ``insitu_annot.csv`` (``bags_from="bdgp"``) or from the FlyIT bag list
    (``bags_from="flyit"``: the annotation table is not downloaded; FlyIT bags without a BDGP image are
    listed in ``<out_dir>/flyit_unmatched.tsv``). ``limit`` keeps only the first ``limit`` groups (sorted
    by name) for a quick try. Without a ``downloader`` a polite one is made (one connection,
    ``options.min_interval`` seconds between requests, manifest ``<out_dir>/manifest.tsv``). Image rows
    left out before downloading are counted by reason (log, ``<out_dir>/source.json``). Images that fail
    (HTTP error, an HTML page instead of a JPEG) are listed in ``<out_dir>/rejected.tsv``
    (``image_id, url, reason``) and left out; if more than ``max_bad_fraction`` of them (or all) fail,
    :class:`DownloadError` is raised and ``images.tsv`` is not written.
    ``retries``: attempts after the first for transient failures (when no ``downloader`` is given).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if downloader is None:
        policy = DownloadPolicy(min_interval=options.min_interval, concurrency=1, retries=retries)
        downloader = Downloader(policy, manifest=out_dir / "manifest.tsv")
    base = options.base_url.rstrip("/")
    annot_url, images_url = f"{base}/{options.annot_path}", f"{base}/{options.images_path}"
    drop_terms, drop_prefixes = options.terms_dropped()
    record: dict = {
        **asdict(replace(options, drop_terms=drop_terms, drop_prefixes=drop_prefixes)),
        "images_url": images_url,
        "max_bad_fraction": max_bad_fraction,
    }
    flyit = options.bags_from == "flyit"
    if flyit:
        bags = load_flyit_bags()
        keys = flyit_gene_keys(bags)
    else:
        annot = _fetch_table(
            downloader,
            annot_url,
            out_dir / "raw" / "insitu_annot.csv.gz",
            lambda data: parse_annotations(data, annot_url, options.encoding),
        )
        keys = _gene_keys(annot)
        record["annot_url"] = annot_url
    refused: list[tuple[str, str, str]] = []
    images = _fetch_table(
        downloader,
        images_url,
        out_dir / "raw" / "insitu_images.csv.gz",
        lambda data: parse_images(data, keys, images_url, options.image_columns, refused, options),
    )
    excluded: Counter[str] = Counter()
    if flyit:
        unmatched: list[tuple[str, str, str, str]] = []
        groups = build_flyit_groups(bags, images, options, excluded, unmatched)
        _record_flyit(record, bags, options, groups, unmatched, out_dir)
    else:
        groups = build_groups(annot, images, options, excluded)
    if limit is not None:
        keep = groups["group"].isin(sorted(groups["group"].unique())[: max(0, limit)])
        excluded[SKIP_LIMIT] += int((~keep).sum())
        groups = groups[keep]
    record["image_rows"] = len(images)
    record["excluded"] = {reason: n for reason, n in sorted(excluded.items()) if n}
    record["bags"], record["images_selected"] = int(groups["group"].nunique()), len(groups)
    log.info(
        "%s: %d image rows -> %d images in %d bags; left out: %s",
        images_url,
        len(images),
        len(groups),
        record["bags"],
        ", ".join(f"{n} {r}" for r, n in record["excluded"].items()) or "none",
    )
    write_json(record, out_dir / "source.json")
    if groups.empty:
        raise InputError(f"{images_url}: no image left after the stage/view/term filters (see source.json)")
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
    record["images"], record["bags_with_images"] = len(table), int(table["group"].nunique())
    write_json(record, out_dir / "source.json")
    write_tsv(table, out_dir / "images.tsv")
    return table


def _record_flyit(
    record: dict,
    bags: pd.DataFrame,
    options: BdgpOptions,
    groups: pd.DataFrame,
    unmatched: list[tuple[str, str, str, str]],
    out_dir: Path,
) -> None:
    """Count the FlyIT bags that found BDGP images; list the others in ``flyit_unmatched.tsv``."""
    selected = bags[bags["stage"].isin(options.stages)]
    matched = int(groups["group"].nunique())
    table = pd.DataFrame(unmatched, columns=["gene", "stage_range", "terms", "reason"], dtype=str)
    write_tsv(table, out_dir / "flyit_unmatched.tsv")
    record["flyit_bags"] = len(selected)
    record["flyit_bags_with_images"] = matched
    record["flyit_bags_without_images"] = len(table)
    record["flyit_unmatched_reasons"] = dict(Counter(r.split(":")[0] for r in table["reason"]).most_common())
    log.info(
        "FlyIT bags at stages %s: %d, %d with BDGP images, %d without (listed in %s)",
        ",".join(map(str, options.stages)),
        len(selected),
        matched,
        len(table),
        out_dir / "flyit_unmatched.tsv",
    )


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

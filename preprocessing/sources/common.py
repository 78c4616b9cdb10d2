"""Pieces shared by the downloading sources (hpa, bdgp): fetch a table's images, list what failed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from preprocessing.download import Downloader, DownloadError, FetchItem
from preprocessing.io import check_rejected

REJECTED_COLUMNS: tuple[str, ...] = ("image_id", "url", "reason")


def confined(path: Path, root: Path) -> bool:
    """Whether ``path`` (made from a remote name) stays inside ``root`` once resolved (``..``, links)."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def finish_downloads(
    table: pd.DataFrame,
    items: list[FetchItem],
    rows: list[int],
    out_dir: Path,
    downloader: Downloader,
    max_bad_fraction: float,
    what: str,
    refused: Sequence[tuple[str, str, str]] = (),
) -> pd.DataFrame:
    """Fetch ``items`` (``rows[i]`` = the table row of item ``i``); drop rows with a failed item.

    ``refused``: ``(image_id, url, reason)`` of images refused before any download (a bad remote name);
    they count as failures too. An item whose destination would leave ``out_dir`` is refused, not fetched.
    Failures go to ``<out_dir>/rejected.tsv`` (``image_id, url, reason``); :class:`DownloadError` when
    more than ``max_bad_fraction`` of the images (or all) failed (see
    :func:`preprocessing.io.check_rejected`), else a warning says how many were left out and where.
    """
    failed: dict[int, tuple[str, str, str]] = {}
    fetch: list[tuple[int, FetchItem]] = []
    for row, item in zip(rows, items, strict=True):
        if not confined(item.dest, out_dir):
            failed.setdefault(
                row, (table["image_id"].iloc[row], item.url, "file name leaves the data folder")
            )
        else:
            fetch.append((row, item))
    results = downloader.fetch_many([item for _, item in fetch])
    for (row, _), res in zip(fetch, results, strict=True):
        if res.error and row not in failed:
            failed[row] = (table["image_id"].iloc[row], res.item.url, res.error)
    rejected = pd.DataFrame([*refused, *failed.values()], columns=list(REJECTED_COLUMNS), dtype=str)
    check_rejected(
        rejected, len(table) + len(refused), out_dir / "rejected.tsv", max_bad_fraction, what, DownloadError
    )
    keep = [i not in failed for i in range(len(table))]
    return table[keep].reset_index(drop=True)

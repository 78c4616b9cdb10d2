"""Pieces shared by the downloading sources (hpa, bdgp): fetch a table's images, list what failed."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from preprocessing.download import Downloader, DownloadError, FetchItem
from preprocessing.io import check_rejected

REJECTED_COLUMNS: tuple[str, ...] = ("image_id", "url", "reason")


def finish_downloads(
    table: pd.DataFrame,
    items: list[FetchItem],
    rows: list[int],
    out_dir: Path,
    downloader: Downloader,
    max_bad_fraction: float,
    what: str,
) -> pd.DataFrame:
    """Fetch ``items`` (``rows[i]`` = the table row of item ``i``); drop rows with a failed item.

    Failures go to ``<out_dir>/rejected.tsv`` (``image_id, url, reason``); :class:`DownloadError` when
    more than ``max_bad_fraction`` of the rows (or all) failed (see :func:`preprocessing.io.check_rejected`).
    """
    results = downloader.fetch_many(items)
    failed: dict[int, tuple[str, str, str]] = {}
    for row, res in zip(rows, results, strict=True):
        if res.error and row not in failed:
            failed[row] = (table["image_id"].iloc[row], res.item.url, res.error)
    rejected = pd.DataFrame(list(failed.values()), columns=list(REJECTED_COLUMNS), dtype=str)
    check_rejected(rejected, len(table), out_dir / "rejected.tsv", max_bad_fraction, what, DownloadError)
    keep = [i not in failed for i in range(len(table))]
    return table[keep].reset_index(drop=True)

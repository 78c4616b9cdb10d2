"""Gather ``metrics.json`` of every model x seed into one comparison table (mean ± sd over seeds)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from preprocessing.errors import InputError
from preprocessing.io import atomic_path, write_tsv

METRICS = ("macro_auc", "macro_f1", "micro_f1")


def gather(paths: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    """One row per metrics file: model, seed and the paper's three metrics."""
    rows = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: unreadable metrics file ({err})") from None
        missing = [k for k in ("model", "seed", *METRICS) if k not in data]
        if missing:
            raise InputError(f"{path}: missing keys: {', '.join(missing)}")
        rows.append({k: data[k] for k in ("model", "seed", *METRICS)})
    return pd.DataFrame(rows, columns=["model", "seed", *METRICS])


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample sd per model over seeds (sd is 0 with one seed), models in first-seen order."""
    order = list(dict.fromkeys(runs["model"]))
    grouped = runs.groupby("model", sort=False)
    table = pd.DataFrame({"model": order, "seeds": [int(grouped.size()[m]) for m in order]})
    for metric in METRICS:
        values = runs[metric].astype(float)
        stats = values.groupby(runs["model"]).agg(["mean", lambda v: v.std(ddof=1) if len(v) > 1 else 0.0])
        table[f"{metric}_mean"] = [stats.loc[m].iloc[0] for m in order]
        table[f"{metric}_sd"] = [stats.loc[m].iloc[1] for m in order]
    return table


def to_markdown(table: pd.DataFrame, title: str = "") -> str:
    """The comparison as a Markdown table in the paper's layout: rows = models, cells = mean ± sd."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| model | seeds | macro AUC | macro F1 | micro F1 |", "|---|---:|---:|---:|---:|"]
    for _, row in table.iterrows():
        cells = [_fmt(row[f"{m}_mean"], row[f"{m}_sd"]) for m in METRICS]
        lines.append(f"| {row['model']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(mean: float, sd: float) -> str:
    return "n/a" if np.isnan(mean) else f"{mean:.3f} ± {sd:.3f}"


def compare(
    paths: Sequence[str | os.PathLike[str]],
    out_tsv: str | os.PathLike[str],
    out_md: str | os.PathLike[str],
    title: str = "",
) -> str:
    """Write the comparison TSV and Markdown; return the Markdown."""
    if not paths:
        raise InputError("compare: no metrics files given")
    table = summarise(gather(paths))
    write_tsv(table.round(4), out_tsv)
    text = to_markdown(table, title)
    with atomic_path(out_md) as tmp:
        tmp.write_text(text)
    return text

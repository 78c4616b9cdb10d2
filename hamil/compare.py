"""Gather ``metrics.json`` of every model x seed into one comparison table (mean ± sd over seeds).

Rows are models, columns the paper's metrics (macro AUC, macro F1, micro F1 at the fixed threshold) and,
where evaluation tuned per-class thresholds on the validation split, macro and micro F1 at those.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from preprocessing.errors import InputError
from preprocessing.io import atomic_path, read_table, write_tsv

METRICS = ("macro_auc", "macro_f1", "micro_f1")
TUNED = ("tuned_macro_f1", "tuned_micro_f1")
HEADERS = {
    "macro_auc": "macro AUC",
    "macro_f1": "macro F1",
    "micro_f1": "micro F1",
    "tuned_macro_f1": "macro F1 (tuned)",
    "tuned_micro_f1": "micro F1 (tuned)",
}


def gather(paths: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    """One row per metrics file: model, seed, the paper's three metrics and the tuned-threshold F1s."""
    rows = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: unreadable metrics file ({err})") from None
        missing = [k for k in ("model", "seed", *METRICS) if k not in data]
        if missing:
            raise InputError(f"{path}: missing keys: {', '.join(missing)}")
        row = {k: data[k] for k in ("model", "seed", *METRICS)}
        tuned = data.get("tuned") or {}
        row.update({f"tuned_{k}": tuned.get(k) for k in ("macro_f1", "micro_f1")})
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "seed", *METRICS, *TUNED])


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample sd per model over seeds (sd 0 with one seed), models in first-seen order."""
    grouped = runs.groupby("model", sort=False)
    table = pd.DataFrame({"model": list(grouped.groups), "seeds": grouped.size().to_numpy()})
    for metric in (*METRICS, *TUNED):
        values = grouped[metric].apply(lambda v: pd.to_numeric(v, errors="coerce"))
        stats = values.groupby(level=0, sort=False).agg(["mean", "std"])
        table[f"{metric}_mean"] = stats["mean"].to_numpy()
        table[f"{metric}_sd"] = stats["std"].fillna(0.0).to_numpy()
    return table


def to_markdown(table: pd.DataFrame, title: str = "", reference: pd.DataFrame | None = None) -> str:
    """The comparison as Markdown in the paper's layout: rows = models, cells = mean ± sd over seeds.

    ``reference`` (columns ``model``, the metrics, optionally ``source``) is printed as a second table.
    """
    metrics = [*METRICS, *(m for m in TUNED if table[f"{m}_mean"].notna().any())]
    lines = [f"### {title}", ""] if title else []
    lines += ["| model | seeds | " + " | ".join(HEADERS[m] for m in metrics) + " |"]
    lines += ["|---|---:|" + "---:|" * len(metrics)]
    for _, row in table.iterrows():
        cells = [_fmt(row[f"{m}_mean"], row[f"{m}_sd"]) for m in metrics]
        lines.append(f"| {row['model']} | {row['seeds']} | " + " | ".join(cells) + " |")
    if reference is not None and len(reference):
        source = ", ".join(sorted(set(reference.get("source", pd.Series(["reference"])))))
        lines += ["", f"Reference results ({source}):", ""]
        lines += [
            "| model | " + " | ".join(HEADERS[m] for m in METRICS) + " |",
            "|---|" + "---:|" * len(METRICS),
        ]
        for _, row in reference.iterrows():
            lines.append(f"| {row['model']} | " + " | ".join(str(row[m]) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def _fmt(mean: float, sd: float) -> str:
    return "n/a" if np.isnan(mean) else f"{mean:.3f} ± {sd:.3f}"


def compare(
    paths: Sequence[str | os.PathLike[str]],
    out_tsv: str | os.PathLike[str],
    out_md: str | os.PathLike[str],
    title: str = "",
    reference: str | os.PathLike[str] | None = None,
) -> str:
    """Write the comparison TSV and Markdown; return the Markdown.

    ``reference``: an optional TSV of published or earlier results (``model``, ``macro_auc``, ``macro_f1``,
    ``micro_f1``, optional ``source``) shown beside ours.
    """
    if not paths:
        raise InputError("compare: no metrics files given")
    table = summarise(gather(paths))
    ref = read_table(reference, ("model", *METRICS)) if reference else None
    write_tsv(table.round(4), out_tsv)
    text = to_markdown(table, title, ref)
    with atomic_path(out_md) as tmp:
        tmp.write_text(text)
    return text

"""Gather ``metrics.json`` of every model x seed into one comparison table (mean ± sd over seeds).

Rows are models, columns the paper's metrics (macro AUC, macro F1, micro F1 at the fixed threshold), subset
accuracy (every class right) and, where evaluation tuned per-class thresholds on the validation split, macro
and micro F1 at those. A model with one seed shows its value alone (no sd).
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
EXTRA = ("subset_accuracy",)  # optional in a metrics file (older evaluations have none)
TUNED = ("tuned_macro_f1", "tuned_micro_f1")
HEADERS = {
    "macro_auc": "macro AUC",
    "macro_f1": "macro F1",
    "micro_f1": "micro F1",
    "subset_accuracy": "subset accuracy",
    "tuned_macro_f1": "macro F1 (tuned)",
    "tuned_micro_f1": "micro F1 (tuned)",
}


def gather(paths: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    """One row per metrics file: model, seed, the paper's three metrics, subset accuracy and the
    tuned-threshold F1s (NaN where a file has none)."""
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
        row.update({k: data.get(k) for k in EXTRA})
        tuned = data.get("tuned") or {}
        row.update({f"tuned_{k}": tuned.get(k) for k in ("macro_f1", "micro_f1")})
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "seed", *METRICS, *EXTRA, *TUNED])


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample sd per model over seeds (sd 0 in the table with one seed, where the Markdown shows
    the value alone), models in first-seen order."""
    grouped = runs.groupby("model", sort=False)
    table = pd.DataFrame({"model": list(grouped.groups), "seeds": grouped.size().to_numpy()})
    for metric in (*METRICS, *EXTRA, *TUNED):
        values = grouped[metric].apply(lambda v: pd.to_numeric(v, errors="coerce"))
        stats = values.groupby(level=0, sort=False).agg(["mean", "std"])
        table[f"{metric}_mean"] = stats["mean"].to_numpy()
        table[f"{metric}_sd"] = stats["std"].fillna(0.0).to_numpy()
    return table


def with_reference(table: pd.DataFrame, reference: pd.DataFrame | None) -> pd.DataFrame:
    """``table`` plus, per metric, the reference value (``<metric>_paper``) and ours minus it
    (``<metric>_diff``) for the models the reference has; empty reference cells stay NaN."""
    if reference is None:
        return table
    ref = reference.drop_duplicates("model").set_index("model")
    out = table.copy()
    for metric in METRICS:
        values = pd.to_numeric(ref[metric].replace("", np.nan), errors="coerce")
        out[f"{metric}_paper"] = out["model"].map(values)
        out[f"{metric}_diff"] = out[f"{metric}_mean"] - out[f"{metric}_paper"]
    return out


def to_markdown(table: pd.DataFrame, title: str = "", reference: pd.DataFrame | None = None) -> str:
    """The comparison as Markdown in the paper's layout: rows = models, cells = mean ± sd over seeds (the
    value alone for a model with one seed); optional columns (subset accuracy, tuned F1s) only where a
    model has them.

    ``reference`` (columns ``model``, the metrics, optionally ``source``, ``note``) follows as a second table:
    every published row, with ours minus the published value for the models we ran (negative: ours lower).
    """
    metrics = [*METRICS, *(m for m in (*EXTRA, *TUNED) if table[f"{m}_mean"].notna().any())]
    lines = [f"### {title}", ""] if title else []
    lines += ["| model | seeds | " + " | ".join(HEADERS[m] for m in metrics) + " |"]
    lines += ["|---|---:|" + "---:|" * len(metrics)]
    for _, row in table.iterrows():
        cells = [_fmt(row[f"{m}_mean"], row[f"{m}_sd"], row["seeds"]) for m in metrics]
        lines.append(f"| {row['model']} | {row['seeds']} | " + " | ".join(cells) + " |")
    if reference is not None and len(reference):
        lines += _reference_table(table, reference)
    return "\n".join(lines) + "\n"


def _reference_table(table: pd.DataFrame, reference: pd.DataFrame) -> list[str]:
    source = ", ".join(sorted(set(reference.get("source", pd.Series(["reference"]))) - {""})) or "reference"
    ours = table.set_index("model")
    lines = ["", f"Reference results ({source}):", ""]
    lines += [
        "| model | "
        + " | ".join(HEADERS[m] for m in METRICS)
        + " | ours − published (AUC / F1 / micro F1) | note |"
    ]
    lines += ["|---|" + "---:|" * len(METRICS) + "---|---|"]
    for _, row in reference.iterrows():
        diffs = ""
        if row["model"] in ours.index:
            published = [pd.to_numeric(row[m] or np.nan, errors="coerce") for m in METRICS]
            mine = [ours.loc[row["model"], f"{m}_mean"] for m in METRICS]
            diffs = " / ".join(
                "–" if pd.isna(p) else f"{o - p:+.3f}" for o, p in zip(mine, published, strict=True)
            )
        note = str(row.get("note", "") or "")
        lines.append(
            f"| {row['model']} | " + " | ".join(str(row[m]) for m in METRICS) + f" | {diffs} | {note} |"
        )
    return lines


def _fmt(mean: float, sd: float, seeds: int) -> str:
    """``mean ± sd``; the mean alone for one seed (no spread to show), ``n/a`` without a value."""
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if seeds < 2 else f"{mean:.3f} ± {sd:.3f}"


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
    write_tsv(with_reference(table, ref).round(4), out_tsv)  # + <metric>_paper, <metric>_diff
    text = to_markdown(table, title, ref)
    with atomic_path(out_md) as tmp:
        tmp.write_text(text)
    return text

"""Figures of a training run (matplotlib, headless)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from preprocessing.io import atomic_path, read_table  # noqa: E402

HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_macro_auc", "val_macro_f1", "val_micro_f1")


def plot_curves(history_csv: str | os.PathLike[str], dest: str | os.PathLike[str], title: str = "") -> None:
    """Training curves: train and val loss, val macro AUC / macro F1 / micro F1 per epoch."""
    hist = read_table_csv(history_csv)
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    ax_loss.plot(hist["epoch"], hist["train_loss"], label="train")
    ax_loss.plot(hist["epoch"], hist["val_loss"], label="val")
    ax_loss.set(xlabel="epoch", ylabel="BCE loss", title="loss")
    ax_loss.legend()
    for col, name in (
        ("val_macro_auc", "macro AUC"),
        ("val_macro_f1", "macro F1"),
        ("val_micro_f1", "micro F1"),
    ):
        ax_metric.plot(hist["epoch"], hist[col], label=name)
    ax_metric.set(xlabel="epoch", ylabel="validation", ylim=(0, 1), title="validation metrics")
    ax_metric.legend()
    if title:
        fig.suptitle(title)
    save_figure(fig, dest)


def read_table_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a training history CSV, checking its columns."""
    table = read_table(path, HISTORY_COLUMNS, sep=",")  # strings; an undefined metric is "nan"
    return table.replace({"nan": None, "": None}).apply(pd.to_numeric)


def save_figure(fig: plt.Figure, dest: str | os.PathLike[str]) -> None:
    """Save a figure atomically (format from the suffix) and close it."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format=dest.suffix.lstrip("."), dpi=120)
    plt.close(fig)

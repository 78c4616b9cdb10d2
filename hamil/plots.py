"""Plotting functions for a training run's figures (matplotlib, headless), each saved as PNG and SVG.

- ``curves``: training and validation loss and validation metrics per epoch;
- ``roc``: per-class ROC curves on the evaluated split (from ``predictions.tsv``);
- ``tsne``: tSNE of instance features before aggregation and of bag features after it (paper Fig. 6);
- ``instance_scores``: rows of bags, their instances ordered by score (paper Fig. 7), with a second
  model's scores (e.g. RAMIL beside HAMIL) when given.

Deterministic for a seed: tSNE and the choice of bags use it, and SVGs carry no date or random ids.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from hamil.tables import HISTORY_COLUMNS, PROB_PREFIX, probability_classes  # noqa: E402
from preprocessing.io import atomic_path, read_table  # noqa: E402

FORMATS = ("png", "svg")
MAX_TSNE_INSTANCES = 3000


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
    """Save a figure atomically as ``dest`` and beside it in every other of :data:`FORMATS`, then close it.

    SVGs get a fixed id salt and no date, so that the same figure gives the same bytes.
    """
    dest = Path(dest)
    for fmt in dict.fromkeys([dest.suffix.lstrip("."), *FORMATS]):
        target = dest.with_suffix(f".{fmt}")
        with atomic_path(target) as tmp, plt.rc_context({"svg.hashsalt": "hamil"}):
            metadata = {"Date": None} if fmt == "svg" else None
            fig.savefig(tmp, format=fmt, dpi=120, metadata=metadata)
    plt.close(fig)


def plot_roc(predictions_tsv: str | os.PathLike[str], dest: str | os.PathLike[str], title: str = "") -> int:
    """Per-class ROC curves from an evaluation's ``predictions.tsv``; returns the number of curves.

    Classes without both positive and negative bags in the split have no curve (and say so in the legend).
    """
    table = pd.read_csv(predictions_tsv, sep="\t", keep_default_na=False)
    classes = probability_classes(table.columns)
    truth = [set(filter(None, str(v).split(";"))) for v in table["true_labels"]]
    fig, ax = plt.subplots(figsize=(6, 5.5), constrained_layout=True)
    drawn = 0
    for name in classes:
        y = np.array([name in t for t in truth], dtype=int)
        p = table[f"{PROB_PREFIX}{name}"].to_numpy(dtype=float)
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, p):.3f})")
            drawn += 1
        else:
            ax.plot([], [], " ", label=f"{name} (one class only)")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(title or "ROC per class")
    ax.legend(fontsize="small", loc="lower right")
    save_figure(fig, dest)
    return drawn


def embed_2d(x: np.ndarray, seed: int) -> np.ndarray:
    """tSNE of ``(n, C)`` to ``(n, 2)`` (scikit-learn, PCA initialisation, perplexity fitted to ``n``).

    Fewer than 4 points are placed by PCA (tSNE needs a perplexity below ``n``).
    """
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0 or np.ptp(x, axis=0).max() == 0:  # identical points (a collapsed model): no spread
        return np.zeros((len(x), 2))
    if len(x) < 4:
        centred = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        out = np.zeros((len(x), 2))
        proj = centred @ vt[:2].T
        out[:, : proj.shape[1]] = proj
        return out
    perplexity = min(30.0, (len(x) - 1) / 3)
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def first_labels(labels: np.ndarray, class_names: list[str]) -> list[str]:
    """The first label (in class order) of each multi-hot row, ``"none"`` for a row without labels."""
    return [class_names[int(np.argmax(row))] if row.any() else "none" for row in np.asarray(labels) > 0]


def plot_tsne(
    explained: Any, class_names: list[str], dest: str | os.PathLike[str], seed: int = 0, title: str = ""
) -> tuple[int, int]:
    """tSNE of instance features (before aggregation) and bag features (after), coloured by the first
    label of the (instance's) bag. ``explained`` is a :class:`hamil.inference.Explained`.

    Returns ``(instance points, bag points)``: one point per bag; instances are subsampled (seeded) to at
    most :data:`MAX_TSNE_INSTANCES`.
    """
    rng = np.random.default_rng(seed)
    inst = np.arange(len(explained.instance_features))
    if len(inst) > MAX_TSNE_INSTANCES:
        inst = np.sort(rng.choice(inst, MAX_TSNE_INSTANCES, replace=False))
    bag_colour = first_labels(explained.labels, class_names)
    inst_colour = [bag_colour[b] for b in explained.instance_bag[inst]]
    xy_inst = embed_2d(explained.instance_features[inst], seed)
    xy_bags = embed_2d(explained.bag_features, seed)
    palette = {
        name: plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")(k)
        for k, name in enumerate(class_names)
    }
    palette["none"] = (0.6, 0.6, 0.6, 1.0)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), constrained_layout=True)
    panels = (
        (axes[0], xy_inst, inst_colour, f"instances before aggregation ({len(inst)})", 8),
        (axes[1], xy_bags, bag_colour, f"bags after aggregation ({len(xy_bags)})", 18),
    )
    for ax, xy, colours, name, size in panels:
        for label in [*class_names, "none"]:
            mask = np.array([c == label for c in colours], dtype=bool)
            if mask.any():
                ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=palette[label], label=label, alpha=0.8)
        ax.set(title=name, xticks=[], yticks=[])
    axes[1].legend(fontsize="small", markerscale=1.2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title or "tSNE (coloured by the first label of the bag)")
    save_figure(fig, dest)
    return len(xy_inst), len(xy_bags)


def plot_instance_scores(
    rows: list[dict[str, Any]], dest: str | os.PathLike[str], names: tuple[str, ...], title: str = ""
) -> None:
    """Paper Fig. 7: one row per bag, its instances ordered by the first model's score, each titled with
    the scores of every model in ``names``.

    ``rows``: dicts with ``bag`` (str), ``labels`` (str), ``patches`` ``(n, C, H, W)`` uint8 and ``scores``
    ``{name: (n,)}``.
    """
    cols = max(len(r["patches"]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.8 * cols, 2.1 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        order = np.argsort(-row["scores"][names[0]], kind="stable")
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(order):
                ax.axis("off")
                continue
            k = order[c]
            ax.imshow(np.moveaxis(row["patches"][k], 0, -1))
            ax.set_title(" · ".join(f"{n} {row['scores'][n][k]:.2f}" for n in names), fontsize=7)
            if c == 0:
                ax.set_ylabel(f"{row['bag']}\n{row['labels']}", fontsize=7)
    fig.suptitle(title or "instance scores")
    fig.tight_layout()
    save_figure(fig, dest)

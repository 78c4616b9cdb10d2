"""Plotting functions for a training run's figures (matplotlib, headless), each saved as PNG and SVG.

- ``curves``: training and validation loss and validation metrics per epoch, the best epoch marked;
- ``roc``: per-class ROC curves on the evaluated split (from ``predictions.tsv``);
- ``tsne``: tSNE of instance features before aggregation (a point per instance) and of bag features after
  it (a point per bag; paper Fig. 6);
- ``instance_scores``: rows of bags, their highest- and lowest-scoring instances ordered by score (paper
  Fig. 7), with a second model's scores (e.g. RAMIL beside HAMIL) when given.

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
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from hamil.tables import HISTORY_COLUMNS, PROB_PREFIX, probability_classes  # noqa: E402
from preprocessing.io import atomic_path, read_table  # noqa: E402

FORMATS = ("png", "svg")
MAX_TSNE_INSTANCES = 3000
MONITOR_NAMES = {"macro_auc": "macro AUC", "macro_f1": "macro F1", "micro_f1": "micro F1", "loss": "val loss"}


def plot_curves(
    history_csv: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    title: str = "",
    monitor: str = "macro_f1",
    best_epoch: int | None = None,
) -> int | None:
    """Training curves: train and val loss, val macro AUC / macro F1 / micro F1 per epoch (integer ticks).

    The best epoch (``best_epoch``, e.g. ``best.pt``'s; else the first epoch with the best ``monitor`` score
    in the history, as training chooses it) is marked on both panels. Macro and micro F1 are one line when
    they are equal at every epoch (always so with one class). Returns the marked epoch (None: no epochs).
    """
    hist = read_table_csv(history_csv)
    if best_epoch is None:
        best_epoch = best_epoch_of(hist, monitor)
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    ax_loss.plot(hist["epoch"], hist["train_loss"], label="train", marker=".")
    ax_loss.plot(hist["epoch"], hist["val_loss"], label="val", marker=".")
    ax_loss.set(xlabel="epoch", ylabel="BCE loss", title="loss")
    curves = [("val_macro_auc", "macro AUC"), ("val_macro_f1", "macro F1"), ("val_micro_f1", "micro F1")]
    if same_values(hist["val_macro_f1"], hist["val_micro_f1"]):
        curves = [("val_macro_auc", "macro AUC"), ("val_macro_f1", "macro F1 = micro F1")]
    for col, name in curves:
        ax_metric.plot(hist["epoch"], hist[col], label=name, marker=".")
    ax_metric.set(xlabel="epoch", ylabel="validation", ylim=(0, 1.02), title="validation metrics")
    if best_epoch is not None:
        for ax in (ax_loss, ax_metric):
            ax.axvline(best_epoch, color="black", linestyle="--", linewidth=1)
        ax_metric.plot([], [], color="black", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
        monitored = MONITOR_NAMES.get(monitor, monitor)
        ax_metric.set_title(f"validation metrics (best by {monitored}: epoch {best_epoch})")
    for ax in (ax_loss, ax_metric):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    save_figure(fig, dest)
    return best_epoch


def best_epoch_of(hist: pd.DataFrame, monitor: str) -> int | None:
    """The first epoch with the best monitored validation score (lowest loss, highest metric), as training
    picks ``best.pt``; None for an empty history. An undefined score (NaN) never wins over a defined one."""
    if len(hist) == 0:
        return None
    column = "val_loss" if monitor == "loss" else f"val_{monitor}"
    score = pd.to_numeric(hist[column], errors="coerce").to_numpy(dtype=float)
    score = -score if monitor == "loss" else score
    score = np.where(np.isnan(score), -np.inf, score)
    return int(hist["epoch"].iloc[int(np.argmax(score))])


def same_values(a: pd.Series, b: pd.Series) -> bool:
    """Whether two metric columns agree at every epoch (NaN equal to NaN)."""
    x, y = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
    return bool(np.allclose(x, y, rtol=0, atol=1e-9, equal_nan=True))


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
    total = len(explained.instance_features)
    inst = np.arange(total)
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
    sampled = "" if len(inst) == len(explained.instance_features) else f" (a sample of {total:,})"
    panels = (
        (
            axes[0],
            xy_inst,
            inst_colour,
            f"instance features before aggregation:\n{len(inst):,} points, one per instance{sampled}",
            8,
        ),
        (
            axes[1],
            xy_bags,
            bag_colour,
            f"bag features after aggregation:\n{len(xy_bags):,} points, one per bag",
            18,
        ),
    )
    for ax, xy, colours, name, size in panels:
        for label in [*class_names, "none"]:
            mask = np.array([c == label for c in colours], dtype=bool)
            if mask.any():
                ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=palette[label], label=label, alpha=0.8)
        ax.set(title=name, xticks=[], yticks=[])
    axes[1].legend(fontsize="small", markerscale=1.2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"{title or 'tSNE'}: left instances, right bags; colour: the first label of the bag")
    save_figure(fig, dest)
    return len(xy_inst), len(xy_bags)


def top_and_bottom(scores: np.ndarray, count: int) -> tuple[np.ndarray, int | None]:
    """Positions of a bag's instances to show, highest score first: all of them when the bag has at most
    ``count``, else the ``ceil(count / 2)`` highest and the ``floor(count / 2)`` lowest. Returns the positions
    and where the hidden middle lies (the number of highest shown; None when all are shown)."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    if len(order) <= count:
        return order, None
    high = (count + 1) // 2
    return np.concatenate([order[:high], order[len(order) - (count - high) :]]), high


def plot_instance_scores(
    rows: list[dict[str, Any]], dest: str | os.PathLike[str], names: tuple[str, ...], title: str = ""
) -> None:
    """Paper Fig. 7: one row per bag, the shown instances in the given order (highest score first), each
    titled with the scores of every model in ``names``; where a bag's middle instances are not shown, a gap
    column says how many are left out.

    ``rows``: dicts with ``bag`` (str), ``labels`` (str), ``patches`` ``(n, C, H, W)`` uint8 and ``scores``
    ``{name: (n,)}`` of the shown instances in display order, ``size`` (the bag's instances) and ``gap``
    (the position of the hidden middle, None when the whole bag is shown).
    """
    gaps = any(row.get("gap") is not None for row in rows)
    cols = max(len(r["patches"]) for r in rows) + int(gaps)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.8 * cols, 2.1 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        cells: list[int | None] = list(range(len(row["patches"])))
        if row.get("gap") is not None:
            cells.insert(row["gap"], None)
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{row['bag']}\n{row['labels']}\n{row['size']} instances", fontsize=7)
            if c >= len(cells):
                ax.axis("off")
                continue
            k = cells[c]
            if k is None:  # the hidden middle of the bag
                hidden = row["size"] - len(row["patches"])
                ax.text(0.5, 0.5, f"… {hidden}\nnot shown …", ha="center", va="center", fontsize=7)
                for spine in ax.spines.values():
                    spine.set_visible(False)
                continue
            ax.imshow(np.moveaxis(row["patches"][k], 0, -1))
            ax.set_title(" · ".join(f"{n} {row['scores'][n][k]:.2f}" for n in names), fontsize=7)
    fig.suptitle(title or "instance scores", fontsize=9, wrap=True)
    fig.tight_layout()
    save_figure(fig, dest)

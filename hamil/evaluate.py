"""Evaluate a checkpoint on one split of a bag store: metrics.json, per_class.tsv, predictions.tsv and
instances.tsv.

The metrics (:func:`score_report`) are shared with ``hamil predict``, which writes the same
``metrics.json`` and ``per_class.tsv`` for bags whose labels are known; both write ``predictions.tsv``
and ``instances.tsv`` in the layouts of :mod:`hamil.tables`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hamil.checkpoint import load_checkpoint, model_from_checkpoint
from hamil.data import BagDataset, make_loader
from hamil.inference import Explained, explain_batches, predict_batches
from hamil.metrics import TunedThresholds, compute_metrics, tune_thresholds
from hamil.runtime import select_device
from hamil.tables import instance_table, prediction_table
from preprocessing.errors import InputError
from preprocessing.io import write_json, write_tsv
from preprocessing.store import BagStore

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.tsv"
PREDICTION_FILE = "predictions.tsv"
INSTANCE_FILE = "instances.tsv"


def score_report(
    y: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    threshold: float,
    tuned: TunedThresholds | None = None,
    tuned_on: str | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """``metrics.json``'s metrics and the ``per_class.tsv`` table of labels ``y (B, K)`` and ``probs (B, K)``.

    Metrics are at the fixed ``threshold``; with per-class ``tuned`` thresholds (found on ``tuned_on``) the
    table gains ``threshold_tuned``, ``tune_positives`` and ``f1_tuned`` and the metrics a ``tuned`` entry.
    """
    metrics = compute_metrics(y, probs, class_names, threshold)
    per_class = pd.DataFrame(metrics.pop("per_class"))
    if tuned is not None:
        at_tuned = compute_metrics(y, probs, class_names, tuned.thresholds)
        per_class["threshold_tuned"] = np.round(tuned.thresholds, 6)
        per_class["tune_positives"] = tuned.positives
        per_class["f1_tuned"] = [row["f1"] for row in at_tuned["per_class"]]
        metrics["tuned"] = {
            "on": tuned_on,
            "macro_f1": at_tuned["macro_f1"],
            "micro_f1": at_tuned["micro_f1"],
            "thresholds": dict(zip(class_names, np.round(tuned.thresholds, 6).tolist(), strict=True)),
            "positives": dict(zip(class_names, tuned.positives.tolist(), strict=True)),
            "tuned_classes": [n for n, m in zip(class_names, tuned.tuned, strict=True) if m],
        }
    return metrics, per_class


def _tune(
    model: Any, store: BagStore, split: str | None, default: float, batch_bags: int, dev: Any, name: str
) -> TunedThresholds | None:
    """Per-class thresholds tuned on ``split`` (None without one or without bags there), logged."""
    if split is None or not len(store.bags_in(split)):
        return None
    loader = make_loader(BagDataset(store, store.bags_in(split)), batch_bags, False, 0)
    _, y, probs, _ = predict_batches(model, loader, dev)  # (B, K), (B, K)
    tuned = tune_thresholds(y, probs, default)
    log.info("%s: %s", name, tuned.summary(store.class_names, split, default))
    return tuned


def evaluate(
    checkpoint: str | os.PathLike[str],
    store_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    split: str = "test",
    device: str = "auto",
    batch_bags: int = 8,
    threshold: float = 0.5,
    tune_split: str | None = "val",
) -> dict[str, Any]:
    """Write ``metrics.json``, ``per_class.tsv``, ``predictions.tsv`` and ``instances.tsv`` for ``split``.

    Metrics use the fixed ``threshold`` (the paper's 0.5). With ``tune_split`` (default "val"), per-class
    thresholds for F1 on that split (:func:`tune_thresholds`: a coarse grid, only classes with enough
    positives, only a gain above one bag's noise) are also applied and reported beside them (``tuned``).
    Probabilities and instance scores (:meth:`MILModel.explain`) come from one pass over the split.
    """
    store = BagStore(store_path)
    ckpt = load_checkpoint(checkpoint, num_classes=len(store.class_names))
    if ckpt["class_names"] != store.class_names:
        raise InputError(
            f"{checkpoint}: classes {ckpt['class_names']} differ from the store's {store.class_names}"
        )
    dev = select_device(device)
    model = model_from_checkpoint(ckpt, dev, checkpoint)
    bags = store.bags_in(split)
    if len(bags) == 0:
        raise InputError(f"{store_path}: no bags in the {split} split")
    explained = explain_batches(
        model, make_loader(BagDataset(store, bags), batch_bags, False, 0), dev, features=False
    )
    y, probs = explained.labels, explained.probs  # (B, K), (B, K)
    warn_one_class_split(y, store.class_names, split)
    tuned = _tune(model, store, tune_split, threshold, batch_bags, dev, str(checkpoint))
    metrics, per_class = score_report(y, probs, store.class_names, threshold, tuned, tune_split)
    metrics.update(
        {
            "model": ckpt["config"].model,
            "seed": ckpt["config"].seed,
            "split": split,
            "threshold": threshold,
            "loss": explained.loss,
            "epoch": ckpt["epoch"],
        }
    )
    out = Path(out_dir)
    index = explained.bags
    sizes = store.bag_sizes()[index]
    cuts = None if tuned is None else tuned.thresholds
    predictions = prediction_table(
        store.bag_id[index], store.group[index], sizes, probs, store.class_names, threshold, y, cuts
    )
    write_tsv(predictions, out / PREDICTION_FILE)
    write_tsv(_instances_table(store, explained), out / INSTANCE_FILE)
    write_tsv(per_class, out / PER_CLASS_FILE)
    write_json(metrics, out / METRICS_FILE)
    return metrics


def warn_one_class_split(labels: np.ndarray, class_names: list[str], split: str) -> list[str]:
    """Warn about the classes whose bags in ``split`` are all positive or all negative: their AUC is
    undefined (left out of the macro AUC) and their F1 says little; return those classes."""
    positives = labels.sum(axis=0)  # (K,)
    one_sided = [c for c, n in zip(class_names, positives, strict=True) if n == 0 or n == len(labels)]
    if one_sided:
        shown = ", ".join(one_sided[:5]) + (f" and {len(one_sided) - 5} more" if len(one_sided) > 5 else "")
        log.warning(
            "%s split: %d bags; %d of %d classes hold only positives or only negatives (%s): their AUC is "
            "undefined and the macro AUC leaves them out",
            split,
            len(labels),
            len(one_sided),
            len(class_names),
            shown,
        )
    return one_sided


def _instances_table(store: BagStore, explained: Explained) -> pd.DataFrame:
    """``instances.tsv`` of the explained bags: each instance's bag, position, image, box and score."""
    index = explained.bags  # (B,)
    offsets = store.bag_offsets
    rows = np.concatenate([np.arange(offsets[b], offsets[b + 1]) for b in index])  # (N,) patch rows
    if len(rows) != len(explained.instance_scores):
        raise RuntimeError(f"{len(explained.instance_scores)} instance scores for {len(rows)} instances")
    # the split's rows in one read per array (the chunks they touch), not one read per bag
    sources = np.asarray(store.root["source_image"].oindex[rows])  # (N,)
    boxes = np.asarray(store.root["box"].oindex[rows])  # (N, 4)
    owner = explained.instance_bag  # (N,) position in ``index``
    starts = offsets[index][owner]  # (N,)
    return instance_table(
        store.bag_id[index][owner],
        store.group[index][owner],
        rows - starts,
        sources,
        boxes,
        explained.instance_scores,
    )

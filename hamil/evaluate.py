"""Evaluate a checkpoint on one split of a bag store: metrics.json, predictions.tsv, per_class.tsv."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hamil.checkpoint import load_checkpoint, model_from_checkpoint
from hamil.data import BagDataset, make_loader
from hamil.inference import predict_batches
from hamil.metrics import compute_metrics, tune_thresholds
from hamil.runtime import select_device
from hamil.tables import add_probabilities, label_lists
from preprocessing.errors import InputError
from preprocessing.io import write_json, write_tsv
from preprocessing.store import BagStore


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
    """Write ``metrics.json``, ``predictions.tsv`` and ``per_class.tsv`` for ``split`` into ``out_dir``.

    Metrics use the fixed ``threshold`` (the paper's 0.5). With ``tune_split`` (default "val"), per-class
    thresholds maximising F1 on that split are also applied and reported beside them (``tuned``).
    """
    store = BagStore(store_path)
    ckpt = load_checkpoint(checkpoint, num_classes=len(store.class_names))
    if ckpt["class_names"] != store.class_names:
        raise InputError(
            f"{checkpoint}: classes {ckpt['class_names']} differ from the store's {store.class_names}"
        )
    dev = select_device(device)
    model = model_from_checkpoint(ckpt, dev)
    bags = store.bags_in(split)
    if len(bags) == 0:
        raise InputError(f"{store_path}: no bags in the {split} split")
    index, y, probs, loss = predict_batches(
        model, make_loader(BagDataset(store, bags), batch_bags, False, 0), dev
    )
    metrics = compute_metrics(y, probs, store.class_names, threshold)
    per_class = pd.DataFrame(metrics.pop("per_class"))
    tuned = None
    if tune_split is not None and len(store.bags_in(tune_split)):
        tune_loader = make_loader(BagDataset(store, store.bags_in(tune_split)), batch_bags, False, 0)
        _, y_tune, p_tune, _ = predict_batches(model, tune_loader, dev)
        tuned = tune_thresholds(y_tune, p_tune, threshold)
        at_tuned = compute_metrics(y, probs, store.class_names, tuned)
        per_class["threshold_tuned"] = np.round(tuned, 6)
        per_class["f1_tuned"] = [row["f1"] for row in at_tuned["per_class"]]
        metrics["tuned"] = {
            "on": tune_split,
            "macro_f1": at_tuned["macro_f1"],
            "micro_f1": at_tuned["micro_f1"],
            "thresholds": dict(zip(store.class_names, tuned.round(6).tolist(), strict=True)),
        }
    metrics.update(
        {
            "model": ckpt["config"].model,
            "seed": ckpt["config"].seed,
            "split": split,
            "threshold": threshold,
            "loss": loss,
            "epoch": ckpt["epoch"],
        }
    )
    out = Path(out_dir)
    write_tsv(_predictions_table(store, index, y, probs, threshold, tuned), out / "predictions.tsv")
    write_tsv(per_class, out / "per_class.tsv")
    write_json(metrics, out / "metrics.json")
    return metrics


def _predictions_table(
    store: BagStore,
    index: np.ndarray,
    y: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    tuned: np.ndarray | None,
) -> pd.DataFrame:
    names = store.class_names
    table = pd.DataFrame({"bag_id": store.bag_id[index], "group": store.group[index]})
    table["true_labels"] = label_lists(y > 0, names)
    table["predicted_labels"] = label_lists(probs >= threshold, names)
    if tuned is not None:
        table["predicted_labels_tuned"] = label_lists(probs >= tuned, names)
    return add_probabilities(table, probs, names)

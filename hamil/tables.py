"""The column layouts of the tables the stages write and read, each defined once.

``history.csv`` (train -> figures), ``predictions.tsv`` and ``instances.tsv`` (written alike by
``hamil evaluate`` and ``hamil predict``; read by figures) and ``skipped.tsv`` of ``hamil predict``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from preprocessing.io import BOX_COLUMNS

#: ``history.csv``: one row per epoch, written by training, read by the curves figure.
HISTORY_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_macro_auc",
    "val_macro_f1",
    "val_micro_f1",
    "lr",
    "seconds",
)
#: The prefix of a class's probability column in prediction tables.
PROB_PREFIX = "p_"
#: ``predictions.tsv`` of ``hamil evaluate`` and ``hamil predict``: one row per scored bag, these columns
#: in this order, then one ``p_<class>`` per class. ``true_labels`` is present only when the labels are
#: known, ``predicted_labels_tuned`` only with tuned thresholds. Label lists are ``;``-joined class names
#: ("" for none); ``predicted_labels`` are the classes with ``p >= threshold``.
PREDICTION_COLUMNS = (
    "bag_id",
    "group",
    "n_instances",
    "true_labels",
    "predicted_labels",
    "predicted_labels_tuned",
)
#: ``instances.tsv`` of ``hamil evaluate`` and ``hamil predict``: one row per instance of a scored bag,
#: in bag order; ``instance`` is its position in the bag, ``source_image`` the image it was cut from (the
#: ``image_id`` for evaluate, the path as given for predict), the box its window in that image.
INSTANCE_COLUMNS = ("bag_id", "group", "instance", "source_image", *BOX_COLUMNS, "score")
#: ``skipped.tsv`` of ``hamil predict``: bags that gave no instance.
SKIPPED_COLUMNS = ("bag_id", "n_images", "reason")


def label_lists(hits: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """``(B, K)`` booleans -> one ``;``-joined list of class names per row ("" for none)."""
    names = np.asarray(class_names)
    return [";".join(names[row.astype(bool)]) for row in hits]


def add_probabilities(table: pd.DataFrame, probs: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """Append one ``p_<class>`` column per class from ``probs (B, K)``, rounded to 6 decimals."""
    for k, name in enumerate(class_names):
        table[f"{PROB_PREFIX}{name}"] = np.round(probs[:, k], 6)
    return table


def probability_classes(columns: Sequence[str]) -> list[str]:
    """Class names of a prediction table, from its ``p_<class>`` columns, in order."""
    return [c[len(PROB_PREFIX) :] for c in columns if c.startswith(PROB_PREFIX)]


def prediction_table(
    bag_id: Sequence[str],
    group: Sequence[str],
    n_instances: Sequence[int],
    probs: np.ndarray,
    class_names: Sequence[str],
    threshold: float | np.ndarray,
    true: np.ndarray | None = None,
    tuned: np.ndarray | None = None,
) -> pd.DataFrame:
    """The ``predictions.tsv`` of :data:`PREDICTION_COLUMNS` for ``B`` bags.

    ``probs (B, K)``; ``threshold`` a scalar or ``(K,)``; ``true (B, K)`` the known labels (0/1) or None;
    ``tuned (K,)`` per-class tuned thresholds or None.
    """
    table = pd.DataFrame(
        {"bag_id": list(bag_id), "group": list(group), "n_instances": np.asarray(n_instances, dtype=np.int64)}
    )
    if true is not None:
        table["true_labels"] = label_lists(np.asarray(true) > 0, class_names)
    table["predicted_labels"] = label_lists(probs >= np.asarray(threshold), class_names)
    if tuned is not None:
        table["predicted_labels_tuned"] = label_lists(probs >= tuned, class_names)
    return add_probabilities(table, probs, class_names)


def instance_table(
    bag_id: Sequence[str],
    group: Sequence[str],
    instance: Sequence[int],
    source_image: Sequence[str],
    boxes: np.ndarray,
    scores: np.ndarray,
) -> pd.DataFrame:
    """The ``instances.tsv`` of :data:`INSTANCE_COLUMNS`: one row per instance, ``boxes (N, 4)``,
    ``scores (N,)`` (rounded to 6 decimals)."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)  # (N, 4)
    table = pd.DataFrame(
        {
            "bag_id": list(bag_id),
            "group": list(group),
            "instance": np.asarray(instance, dtype=np.int64),
            "source_image": list(source_image),
        }
    )
    for k, name in enumerate(BOX_COLUMNS):
        table[name] = boxes[:, k]
    table["score"] = np.round(np.asarray(scores, dtype=np.float64), 6)
    return table[list(INSTANCE_COLUMNS)]

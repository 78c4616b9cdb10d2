"""The column layouts of the tables the stages write and read, each defined once.

``history.csv`` (train -> figures), the probability columns ``p_<class>`` and ``;``-joined label lists
of ``predictions.tsv`` (evaluate -> figures; predict), and the side tables of ``hamil predict``.
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
#: ``instances.tsv`` of ``hamil predict``: every instance's window in its image and its score.
INSTANCE_COLUMNS = ("bag", "path", *BOX_COLUMNS, "score")
#: ``skipped.tsv`` of ``hamil predict``: bags that gave no instance.
SKIPPED_COLUMNS = ("bag", "n_images", "reason")


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

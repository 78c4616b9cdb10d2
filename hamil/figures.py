"""The ``hamil figures`` stage: all figures of one training run (curves, ROC, tSNE, instance scores).

The drawing itself is in :mod:`hamil.plots`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hamil.checkpoint import load_checkpoint, model_from_checkpoint
from hamil.data import BagDataset, make_loader
from hamil.inference import Explained, explain_batches
from hamil.models import paper_name
from hamil.plots import plot_curves, plot_instance_scores, plot_roc, plot_tsne, top_and_bottom
from hamil.runtime import select_device
from preprocessing.errors import InputError
from preprocessing.io import write_tsv
from preprocessing.store import BagStore

log = logging.getLogger(__name__)


def draw_run_figures(
    run_dir: str | os.PathLike[str],
    store_path: str | os.PathLike[str] | None = None,
    split: str = "test",
    compare_runs: list[str | os.PathLike[str]] | None = None,
    bags_shown: int = 4,
    instances_shown: int = 8,
    seed: int = 0,
    title: str = "",
    device: str = "auto",
    batch_bags: int = 8,
) -> list[Path]:
    """Draw every figure the run's files allow; returns the PNG paths (each has an SVG twin).

    ``curves`` needs ``history.csv``; ``roc`` the evaluation's ``predictions.tsv``; ``tsne`` and
    ``instance_scores`` the bag store (``best.pt`` is applied to ``split``). ``compare_runs`` add their
    models' instance scores beside this run's (e.g. RAMIL's run beside HAMIL's). Models run on whole bags,
    ``batch_bags`` at a time.

    The instance-score figure shows ``bags_shown`` bags drawn with ``seed`` (their ids logged), of each at
    most ``instances_shown`` instances: the highest- and lowest-scoring halves (all of a smaller bag). Its
    title counts the instances and bags shown; ``instance_scores.tsv`` beside it lists every shown instance.
    """
    run = Path(run_dir)
    seen = [run.resolve()]
    for other in compare_runs or []:
        if Path(other).resolve() in seen:
            raise InputError(f"{other}: compared twice")
        seen.append(Path(other).resolve())
    written = [run / "curves.png"]
    monitor, best_epoch = _best_of(run / "best.pt")
    plot_curves(run / "history.csv", written[0], title=title, monitor=monitor, best_epoch=best_epoch)
    if (run / "predictions.tsv").is_file():
        written.append(run / "roc.png")
        plot_roc(run / "predictions.tsv", written[-1], title=f"{title} ROC ({split})".strip())
    if store_path is None:
        return written
    store = BagStore(store_path)
    bags = store.bags_in(split)
    if len(bags) == 0:
        raise InputError(f"{store_path}: no bags in the {split} split")
    dev = select_device(device)
    name, kind, explained = _explain(run / "best.pt", store, bags, dev, batch_bags)
    written.append(run / "tsne.png")
    plot_tsne(explained, store.class_names, written[-1], seed, f"{title} tSNE ({split})".strip())
    shown = _pick_bags(explained, bags_shown, seed)
    log.info(
        "instance scores: seed %d chose %d of %d %s bags: %s",
        seed,
        len(shown),
        len(bags),
        split,
        ", ".join(str(store.bag_id[int(explained.bags[pos])]) for pos in shown),
    )
    scores, kinds = {name: explained}, [f"{name}: {kind}"]
    for other in compare_runs or []:
        other_name, other_kind, other_explained = _explain(
            Path(other) / "best.pt", store, bags[shown], dev, batch_bags
        )
        if other_name in scores:  # e.g. another seed of the same model
            other_name = f"{other_name} ({Path(other).name})"
        scores[other_name] = _spread(other_explained, explained, shown)
        kinds.append(f"{other_name}: {other_kind}")
    rows, table = _score_rows(store, explained, shown, scores, instances_shown)
    write_tsv(table, run / "instance_scores.tsv")
    n_shown, n_total = len(table), sum(row["size"] for row in rows)
    high, low = (instances_shown + 1) // 2, instances_shown // 2
    written.append(run / "instance_scores.png")
    plot_instance_scores(
        rows,
        written[-1],
        tuple(scores),
        "\n".join(
            (
                f"{title} instance scores ({split})".strip(),
                f"{n_shown} of {n_total} instances shown, of {len(shown)} of {len(bags)} bags"
                f" (random, seed {seed})",
                f"per bag the {high} highest and {low} lowest by {name}'s score (a smaller bag: all)",
                "; ".join(kinds),
            )
        ),
    )
    log.info(
        "instance scores: %d of %d instances shown, listed in %s",
        n_shown,
        n_total,
        run / "instance_scores.tsv",
    )
    return written


def _explain(
    checkpoint: Path, store: BagStore, bags: np.ndarray, device: torch.device, batch_bags: int
) -> tuple[str, str, Explained]:
    """The model's display name, what its instance scores are, and its outputs on ``bags``."""
    ckpt = load_checkpoint(checkpoint, num_classes=len(store.class_names))
    model = model_from_checkpoint(ckpt, device, checkpoint)
    loader = make_loader(BagDataset(store, bags), batch_bags, False, 0)
    model_name = ckpt["config"].model
    return paper_name(model_name), model.score_kind, explain_batches(model, loader, device)


def _pick_bags(explained: Explained, count: int, seed: int) -> np.ndarray:
    """Positions of up to ``count`` bags with at least two instances (all bags if none has), seeded."""
    sizes = np.bincount(explained.instance_bag, minlength=len(explained.bags))
    candidates = np.flatnonzero(sizes >= 2)
    if len(candidates) == 0:
        candidates = np.arange(len(explained.bags))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=min(count, len(candidates)), replace=False))


def _spread(part: Explained, full: Explained, shown: np.ndarray) -> Explained:
    """Scores of a model run on the ``shown`` bags only, laid out like ``full`` (other bags NaN)."""
    scores = np.full(len(full.instance_scores), np.nan)
    for k, pos in enumerate(shown):
        scores[full.instance_bag == pos] = part.instance_scores[part.instance_bag == k]
    return Explained(
        full.bags,
        full.labels,
        full.probs,
        full.bag_features,
        full.instance_bag,
        full.instance_features,
        scores,
    )


def _best_of(checkpoint: Path) -> tuple[str, int | None]:
    """The monitored metric and the epoch of ``best.pt`` (``macro_f1`` and None when there is none)."""
    if not checkpoint.is_file():
        return "macro_f1", None
    ckpt = load_checkpoint(checkpoint)
    return ckpt["config"].monitor, int(ckpt["epoch"])


def _score_rows(
    store: BagStore,
    explained: Explained,
    shown: np.ndarray,
    scores: dict[str, Explained],
    instances_shown: int,
) -> tuple[list[dict], pd.DataFrame]:
    """The figure's rows (per bag the highest- and lowest-scoring instances by the first model, see
    :func:`top_and_bottom`) and the table of every shown instance: bag, labels, the bag's instance count,
    rank by score (1: highest), instance (position in the bag), source image and box, and each model's
    score (``score``: this run's model, ``score_<model>`` the compared ones)."""
    names = np.asarray(store.class_names)
    first = next(iter(scores))
    rows, records = [], []
    for pos in shown:
        bag = int(explained.bags[pos])
        members = np.flatnonzero(explained.instance_bag == pos)  # instance positions, in store order
        keep, gap = top_and_bottom(explained.instance_scores[members], instances_shown)
        ranks = np.empty(len(members), dtype=np.int64)
        ranks[np.argsort(-explained.instance_scores[members], kind="stable")] = np.arange(1, len(members) + 1)
        stored = np.sort(keep)  # the store returns patches in instance order
        patches = store.patches(bag, stored)[np.searchsorted(stored, keep)]  # (n, C, H, W), display order
        bag_id, labels = str(store.bag_id[bag]), ";".join(names[explained.labels[pos] > 0]) or "none"
        sources, boxes = store.instance_info(bag)
        row_scores = {n: ex.instance_scores[members[keep]] for n, ex in scores.items()}
        rows.append(
            {
                "bag": bag_id,
                "labels": labels,
                "patches": patches,
                "scores": row_scores,
                "size": len(members),
                "gap": gap,
            }
        )
        for j, k in enumerate(keep):
            x0, y0, x1, y1 = (int(v) for v in boxes[k])
            record = {
                "bag": bag_id,
                "labels": labels,
                "bag_instances": len(members),
                "rank": int(ranks[k]),
                "instance": int(k),
                "source_image": str(sources[k]),
                **{"x0": x0, "y0": y0, "x1": x1, "y1": y1},
            }
            for n, values in row_scores.items():
                record["score" if n == first else f"score_{n.replace(' ', '_')}"] = round(float(values[j]), 6)
            records.append(record)
    return rows, pd.DataFrame(records)

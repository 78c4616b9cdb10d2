"""The ``hamil figures`` stage: all figures of one training run (curves, ROC, tSNE, instance scores).

The drawing itself is in :mod:`hamil.plots`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from hamil.checkpoint import load_checkpoint, model_from_checkpoint
from hamil.data import BagDataset, make_loader
from hamil.inference import Explained, explain_batches
from hamil.models import paper_name
from hamil.plots import plot_curves, plot_instance_scores, plot_roc, plot_tsne
from hamil.runtime import select_device
from preprocessing.errors import InputError
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
    """
    run = Path(run_dir)
    seen = [run.resolve()]
    for other in compare_runs or []:
        if Path(other).resolve() in seen:
            raise InputError(f"{other}: compared twice")
        seen.append(Path(other).resolve())
    written = [run / "curves.png"]
    plot_curves(run / "history.csv", written[0], title=title)
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
    scores, kinds = {name: explained}, [f"{name}: {kind}"]
    for other in compare_runs or []:
        other_name, other_kind, other_explained = _explain(
            Path(other) / "best.pt", store, bags[shown], dev, batch_bags
        )
        if other_name in scores:  # e.g. another seed of the same model
            other_name = f"{other_name} ({Path(other).name})"
        scores[other_name] = _spread(other_explained, explained, shown)
        kinds.append(f"{other_name}: {other_kind}")
    written.append(run / "instance_scores.png")
    plot_instance_scores(
        _score_rows(store, explained, shown, scores, instances_shown, seed),
        written[-1],
        tuple(scores),
        f"{title} instance scores ({split}); {'; '.join(kinds)}".strip(),
    )
    return written


def _explain(
    checkpoint: Path, store: BagStore, bags: np.ndarray, device: torch.device, batch_bags: int
) -> tuple[str, str, Explained]:
    """The model's display name, what its instance scores are, and its outputs on ``bags``."""
    ckpt = load_checkpoint(checkpoint, num_classes=len(store.class_names))
    model = model_from_checkpoint(ckpt, device)
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


def _score_rows(
    store: BagStore,
    explained: Explained,
    shown: np.ndarray,
    scores: dict[str, Explained],
    instances_shown: int,
    seed: int,
) -> list[dict]:
    rng = np.random.default_rng(seed)
    names = np.asarray(store.class_names)
    rows = []
    for pos in shown:
        bag = int(explained.bags[pos])
        members = np.flatnonzero(explained.instance_bag == pos)  # instance positions, in store order
        keep = np.arange(len(members))
        if len(keep) > instances_shown:
            keep = np.sort(rng.choice(keep, instances_shown, replace=False))
        rows.append(
            {
                "bag": str(store.bag_id[bag]),
                "labels": ";".join(names[explained.labels[pos] > 0]) or "none",
                "patches": store.patches(bag, keep),  # (n, C, H, W)
                "scores": {name: ex.instance_scores[members[keep]] for name, ex in scores.items()},
            }
        )
    return rows

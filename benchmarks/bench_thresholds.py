"""Tuned thresholds against the fixed 0.5 on an MNIST-like multi-label MIL set, through the real workflow.

The set: scikit-learn's bundled handwritten digits (1,797 greyscale 8x8 scans, UCI; no download), each scan
written as a 32x32 PNG. Bags of 2-6 scans, every scan in one bag only; a bag's labels are the digits it
holds (a bag holds a given digit about one time in three), so the ten classes are ten MIL tasks. Bags are
split 2:1:2, so the validation split holds about 25 positives per class: enough for :func:`tune_thresholds`
to consider every class. ``snakemake`` runs acquire, crop (whole images), bags, train and evaluate for the
models asked for; then, per model, the test macro F1 at 0.5 and at the tuned thresholds, their paired
difference and its 95 % bootstrap interval over test bags (the noise), and which classes moved.

    python benchmarks/bench_thresholds.py [--out benchmarks/out/thresholds] [--models hamil mean]
        [--epochs 16] [--cores 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image
from sklearn.datasets import load_digits

REPO = Path(__file__).resolve().parents[1]
BOOTSTRAP = 2000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/out/thresholds")
    parser.add_argument("--models", nargs="+", default=["hamil", "mean"])
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="bags, split and training seed")
    return parser.parse_args()


def write_digit_bags(folder: Path, seed: int) -> Path:
    """PNG scans and the folder source's ``path, group, labels`` table; returns the table."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows, start, bag = [], 0, 0
    while start + 2 <= len(order):
        members = order[start : start + int(rng.integers(2, 7))]
        start += len(members)
        labels = ";".join(f"d{d}" for d in sorted(set(digits.target[members].tolist())))
        for i in members:
            name = f"images/digit{i:04d}.png"
            scan = np.kron(digits.images[i] * (255 / 16), np.ones((4, 4))).round().astype(np.uint8)
            Image.fromarray(scan).save(folder / name)  # (32, 32) grey
            rows.append({"path": name, "group": f"bag{bag:03d}", "labels": labels})
        bag += 1
    table = folder / "digits.tsv"
    pd.DataFrame(rows).to_csv(table, sep="\t", index=False)
    return table


def write_config(folder: Path, table: Path, args: argparse.Namespace) -> Path:
    """The workflow configuration: whole 32x32 scans, one bag per group, split 2:1:2."""
    config = {
        "datasets": {
            "digits": {
                "source": "folder",
                "table": str(table),
                "shards": 1,
                "crop": {"instances": "whole", "whole_size": [32, 32]},
                "bags": {"top_k": 10, "max_bag_size": None, "split_ratio": [2, 1, 2], "seed": args.seed},
            }
        },
        "models": args.models,
        "seeds": [args.seed],
        "train": {"epochs": args.epochs, "batch_bags": 8, "lr": 1.0e-3, "schedule": "cosine"},
        "evaluate": {"split": "test", "threshold": 0.5},
    }
    config["train"]["patience"] = None  # the cosine schedule to its last epoch
    path = folder / "digits.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def macro_f1(y: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Macro F1 of ``y (..., B, K)`` at per-class ``thresholds (K,)``, vectorised over leading axes.

    F1 = 2TP / (2TP + FP + FN), 0 where a class is neither true nor predicted (sklearn's zero_division=0).
    """
    predicted = probs >= thresholds
    tp = (predicted & (y == 1)).sum(axis=-2)
    denominator = predicted.sum(axis=-2) + y.sum(axis=-2)
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0).mean(axis=-1)


def paired_interval(y: np.ndarray, probs: np.ndarray, tuned: np.ndarray, seed: int) -> tuple[float, float]:
    """95 % bootstrap interval over test bags of macro F1 (tuned) minus macro F1 (0.5)."""
    pick = np.random.default_rng(seed).integers(0, len(y), (BOOTSTRAP, len(y)))  # (R, B)
    yb, pb = y[pick], probs[pick]  # (R, B, K)
    diffs = macro_f1(yb, pb, tuned) - macro_f1(yb, pb, np.full(len(tuned), 0.5))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)


def report(run: Path, seed: int) -> dict[str, object]:
    """One model's row: F1 at 0.5 and tuned, the paired difference with its interval, the moved classes."""
    metrics = json.loads((run / "metrics.json").read_text())
    per_class = pd.read_csv(run / "per_class.tsv", sep="\t")
    predictions = pd.read_csv(run / "predictions.tsv", sep="\t", keep_default_na=False)
    classes = per_class["class"].tolist()
    probs = predictions[[f"p_{c}" for c in classes]].to_numpy(np.float64)  # (B, K)
    truth = predictions["true_labels"].str.split(";")
    y = np.array([[c in labels for c in classes] for labels in truth], dtype=np.int64)  # (B, K)
    tuned = per_class["threshold_tuned"].to_numpy(np.float64)
    fixed = np.full(len(classes), 0.5)
    for thresholds, want in ((fixed, metrics["macro_f1"]), (tuned, metrics["tuned"]["macro_f1"])):
        if abs(macro_f1(y, probs, thresholds) - want) > 1e-9:
            raise SystemExit(f"{run}: predictions.tsv gives another macro F1 than metrics.json")
    low, high = paired_interval(y, probs, tuned, seed)
    return {
        "macro_auc": round(metrics["macro_auc"], 3),
        "f1_at_0.5": round(metrics["macro_f1"], 3),
        "f1_tuned": round(metrics["tuned"]["macro_f1"], 3),
        "difference": round(metrics["tuned"]["macro_f1"] - metrics["macro_f1"], 3),
        "interval_95": f"[{low:+.3f}, {high:+.3f}]",
        "tuned_classes": ", ".join(f"{c} {t:g}" for c, t in zip(classes, tuned, strict=True) if t != 0.5)
        or "none",
        "val_positives": f"{per_class['tune_positives'].min()}-{per_class['tune_positives'].max()}",
    }


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table = write_digit_bags(args.out / "raw", args.seed)
    config = write_config(args.out, table, args)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(args.out)]
    cmd += ["evaluate", "--cores", str(args.cores), "--configfile", str(config)]
    subprocess.run(cmd, check=True)
    rows = {m: report(args.out / f"results/digits/{m}/seed{args.seed}", args.seed) for m in args.models}
    frame = pd.DataFrame(rows).T.rename_axis("model")
    print(frame.to_markdown())
    (args.out / "thresholds.md").write_text(frame.to_markdown() + "\n")


if __name__ == "__main__":
    main()

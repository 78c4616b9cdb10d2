"""Cropping throughput and recall per proposal backend on synthetic 2048x2048 fields (not a test).

Generates a few fields (cell_size ~400) in a temporary folder, then runs :func:`preprocessing.crop.crop_shard`
over all of them in one process with one OpenCV thread, once per backend, and prints fields per second per
core (reading, proposals, cropping and Zarr writing included) and the recall (IoU >= 0.5) of the kept boxes.

    python benchmarks/bench_crop.py [--fields 8] [--backends opencv selectivesearch] [--patch-size 512]

Target: opencv >= 2 fields/s/core at recall >= 0.8.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import cv2  # noqa: E402

from preprocessing.crop import BACKENDS, CropParams, crop_shard  # noqa: E402
from preprocessing.sources.synthetic import SynthParams, generate  # noqa: E402

TARGET_FIELDS_PER_S = 2.0
TARGET_RECALL = 0.8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=8, help="number of 2048x2048 fields (default 8)")
    parser.add_argument("--field-size", type=int, default=2048)
    parser.add_argument("--cell-size", type=int, default=400)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--opencv-mode", default="single", choices=["single", "fast", "quality"])
    parser.add_argument("--patch-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=11)
    return parser.parse_args(argv)


def make_fields(root: Path, args: argparse.Namespace) -> None:
    """Write ``args.fields`` synthetic fields (1 per protein, 20 % of poor quality) under ``root``."""
    params = SynthParams(
        proteins=args.fields,
        fields_min=1,
        fields_max=1,
        field_size=args.field_size,
        cell_size=args.cell_size,
        seed=args.seed,
    )
    generate(root, params, workers=2)


def bench_backend(root: Path, backend: str, args: argparse.Namespace) -> dict[str, float | str]:
    """Crop every field with one backend in this process; return one table row."""
    params = CropParams(backend=backend, patch_size=args.patch_size, opencv_mode=args.opencv_mode)
    out = root / f"out_{backend}"
    start = time.perf_counter()
    stats = crop_shard(
        root / "images.tsv",
        0,
        1,
        out / "patches.zarr",
        out / "patches.tsv",
        params,
        boxes_tsv=root / "boxes.tsv",
    )
    seconds = time.perf_counter() - start
    name = backend if backend != "opencv" else f"opencv ({args.opencv_mode})"
    return {
        "backend": name,
        "fields": stats["fields"],
        "seconds": seconds,
        "fields_per_s_core": stats["fields"] / seconds,
        "recall": stats["recall"] if stats["recall"] is not None else float("nan"),
        "patches_per_field": stats["patches"] / max(stats["fields"], 1),
        "cells_per_field": stats["true_boxes"] / max(stats["fields"], 1),
    }


def print_table(rows: list[dict[str, float | str]]) -> None:
    header = (
        f"{'backend':<18} {'fields':>6} {'seconds':>8} {'fields/s/core':>13} {'recall':>7}  patches/field"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['backend']:<18} {r['fields']:>6} {r['seconds']:>8.2f} {r['fields_per_s_core']:>13.2f} "
            f"{r['recall']:>7.3f}  {r['patches_per_field']:.1f} (cells {r['cells_per_field']:.1f})"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cv2.setNumThreads(1)  # one core
    with tempfile.TemporaryDirectory(prefix="bench_crop_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        make_fields(root, args)
        print(
            f"{args.fields} synthetic {args.field_size}x{args.field_size} fields, cell_size {args.cell_size} "
            f"(generated in {time.perf_counter() - start:.1f} s); single process, 1 OpenCV thread\n"
        )
        rows = [bench_backend(root, backend, args) for backend in args.backends]
    print_table(rows)
    for r in rows:
        if str(r["backend"]).startswith("opencv"):
            ok = r["fields_per_s_core"] >= TARGET_FIELDS_PER_S and r["recall"] >= TARGET_RECALL
            verdict = "meets" if ok else "MISSES"
            target = f">= {TARGET_FIELDS_PER_S} fields/s/core at recall >= {TARGET_RECALL}"
            print(f"\n{r['backend']} {verdict} the target ({target})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Crop recall and speed of every box backend on synthetic 2048x2048 fields, sparse and dense (not a test).

For each setting, generates fields with their true cell boxes in a temporary folder, then per backend, in
one process with one OpenCV thread:

* ``boxes``: fields per second per core of :func:`preprocessing.proposals.propose_boxes` alone (the field
  already in memory) and the recall (IoU >= 0.5) of its boxes against the true boxes;
* ``crop``: fields per second per core of the whole crop stage (:func:`preprocessing.crop.crop_shard`:
  reading, boxes, cutting and Zarr writing of the patches).

Settings: ``sparse`` (4-7 cells of ~400 px per field, kept apart) and ``dense`` (30-45 cells of ~360 px,
bodies touching and overlapping by up to 10 % of a cell: ``SynthParams.touching``). 20 % of the fields are
of poor quality (blur, dim, noise, no signal) in both.

``--real PATH`` adds a real fluorescence image of densely packed nuclei with independent manual
annotations: the 2018 Data Science Bowl image that the ``stardist`` package ships (512x512, 125 nuclei;
PATH: its wheel, ``pip download --no-deps stardist==0.9.2``, or a folder with ``img2d.tif`` and
``mask2d.tif``). It is cropped as a user would: the one channel put in the nucleus channel (blue) and
scaled to its maximum, boxes set to fit (``min_size`` 0.015, ``max_size`` 0.1, ``max_aspect`` 3, 500 boxes
at most), for every backend; a fourth row is the seeded backend with one global Otsu threshold.

    python benchmarks/bench_crop.py [--fields 8] [--settings sparse dense] [--real stardist-0.9.2-*.whl]

Targets: dense, seeded: recall >= 0.9 and >= 5x the opencv backend's fields/s (boxes); sparse, opencv:
>= 2 fields/s/core (crop) at recall >= 0.8.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tifffile  # noqa: E402
from skimage import measure  # noqa: E402

from preprocessing import boxes as bx  # noqa: E402
from preprocessing.crop import BACKENDS, CropParams, crop_shard  # noqa: E402
from preprocessing.io import read_image  # noqa: E402
from preprocessing.proposals import propose_boxes  # noqa: E402
from preprocessing.sources.synthetic import SynthParams, generate  # noqa: E402

SETTINGS = {
    "sparse": {"cell_size": 400},
    "dense": {"cell_size": 360, "cells_min": 30, "cells_max": 45, "touching": 0.1},
}
REAL_PARAMS = {"min_size": 0.015, "max_size": 0.1, "max_aspect": 3.0, "max_patches_per_field": 500}
DENSE_RECALL, DENSE_SPEEDUP = 0.9, 5.0
SPARSE_FIELDS_PER_S, SPARSE_RECALL = 2.0, 0.8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=8, help="fields per setting (default 8)")
    parser.add_argument("--field-size", type=int, default=2048)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--opencv-mode", default="single", choices=["single", "fast", "quality"])
    parser.add_argument("--patch-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--real", type=Path, help="the stardist wheel, or a folder with img2d.tif, mask2d.tif"
    )
    return parser.parse_args(argv)


def make_fields(root: Path, setting: str, args: argparse.Namespace) -> None:
    """Write ``args.fields`` synthetic fields of one setting (1 per protein) under ``root``."""
    params = SynthParams(
        proteins=args.fields, fields_min=1, fields_max=1, field_size=args.field_size, seed=args.seed
    )
    generate(root, dataclasses.replace(params, **SETTINGS[setting]), workers=2)


def true_boxes(root: Path) -> dict[str, np.ndarray]:
    table = pd.read_csv(root / "boxes.tsv", sep="\t", dtype={"image_id": str})
    return {k: g[["x0", "y0", "x1", "y1"]].to_numpy() for k, g in table.groupby("image_id")}


def time_boxes(
    fields: dict[str, np.ndarray], truth: dict[str, np.ndarray], params: CropParams, repeats: int = 1
) -> dict[str, float]:
    """Boxes of every field (in memory, ``repeats`` times): fields/s, recall and boxes per field."""
    propose_boxes(next(iter(fields.values())), params)  # warm up (lazy imports)
    start = time.perf_counter()
    for _ in range(repeats):
        found = {image_id: propose_boxes(field, params) for image_id, field in fields.items()}
    seconds = (time.perf_counter() - start) / repeats
    matched = sum(int(bx.matched(found[k], truth.get(k, np.zeros((0, 4)))).sum()) for k in fields)
    n_true = sum(len(t) for t in truth.values())
    return {
        "boxes_per_s": len(fields) / seconds,
        "recall": matched / n_true,
        "boxes_per_field": sum(len(b) for b in found.values()) / len(fields),
        "cells_per_field": n_true / len(fields),
    }


def time_crop(root: Path, params: CropParams) -> float:
    """Fields per second of the whole crop stage over every field of ``root`` (one process)."""
    out = root / f"out_{params.backend}_{params.seeded_threshold}"
    start = time.perf_counter()
    stats = crop_shard(root / "images.tsv", 0, 1, out / "patches.zarr", out / "patches.tsv", params)
    return stats["fields"] / (time.perf_counter() - start)


def bench_setting(root: Path, variants: list[tuple[str, CropParams]], crop: bool) -> list[dict[str, Any]]:
    """One row per backend variant on the fields of ``root`` (a single field: boxes timed 5 times)."""
    table = pd.read_csv(root / "images.tsv", sep="\t", dtype=str)
    fields = {row.image_id: read_image(root / row.path) for row in table.itertuples()}
    truth = true_boxes(root)
    rows = []
    for name, params in variants:
        row = {"backend": name, "fields": len(fields)}
        row |= time_boxes(fields, truth, params, repeats=5 if len(fields) == 1 else 1)
        row["crop_per_s"] = time_crop(root, params) if crop else float("nan")
        rows.append(row)
    return rows


def variants(args: argparse.Namespace, **extra: Any) -> list[tuple[str, CropParams]]:
    """(name, params) per backend asked for, with ``extra`` parameters."""
    out = []
    for backend in args.backends:
        name = f"opencv ({args.opencv_mode})" if backend == "opencv" else backend
        params = CropParams(
            backend=backend, patch_size=args.patch_size, opencv_mode=args.opencv_mode, **extra
        )
        out.append((name, params))
    return out


def write_real(root: Path, source: Path) -> None:
    """The stardist package's DSB 2018 image as one field (nuclei in blue) with its annotated boxes."""
    if source.is_dir():
        image, mask = (tifffile.imread(source / name) for name in ("img2d.tif", "mask2d.tif"))
    else:
        with zipfile.ZipFile(source) as wheel:
            image, mask = (
                tifffile.imread(io.BytesIO(wheel.read(f"stardist/data/images/{name}")))
                for name in ("img2d.tif", "mask2d.tif")
            )
    field = np.zeros((*image.shape, 3), np.uint8)  # (H, W, 3)
    field[:, :, 2] = np.round(image.astype(np.float64) / image.max() * 255)
    root.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / "dsb2018.png"), field[:, :, ::-1])
    pd.DataFrame([{"image_id": "dsb2018", "group": "real", "path": "dsb2018.png", "labels": ""}]).to_csv(
        root / "images.tsv", sep="\t", index=False
    )
    boxes = [(r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]) for r in measure.regionprops(mask)]
    pd.DataFrame([("dsb2018", *b) for b in boxes], columns=["image_id", "x0", "y0", "x1", "y1"]).to_csv(
        root / "boxes.tsv", sep="\t", index=False
    )


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    header = f"{'backend':<24} {'fields':>6} {'recall@0.5':>10} {'boxes/field':>16} {'boxes f/s/core':>14}"
    header += f" {'crop f/s/core':>13}"
    print(header)
    print("-" * len(header))
    for r in rows:
        counts = f"{r['boxes_per_field']:.1f} ({r['cells_per_field']:.1f})"
        print(
            f"{r['backend']:<24} {r['fields']:>6} {r['recall']:>10.3f} {counts:>16} "
            f"{r['boxes_per_s']:>14.2f} {_number(r['crop_per_s']):>13}"
        )


def _number(value: float) -> str:
    return "-" if np.isnan(value) else f"{value:.2f}"


def verdicts(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line per target that the rows measured allow to check."""
    lines = []
    dense = {r["backend"].split(" ")[0]: r for r in results.get("dense", [])}
    if "seeded" in dense:
        ok = dense["seeded"]["recall"] >= DENSE_RECALL
        lines.append(
            f"dense, seeded: recall {dense['seeded']['recall']:.3f} (target >= {DENSE_RECALL}): "
            + ("met" if ok else "MISSED")
        )
    if "seeded" in dense and "opencv" in dense:
        boxes = dense["seeded"]["boxes_per_s"] / dense["opencv"]["boxes_per_s"]
        crop = dense["seeded"]["crop_per_s"] / dense["opencv"]["crop_per_s"]
        patches = crop * dense["seeded"]["boxes_per_field"] / max(dense["opencv"]["boxes_per_field"], 1e-9)
        lines.append(
            f"dense, seeded / opencv fields per second: boxes {boxes:.1f}x (target >= {DENSE_SPEEDUP}x): "
            + ("met" if boxes >= DENSE_SPEEDUP else "MISSED")
            + f"; whole crop stage {crop:.1f}x (reading, cutting and writing included, not a target;"
            + f" per patch written {patches:.1f}x: seeded cuts the cells opencv misses)"
        )
    for r in results.get("sparse", []):
        if r["backend"].startswith("opencv"):
            ok = r["crop_per_s"] >= SPARSE_FIELDS_PER_S and r["recall"] >= SPARSE_RECALL
            target = f">= {SPARSE_FIELDS_PER_S} fields/s/core (crop) at recall >= {SPARSE_RECALL}"
            lines.append(
                f"sparse, {r['backend']}: " + ("meets" if ok else "MISSES") + f" the target ({target})"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cv2.setNumThreads(1)  # one core
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_crop_") as tmp:
        for setting in args.settings:
            root = Path(tmp) / setting
            start = time.perf_counter()
            make_fields(root, setting, args)
            print(
                f"{setting}: {args.fields} synthetic {args.field_size}x{args.field_size} fields "
                f"{SETTINGS[setting]} (generated in {time.perf_counter() - start:.1f} s)",
                flush=True,
            )
            results[setting] = bench_setting(root, variants(args), crop=True)
        if args.real is not None:
            write_real(Path(tmp) / "real", args.real)
            real = variants(args, **REAL_PARAMS)
            if "seeded" in args.backends:
                otsu = CropParams(backend="seeded", seeded_threshold="otsu", **REAL_PARAMS)
                real.append(("seeded (global otsu)", otsu))
            results["real"] = bench_setting(Path(tmp) / "real", real, crop=False)
    print("\nsingle process, 1 OpenCV thread; boxes: propose_boxes alone; crop: the whole crop stage")
    for setting, rows in results.items():
        title = "real: DSB 2018 nuclei (stardist's test image), boxes vs. its manual annotation"
        print_table(title if setting == "real" else f"{setting} ({SETTINGS[setting]})", rows)
    print()
    print("\n".join(verdicts(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

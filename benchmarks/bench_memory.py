"""Peak memory of training against the number of bags in the store, measured in one run (not a test).

Builds, in a temporary folder, two bag stores of incompressible random patches that differ only in their
test split: both hold the same ``--train`` train bags and ``--val`` val bags (same patches, same bag
indices); the big one adds ``--extra`` test bags, which training never reads (default 1,960 extra bags of
4-8 patches of 3x96x96: about 330 MB on disk, more than the RSS of the whole run). Each store is then
trained on for one epoch (:func:`hamil.train.train`, mean pooling, the same steps on both) in a fresh
Python process, which reports its own peak resident set size (``ru_maxrss``; DataLoader workers, if any,
are reported apart). Runs alternate small, big, small, big, ... so drifts hit both alike. Prints the peak
RSS per store and the ratio big / small, which should be about 1.0: memory must not grow with the store.

    python benchmarks/bench_memory.py [--train 32] [--val 8] [--extra 1960] [--patch 96] [--repeats 2]
                                      [--workers 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import zarr  # noqa: E402

from preprocessing.store import write_bag_store  # noqa: E402

NUM_CLASSES = 5
TARGET_RATIO = 1.10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=32, help="train bags in both stores (default 32)")
    parser.add_argument("--val", type=int, default=8, help="val bags in both stores (default 8)")
    parser.add_argument("--extra", type=int, default=1960, help="test bags of the big store only")
    parser.add_argument("--patch", type=int, default=96, help="patch side in pixels (default 96)")
    parser.add_argument("--min-bag", type=int, default=4)
    parser.add_argument("--max-bag", type=int, default=8)
    parser.add_argument("--batch-bags", type=int, default=8)
    parser.add_argument("--model", default="mean")
    parser.add_argument("--repeats", type=int, default=2, help="trainings per store (default 2)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=2, metavar=("CONFIG_JSON", "RESULT_JSON"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_stores(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Write the small and the big store from one shard; the small one is the big one's first bags."""
    rng = np.random.default_rng(args.seed)
    common = args.train + args.val
    bags = common + args.extra
    sizes = rng.integers(args.min_bag, args.max_bag + 1, bags)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    block = 256  # the source shard is only input to write_bag_store: big uncompressed chunks write fast
    shape = (3, args.patch, args.patch)
    source = zarr.create_array(
        root / "shard.zarr", shape=(n, *shape), chunks=(block, *shape), dtype="uint8", compressors=None
    )
    for start in range(0, n, block):  # uniform noise: incompressible, so the big store is big on disk
        count = min(block, n - start)
        source[start : start + count] = rng.integers(0, 256, (count, *shape), np.uint8)
    labels = (rng.random((bags, NUM_CLASSES)) < 0.4).astype(np.uint8)
    labels[np.arange(bags), rng.integers(0, NUM_CLASSES, bags)] = 1  # every bag has a label
    split = np.full(bags, 2, np.int8)
    split[: args.train], split[args.train : common] = 0, 1
    stores = {}
    for name, count in (("small", common), ("big", bags)):
        patches = int(offsets[count])
        stores[name] = root / f"{name}.zarr"
        write_bag_store(
            stores[name],
            [source],
            picks=np.stack([np.zeros(patches, np.int64), np.arange(patches)], axis=1),
            bag_offsets=offsets[: count + 1],
            labels=labels[:count],
            split=split[:count],
            group=[f"G{b}" for b in range(count)],
            bag_id=[f"G{b}#0" for b in range(count)],
            source_image=[f"F{i}" for i in range(patches)],
            box=np.zeros((patches, 4), np.int64),
            attrs={"class_names": [f"c{k}" for k in range(NUM_CLASSES)], "source": "bench_memory"},
            workers=2,
        )
    return stores


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def child(config_json: str, result_json: str) -> int:
    """Run one training from a saved config; write this process's peak RSS (and its workers') as JSON."""
    from hamil.config import TrainConfig
    from hamil.train import train

    cfg = TrainConfig(**json.loads(Path(config_json).read_text()))
    start = time.perf_counter()
    train(cfg)
    result = {
        "seconds": time.perf_counter() - start,
        "self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # KiB on Linux
        "workers_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        "epochs_done": len(Path(cfg.out_dir, "history.csv").read_text().splitlines()) - 1,
    }
    Path(result_json).write_text(json.dumps(result))
    return 0


def run_training(store: Path, run_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """One training on ``store`` in a fresh interpreter; its peak RSS and time."""
    run_dir.mkdir(parents=True)
    config = {
        "store": str(store),
        "out_dir": str(run_dir / "out"),
        "model": args.model,
        "epochs": 1,
        "batch_bags": args.batch_bags,
        "max_instances": args.max_bag,
        "threads": args.threads,
        "num_workers": args.workers,
        "seed": args.seed,
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    command = [
        sys.executable,
        __file__,
        "--child",
        str(run_dir / "config.json"),
        str(run_dir / "result.json"),
    ]
    done = subprocess.run(command, capture_output=True, text=True)  # keeps progress bars out of the table
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"training on {store.name} failed (exit {done.returncode})")
    return json.loads((run_dir / "result.json").read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(*args.child)
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        stores = build_stores(root, args)
        raw = {name: disk_bytes(path / "patches") for name, path in stores.items()}
        steps = -(-args.train // args.batch_bags)
        print(
            f"stores of 3x{args.patch}x{args.patch} random patches, {args.min_bag}-{args.max_bag} per bag "
            f"(built in {time.perf_counter() - start:.1f} s):\n"
            f"  small: {args.train} train + {args.val} val bags, {raw['small'] / 2**20:.1f} MiB of patches\n"
            f"  big  : the same + {args.extra} test bags, {raw['big'] / 2**20:.1f} MiB of patches\n"
            f"each run: model {args.model}, 1 epoch = {steps} steps of {args.batch_bags} bags, "
            f"{args.workers} workers, {args.threads} threads, fresh process\n"
        )
        peaks: dict[str, list[float]] = {name: [] for name in stores}
        header = f"{'run':>3} {'store':<6} {'seconds':>8} {'peak RSS MiB':>13} {'workers MiB':>12}"
        print(header)
        print("-" * len(header))
        for k in range(args.repeats):
            for name, path in stores.items():
                r = run_training(path, root / f"run_{name}_{k}", args)
                assert r["epochs_done"] == 1
                total = r["self_kib"] / 1024 + (r["workers_kib"] / 1024 if args.workers else 0.0)
                peaks[name].append(total)
                print(
                    f"{k:>3} {name:<6} {r['seconds']:>8.1f} {r['self_kib'] / 1024:>13.1f} "
                    f"{r['workers_kib'] / 1024 if args.workers else 0.0:>12.1f}",
                    flush=True,
                )
    small, big = max(peaks["small"]), max(peaks["big"])
    ratio = big / small
    print(f"\npeak RSS (max over runs, process + workers): small {small:.1f} MiB, big {big:.1f} MiB")
    print(f"ratio big / small = {ratio:.3f} (store on disk: x{raw['big'] / raw['small']:.1f})")
    verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
    print(f"{verdict} the target (ratio <= {TARGET_RATIO}: memory does not grow with the store)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Loading throughput of the bag store against per-patch JPEG files, through the same DataLoader (not a test).

Builds, in a temporary folder, one set of synthetic RGB patches with image structure (smoothed noise,
bright blobs, a little pixel noise, so JPEG sizes are realistic) and writes it twice: as a bag store
(:func:`preprocessing.store.write_bag_store`: one chunk per patch, once per ``--codecs`` entry: lz4, the
bag-store default, and zstd) and as one JPEG file per patch
(quality 90, ``cv2.imwrite``, one folder per bag). The JPEG side is the dataset a user would write
instead: decode a bag's files with ``cv2.imread``, BGR -> RGB, HWC -> CHW, stack. Both go through
:func:`hamil.data.make_loader` (same ``collate_bags``, batch size, no shuffling, no augmentation); each
configuration gets one warm-up pass (files in the page cache, workers started), then the best of
``--repeats`` timed passes, alternating store and JPEG. Prints patches per second and the ratio
store / JPEG per worker count.

    python benchmarks/bench_loader.py [--patch 512] [--bags 48] [--bag-size 8] [--batch-bags 4]
                                      [--workers 2 0] [--repeats 3] [--codecs lz4 zstd]

Target: store >= 1.5x JPEG.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from hamil.data import BagDataset, make_loader  # noqa: E402
from preprocessing.store import BagStore, create_patch_array, write_bag_store  # noqa: E402

TARGET_RATIO = 1.5
JPEG_QUALITY = 90
NUM_CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patch", type=int, default=512, help="patch side in pixels (default 512)")
    parser.add_argument("--bags", type=int, default=48, help="number of bags (default 48)")
    parser.add_argument("--bag-size", type=int, default=8, help="patches per bag (default 8)")
    parser.add_argument("--batch-bags", type=int, default=4, help="bags per batch (default 4)")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[2, 0], help="DataLoader worker counts (default 2 0)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per configuration (best)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--codecs", nargs="+", default=["lz4", "zstd"], help="bag-store codecs to compare (first: the target)"
    )
    return parser.parse_args(argv)


def make_patch(rng: np.random.Generator, size: int) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 RGB patch: smoothed noise + Gaussian blobs + a little pixel noise."""
    low = max(size // 16, 2)
    image = np.empty((size, size, 3), np.float32)
    for c in range(3):
        coarse = rng.random((low, low), dtype=np.float32)
        image[..., c] = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC) * 90.0
    blobs = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(4, 12))):
        x, y = (int(v) for v in rng.integers(0, size, 2))
        radius = int(rng.integers(size // 40 + 1, size // 10 + 2))
        cv2.circle(blobs, (x, y), radius, float(rng.uniform(60, 160)), -1)
    blobs = cv2.GaussianBlur(blobs, (0, 0), sigmaX=max(size / 100, 1.0))
    image[..., 1] += blobs
    image[..., 2] += 0.5 * blobs
    image += rng.normal(0.0, 4.0, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def build_data(
    root: Path, args: argparse.Namespace
) -> tuple[dict[str, Path], list[list[Path]], dict[str, float]]:
    """Write the same patches as bag stores (one per codec) and as JPEG files; return stores, files, sizes."""
    rng = np.random.default_rng(args.seed)
    n = args.bags * args.bag_size
    src = zarr.open_group(root / "shard.zarr", mode="w", zarr_format=3)
    shard = create_patch_array(src, n, 3, args.patch)
    files: list[list[Path]] = []
    jpeg_bytes = 0
    for b in range(args.bags):
        folder = root / "jpeg" / f"bag_{b:05d}"
        folder.mkdir(parents=True)
        bag_files, block = [], []
        for i in range(args.bag_size):
            rgb = make_patch(rng, args.patch)
            path = folder / f"{i:03d}.jpg"
            cv2.imwrite(
                str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
            )
            jpeg_bytes += path.stat().st_size
            bag_files.append(path)
            block.append(rgb.transpose(2, 0, 1))
        shard[b * args.bag_size : (b + 1) * args.bag_size] = np.stack(block)
        files.append(bag_files)
    labels = (rng.random((args.bags, NUM_CLASSES)) < 0.3).astype(np.uint8)
    stores, sizes = {}, {"raw": n * 3 * args.patch**2, "jpeg": jpeg_bytes}
    for codec in args.codecs:
        store = stores[codec] = root / f"bags_{codec}.zarr"
        write_bag_store(
            store,
            [zarr.open_array(root / "shard.zarr" / "patches", mode="r")],
            picks=np.stack([np.zeros(n, np.int64), np.arange(n)], axis=1),
            bag_offsets=np.arange(0, n + 1, args.bag_size),
            labels=labels,
            split=np.zeros(args.bags, np.int8),
            group=[f"G{b}" for b in range(args.bags)],
            bag_id=[f"G{b}#0" for b in range(args.bags)],
            source_image=[f"F{i}" for i in range(n)],
            box=np.zeros((n, 4), np.int64),
            attrs={"class_names": [f"c{k}" for k in range(NUM_CLASSES)], "source": "bench_loader"},
            workers=2,
            codec=codec,
        )
        sizes[codec] = sum(p.stat().st_size for p in (store / "patches").rglob("*") if p.is_file())
    return stores, files, sizes


class JpegBagDataset(Dataset):
    """Bags of JPEG files as ``(patches uint8 (n, 3, H, W), labels float (K,), bag index)``."""

    def __init__(self, files: list[list[Path]], labels: np.ndarray) -> None:
        self.files = [[str(p) for p in bag] for bag in files]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        images = [cv2.cvtColor(cv2.imread(p, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for p in self.files[i]]
        patches = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())  # (n, 3, H, W)
        return patches, torch.from_numpy(self.labels[i].astype(np.float32)), i


def time_loaders(datasets: dict[str, Dataset], args: argparse.Namespace, workers: int) -> dict[str, float]:
    """Patches per second of each dataset: best of ``args.repeats`` full passes after one warm-up pass.

    The timed passes alternate between the datasets, so drifts in machine load hit all of them alike.
    """
    loaders = {
        name: make_loader(dataset, args.batch_bags, shuffle=False, seed=args.seed, num_workers=workers)
        for name, dataset in datasets.items()
    }
    patches = {name: sum(len(images) for images, *_ in loader) for name, loader in loaders.items()}  # warm-up
    best = dict.fromkeys(loaders, float("inf"))
    for _ in range(args.repeats):
        for name, loader in loaders.items():
            start = time.perf_counter()
            count = sum(len(images) for images, *_ in loader)
            best[name] = min(best[name], time.perf_counter() - start)
            assert count == patches[name]
    del loaders  # stops persistent workers
    return {name: patches[name] / best[name] for name in best}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        start = time.perf_counter()
        store_paths, files, sizes = build_data(Path(tmp), args)
        stores = {codec: BagStore(path) for codec, path in store_paths.items()}
        labels = next(iter(stores.values())).labels
        datasets: dict[str, Dataset] = {
            f"store {codec}": BagDataset(store, np.arange(store.num_bags)) for codec, store in stores.items()
        }
        datasets["jpeg"] = JpegBagDataset(files, labels)
        first_jpeg = datasets["jpeg"][0][0]
        for name in datasets:
            assert datasets[name][0][0].shape == first_jpeg.shape
        on_disk = ", ".join(f"store {c} {sizes[c] / 2**20:.1f} MiB" for c in stores)
        print(
            f"{args.bags} bags x {args.bag_size} patches of 3x{args.patch}x{args.patch} uint8, "
            f"batches of {args.batch_bags} bags (built in {time.perf_counter() - start:.1f} s)\n"
            f"on disk: raw {sizes['raw'] / 2**20:.1f} MiB, {on_disk}, "
            f"JPEG q{JPEG_QUALITY} {sizes['jpeg'] / 2**20:.1f} MiB\n"
        )
        rows = [(workers, time_loaders(datasets, args, workers)) for workers in args.workers]

    names = [n for n in datasets if n != "jpeg"]
    header = f"{'workers':>7} {'JPEG patches/s':>15}" + "".join(
        f" {n + ' /s':>16} {'x JPEG':>7}" for n in names
    )
    print(header)
    print("-" * len(header))
    for workers, rate in rows:
        cells = "".join(f" {rate[n]:>16.1f} {rate[n] / rate['jpeg']:>7.2f}" for n in names)
        print(f"{workers:>7} {rate['jpeg']:>15.1f}{cells}")
    for workers, rate in rows:
        ratio = rate[names[0]] / rate["jpeg"]
        verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
        print(f"\n{workers} workers: {names[0]} {verdict} the target (>= {TARGET_RATIO}x JPEG): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

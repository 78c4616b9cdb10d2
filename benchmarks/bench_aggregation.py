"""What aggregation costs, measured in one run (CPU by default, ``--device cuda`` on a GPU).

1. Aggregator alone, forward + backward, one bag of ``n`` feature maps ``(n, 512, 4, 4)`` (ResNet18 on
   128x128 patches), for n = 8, 32, 128, 512 and mean, attention, hamil_a, hamil, ramil (median of
   ``--repeats``); the growth t(512) / t(128) (linear cost: 4) and each model's time over attention's at 512.
2. One training step (forward, backward, Adam) with the ResNet18 backbone, HAMIL over mean pooling on the
   same batch (default 8 bags x 12 instances x 3x128x128; the paper's shapes on a GPU:
   ``--bags 8 --per-bag 13 --image-size 512``), and images per second per model.
3. ``merge_order`` (single-linkage tree) for n = 100, 1,000, 5,000 512-d points.

Targets (issue 16): t(512)/t(128) <= 6 for hamil and hamil_a; at n = 512 hamil <= 250x and hamil_a <= 120x
attention's time.

    python benchmarks/bench_aggregation.py [--repeats 5] [--threads 2] [--device cpu|cuda] [--amp bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import numpy as np
import torch

from hamil.models import build_model, create
from hamil.runtime import select_device
from hamil.tree import merge_order

AGGREGATORS = ("mean", "attention", "hamil_a", "hamil", "ramil")
SIZES = (8, 32, 128, 512)
TARGETS = {"hamil": (6.0, 250.0), "hamil_a": (6.0, 120.0)}  # growth t(512)/t(128), t / attention at 512


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="autocast on CUDA")
    parser.add_argument("--bags", type=int, default=8)
    parser.add_argument("--per-bag", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--step-models", nargs="+", default=["mean", "attention", "hamil_a", "hamil"])
    parser.add_argument("--skip-merge-order", action="store_true")
    return parser.parse_args()


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` after one warm-up call (synchronising a GPU around each call)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def aggregator_times(args: argparse.Namespace, device: torch.device) -> dict[str, dict[int, float]]:
    """Forward + backward of each aggregator alone on one bag of n maps (512, 4, 4)."""
    out: dict[str, dict[int, float]] = {}
    for name in AGGREGATORS:
        torch.manual_seed(0)
        agg = create(name, 512).to(device).train()
        out[name] = {}
        for n in SIZES:
            feats = torch.randn(n, 512, 4, 4, device=device, requires_grad=True)  # (n, C, h, w)
            sizes = torch.tensor([n], device=device)

            def step(agg=agg, feats=feats, sizes=sizes) -> None:
                with autocast(device, args.amp):
                    bags = agg(feats, sizes).bags  # (1, C, h, w) or (1, D)
                bags.float().square().sum().backward()

            out[name][n] = timed(step, device, args.repeats if n < 512 else max(1, args.repeats // 2))
    return out


def print_aggregator_table(times: dict[str, dict[int, float]]) -> None:
    print("aggregator forward + backward, one bag of n maps (512, 4, 4), median seconds")
    print(f"  {'n':>5} " + " ".join(f"{name:>11}" for name in AGGREGATORS))
    for n in SIZES:
        print(f"  {n:>5} " + " ".join(f"{times[name][n]:>11.5f}" for name in AGGREGATORS))
    growth = {name: times[name][512] / times[name][128] for name in AGGREGATORS}
    over = {name: times[name][512] / times["attention"][512] for name in AGGREGATORS}
    print("  t(512)/t(128) " + " ".join(f"{growth[name]:>11.2f}" for name in AGGREGATORS))
    print("  / attention   " + " ".join(f"{over[name]:>11.1f}" for name in AGGREGATORS) + "   (at n = 512)")
    for name, (max_growth, max_over) in TARGETS.items():
        ok = growth[name] <= max_growth and over[name] <= max_over
        print(
            f"  {name}: growth {growth[name]:.2f} (target <= {max_growth:g}), {over[name]:.1f}x attention "
            f"(target <= {max_over:g}x): {'meets' if ok else 'MISSES'} the target"
        )


def step_times(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """One training step (forward, backward, Adam) per model on the same batch of images."""
    torch.manual_seed(0)
    n = args.bags * args.per_bag
    images = torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8).to(device)
    sizes = torch.full((args.bags,), args.per_bag, device=device)
    labels = (torch.rand(args.bags, 10) < 0.3).float().to(device)
    out = {}
    for name in args.step_models:
        torch.manual_seed(0)
        model = build_model(name, labels.shape[1]).to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt) -> None:
            with autocast(device, args.amp):
                _, loss = model(images, sizes, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()

        out[name] = timed(step, device, args.repeats)
    return out


def print_step_table(args: argparse.Namespace, times: dict[str, float]) -> None:
    n, side = args.bags * args.per_bag, args.image_size
    print(f"\ntraining step, {args.bags} bags x {args.per_bag} x 3x{side}x{side} (median of {args.repeats})")
    for name, t in times.items():
        print(f"  {name:<10} {t:8.3f} s  {n / t:8.1f} images/s")
    if "hamil" in times and "mean" in times:
        print(f"  ratio HAMIL / mean = {times['hamil'] / times['mean']:.3f}")


def print_merge_order() -> None:
    print("\nmerge_order, 512-d float32 features, best of 3")
    rng = np.random.default_rng(0)
    for n in (100, 1_000, 5_000):
        x = rng.standard_normal((n, 512)).astype(np.float32)
        best = min(timed(lambda x=x: merge_order(x), torch.device("cpu"), 1) for _ in range(3))
        print(f"  n = {n:>5}: {best:.3f} s")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"device: {name}; autocast: {args.amp if device.type == 'cuda' else 'off'}\n")
    print_aggregator_table(aggregator_times(args, device))
    print_step_table(args, step_times(args, device))
    if not args.skip_merge_order:
        print_merge_order()


if __name__ == "__main__":
    main()

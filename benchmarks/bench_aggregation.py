"""HAMIL's cost over mean pooling, measured in one run on CPU.

Prints: the time of one HAMIL training step over one mean-pooling step with the same backbone and batch
(8 bags x 12 instances x 3x128x128; target <= 1.10), the unit calls per batch against the merges, and
merge_order times for n = 100, 1,000, 5,000 (512-d features).

    python benchmarks/bench_aggregation.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hamil.models import build_model
from hamil.tree import merge_order


def step_time(
    model: torch.nn.Module, images: torch.Tensor, sizes: torch.Tensor, labels: torch.Tensor, repeats: int
) -> float:
    """Median wall time of forward + backward + Adam step."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss = loss_fn(model(images, sizes), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bags, per_bag, size = 8, 12, 128
    images = torch.randint(0, 256, (bags * per_bag, 3, size, size), dtype=torch.uint8)
    sizes = torch.full((bags,), per_bag)
    labels = (torch.rand(bags, 10) < 0.3).float()

    timings = {}
    for name in ("mean", "hamil"):
        torch.manual_seed(0)
        model = build_model(name, 10).train()
        timings[name] = step_time(model, images, sizes, labels, args.repeats)
        if name == "hamil":
            calls = model.aggregator.last_unit_calls
    print(f"training step, {bags} bags x {per_bag} instances x 3x{size}x{size}, {args.threads} threads, CPU")
    print(f"  mean pooling : {timings['mean']:.3f} s")
    print(f"  HAMIL (L1Agg): {timings['hamil']:.3f} s")
    print(f"  ratio HAMIL / mean = {timings['hamil'] / timings['mean']:.3f}  (target <= 1.10)")
    print(f"  unit calls per batch: {calls} (merges: {bags * (per_bag - 1)})")

    print("merge_order, 512-d float32 features, best of 3")
    rng = np.random.default_rng(0)
    for n in (100, 1_000, 5_000):
        x = rng.standard_normal((n, 512)).astype(np.float32)
        best = min(_timed(lambda x=x: merge_order(x)) for _ in range(3))
        print(f"  n = {n:>5}: {best:.3f} s")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()

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


class Stepper:
    """One training step (forward, backward, Adam) of a model on a fixed batch."""

    def __init__(self, name: str, images: torch.Tensor, sizes: torch.Tensor, labels: torch.Tensor) -> None:
        torch.manual_seed(0)
        self.model = build_model(name, labels.shape[1]).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.batch = images, sizes, labels

    def __call__(self) -> float:
        images, sizes, labels = self.batch
        start = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(self.model(images, sizes), labels)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return time.perf_counter() - start


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

    steppers = {name: Stepper(name, images, sizes, labels) for name in ("mean", "hamil")}
    for step in steppers.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        for name, step in steppers.items():
            times[name].append(step())
    timings = {name: float(np.median(t)) for name, t in times.items()}
    calls = steppers["hamil"].model.aggregator.last_unit_calls
    print(f"training step, {bags} bags x {per_bag} instances x 3x{size}x{size}, {args.threads} threads, CPU")
    print(f"  mean pooling : {timings['mean']:.3f} s (median of {args.repeats})")
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

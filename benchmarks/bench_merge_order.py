"""Wall time of hamil.tree.merge_order on one thread (best of 3). Not a test.

Usage: ``python benchmarks/bench_merge_order.py``
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported

import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

from hamil.tree import merge_order, tree_height  # noqa: E402


def _single_thread() -> None:
    """Pin BLAS/OpenMP pools to one thread even if numpy was imported earlier."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1)


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    _single_thread()
    rng = np.random.default_rng(0)
    for n in (100, 1_000, 5_000):
        x = rng.standard_normal((n, 512)).astype(np.float32)
        seconds = best_of(lambda x=x: merge_order(x))
        print(f"random float32 n={n:>5} d=512: {seconds:8.3f} s  (height {tree_height(merge_order(x), n)})")
    for n, d, values in ((300, 2, 3), (300, 8, 2), (300, 512, 2)):
        x = rng.integers(0, values, (n, d)).astype(np.float32)
        seconds = best_of(lambda x=x: merge_order(x))
        print(f"many ties n={n:>5} d={d:>3} values 0..{values - 1}: {seconds:8.3f} s")
    x = np.zeros((300, 512), dtype=np.float32)
    print(f"all identical n=  300 d=512: {best_of(lambda: merge_order(x)):8.3f} s")
    x = rng.integers(0, 2, (5_000, 2)).astype(np.float32)
    print(f"many ties n= 5000 d=  2 values 0..1: {best_of(lambda: merge_order(x)):8.3f} s")


if __name__ == "__main__":
    main()

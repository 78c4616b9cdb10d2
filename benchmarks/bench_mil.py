"""Cost of ``hamil mil-bench``, measured in one run on CPU.

Prints, per model of Table S3, the time of one cross-validation fold (standardise, train on 9/10 of the
bags with SGD, one bag per step as in the paper, test on the rest) for 100 bags x 10 instances x 200
features (random data: the cost does not depend on what is learned), and that time x 50 for the full
10-fold CV repeated 5 times.

    python benchmarks/bench_mil.py [--epochs 100] [--batch-bags 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hamil.mil_bench import (
    DEFAULT_MODELS,
    DEFAULT_OPTIONS,
    MILNet,
    fit_scaler,
    fold_splits,
    fold_tensors,
    from_arrays,
    train_and_test,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-bags", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bags_n, per_bag, dim = 100, 10, 200
    rng = np.random.default_rng(0)
    labels = np.arange(bags_n) % 2  # (B,)
    ids = np.repeat(np.arange(bags_n), per_bag)  # (N,)
    bags = from_arrays(rng.standard_normal((bags_n * per_bag, dim)), ids, labels[ids])  # (N, D) features
    _, _, train, test = next(fold_splits(bags.labels, folds=10, repeats=1, seed=0))
    print(
        f"one CV fold: {len(train)} training bags, {len(test)} test bags,"
        f" {per_bag} instances x {dim} features, {args.epochs} epochs,"
        f" {args.batch_bags} bag(s) per step, {args.threads} threads, CPU"
    )
    for model in args.models:
        start = time.perf_counter()
        scaler = fit_scaler(bags, train)
        train_t, test_t = fold_tensors(bags, train, scaler), fold_tensors(bags, test, scaler)
        torch.manual_seed(0)
        net = MILNet(dim, model, **DEFAULT_OPTIONS.get(model, {}))
        train_and_test(
            net, train_t, test_t, args.epochs, 1e-4, batch_bags=args.batch_bags, rng=np.random.default_rng(0)
        )
        seconds = time.perf_counter() - start
        print(f"  {model:<16}: {seconds:6.2f} s per fold, {seconds * 50 / 60:6.1f} min for 10-fold CV x 5")


if __name__ == "__main__":
    main()

"""Cost of ``hamil mil-bench``, measured in one run on CPU.

One cross-validation fold per model (standardise, train on 9/10 of the bags one bag per step, test on the
rest) on random bags shaped like the classical sets: 100 bags of about 65 instances (uniform in 33-97) x
230 features, as Fox, Tiger and Elephant. All models train the same number of epochs here, so the times
compare their cost per epoch (the issue-16 target: a HAMIL fold at most 3x attention's); then the time of a
full 10-fold CV x 5 with each model's own recipe (its epochs) is extrapolated for ``--jobs`` processes.

    python benchmarks/bench_mil.py [--epochs 20] [--instances 65] [--threads 1] [--jobs 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hamil.mil_bench import (
    DEFAULT_MODELS,
    MILNet,
    fit_scaler,
    fold_splits,
    fold_tensors,
    from_arrays,
    model_options,
    train_and_test,
    training_plan,
)

TARGET_HAMIL_OVER_ATTENTION = 3.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=20, help="epochs of every model's fold (default 20)")
    parser.add_argument("--bags", type=int, default=100)
    parser.add_argument("--instances", type=int, default=65, help="mean instances per bag")
    parser.add_argument("--features", type=int, default=230)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (mil-bench's default: 1)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel folds for the full-run estimate")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="timed folds per model (median)")
    return parser.parse_args()


def random_bags(args: argparse.Namespace):
    """Bags of ``instances // 2 .. 3 * instances // 2`` random instances, half of them positive."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(args.instances // 2, 3 * args.instances // 2 + 1, args.bags)  # (B,)
    labels = np.arange(args.bags) % 2  # (B,)
    ids = np.repeat(np.arange(args.bags), sizes)  # (N,)
    return from_arrays(rng.standard_normal((len(ids), args.features)), ids, labels[ids])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    bags = random_bags(args)
    _, _, train, test = next(fold_splits(bags.labels, folds=10, repeats=1, seed=0))
    plan = training_plan(args.models, dataset="fox")
    options = model_options(args.models)
    print(
        f"one CV fold: {len(train)} training bags, {len(test)} test bags, {bags.bag_sizes.mean():.1f}"
        f" instances per bag x {args.features} features, {args.epochs} epochs for every model, one bag per"
        f" step, {args.threads} torch thread(s), CPU; median of {args.repeats} folds"
    )
    scaler = fit_scaler(bags, train)
    train_t, test_t = fold_tensors(bags, train, scaler), fold_tensors(bags, test, scaler)
    times: dict[str, list[float]] = {model: [] for model in args.models}
    for run in range(args.repeats + 1):  # run 0: one epoch of every model, so one-off start-up costs stay out
        for model in args.models:  # interleaved, so that drifts in machine load hit every model alike
            torch.manual_seed(0)
            net = MILNet(args.features, model, dropout=plan[model]["dropout"], **options[model])
            start = time.perf_counter()
            epochs = args.epochs if run else 1
            train_and_test(net, train_t, test_t, epochs, 1e-4, rng=np.random.default_rng(0))
            if run:
                times[model].append(time.perf_counter() - start)
    seconds = {model: float(np.median(t)) for model, t in times.items()}
    full = {m: seconds[m] / args.epochs * plan[m]["epochs"] * 50 / args.jobs for m in args.models}
    print(f"  {'model':<16} {'s/fold':>8} {'/ attention':>12}   full 5x10 CV, own recipe, {args.jobs} jobs")
    for model in args.models:
        ratio = seconds[model] / seconds["attention"] if "attention" in seconds else float("nan")
        recipe = f"{plan[model]['recipe']}, {plan[model]['epochs']} epochs"
        print(f"  {model:<16} {seconds[model]:8.2f} {ratio:12.2f}   {full[model] / 60:6.1f} min ({recipe})")
    print(f"  all models: {sum(full.values()) / 60:.1f} min for the full 10-fold CV x 5 (estimated)")
    if "hamil" in seconds and "attention" in seconds:
        ratio = seconds["hamil"] / seconds["attention"]
        verdict = "meets" if ratio <= TARGET_HAMIL_OVER_ATTENTION else "MISSES"
        target = TARGET_HAMIL_OVER_ATTENTION
        print(f"  HAMIL / attention per fold: {ratio:.2f} ({verdict} the target <= {target:g})")


if __name__ == "__main__":
    main()

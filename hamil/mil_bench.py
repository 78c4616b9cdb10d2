"""Classical MIL benchmarks (MUSK1/2, Fox, Tiger, Elephant, ...): the paper's supplementary Tables S3-S5.

Bags of feature vectors are classified by a small network (Table S3, as in Ilse et al., ICML 2018):
``fc-256 + ReLU, dropout, fc-128 + ReLU, dropout, fc-64 + ReLU, dropout``, applied to every instance, then
an aggregator from the model registry (``hamil`` with the 1-D unit, ``hamil_a``, ``attention``,
``gated_attention``, ``mean``, ``max``, ...), then ``fc-1`` with a sigmoid and binary cross-entropy.
Training: each model by its published recipe (:mod:`hamil.recipes`, ``config/reference/recipes.yaml``:
``paper`` for HAMIL and HAMIL-A, SGD with momentum 0.9, weight decay 0.005, learning rate 1e-4;
``ilse2018`` for the attention and pooling baselines) for a fixed number of epochs, unless one recipe or
explicit values are given. Protocol: stratified 10-fold cross-validation on the bag labels, repeated
5 times with different fold seeds; features are standardised with a scaler fitted on the training
folds' instances only. The result is the mean and standard deviation of the bag accuracy
over the 50 folds, per model.

Input (see :func:`read_feature_bags`): one instance per row, either ``label,bag,f1,f2,...`` without a
header (the common CSV layout of the classical MIL sets; labels 0/1 or -1/1), or a table with a header
naming the columns ``bag`` and ``label`` (tab- or comma-separated), all other columns being features.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import multiprocessing
import os
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from torch import nn

from hamil.models import available, create, model_info, paper_name
from hamil.models.ops import pool
from hamil.recipes import choose
from preprocessing.errors import InputError
from preprocessing.io import atomic_path, write_tsv

log = logging.getLogger("hamil.mil_bench")

#: The models of Table S3, in the paper's order.
DEFAULT_MODELS = ("hamil", "hamil_a", "attention", "gated_attention", "mean", "max")
#: Aggregator options used here unless overridden: vectors need HAMIL's 1-D unit; the attention models
#: act on the fc-64 outputs directly, with a 64-wide attention layer (Ilse et al.'s networks).
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "hamil": {"dims": 1},
    "ramil": {"dims": 1},
    "attention": {"embed_dim": None, "attention_dim": 64},
    "gated_attention": {"embed_dim": None, "attention_dim": 64},
}
#: Registry models that need training this module does not do (instance-level training).
UNSUPPORTED = {"si": "the single-instance baseline trains instances alone; not part of the MIL benchmarks"}
TRUE_LABELS = {1.0: 1, 0.0: 0, -1.0: 0}


@dataclass(frozen=True)
class FeatureBags:
    """A set of bags of feature vectors, the instances of each bag contiguous (in order of first row)."""

    features: np.ndarray  # (N, D) float64
    bag_sizes: np.ndarray  # (B,) int64
    labels: np.ndarray  # (B,) int64, 0 or 1
    bag_ids: tuple[str, ...]
    feature_names: tuple[str, ...]
    source: str = "<memory>"

    @property
    def offsets(self) -> np.ndarray:
        """``(B + 1,)`` start of each bag's rows in :attr:`features`, then ``N``."""
        return np.concatenate([[0], np.cumsum(self.bag_sizes)])

    @property
    def num_bags(self) -> int:
        return len(self.bag_sizes)

    def instance_rows(self, bags: np.ndarray) -> np.ndarray:
        """Row indices (into :attr:`features`) of all instances of the given bags, bag by bag."""
        offsets = self.offsets
        parts = [np.arange(offsets[b], offsets[b + 1]) for b in np.asarray(bags, dtype=np.int64)]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)


def from_arrays(
    features: np.ndarray, bag_ids: Sequence[object], labels: Sequence[float], source: str = "<memory>"
) -> FeatureBags:
    """Build :class:`FeatureBags` from per-instance arrays (``features (N, D)``, bag id and label per row).

    Rows are grouped by bag id in order of first appearance; labels -1/1 become 0/1. Bad input raises
    :class:`InputError` naming ``source`` and the row (1-based) or bag.
    """
    rows = [(i + 1, str(b), str(lab)) for i, (b, lab) in enumerate(zip(bag_ids, labels, strict=True))]
    x = np.asarray(features, dtype=np.float64)  # (N, D)
    return _group(source, rows, x, [f"f{k + 1}" for k in range(x.shape[1])], "row")


def read_feature_bags(path: str | os.PathLike[str]) -> FeatureBags:
    """Read a feature-bag file: one instance per row.

    Two layouts, told apart by the first line:

    * no header: ``label,bag,f1,...,fD`` (comma-separated, as the classical MIL sets are commonly shared;
      tab-separated also works); labels 0/1 or -1/1 (``1.0`` etc. accepted);
    * a header naming the columns ``bag`` and ``label`` (tab- or comma-separated, any column order): every
      other column is a feature.

    Raises :class:`InputError` (one line, naming the file and the line or bag) for an empty or unreadable
    file, rows with different numbers of fields, non-numeric or non-finite features, labels other than
    0/1/-1, a bag with mixed labels, or a single class only.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file (not UTF-8)") from None
    lines = [(k + 1, line) for k, line in enumerate(text.splitlines()) if line.strip()]
    if not lines:
        raise InputError(f"{path}: empty file (no bags)")
    sep = "\t" if "\t" in lines[0][1] else ","
    records = [
        (k, [f.strip() for f in fields]) for (k, _), fields in zip(lines, _split(lines, sep), strict=True)
    ]
    head_no, head = records[0]
    lowered = [h.lower() for h in head]
    if "bag" in lowered and "label" in lowered:
        bag_col, label_col = lowered.index("bag"), lowered.index("label")
        feature_cols = [c for c in range(len(head)) if c not in (bag_col, label_col)]
        names = [head[c] for c in feature_cols]
        records = records[1:]
        expected, first = len(head), f"the header (line {head_no})"
        if not records:
            raise InputError(f"{path}: empty file (a header but no bags)")
    else:
        bag_col, label_col, feature_cols = 1, 0, list(range(2, len(head)))
        names = [f"f{c - 1}" for c in feature_cols]
        expected, first = len(head), f"line {head_no}"
    if not feature_cols:
        raise InputError(f"{path}: no feature columns (need label, bag and at least one feature per row)")
    for line_no, fields in records:
        if len(fields) != expected:
            raise InputError(f"{path}: line {line_no} has {len(fields)} fields, {first} has {expected}")
    table = np.array([fields for _, fields in records], dtype=object)  # (N, fields)
    raw = table[:, feature_cols].astype(str)  # (N, D)
    try:
        x = raw.astype(np.float64)  # (N, D)
    except ValueError:
        x = None
    if x is None:
        for (line_no, _), row in zip(records, raw, strict=True):
            for name, cell in zip(names, row, strict=True):
                if not _is_float(cell):
                    raise InputError(f"{path}: line {line_no}: feature {name} is not a number: {cell!r}")
    rows = [(line_no, fields[bag_col], fields[label_col]) for line_no, fields in records]
    return _group(str(path), rows, x, names, "line")


def _split(lines: list[tuple[int, str]], sep: str) -> Iterator[list[str]]:
    text = "\n".join(line for _, line in lines)
    reader = csv.reader(io.StringIO(text), delimiter=sep, quoting=csv.QUOTE_NONE)
    yield from reader


def _is_float(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _group(
    source: str, rows: list[tuple[int, str, str]], x: np.ndarray, names: Sequence[str], unit: str
) -> FeatureBags:
    """Check labels and features, group rows by bag (order of first appearance)."""
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        raise InputError(f"{source}: {unit} {rows[bad[0]][0]}: non-finite feature value")
    bag_index: dict[str, int] = {}
    bag_label: list[int] = []
    bag_first: list[int] = []
    row_bag = np.empty(len(rows), dtype=np.int64)
    for i, (line_no, bag, label_text) in enumerate(rows):
        label = TRUE_LABELS.get(float(label_text)) if _is_float(label_text) else None
        if label is None:
            raise InputError(f"{source}: {unit} {line_no}: label {label_text!r} is not 0/1 or -1/1")
        if bag == "":
            raise InputError(f"{source}: {unit} {line_no}: empty bag id")
        b = bag_index.setdefault(bag, len(bag_index))
        if b == len(bag_label):
            bag_label.append(label)
            bag_first.append(line_no)
        elif bag_label[b] != label:
            raise InputError(
                f"{source}: bag {bag!r} has mixed labels ({bag_label[b]} on {unit} {bag_first[b]}, "
                f"{label} on {unit} {line_no})"
            )
        row_bag[i] = b
    labels = np.asarray(bag_label, dtype=np.int64)  # (B,)
    if len(np.unique(labels)) < 2:
        raise InputError(
            f"{source}: all {len(labels)} bags have label {labels[0]}; need positive and negative bags"
        )
    order = np.argsort(row_bag, kind="stable")
    return FeatureBags(
        features=np.ascontiguousarray(x[order]),  # (N, D), bags contiguous
        bag_sizes=np.bincount(row_bag, minlength=len(labels)).astype(np.int64),  # (B,)
        labels=labels,
        bag_ids=tuple(bag_index),
        feature_names=tuple(names),
        source=source,
    )


class MILNet(nn.Module):
    """Table S3's network: the instance MLP, a registry aggregator, and ``fc-1`` (a logit per bag).

    ``fc-256 + ReLU, dropout, fc-128 + ReLU, dropout, fc-64 + ReLU, dropout`` on every instance, then the
    aggregator ``model`` (``options`` passed to :func:`hamil.models.create`), then a linear layer to one
    logit (the sigmoid is part of the loss, ``BCEWithLogits``). Aggregators that output logits themselves
    (``deepmiml``) get no extra layer.
    """

    def __init__(
        self,
        in_features: int,
        model: str,
        dropout: float = 0.2,
        widths: Sequence[int] = (256, 128, 64),
        **options: Any,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for out in widths:
            layers += [nn.Linear(width, out), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = out
        self.instance_net = nn.Sequential(*layers)
        self.aggregator = create(model, width, num_classes=1, **options)
        provides = model_info(model).provides_logits
        self.head = nn.Identity() if provides else nn.Linear(self.aggregator.out_channels, 1)

    def forward(self, instances: torch.Tensor, bag_sizes: torch.Tensor) -> torch.Tensor:
        """``instances (N, D)`` (bags contiguous) and ``bag_sizes (B,)`` -> logits ``(B,)``."""
        h = self.instance_net(instances)  # (N, 64)
        bags = pool(self.aggregator(h, bag_sizes).bags)  # (B, C)
        return self.head(bags).reshape(-1)  # (B,)


def model_options(models: Sequence[str], overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """Aggregator options per model: :data:`DEFAULT_OPTIONS` updated by ``overrides`` (model -> options)."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(models))
    if unknown:
        raise InputError(f"model options given for model(s) not run: {', '.join(unknown)}")
    return {m: {**DEFAULT_OPTIONS.get(m, {}), **dict(overrides.get(m, {}))} for m in models}


def check_models(models: Sequence[str]) -> None:
    """:class:`InputError` for unknown, unsupported or repeated model names."""
    if not models:
        raise InputError("no models given")
    for m in models:
        if m in UNSUPPORTED:
            raise InputError(f"model {m!r} is not supported by mil-bench: {UNSUPPORTED[m]}")
        if m not in available():
            valid = ", ".join(n for n in available() if n not in UNSUPPORTED)
            raise InputError(f"unknown model {m!r}; valid names: {valid}")
    if len(set(models)) != len(models):
        raise InputError(f"models repeated: {' '.join(models)}")


def fold_splits(
    labels: np.ndarray, folds: int = 10, repeats: int = 5, seed: int = 0
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """``(repeat, fold, train_bags, test_bags)`` of stratified ``folds``-fold CV, ``repeats`` times.

    Repeat ``r`` shuffles with ``random_state = seed + r`` (scikit-learn's :class:`StratifiedKFold`).
    """
    counts = np.bincount(labels, minlength=2)
    if folds < 2 or counts.min() < folds:
        raise InputError(
            f"{folds}-fold stratified cross-validation needs folds >= 2 and at least {folds} bags per class; "
            f"there are {counts[0]} negative and {counts[1]} positive bags"
        )
    for r in range(repeats):
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        for k, (train, test) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
            yield r, k, train, test


def fit_scaler(bags: FeatureBags, train_bags: np.ndarray) -> StandardScaler:
    """A :class:`StandardScaler` fitted on the instances of the training bags only."""
    return StandardScaler().fit(bags.features[bags.instance_rows(train_bags)])


def _seeds(seed: int, repeat: int, fold: int, model: str) -> tuple[int, int]:
    """Torch and NumPy seeds of one (repeat, fold, model): independent of the other models run."""
    state = np.random.SeedSequence([seed, repeat, fold, zlib.crc32(model.encode())]).generate_state(2)
    return int(state[0]), int(state[1])


def train_and_test(
    net: MILNet,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.005,
    batch_bags: int = 1,
    rng: np.random.Generator | None = None,
    optimizer: str = "sgd",
    betas: tuple[float, float] = (0.9, 0.999),
) -> dict[str, float]:
    """Train ``net`` with ``optimizer`` (:func:`make_optimizer`) and BCE on ``train``, then score ``test``;
    each is
    ``(instances (N, D) float32, bag_sizes (B,) int64, labels (B,) float32)``.

    Returns test accuracy (threshold 0.5 on the sigmoid), the last epoch's mean training loss and the
    seconds spent.
    """
    rng = rng or np.random.default_rng(0)
    start = time.perf_counter()
    x, sizes, y = train
    offsets = torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)]).tolist()
    per_bag = [x[offsets[b] : offsets[b + 1]] for b in range(len(sizes))]  # B x (n_b, D)
    opt = make_optimizer(net, optimizer, lr, momentum, betas, weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    mean_loss = math.nan
    for _ in range(epochs):
        net.train()
        total, order = 0.0, rng.permutation(len(sizes))
        for lo in range(0, len(order), batch_bags):
            idx = order[lo : lo + batch_bags]
            instances = per_bag[idx[0]] if len(idx) == 1 else torch.cat([per_bag[b] for b in idx])  # (N, D)
            logits = net(instances, sizes[idx])  # (b,)
            loss = loss_fn(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        mean_loss = total / len(order)
    net.eval()
    tx, tsizes, ty = test
    with torch.no_grad():
        prob = torch.sigmoid(net(tx, tsizes))  # (B_test,)
    accuracy = float(((prob > 0.5).float() == ty).float().mean())
    return {"accuracy": accuracy, "train_loss": mean_loss, "seconds": time.perf_counter() - start}


def make_optimizer(
    net: nn.Module,
    name: str,
    lr: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """``sgd`` (with ``momentum``) or ``adam`` (with ``betas``) over ``net``'s parameters."""
    if name == "sgd":
        return torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(net.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise InputError(f"unknown optimizer {name!r} (known: sgd, adam)")


def training_plan(
    models: Sequence[str],
    recipe: str | None = None,
    dataset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per model: its training values (optimizer, lr, momentum, betas, weight_decay, epochs, batch_bags,
    dropout) and ``recipe`` (the name). Each model's own recipe, or ``recipe`` for all; ``overrides`` that
    are not None replace the recipe's values (epochs for ``dataset`` where the recipe has them)."""
    plan = {}
    for model, chosen in choose(models, recipe).items():
        values = chosen.training(dataset)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        values["recipe"] = chosen.name
        plan[model] = values
    return plan


def fold_tensors(
    bags: FeatureBags, which: np.ndarray, scaler: StandardScaler
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bags ``which`` as ``(instances (N, D) float32, scaled by scaler; bag_sizes (B,); labels (B,))``."""
    rows = bags.instance_rows(which)
    x = torch.as_tensor(scaler.transform(bags.features[rows]), dtype=torch.float32)  # (N, D)
    sizes = torch.as_tensor(bags.bag_sizes[which], dtype=torch.int64)  # (B,)
    y = torch.as_tensor(bags.labels[which], dtype=torch.float32)  # (B,)
    return x, sizes, y


def cross_validate(
    bags: FeatureBags,
    models: Sequence[str] = DEFAULT_MODELS,
    folds: int = 10,
    repeats: int = 5,
    epochs: int | None = None,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    dropout: float | None = None,
    batch_bags: int | None = None,
    seed: int = 0,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    threads: int | None = None,
    on_fold: Callable[[dict[str, Any]], None] | None = None,
    jobs: int = 1,
    recipe: str | None = None,
    dataset: str | None = None,
    optimizer: str | None = None,
    betas: tuple[float, float] | None = None,
) -> pd.DataFrame:
    """Repeated stratified cross-validation of every model on ``bags``.

    Every model sees the same folds and the same standardised features (scaler fitted on the training
    folds' instances). Initialisation and bag order depend on ``(seed, repeat, fold, model)`` only, so a
    run is deterministic and a model's numbers do not depend on which other models run. ``threads`` is
    ``torch.set_num_threads`` while training (default 1: on these tiny networks more threads do not speed
    a fold up, and the numbers depend on it). ``jobs`` > 1 (0: ``os.cpu_count()``) runs each
    (repeat, fold, model) in one of ``jobs`` worker processes (``spawn``), each with ``threads`` torch
    threads; the numbers are those of a serial run with the same ``threads``.

    Training values come from each model's own recipe (:mod:`hamil.recipes`), or from ``recipe`` for all
    models; ``epochs`` per ``dataset`` where the recipe has them. The training arguments (``epochs``, ``lr``,
    ``momentum``, ``weight_decay``, ``dropout``, ``batch_bags``, ``optimizer``, ``betas``) override the
    recipe's value when not None.

    Returns one row per (model, repeat, fold), in the order of a serial run (fold by fold, models in the
    order given): ``model, recipe, repeat, fold, accuracy, train_loss, seconds, train_bags, test_bags``.
    ``on_fold`` is called (in this process) with each row as it is done.
    """
    check_models(models)  # the numbers are checked by hamil.stages.MilBenchParams
    opts = model_options(models, options)
    overrides = {"epochs": epochs, "lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    overrides |= {"dropout": dropout, "batch_bags": batch_bags, "optimizer": optimizer, "betas": betas}
    plan = training_plan(models, recipe, dataset, overrides)
    for model in models:  # bad options fail here, before any training
        MILNet(bags.features.shape[1], model, dropout=plan[model]["dropout"], **opts[model])
    cfg = {"seed": seed, "options": opts, "plan": plan}
    splits = list(fold_splits(bags.labels, folds, repeats, seed))
    jobs = resolve_jobs(jobs)
    threads = threads or 1
    if jobs > 1:
        return _cross_validate_parallel(bags, models, splits, cfg, jobs, threads, on_fold)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = []
        for repeat, fold, train, test in splits:
            for row in _run_fold(bags, repeat, fold, train, test, models, cfg):
                rows.append(row)
                if on_fold is not None:
                    on_fold(row)
    finally:
        torch.set_num_threads(previous_threads)
    return pd.DataFrame(rows)


def resolve_jobs(jobs: int) -> int:
    """``jobs`` processes, ``0`` meaning ``os.cpu_count()``."""
    if jobs < 0:
        raise InputError(f"jobs must be >= 0 (0: all cores), got {jobs}")
    return jobs if jobs > 0 else os.cpu_count() or 1


def _run_fold(
    bags: FeatureBags,
    repeat: int,
    fold: int,
    train: np.ndarray,
    test: np.ndarray,
    models: Sequence[str],
    cfg: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Train and test ``models`` on one (repeat, fold): the rows of :func:`cross_validate`."""
    scaler = fit_scaler(bags, train)
    train_t, test_t = fold_tensors(bags, train, scaler), fold_tensors(bags, test, scaler)
    rows = []
    for model in models:
        torch_seed, np_seed = _seeds(cfg["seed"], repeat, fold, model)
        torch.manual_seed(torch_seed)
        train_cfg = cfg["plan"][model]
        net = MILNet(bags.features.shape[1], model, dropout=train_cfg["dropout"], **cfg["options"][model])
        result = train_and_test(
            net,
            train_t,
            test_t,
            train_cfg["epochs"],
            train_cfg["lr"],
            train_cfg["momentum"],
            train_cfg["weight_decay"],
            train_cfg["batch_bags"],
            np.random.default_rng(np_seed),
            optimizer=train_cfg["optimizer"],
            betas=train_cfg["betas"],
        )
        row = {"model": model, "recipe": train_cfg["recipe"], "repeat": repeat, "fold": fold, **result}
        row.update(train_bags=len(train), test_bags=len(test))
        rows.append(row)
    return rows


_WORKER: dict[str, Any] = {}


def _init_worker(bags: FeatureBags, cfg: Mapping[str, Any], threads: int) -> None:
    """A worker process: ``threads`` torch threads, the bags and settings kept for all its tasks."""
    torch.set_num_threads(threads)
    _WORKER.update(bags=bags, cfg=cfg)


def _worker_fold(
    repeat: int, fold: int, train: np.ndarray, test: np.ndarray, model: str
) -> list[dict[str, Any]]:
    return _run_fold(_WORKER["bags"], repeat, fold, train, test, [model], _WORKER["cfg"])


def _cross_validate_parallel(
    bags: FeatureBags,
    models: Sequence[str],
    splits: list[tuple[int, int, np.ndarray, np.ndarray]],
    cfg: Mapping[str, Any],
    jobs: int,
    threads: int,
    on_fold: Callable[[dict[str, Any]], None] | None,
) -> pd.DataFrame:
    """:func:`cross_validate` with one task per (repeat, fold, model) in ``jobs`` spawned processes."""
    tasks = [(r, k, train, test, m) for r, k, train, test in splits for m in models]
    done: dict[int, dict[str, Any]] = {}
    context = multiprocessing.get_context("spawn")
    workers = min(jobs, len(tasks))
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(bags, cfg, threads)
    ) as pool_:
        futures = {pool_.submit(_worker_fold, *task): i for i, task in enumerate(tasks)}
        try:
            for future in as_completed(futures):
                (row,) = future.result()
                done[futures[future]] = row
                if on_fold is not None:
                    on_fold(row)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return pd.DataFrame([done[i] for i in range(len(tasks))])


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Per model (in order of first appearance): folds run, accuracy mean and sd (ddof 1) over all folds,
    sd of the repeats' mean accuracies, and mean seconds per fold. When ``hamil`` was run, also the paired
    comparison to it: mean and sd (ddof 1) over the (repeat, fold) pairs of ``accuracy - hamil's``
    (every model sees the same folds)."""
    hamil = None
    if "hamil" in set(results["model"]):
        hamil = results[results["model"] == "hamil"].set_index(["repeat", "fold"])["accuracy"]
    out = []
    for model, part in results.groupby("model", sort=False):
        repeat_means = part.groupby("repeat")["accuracy"].mean()
        row = {
            "model": model,
            "paper_name": paper_name(str(model)),
            **({"recipe": part["recipe"].iloc[0]} if "recipe" in part else {}),
            "folds": len(part),
            "repeats": part["repeat"].nunique(),
            "accuracy_mean": part["accuracy"].mean(),
            "accuracy_sd": part["accuracy"].std(ddof=1) if len(part) > 1 else 0.0,
            "repeat_sd": repeat_means.std(ddof=1) if len(repeat_means) > 1 else 0.0,
            "seconds_per_fold": part["seconds"].mean(),
        }
        if hamil is not None:
            mine = part.set_index(["repeat", "fold"])["accuracy"]
            diff = (mine - hamil.reindex(mine.index)).dropna()
            row["vs_hamil_mean"] = diff.mean() if len(diff) else math.nan
            row["vs_hamil_sd"] = diff.std(ddof=1) if len(diff) > 1 else 0.0
        out.append(row)
    return pd.DataFrame(out)


#: The classical MIL sets with published numbers (columns of the reference table).
CLASSICAL_SETS = ("musk1", "musk2", "fox", "tiger", "elephant")
#: Tables S4/S5 of the paper (and the sources it quotes), one row per method.
PUBLISHED_TABLE = Path(__file__).resolve().parents[1] / "config" / "reference" / "hamil_tables_s4_s5_mil.tsv"


def dataset_name(path: str | os.PathLike[str], dataset: str | None = None) -> str | None:
    """The classical set a run is on: ``dataset`` (case-insensitive; :class:`InputError` if it is not one
    of :data:`CLASSICAL_SETS`), else the input file's stem if it names one, else ``None``."""
    if dataset is not None:
        name = dataset.strip().lower()
        if name not in CLASSICAL_SETS:
            raise InputError(f"unknown --dataset {dataset!r}; valid names: {', '.join(CLASSICAL_SETS)}")
        return name
    stem = Path(path).stem.lower()
    return stem if stem in CLASSICAL_SETS else None


def _parse_cell(cell: str) -> tuple[float, float]:
    """``'0.892 ± 0.040'`` -> ``(0.892, 0.040)``; ``'0.874'`` -> ``(0.874, nan)``."""
    mean, _, sd = str(cell).partition("±")
    return float(mean), float(sd) if sd.strip() else math.nan


def published(dataset: str, table: str | os.PathLike[str] = PUBLISHED_TABLE) -> pd.DataFrame:
    """Published results on ``dataset``: ``method, published_mean, published_sd, published_source``
    (sd NaN where the source gives none), in the table's order."""
    ref = pd.read_csv(table, sep="\t", dtype=str)
    rows = []
    for r in ref.itertuples(index=False):
        mean, sd = _parse_cell(getattr(r, dataset))
        rows.append(
            {"method": r.method, "published_mean": mean, "published_sd": sd, "published_source": r.source}
        )
    return pd.DataFrame(rows)


def add_published(summary: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """``summary`` with the published columns of its models (NaN where none) and ``published_diff``
    (ours - published)."""
    ref = reference.set_index("method")
    out = summary.copy()
    for col in ("published_mean", "published_sd", "published_source"):
        out[col] = [ref[col].get(m, math.nan if col != "published_source" else "") for m in out["model"]]
    out["published_diff"] = out["accuracy_mean"] - out["published_mean"]
    return out


def _pm(mean: float, sd: float) -> str:
    if pd.isna(mean):
        return "—"
    return f"{mean:.3f}" if pd.isna(sd) else f"{mean:.3f} ± {sd:.3f}"


def to_markdown(
    summary: pd.DataFrame, title: str = "", reference: pd.DataFrame | None = None, dataset: str = ""
) -> str:
    """The summary as a Markdown table: accuracy mean ± sd over folds, sd of the repeats' means, seconds
    per fold; the paired difference to HAMIL where present; and, with ``reference`` (the published rows
    of the set, see :func:`published`) and the published columns (:func:`add_published`), the published
    mean ± sd beside ours with the difference, then the published rows of methods not run here."""
    lines = [f"## {title}", ""] if title else []
    paired = "vs_hamil_mean" in summary.columns
    has_pub = "published_mean" in summary.columns
    head = "| model | paper's name | recipe | folds | accuracy (mean ± sd over folds) | sd of repeat means |"
    head += " s / fold |"
    rule = "|---|---|---|---:|---:|---:|---:|"
    if paired:
        head += " paired Δ vs hamil (mean ± sd over folds) |"
        rule += "---:|"
    if has_pub:
        head += f" published ({dataset}) | ours − published |"
        rule += "---:|---:|"
    lines += [head, rule]
    for r in summary.itertuples(index=False):
        line = (
            f"| {r.model} | {r.paper_name} | {getattr(r, 'recipe', '')} | {r.folds} "
            f"| {r.accuracy_mean:.3f} ± {r.accuracy_sd:.3f} "
            f"| {r.repeat_sd:.3f} | {r.seconds_per_fold:.2f} |"
        )
        if paired:
            line += f" {_pm(r.vs_hamil_mean, r.vs_hamil_sd)} |"
        if has_pub:
            diff = "—" if pd.isna(r.published_diff) else f"{r.published_diff:+.3f}"
            line += f" {_pm(r.published_mean, r.published_sd)} | {diff} |"
        lines.append(line)
    if reference is not None:
        others = reference[~reference["method"].isin(set(summary["model"]))]
        if len(others):
            lines += ["", f"Published results on {dataset} of methods not run here:", ""]
            lines += ["| method | accuracy (published) | source |", "|---|---:|---|"]
            for r in others.itertuples(index=False):
                lines.append(
                    f"| {r.method} | {_pm(r.published_mean, r.published_sd)} | {r.published_source} |"
                )
    return "\n".join(lines) + "\n"


def run_mil_bench(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    models: Sequence[str] = DEFAULT_MODELS,
    dataset: str | None = None,
    **cv_options: Any,
) -> pd.DataFrame:
    """Read ``path``, cross-validate ``models`` (``cv_options`` as for :func:`cross_validate`), and write
    ``out_dir/folds.tsv`` (every fold), ``summary.tsv``, ``summary.md`` and ``settings.json``.
    On a classical set (``dataset``, or the file's stem: see :func:`dataset_name`) the published results
    are written beside ours. Returns the summary."""
    name = dataset_name(path, dataset)
    bags = read_feature_bags(path)
    check_models(models)
    out_dir = Path(out_dir)
    log.info(
        "%s: %d bags (%d positive), %d instances, %d features",
        path,
        bags.num_bags,
        int(bags.labels.sum()),
        len(bags.features),
        bags.features.shape[1],
    )

    def report(row: dict[str, Any]) -> None:
        log.info(
            "repeat %d fold %d %s: accuracy %.3f (train loss %.4f, %.1f s)",
            row["repeat"],
            row["fold"],
            row["model"],
            row["accuracy"],
            row["train_loss"],
            row["seconds"],
        )

    cv_options.setdefault("dataset", name)
    results = cross_validate(bags, models, on_fold=report, **cv_options)
    summary = summarise(results)
    reference = published(name) if name is not None else None
    if reference is not None:
        summary = add_published(summary, reference)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tsv(results, out_dir / "folds.tsv")
    write_tsv(summary, out_dir / "summary.tsv")
    title = f"MIL benchmark: {Path(path).name}" + (f" ({name})" if name else "")
    with atomic_path(out_dir / "summary.md") as tmp:
        tmp.write_text(to_markdown(summary, title=title, reference=reference, dataset=name or ""))
    settings = {"input": str(path), "dataset": name, "models": list(models), **cv_options}
    settings["options"] = model_options(models, cv_options.get("options"))
    overrides = {k: cv_options.get(k) for k in ("epochs", "lr", "momentum", "weight_decay", "dropout")}
    overrides |= {k: cv_options.get(k) for k in ("batch_bags", "optimizer", "betas")}
    settings["training"] = training_plan(models, cv_options.get("recipe"), cv_options["dataset"], overrides)
    settings["recipe"] = {m: v["recipe"] for m, v in settings["training"].items()}
    with atomic_path(out_dir / "settings.json") as tmp:
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True, default=str) + "\n")
    return summary

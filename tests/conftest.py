"""Shared fixtures: tiny patch shards written exactly as the crop stage writes them, and bag stores built
from them by the bag stage (one session-wide store for the training tests)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from localhttp import Script, serve

from preprocessing.bags import BagParams, build_bags
from preprocessing.store import create_patch_array, seal_patches


def write_shard(folder: Path, name: str, groups: dict[str, tuple[int, str]], patch: int = 8, seed: int = 0):
    """A shard with ``count`` patches per group (labels given); patch pixel values encode (shard, row)."""
    rng = np.random.default_rng(seed)
    rows = []
    for group, (count, labels) in groups.items():
        for k in range(count):
            rows.append((f"{group}_F{k // 3}", group, labels, *rng.integers(0, 100, 2), 0, 0))
    n = len(rows)
    table = pd.DataFrame(rows, columns=["image_id", "group", "labels", "x0", "y0", "x1", "y1"])
    table["x1"], table["y1"] = table["x0"] + 10, table["y0"] + 10
    table.insert(0, "patch_index", np.arange(n))
    root = zarr.open_group(folder / f"{name}.zarr", mode="w", zarr_format=3)
    arr = create_patch_array(root, n, 3, patch)
    if n:
        arr[:] = (np.arange(n, dtype=np.uint8)[:, None, None, None] + seed * 100) * np.ones(
            (1, 3, patch, patch), np.uint8
        )
    seal_patches(folder / f"{name}.zarr")  # as the crop stage does
    table.to_csv(folder / f"{name}.tsv", sep="\t", index=False)
    return folder / f"{name}.tsv", folder / f"{name}.zarr"


@pytest.fixture
def two_shards(tmp_path: Path):
    """Two shards of 12 groups with 1-40 patches each and labels from a 4-class vocabulary."""
    rng = np.random.default_rng(1)
    vocab = ["A", "B", "C", "D", "E"]
    groups = {}
    for g in range(12):
        labels = ";".join(sorted(rng.choice(vocab, size=rng.integers(1, 3), replace=False)))
        groups[f"G{g:02d}"] = (int(rng.integers(1, 40)), labels)
    groups["G99"] = (5, "E")  # only carries the rarest label
    names = sorted(groups)
    s0 = write_shard(tmp_path, "0", {g: groups[g] for g in names[::2]}, seed=0)
    s1 = write_shard(tmp_path, "1", {g: groups[g] for g in names[1::2]}, seed=1)
    return [s0[0], s1[0]], [s0[1], s1[1]], groups


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Script]]:
    """The scripted local HTTP server (tests/localhttp.py): its base URL and its script of routes."""
    with serve(monkeypatch) as running:
        yield running


def make_store(folder: Path, patch: int, groups: int = 24, seed: int = 0, split_seed: int = 0) -> Path:
    """A bag store of ``groups`` groups (2-8 textured patches each, 1-2 labels of A, B, C), split 4:1:1
    (groups drawn into the splits with ``split_seed``)."""
    rng = np.random.default_rng(seed)
    vocab = ["A", "B", "C"]
    spec = {
        f"G{g:02d}": (int(rng.integers(2, 9)), ";".join(sorted(rng.choice(vocab, rng.integers(1, 3), False))))
        for g in range(groups)
    }
    names = sorted(spec)
    tables, stores = zip(
        *(write_shard(folder, str(k), {g: spec[g] for g in names[k::2]}, patch, seed=k) for k in (0, 1)),
        strict=True,
    )
    for store in stores:  # give the patches texture so the network has something to fit
        arr = zarr.open_group(store, mode="r+")["patches"]
        arr[:] = np.random.default_rng(seed).integers(0, 256, arr.shape, dtype=np.uint8)
        seal_patches(store)
    out = folder / "ds.zarr"
    params = BagParams(top_k=3, split_ratio=(4, 1, 1), seed=split_seed)
    build_bags(list(tables), list(stores), out, folder / "bags.tsv", params, "t")
    return out


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> Path:
    """One store of 24 groups of 16x16 patches for every training test of the session (read-only)."""
    return make_store(tmp_path_factory.mktemp("small"), patch=16)


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, small_store) -> tuple[Path, dict[str, Path]]:
    """The session store and two runs trained and evaluated through the CLI: HAMIL and RAMIL (1 epoch).

    Returns ``(store, {"hamil": run_dir, "ramil": run_dir})``; tests may add files to the run folders.
    """
    from hamil.cli import main

    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for model in ("hamil", "ramil"):
        run = tmp / model
        common = ["--store", str(small_store), "--out-dir", str(run)]
        train = ["train", *common, "--model", model, "--epochs", "1", "--threads", "1", "--batch-bags", "4"]
        assert main(train) == 0
        assert main(["evaluate", "--checkpoint", str(run / "best.pt"), *common]) == 0
        out[model] = run
    return small_store, out


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist every worker process is one test runner: one torch thread each, so that the
    workers do not oversubscribe the cores (the default takes all of them in every worker)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the slow end-to-end tests first, the real-SLURM one (minutes, mostly waiting on the cluster's
    polls) before them: with pytest-xdist (``-n``) the long ones then overlap with everything else instead
    of starting last."""
    items.sort(key=lambda item: (item.path.name != "test_slurm.py", item.get_closest_marker("slow") is None))

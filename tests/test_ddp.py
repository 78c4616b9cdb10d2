"""Multi-process training with two CPU processes (gloo), all cases in one spawn of two ranks.

1. DDP safety: a rank whose bags all have one instance must not leave the unit without gradients.
   ``find_unused_parameters=False``: rank 0 gets only singleton bags (no merges, so the unit is unused but
   for HAMIL's zero-weighted touch), rank 1 gets real bags. Both must finish their steps (no hang) and end
   with identical parameters.
2. ``torchrun``-style training (the instance-balanced sampler) follows the one-process loss curve.

Why the loss curves are compared in float64. Two ranks add gradients in another order than one process,
so their float32 results differ by rounding (about 1e-7 after the first epoch), and training amplifies any
such difference: moving every initial weight of a one-process float32 run by one rounding step (relative
2^-24) changes its third-epoch training loss by up to 1.1e-3 (SI, seeds 0-5 of this store), a growth of
about 2e4 over the 12 Adam steps. A float32 comparison after three epochs therefore measures the training's
sensitivity, not DDP, and fails on some machines whatever tolerance is not loose enough to hide real errors.
In float64 the same runs agree to 1e-15; the tolerance is the rounding bound times that growth: the longest
reduction (ResNet18's 512*3*3 = 4608-term dot products) gives n*u = 4608 * 2^-53 = 5.1e-13, times a growth
of at most 1e5 (5x the measured), rtol 5e-8, while a wrong loss scale, split or dropped bag moves a loss by
1e-3 or more. ``HAMIL_DDP_SEED`` picks the store's and the training's seed (default 0), for repeated runs.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_store  # tests/ is on sys.path
from torch.nn.parallel import DistributedDataParallel

import hamil.train
from hamil.checkpoint import load_checkpoint
from hamil.config import TrainConfig
from hamil.models import build_model
from hamil.train import train
from preprocessing.errors import InputError

pytestmark = pytest.mark.slow  # one module-wide spawn of two ranks (about 30 s)

SEED = int(os.environ.get("HAMIL_DDP_SEED", "0"))
#: float64 rounding bound of a 4608-term reduction times the growth of a difference through training
RTOL = 4608 * 2.0**-53 * 1e5
#: (model, freeze_batch_norm, dtype). With batch statistics (freeze_batch_norm False) each rank normalises
#: its own share (CPU ranks have no synchronised batch norm), a different function by design: that case
#: runs in float32, the training dtype, and is checked for finishing in step with one process, not for
#: equal losses.
CONFIGS = [("hamil", True, "float64"), ("si", True, "float64")]
CONFIGS += [("hamil", False, "float32")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _singleton_steps(rank: int, out: str) -> None:
    torch.manual_seed(0)
    model = DistributedDataParallel(build_model("hamil", 3), find_unused_parameters=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)
    sizes = [[1, 1, 1], [2, 3]][rank]
    for _ in range(2):
        images = torch.randint(0, 256, (sum(sizes), 3, 48, 48), dtype=torch.uint8, generator=gen)
        labels = (torch.rand(len(sizes), 3, generator=gen) < 0.5).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(images, torch.tensor(sizes))[0], labels
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    unit = model.module.aggregator.unit
    torch.save(
        {k: v for k, v in model.module.state_dict().items() if v.is_floating_point()}, f"{out}/rank{rank}.pt"
    )
    assert all(p.grad is not None for p in unit.parameters())


def _build_float64(*args, **kwargs) -> torch.nn.Module:
    """``build_model`` in float64 (the data stay uint8 until the backbone converts them)."""
    return build_model(*args, **kwargs).double()


def _rank(rank: int, port: int, out: str, configs: list[tuple[dict, str]]) -> None:
    """One rank: the singleton-bag steps, then every training configuration, in one process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=2, timeout=__import__("datetime").timedelta(seconds=60)
    )
    try:
        _singleton_steps(rank, out)
        for cfg, dtype in configs:
            hamil.train.build_model = _build_float64 if dtype == "float64" else build_model
            train(TrainConfig(**cfg))  # joins the existing group, leaves it to us
        try:  # again into a folder that holds a run: rank 0 refuses, and rank 1 must not wait for it
            train(TrainConfig(**configs[0][0]))
            verdict = "trained"
        except InputError as err:
            verdict = str(err)
        Path(out, f"refused-{rank}.txt").write_text(verdict)
    finally:
        dist.destroy_process_group()


def _config(store: Path, model: str, freeze_batch_norm: bool, out_dir: Path) -> dict:
    return dict(
        store=str(store),
        out_dir=str(out_dir),
        model=model,
        epochs=3,
        batch_bags=6,
        lr=1e-3,
        threads=1,
        augment=False,
        patience=None,
        freeze_batch_norm=freeze_batch_norm,
        device="cpu",  # gloo, whatever the machine has
        seed=SEED,
    )


@pytest.fixture(scope="module")
def ddp_store(tmp_path_factory) -> Path:
    """32x32 patches (2x2 feature maps): per-rank batch statistics stay close to the global ones."""
    return make_store(tmp_path_factory.mktemp("ddp_data"), patch=32, groups=30, seed=SEED, split_seed=SEED)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, ddp_store) -> Path:
    """Spawn the two ranks once for every case of this module; returns their output folder."""
    out = tmp_path_factory.mktemp("ddp")
    configs = [(_config(ddp_store, m, f, out / f"two-{i}"), d) for i, (m, f, d) in enumerate(CONFIGS)]
    ctx = mp.start_processes(
        _rank, args=(_free_port(), str(out), configs), nprocs=2, join=False, start_method="spawn"
    )
    for proc in ctx.processes:
        proc.join(timeout=400)
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "DDP hung"
    assert all(p.exitcode == 0 for p in ctx.processes), [p.exitcode for p in ctx.processes]
    return out


def test_singleton_bags_do_not_break_ddp(two_ranks):
    a, b = (torch.load(two_ranks / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in a:
        if "running" not in key:  # batch-norm running statistics are per rank by design
            torch.testing.assert_close(a[key], b[key], msg=key)


@pytest.mark.parametrize("case", range(len(CONFIGS)), ids=[f"{m}-{f}-{d}" for m, f, d in CONFIGS])
def test_two_gloo_ranks_follow_the_one_process_loss_curve(tmp_path, monkeypatch, ddp_store, two_ranks, case):
    """``torchrun``-style DDP (2 CPU processes, gloo) on the instance-balanced sampler gives the loss curve
    of one process on the same global batches (float64: see the module's docstring for the tolerance)."""
    model, freeze_batch_norm, dtype = CONFIGS[case]
    if dtype == "float64":
        monkeypatch.setattr(hamil.train, "build_model", _build_float64)
    train(TrainConfig(**_config(ddp_store, model, freeze_batch_norm, tmp_path / "one")))
    one_dir, two_dir = tmp_path / "one", two_ranks / f"two-{case}"
    one, two = (pd.read_csv(d / "history.csv") for d in (one_dir, two_dir))
    assert len(one) == len(two) == 3
    a, b = load_checkpoint(one_dir / "last.pt"), load_checkpoint(two_dir / "last.pt")
    assert a["global_step"] == b["global_step"]
    assert len(b["rng"]) == 2  # both ranks' generators are saved for an exact resume
    if dtype == "float64":
        assert all(v.dtype == torch.float64 for v in b["model"].values() if v.is_floating_point())
        np.testing.assert_allclose(two.train_loss, one.train_loss, rtol=RTOL)
        np.testing.assert_allclose(two.val_loss, one.val_loss, rtol=RTOL)  # the weights, seen through the
        # validation loss: Adam turns rounding differences on near-zero gradients into lr-sized steps


def test_a_refused_run_folder_stops_every_rank_with_the_same_line(two_ranks: Path) -> None:
    """Only rank 0 checks the folder; the others take its verdict, not waiting for it in a collective."""
    verdicts = [(two_ranks / f"refused-{rank}.txt").read_text() for rank in (0, 1)]
    assert (
        verdicts[0] == verdicts[1] and "holds a training run (best.pt, last.pt, history.csv)" in verdicts[0]
    )

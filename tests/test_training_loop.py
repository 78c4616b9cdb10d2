"""The training loop's guarantees: exact resume after SIGKILL, worker-independent randomness, NaN stop,
mixed precision and gradient accumulation settings, resume checks, TensorBoard."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hamil.checkpoint import load_checkpoint
from hamil.cli import main
from hamil.config import TrainConfig
from hamil.errors import TrainingDiverged
from hamil.models.model import MILModel
from hamil.train import KILL_AFTER_ENV, amp_dtype, train
from preprocessing.errors import InputError


def _cfg(store: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        model="ramil",  # random pairing order: its generator must be saved and restored
        dropout=0.3,  # draws from torch's global generator
        epochs=3,
        batch_bags=3,
        lr=1e-3,
        max_instances=4,  # random instance subsets
        threads=1,
        patience=None,
        device="cpu",  # the exact-equality tests are CPU guarantees
    )
    return TrainConfig(store=str(store), out_dir=str(out), **{**base, **kw})


def _cli_args(cfg: TrainConfig) -> list[str]:
    return [
        "train",
        *("--store", cfg.store, "--out-dir", cfg.out_dir, "--model", cfg.model),
        *("--dropout", str(cfg.dropout), "--epochs", str(cfg.epochs), "--batch-bags", str(cfg.batch_bags)),
        *("--lr", str(cfg.lr), "--max-instances", str(cfg.max_instances), "--threads", "1"),
    ]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_identical_weights(tmp_path, small_store):
    reference = _cfg(small_store, tmp_path / "reference")
    train(reference)

    run = tmp_path / "killed"
    cfg = _cfg(small_store, run)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
        ),
        KILL_AFTER_ENV: "2:2",  # SIGKILL right after batch 2 of epoch 2: mid-epoch, deterministically
    }
    proc = subprocess.run([sys.executable, "-m", "hamil.cli", *_cli_args(cfg)], env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(run / "last.pt")["epoch"] == 1, "the kill was not mid-epoch"

    assert main([*_cli_args(cfg), "--resume"]) == 0
    _assert_same_weights(run / "last.pt", tmp_path / "reference" / "last.pt")
    _assert_same_weights(run / "best.pt", tmp_path / "reference" / "best.pt")
    ours, theirs = (pd.read_csv(d / "history.csv") for d in (run, tmp_path / "reference"))
    pd.testing.assert_frame_equal(ours.drop(columns="seconds"), theirs.drop(columns="seconds"))
    # a finished run resumes to nothing
    assert main([*_cli_args(cfg), "--resume"]) == 0
    assert len(pd.read_csv(run / "history.csv")) == cfg.epochs


def test_randomness_does_not_depend_on_loader_workers(tmp_path, small_store):
    train(_cfg(small_store, tmp_path / "w0", epochs=2, num_workers=0))
    train(_cfg(small_store, tmp_path / "w2", epochs=2, num_workers=2))
    _assert_same_weights(tmp_path / "w0" / "last.pt", tmp_path / "w2" / "last.pt")


def test_resume_refuses_another_configuration(tmp_path, small_store):
    train(_cfg(small_store, tmp_path / "run", epochs=1))
    with pytest.raises(InputError, match=r"last\.pt: cannot resume with a different configuration \(lr"):
        train(_cfg(small_store, tmp_path / "run", epochs=1, lr=1e-2), resume=True)


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, small_store, monkeypatch):
    cfg = _cfg(small_store, tmp_path / "run", model="mean", epochs=3)
    train_bags = int((np.asarray(__import__("zarr").open_group(small_store)["split"][:]) == 0).sum())
    batches_per_epoch = math.ceil(train_bags / cfg.batch_bags)
    calls = {"n": 0}
    real_forward = MILModel.forward

    def poisoned(self, *args, **kwargs):  # fault injection: the 2nd batch of epoch 2 overflows
        logits, loss = real_forward(self, *args, **kwargs)
        if loss is None:  # validation: no labels, no loss
            return logits, loss
        calls["n"] += 1
        return logits, (loss * float("nan") if calls["n"] == batches_per_epoch + 2 else loss)

    monkeypatch.setattr(MILModel, "forward", poisoned)
    with pytest.raises(
        TrainingDiverged, match=r"nan at epoch 2, batch 2/\d+ \(optimizer step \d+\).*epoch 1"
    ):
        train(cfg)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_real_divergence_is_reported_on_one_line(tmp_path, small_store, capsys):
    cfg = _cfg(small_store, tmp_path / "run", model="mean", epochs=3, lr=1e30)
    assert main(_cli_args(cfg)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1].split("\r")[-1]  # after the progress bar's carriage returns
    assert re.search(r"hamil train: error: training loss is (nan|inf) at epoch \d+, batch \d+/\d+", last), (
        last
    )


def test_accumulation_equals_the_larger_batch(tmp_path, small_store):
    """Two batches of 2 bags accumulated = one batch of 4 (same bags: both come from one permutation),
    including a short last group; batch norm frozen so that batch composition does not matter."""
    common = dict(model="mean", epochs=2, dropout=0.0, freeze_batch_norm=True)
    train(_cfg(small_store, tmp_path / "big", batch_bags=4, accumulate=1, **common))
    train(_cfg(small_store, tmp_path / "acc", batch_bags=2, accumulate=2, **common))
    train(_cfg(small_store, tmp_path / "small", batch_bags=2, accumulate=1, **common))
    big, acc, small = (load_checkpoint(tmp_path / d / "last.pt") for d in ("big", "acc", "small"))
    assert big["global_step"] == acc["global_step"] > 2
    for key, value in big["model"].items():
        if value.is_floating_point():
            # float summation order only (Adam magnifies it on near-zero gradients), far below what a
            # different batching gives
            off = (acc["model"][key] - value).abs().max().item()
            assert off < 1e-4 and off <= 0.01 * (small["model"][key] - value).abs().max().item() + 1e-7, key


def test_bf16_autocast_on_cpu_trains(tmp_path, small_store):
    best = train(_cfg(small_store, tmp_path / "run", model="hamil", epochs=1, amp="bf16"))
    assert math.isfinite(best["val_loss"])


def test_amp_modes():
    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is None and amp_dtype("off", cpu) is None
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        amp_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="amp must be one of"):
        amp_dtype("fp8", cpu)


def test_tensorboard_logs(tmp_path, small_store):
    pytest.importorskip("tensorboard")
    train(_cfg(small_store, tmp_path / "run", model="mean", epochs=1, tensorboard=True))
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_checkpoint_problems_are_clear(tmp_path, small_store):
    train(_cfg(small_store, tmp_path / "run", model="mean", epochs=1))
    good = tmp_path / "run" / "last.pt"
    ckpt = torch.load(good, weights_only=True)
    torch.save({**ckpt, "version": 0}, tmp_path / "old.pt")
    with pytest.raises(InputError, match=r"old\.pt: checkpoint version 0, this HAMIL reads 1"):
        load_checkpoint(tmp_path / "old.pt")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(InputError, match=r"cut\.pt: corrupt or unreadable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(InputError, match=r"last\.pt: checkpoint has 3 classes, the data has 5"):
        load_checkpoint(good, num_classes=5)
    torch.save({**ckpt, "extra": pd.DataFrame({"a": [1]})}, tmp_path / "pickled.pt")  # arbitrary objects
    with pytest.raises(InputError, match=r"pickled\.pt: corrupt or unreadable checkpoint"):
        load_checkpoint(tmp_path / "pickled.pt")  # weights_only=True refuses them


def test_orientation_safe_augmentation_is_jitter_only(tmp_path, small_store):
    """--no-flip-rotate keeps every instance's orientation: with the jitter off it trains exactly as
    without augmentation, while flips and rotations (the default) change the run."""
    common = dict(model="mean", epochs=1, dropout=0.0, max_instances=None)
    train(_cfg(small_store, tmp_path / "plain", augment=False, **common))
    train(_cfg(small_store, tmp_path / "safe", augment=True, flip_rotate=False, jitter=0.0, **common))
    train(_cfg(small_store, tmp_path / "flips", augment=True, jitter=0.0, **common))
    _assert_same_weights(tmp_path / "plain" / "last.pt", tmp_path / "safe" / "last.pt")
    plain, flips = _weights(tmp_path / "plain" / "last.pt"), _weights(tmp_path / "flips" / "last.pt")
    assert any(not torch.equal(plain[k], flips[k]) for k in plain)

"""The CUDA paths of training and evaluation, run where a GPU is present (skipped elsewhere).

The CPU suite checks these code paths with the CPU stand-ins (bf16 autocast on the CPU, gloo DDP); here
the real ones: CUDA placement with pinned memory and loader workers, bf16 autocast, fp16 with loss
scaling, resume, and a checkpoint trained on the GPU used on the CPU.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hamil.checkpoint import load_checkpoint, model_from_checkpoint
from hamil.cli import main
from hamil.config import TrainConfig
from hamil.models import build_model, create
from hamil.train import KILL_AFTER_ENV, amp_dtype, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cfg(store, out, **kw) -> TrainConfig:
    base = dict(model="hamil", epochs=2, batch_bags=4, lr=1e-3, max_instances=4, patience=None, device="cuda")
    return TrainConfig(store=str(store), out_dir=str(out), **{**base, **kw})


@pytest.mark.parametrize(("amp", "dtype"), [("auto", torch.bfloat16), ("fp16", torch.float16), ("off", None)])
def test_cuda_training_with_each_precision(tmp_path, small_store, amp, dtype):
    assert amp_dtype(amp, torch.device("cuda")) is dtype
    best = train(_cfg(small_store, tmp_path / "run", amp=amp, num_workers=2))
    assert math.isfinite(best["val_loss"])
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["amp"] == str(dtype) and bool(ckpt["scaler"]) == (dtype == torch.float16)
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["train_loss"].notna().all() and len(history) == 2


def test_cuda_full_precision_follows_the_cpu(tmp_path, small_store):
    """Same seed, same batches: the GPU's loss curve is the CPU's up to kernel rounding (cuDNN convolutions
    use TF32 by default: about 1e-3 relative per step)."""
    common = dict(amp="off", freeze_batch_norm=True, augment=False, dropout=0.0, model="mean")
    train(_cfg(small_store, tmp_path / "gpu", **common))
    train(_cfg(small_store, tmp_path / "cpu", **{**common, "device": "cpu", "threads": 2}))
    gpu, cpu = (pd.read_csv(tmp_path / d / "history.csv") for d in ("gpu", "cpu"))
    np.testing.assert_allclose(gpu.train_loss, cpu.train_loss, rtol=1e-2)
    np.testing.assert_allclose(gpu.val_loss, cpu.val_loss, rtol=1e-2)


def test_cuda_run_killed_mid_epoch_resumes_exactly_with_deterministic_kernels(tmp_path, small_store):
    """SIGKILL after batch 1 of epoch 2, then --resume: with ``deterministic`` the run ends with exactly the
    weights and history of an uninterrupted one, as on the CPU."""
    cfg = _cfg(small_store, tmp_path / "whole", epochs=3, amp="off", deterministic=True)
    train(cfg)
    args = ["train", "--store", cfg.store, "--out-dir", str(tmp_path / "parts"), "--model", "hamil"]
    args += ["--epochs", "3", "--batch-bags", "4", "--lr", "1e-3", "--max-instances", "4"]
    args += ["--patience", "none", "--device", "cuda", "--amp", "off", "--deterministic"]
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, KILL_AFTER_ENV: "2:1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "hamil.cli", *args], env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "parts" / "last.pt")["epoch"] == 1
    assert main([*args, "--resume"]) == 0
    whole, parts = (pd.read_csv(tmp_path / d / "history.csv") for d in ("whole", "parts"))
    pd.testing.assert_frame_equal(parts.drop(columns="seconds"), whole.drop(columns="seconds"))
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("whole", "parts"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_gpu_checkpoint_evaluates_on_the_cpu(tmp_path, small_store):
    train(_cfg(small_store, tmp_path / "run", epochs=1))
    model = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "best.pt"), torch.device("cpu"))
    assert next(model.parameters()).device.type == "cpu"
    args = ["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--store", str(small_store)]
    assert main([*args, "--out-dir", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    assert main([*args, "--out-dir", str(tmp_path / "gpu"), "--device", "cuda"]) == 0
    cpu, gpu = (pd.read_csv(tmp_path / d / "predictions.tsv", sep="\t") for d in ("cpu", "gpu"))
    np.testing.assert_allclose(gpu.filter(like="p_"), cpu.filter(like="p_"), atol=2e-2)


@pytest.mark.parametrize("name", ["mean", "attention", "gated_attention", "si", "nan", "deepmiml"])
def test_non_tree_models_train_without_host_synchronisation(name):
    """Forward, loss and backward of the models without a tree never wait for the GPU (the loop then
    synchronises once per optimizer step); HAMIL's tree is built on the host, so it must."""
    model = build_model(name, 5).cuda().train()
    images = torch.randint(0, 256, (11, 3, 64, 64), dtype=torch.uint8).cuda()
    sizes, labels = torch.tensor([3, 1, 7]).cuda(), (torch.rand(3, 5) < 0.5).float().cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, loss = model(images, sizes, labels)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", ["hamil", "hamil_a", "ramil"])
def test_tree_models_synchronise_once_per_batch(name):
    """Tree building copies sizes and tree features to the host in one copy: one synchronisation per
    forward pass, whatever the number of bags (index tensors go to the GPU without waiting)."""
    model = build_model(name, 5).cuda().train()
    images = torch.randint(0, 256, (23, 3, 64, 64), dtype=torch.uint8).cuda()
    sizes, labels = torch.tensor([3, 1, 7, 12]).cuda(), (torch.rand(4, 5) < 0.5).float().cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, loss = model(images, sizes, labels)
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


@pytest.mark.parametrize("dims", [2, 1])
def test_tree_execution_on_the_gpu_equals_the_cpu(dims):
    """The linear-cost tree execution on CUDA (float64) gives the CPU's outputs and gradients: feature maps
    level by level, feature vectors through the fused autograd node (``hamil.models.fused_tree``)."""
    torch.manual_seed(0)
    agg = create("hamil", 4, init="default", dims=dims).double()
    feats = torch.randn(40, 4, 3, 3, dtype=torch.float64)
    feats = feats if dims == 2 else feats.flatten(1)  # (N, 4, 3, 3) maps or (N, 36) vectors
    sizes = torch.tensor([1, 12, 2, 25])
    outs, grads = [], []
    for device in ("cpu", "cuda"):
        model = agg.to(device)
        x = feats.to(device).requires_grad_()
        out = model(x, sizes.to(device)).bags
        out.square().sum().backward()
        outs.append(out.detach().cpu())
        grads.append(x.grad.cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-9)

"""The training loop: plain PyTorch on one CPU, one GPU or ``torchrun`` ranks, readable top to bottom.

Per run directory: ``best.pt`` (best monitored validation score), ``last.pt`` (end of the latest epoch,
with everything an exact resumption needs), ``history.csv`` and, optionally, ``tensorboard/``.

:func:`train` sets the run up and loops over epochs; each epoch is :func:`train_one_epoch` on every rank,
:func:`validate` on rank 0, then :func:`end_epoch` (schedule, early stopping, checkpoints). All loop state
that a resumption restores is the :class:`TrainState`.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from hamil.checkpoint import (
    capture_rng,
    check_resumable,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from hamil.config import AMP_MODES, TrainConfig
from hamil.data import BagDataset, intensity_jitter, jitter_factors, make_loader
from hamil.errors import TrainingDiverged
from hamil.inference import predict_batches
from hamil.metrics import compute_metrics
from hamil.models import MILModel, build_model
from hamil.runtime import (
    DistContext,
    cleanup_distributed,
    seed_everything,
    set_deterministic,
    set_threads,
    setup_distributed,
)
from hamil.tables import HISTORY_COLUMNS
from preprocessing.errors import InputError
from preprocessing.io import atomic_path, check_writable, remove_stale_temps
from preprocessing.locks import writer_lock
from preprocessing.store import BagStore

log = logging.getLogger(__name__)

#: What a run writes into its folder (``tensorboard/`` aside).
RUN_FILES = ("best.pt", "last.pt", "history.csv")
#: Fault injection for the tests: ``EPOCH:BATCH`` kills this process (SIGKILL) right after that batch.
KILL_AFTER_ENV = "HAMIL_TEST_KILL_AFTER_BATCH"


@dataclass
class TrainState:
    """What the loop carries from epoch to epoch (and a resumption restores from ``last.pt``)."""

    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps taken
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"score": -math.inf})
    stale: int = 0  # epochs since the monitored score last improved
    finished: bool = False


@dataclass
class Run:
    """The objects of one training run on one rank."""

    cfg: TrainConfig
    ctx: DistContext
    store: BagStore
    model: MILModel  # the plain model: its state_dict is what checkpoints hold
    step_model: nn.Module  # what the loop calls: the model itself, or it wrapped in DDP
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    writer: Any = None  # TensorBoard's SummaryWriter on rank 0 when asked for

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_dir)


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg.model`` on the train split of ``cfg.store``; select on the val split.

    With ``resume``, continue from ``<out_dir>/last.pt`` when it exists (same configuration required,
    except the fields in ``TrainConfig.RESUMABLE_CHANGES``); the result is identical to an uninterrupted
    run on the CPU. A folder that holds a run is refused unless ``resume`` or ``overwrite`` (which
    deletes that run first); one training per folder at a time (:func:`claim_run_dir`). Launched by
    ``torchrun``, every rank trains on its share of each global batch. Returns the best validation metrics.
    """
    set_threads(cfg.threads)
    set_deterministic(cfg.deterministic)
    ctx, _, joined = setup_distributed(cfg.device)
    try:
        with claim_run_dir(Path(cfg.out_dir), ctx, resume, overwrite):
            return _train_loop(cfg, ctx, resume)
    finally:
        if joined:
            cleanup_distributed()


@contextlib.contextmanager
def claim_run_dir(out: Path, ctx: DistContext, resume: bool, overwrite: bool) -> Iterator[None]:
    """Hold ``out``'s writer lock (rank 0) and refuse a folder with a run in it unless told what to do.

    Rank 0 decides; every rank waits for its verdict (and its ``--overwrite`` deletions) and raises the
    same one-line error, so no rank goes on to wait for a rank 0 that has stopped.
    """
    if resume and overwrite:
        raise InputError("--resume continues the run in --out-dir, --overwrite deletes it: choose one")
    with contextlib.ExitStack() as stack:
        problem = None
        if ctx.is_main:
            try:
                stack.enter_context(writer_lock(out))
                _check_run_dir(out, resume, overwrite)
            except InputError as err:
                problem = str(err)
        problems = [p for p in ctx.gather_objects(problem) if p]
        if problems:
            raise InputError(problems[0])
        yield


def _check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not (resume or overwrite):
        raise InputError(
            f"{out}: holds a training run ({', '.join(found)}); "
            "--resume continues it, --overwrite replaces it"
        )
    if found and overwrite:
        for name in found:
            (out / name).unlink()
        log.info("--overwrite: deleted %s from %s", ", ".join(found), out)


def _train_loop(cfg: TrainConfig, ctx: DistContext, resume: bool) -> dict[str, Any]:
    """The epochs of :func:`train`: build, resume, then train, validate and checkpoint each epoch."""
    run = build_run(cfg, ctx)
    state = resume_state(run) if resume else TrainState()
    try:
        while not state.finished and state.epoch < cfg.epochs:
            start = time.perf_counter()
            train_loss = train_one_epoch(run, state, state.epoch + 1)
            row, failure = {}, None
            if ctx.is_main:
                try:
                    row = validate(run, state.epoch + 1, train_loss)
                except TrainingDiverged as err:
                    failure = err
            end_epoch(run, state, row, failure, start)
    finally:
        if run.writer is not None:
            run.writer.close()
    return state.best


def build_run(cfg: TrainConfig, ctx: DistContext) -> Run:
    """Seed, open the store, and build the model (DDP-wrapped with several ranks), optimizer and loaders."""
    seed_everything(cfg.seed)
    if ctx.is_main:  # before the first step, not after a whole epoch
        check_writable(cfg.out_dir)
        for name in RUN_FILES:  # temporary files of a run killed while writing them
            remove_stale_temps(Path(cfg.out_dir) / name)
    store = BagStore(cfg.store)
    if cfg.batch_bags < ctx.world:
        raise InputError(
            f"batch_bags {cfg.batch_bags} is the global batch: it needs at least one bag per rank "
            f"({ctx.world} ranks)"
        )
    train_bags, val_bags = store.bags_in("train"), store.bags_in("val")
    if len(train_bags) < ctx.world or len(val_bags) == 0:
        raise InputError(
            f"{cfg.store}: need bags in both train and val splits (have {len(train_bags)}, "
            f"{len(val_bags)}), and at least one train bag per rank ({ctx.world} ranks)"
        )
    device = ctx.device
    model = build_model(
        cfg.model,
        len(store.class_names),
        cfg.pretrained,
        cfg.dropout,
        in_chans=store.channels,
        **cfg.aggregator_options(),
    ).to(device)
    step_model: nn.Module = model
    if ctx.world > 1:
        if device.type == "cuda" and cfg.sync_batch_norm:
            # the backbone only: the aggregation unit runs once per tree level, a number that differs
            # between ranks, and synchronised batch norm needs the same collectives on every rank
            model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)
        torch.manual_seed(cfg.seed + 7919 * ctx.rank)  # dropout masks differ between ranks
        step_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dtype = amp_dtype(cfg.amp, device)
    pin = device.type == "cuda"
    flips = cfg.augment and cfg.flip_rotate  # orientation-changing draws; jitter is applied on the device
    train_data = BagDataset(store, train_bags, cfg.max_instances, flips, cfg.seed)
    return Run(
        cfg,
        ctx,
        store,
        model,
        step_model,
        optimizer,
        make_scheduler(cfg, optimizer),
        torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        dtype,
        make_loader(train_data, cfg.batch_bags, True, cfg.seed, cfg.num_workers, pin, ctx.world, ctx.rank),
        make_loader(BagDataset(store, val_bags), cfg.batch_bags, False, cfg.seed, cfg.num_workers, pin),
        _tensorboard_writer(Path(cfg.out_dir)) if cfg.tensorboard and ctx.is_main else None,
    )


def train_one_epoch(run: Run, state: TrainState, epoch: int) -> float:
    """One pass over the training split; returns the mean training loss over all ranks' items.

    Gradients of ``cfg.accumulate`` batches are summed before each optimizer step (a short last group
    counts as its own). The host waits for the device once per optimizer step, where the step's loss is
    checked: a NaN or infinite loss stops before the optimizer applies it.
    """
    cfg, ctx, device = run.cfg, run.ctx, run.device
    _train_mode(run.model, cfg.freeze_batch_norm)
    run.train_loader.batch_sampler.set_epoch(epoch)
    steps = len(run.train_loader)
    total = torch.zeros(2, dtype=torch.float64)  # (loss sum, items) over all ranks and steps
    group_sum = torch.zeros(2, dtype=torch.float64, device=device)  # this rank's, current optimizer step
    bar = tqdm(run.train_loader, desc=f"epoch {epoch}", leave=False, mininterval=5.0, disable=not ctx.is_main)
    run.optimizer.zero_grad(set_to_none=True)
    for i, (images, sizes, labels, bags) in enumerate(bar, start=1):
        images = images.to(device, non_blocking=True)  # (N, C, H, W) uint8
        if cfg.augment and cfg.jitter > 0:
            factors = jitter_factors(cfg.seed, epoch, bags.tolist(), sizes.tolist(), cfg.jitter)  # (N, 2)
            images = intensity_jitter(images, factors)  # (N, C, H, W) float
        local_items = float(sizes.sum()) if run.model.instance_level else float(len(sizes))  # CPU values
        sizes, labels = sizes.to(device), labels.to(device)  # (B,), (B, K)
        last_micro = i % cfg.accumulate == 0 or i == steps
        group = min(cfg.accumulate, steps - (i - 1) // cfg.accumulate * cfg.accumulate)  # batches this step
        scale = _loss_scale(ctx, local_items, group, device)
        with _ddp_sync(run.step_model, last_micro):
            with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
                _, loss_sum = run.step_model(images, sizes, labels)  # summed over this rank's items
            run.scaler.scale(loss_sum * scale).backward()
        group_sum[0] += loss_sum.detach().double()
        group_sum[1] += local_items
        if last_micro:
            step_total = ctx.all_sum(group_sum.clone()).cpu()  # the one host synchronisation of this step
            group_sum.zero_()
            if not math.isfinite(step_total[0]):
                raise TrainingDiverged(
                    f"training loss is {float(step_total[0])} at epoch {epoch}, batch {i}/{steps} "
                    f"(optimizer step {state.global_step + 1}); stopped, {_kept(run, state.epoch)}"
                )
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            total += step_total
            if run.writer is not None:
                run.writer.add_scalar("train/loss", float(step_total[0] / step_total[1]), state.global_step)
            bar.set_postfix(loss=f"{float(total[0] / total[1]):.4f}", refresh=False)
        _kill_if_asked(epoch, i)
    return float(total[0] / max(float(total[1]), 1.0))


def validate(run: Run, epoch: int, train_loss: float) -> dict[str, float]:
    """Validation metrics of the current model: one ``history.csv`` row (rank 0 only)."""
    _, y, p, val_loss = predict_batches(run.model, run.val_loader, run.device)
    if not np.isfinite(p).all():
        raise TrainingDiverged(
            f"validation outputs are not finite after epoch {epoch}; stopped, {_kept(run, epoch - 1)}"
        )
    metrics = compute_metrics(y, p, run.store.class_names)
    row = {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_macro_auc": metrics["macro_auc"] if metrics["macro_auc"] is not None else float("nan"),
        "val_macro_f1": metrics["macro_f1"],
        "val_micro_f1": metrics["micro_f1"],
        "lr": run.optimizer.param_groups[0]["lr"],
    }
    if run.writer is not None:
        for key, value in row.items():
            if key != "epoch":
                run.writer.add_scalar(
                    key.replace("val_", "val/").replace("train_", "train/epoch_"), value, epoch
                )
    return row


def end_epoch(
    run: Run, state: TrainState, row: dict[str, float], failure: TrainingDiverged | None, start: float
) -> None:
    """Rank 0's verdict shared with every rank: schedule step, best/stale/stop, checkpoints, history."""
    cfg, ctx = run.cfg, run.ctx
    epoch = state.epoch + 1
    score = _monitor_score(cfg.monitor, row) if row else 0.0
    shared = ctx.broadcast(torch.tensor([score, failure is not None], dtype=torch.float64))
    if failure is not None:
        raise failure
    if shared[1]:
        raise TrainingDiverged(f"rank 0 stopped after epoch {epoch} (non-finite validation outputs)")
    score = float(shared[0])
    if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        run.scheduler.step(score)
    elif run.scheduler is not None:
        run.scheduler.step()
    improved = score > state.best["score"] or "epoch" not in state.best  # -inf still gives a best.pt
    state.stale = 0 if improved else state.stale + 1
    stop = cfg.patience is not None and state.stale >= cfg.patience
    state.epoch, state.finished = epoch, stop or epoch >= cfg.epochs
    if improved:
        state.best = {
            "score": score,
            "epoch": epoch,
            **{k: v for k, v in row.items() if k.startswith("val_")},
        }
    rng_states = ctx.gather_objects(capture_rng(run.model, run.device))  # every rank's, on rank 0
    if not ctx.is_main:
        return
    row["seconds"] = time.perf_counter() - start
    state.history.append(row)
    payload = _payload(run, state, row, rng_states)
    if improved:
        save_checkpoint(run.out / "best.pt", payload)
    save_checkpoint(run.out / "last.pt", payload)
    _write_history(state.history, run.out / "history.csv")
    log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})
    if stop:
        log.info("early stop: no improvement of %s for %d epochs", cfg.monitor, state.stale)


def resume_state(run: Run) -> TrainState:
    """Load ``last.pt`` into the run's model, optimizer, schedule, scaler and generators; its loop state.

    No ``last.pt`` yet: a fresh state. Every rank must see the same file (their collectives would
    otherwise drift apart), and configuration, autocast type and store must match (:func:`check_resumable`).
    """
    path = run.out / "last.pt"
    ckpt = load_checkpoint(path, num_classes=len(run.store.class_names)) if path.is_file() else None
    if run.ctx.world > 1:
        epoch = ckpt["epoch"] if ckpt is not None else 0
        first = int(run.ctx.broadcast(torch.tensor([epoch], dtype=torch.float64))[0])
        if first != epoch:
            raise InputError(f"{path}: rank {run.ctx.rank} sees epoch {epoch}, rank 0 epoch {first}")
    if ckpt is None:
        log.info("resume: no %s yet, starting from the beginning", path)
        return TrainState()
    check_resumable(path, ckpt, run.cfg, run.store, run.amp_dtype)
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"]:
        run.scaler.load_state_dict(ckpt["scaler"])
    saved = ckpt.get("state") or ckpt  # checkpoints before TrainState kept these fields at the top level
    state = TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__})
    state.finished = state.finished or (run.cfg.patience is not None and state.stale >= run.cfg.patience)
    states = ckpt["rng"]
    if len(states) != run.ctx.world:
        log.warning(
            "%s was written by %d ranks, now %d: random streams restart", path, len(states), run.ctx.world
        )
    restore_rng(run.model, states[run.ctx.rank % len(states)], run.device)
    log.info("resumed from %s at epoch %d (optimizer step %d)", path, state.epoch, state.global_step)
    return state


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    """The learning-rate schedule of ``cfg.schedule`` (checked by :class:`TrainConfig`), stepped once per
    epoch (``None`` for constant)."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.schedule == "plateau":  # on the monitored validation score, which is maximised
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=3)
    return None


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast type for ``amp`` on ``device`` (``None``: full precision).

    ``auto`` is bf16 on GPUs that support it, fp16 (with loss scaling) on older ones, and off on the CPU;
    ``bf16`` may be asked for on the CPU too.
    """
    if amp not in AMP_MODES:
        raise InputError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise InputError("amp fp16 needs a CUDA device (use bf16 or off on the CPU)")
    return torch.bfloat16 if amp == "bf16" else torch.float16


# ---- small pieces of the loop -------------------------------------------------------------------------


def _train_mode(model: nn.Module, freeze_batch_norm: bool) -> None:
    model.train()
    if freeze_batch_norm:  # batch norm keeps its running statistics
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _loss_scale(ctx: DistContext, local_items: float, group: int, device: torch.device) -> Any:
    """Factor turning a rank's summed loss into its share of the global mean over the step's batches.

    DDP averages gradients over ranks, so ``world * local sum / global items`` gives the global mean; the
    global item count is summed on the device (no host synchronisation). The factor is float64 in both
    cases, so one process and several ranks scale by the same rounded value.
    """
    if ctx.world == 1:
        return 1.0 / (local_items * group)
    items = ctx.sum_on_device(torch.tensor([local_items], dtype=torch.float64, device=device))
    return ctx.world / (items[0] * group)


def _ddp_sync(step_model: nn.Module, last_micro: bool) -> contextlib.AbstractContextManager:
    """DDP reduces gradients only on the last batch of an accumulation group."""
    if not last_micro and isinstance(step_model, DistributedDataParallel):
        return step_model.no_sync()
    return contextlib.nullcontext()


def _monitor_score(monitor: str, row: dict[str, float]) -> float:
    if monitor == "loss":
        return -row["val_loss"]
    value = row[f"val_{monitor}"]
    return -math.inf if math.isnan(value) else value


def _kept(run: Run, epochs_done: int) -> str:
    """Where the last good state is: ``last.pt`` holds the last completed epoch."""
    if epochs_done == 0:
        return "no checkpoint was written yet"
    return f"last good checkpoint: {run.out / 'last.pt'} (epoch {epochs_done})"


def _kill_if_asked(epoch: int, batch: int) -> None:
    if os.environ.get(KILL_AFTER_ENV) == f"{epoch}:{batch}":
        os.kill(os.getpid(), signal.SIGKILL)


def _payload(run: Run, state: TrainState, row: dict[str, float], rng: list[dict[str, Any]]) -> dict[str, Any]:
    store = run.store
    return {
        "config": run.cfg.to_dict(),
        "class_names": store.class_names,
        "store_attrs": {
            "patch_shape": list(store.patch_shape),
            "source": store.attrs.get("source"),
            "crop": store.attrs.get("crop"),
            "bags": store.attrs.get("params"),
            # how the fields were read and their pixel sizes: predict reads new files the same way
            "read": store.attrs.get("read"),
            "pixel_sizes_um": store.attrs.get("pixel_sizes_um", []),
            "max_instances": run.cfg.max_instances,
            "fingerprint": store.fingerprint,
        },
        "threads": torch.get_num_threads(),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else {},
        "scaler": run.scaler.state_dict(),
        "state": asdict(state),
        "epoch": state.epoch,
        "global_step": state.global_step,
        "val_metrics": {k: v for k, v in row.items() if k.startswith("val_")},
        "amp": str(run.amp_dtype),
        "rng": rng,
    }


def _tensorboard_writer(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError(
            "tensorboard: true needs the tensorboard package (pip install tensorboard)"
        ) from None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _write_history(history: list[dict[str, float]], path: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(history)

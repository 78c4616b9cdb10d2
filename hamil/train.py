"""The training loop: plain PyTorch on one CPU, one GPU or ``torchrun`` ranks.

Per run directory: ``best.pt`` (best monitored validation score), ``last.pt`` (end of the latest epoch,
with everything an exact resumption needs), ``history.csv`` and, optionally, ``tensorboard/``.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import random
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from hamil.checkpoint import load_checkpoint, save_checkpoint
from hamil.config import AMP_MODES, TrainConfig
from hamil.data import BagDataset, intensity_jitter, jitter_factors, make_loader
from hamil.distributed import DistContext, cleanup_distributed, setup_distributed
from hamil.errors import TrainingDiverged
from hamil.metrics import compute_metrics
from hamil.models import MILModel, build_model
from hamil.predict import predict_batches
from hamil.seeding import seed_everything
from preprocessing.errors import InputError
from preprocessing.io import atomic_path
from preprocessing.store import BagStore

log = logging.getLogger(__name__)
HISTORY_FIELDS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_macro_auc",
    "val_macro_f1",
    "val_micro_f1",
    "lr",
    "seconds",
)


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg.model`` on the train split of ``cfg.store``; select on the val split.

    With ``resume``, continue from ``<out_dir>/last.pt`` when it exists (same configuration required,
    except the fields in ``TrainConfig.RESUMABLE_CHANGES``); the result is identical to an uninterrupted
    run on the CPU. Launched by ``torchrun``, every rank trains on its share of each global batch.
    Returns the best validation metrics.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx, device, joined = setup_distributed(cfg.device)
    try:
        return Trainer(cfg, ctx, device).fit(resume)
    finally:
        if joined:
            cleanup_distributed()


class _LossModule(nn.Module):
    """The model's summed training loss as ``forward``, so that DDP's gradient hooks see it."""

    def __init__(self, model: MILModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, sizes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model.loss(images, sizes, labels, reduction="sum")


class Trainer:
    """One training run: model, optimiser, schedule, loaders and the loop state that a resume restores."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, device: torch.device) -> None:
        if cfg.accumulate < 1:
            raise ValueError(f"accumulate must be at least 1, got {cfg.accumulate}")
        self.cfg, self.ctx, self.device = cfg, ctx, device
        seed_everything(cfg.seed)
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.store = store = BagStore(cfg.store)
        train_bags, val_bags = store.bags_in("train"), store.bags_in("val")
        if len(train_bags) < ctx.world or len(val_bags) == 0:
            raise InputError(
                f"{cfg.store}: need bags in both train and val splits (have {len(train_bags)}, "
                f"{len(val_bags)}), and at least one train bag per rank ({ctx.world} ranks)"
            )
        self.model = build_model(
            cfg.model, len(store.class_names), cfg.pretrained, cfg.dropout, **cfg.aggregator_options()
        ).to(device)
        self.loss_module: nn.Module = _LossModule(self.model)
        if ctx.world > 1:
            if device.type == "cuda" and cfg.sync_batch_norm:
                # the backbone only: the aggregation unit runs once per tree level, a number that differs
                # between ranks, and synchronised batch norm needs the same collectives on every rank
                self.model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(self.model.backbone)
            torch.manual_seed(cfg.seed + 7919 * ctx.rank)  # dropout masks differ between ranks
            ids = [device.index] if device.type == "cuda" else None
            self.loss_module = DistributedDataParallel(self.loss_module, device_ids=ids)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.amp_dtype = amp_dtype(cfg.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        pin = device.type == "cuda"
        self.train_loader = make_loader(
            BagDataset(store, train_bags, cfg.max_instances, cfg.augment, cfg.seed),
            cfg.batch_bags,
            True,
            cfg.seed,
            cfg.num_workers,
            pin,
            world=ctx.world,
            rank=ctx.rank,
        )
        self.val_loader = make_loader(
            BagDataset(store, val_bags), cfg.batch_bags, False, cfg.seed, cfg.num_workers, pin
        )
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self.best: dict[str, Any] = {"score": -math.inf}
        self.stale = 0
        self.finished = False
        self.writer = _tensorboard_writer(self.out) if cfg.tensorboard and ctx.is_main else None

    # ---- the loop -------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Run the remaining epochs; returns the best validation metrics."""
        if resume:
            self._resume()
        try:
            while not self.finished and self.epoch < self.cfg.epochs:
                self._run_epoch(self.epoch + 1)
        finally:
            if self.writer is not None:
                self.writer.close()
        return self.best

    def _run_epoch(self, epoch: int) -> None:
        start = time.perf_counter()
        train_loss = self._train_epoch(epoch)
        row, failure = {}, None
        if self.ctx.is_main:
            try:
                row = self._validate(epoch, train_loss)
            except TrainingDiverged as err:
                failure = err
        # rank 0 decides; every rank steps its schedule with the same score and stops together
        score = self._monitor_score(row) if row else 0.0
        shared = self.ctx.broadcast(torch.tensor([score, failure is not None], dtype=torch.float64))
        if failure is not None:
            raise failure
        if shared[1]:
            raise TrainingDiverged(f"rank 0 stopped after epoch {epoch} (non-finite validation outputs)")
        score = float(shared[0])
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(score)
        elif self.scheduler is not None:
            self.scheduler.step()
        improved = score > self.best["score"] or "epoch" not in self.best  # -inf still gives a best.pt
        self.stale = 0 if improved else self.stale + 1
        stop = self.cfg.patience is not None and self.stale >= self.cfg.patience
        self.epoch, self.finished = epoch, stop or epoch >= self.cfg.epochs
        if improved:
            self.best = {
                "score": score,
                "epoch": epoch,
                **{k: v for k, v in row.items() if k.startswith("val_")},
            }
        rng_states = self.ctx.gather_objects(self._rng_state())  # every rank's generators, on rank 0
        if self.ctx.is_main:
            row["seconds"] = time.perf_counter() - start
            self.history.append(row)
            payload = self._payload(row, rng_states)
            if improved:
                save_checkpoint(self.out / "best.pt", payload)
            save_checkpoint(self.out / "last.pt", payload)
            _write_history(self.history, self.out / "history.csv")
            log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})
            if stop:
                log.info("early stop: no improvement of %s for %d epochs", self.cfg.monitor, self.stale)

    def _train_epoch(self, epoch: int) -> float:
        cfg, ctx = self.cfg, self.ctx
        self.model.train()
        if cfg.freeze_batch_norm:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        self.train_loader.batch_sampler.set_epoch(epoch)
        steps = len(self.train_loader)
        total = torch.zeros(2, dtype=torch.float64)  # (loss sum, items) over all ranks
        bar = tqdm(
            self.train_loader, desc=f"epoch {epoch}", leave=False, mininterval=5.0, disable=not ctx.is_main
        )
        self.optimizer.zero_grad(set_to_none=True)
        for i, (images, sizes, labels, bags) in enumerate(bar, start=1):
            images = images.to(self.device, non_blocking=True)  # (N, C, H, W) uint8
            if cfg.augment and cfg.jitter > 0:
                factors = jitter_factors(cfg.seed, epoch, bags.tolist(), sizes.tolist(), cfg.jitter)  # (N, 2)
                images = intensity_jitter(images, factors)  # (N, C, H, W) float
            sizes, labels = sizes.to(self.device), labels.to(self.device)  # (B,), (B, K)
            local_items = float(sizes.sum()) if self.model.instance_level else float(len(sizes))
            last_micro = i % cfg.accumulate == 0 or i == steps
            group = min(
                cfg.accumulate, steps - (i - 1) // cfg.accumulate * cfg.accumulate
            )  # batches this step
            sync = contextlib.nullcontext()
            if not last_micro and isinstance(self.loss_module, DistributedDataParallel):
                sync = self.loss_module.no_sync()
            with sync:
                with torch.autocast(
                    self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
                ):
                    loss_sum = self.loss_module(images, sizes, labels)  # summed over this rank's items
                step_total = ctx.all_sum(
                    torch.tensor([float(loss_sum.detach()), local_items], dtype=torch.float64)
                )
                if not math.isfinite(step_total[0]):
                    self._diverged(epoch, i, steps, float(step_total[0]))
                # DDP averages gradients over ranks, so world * local sum / global count is the global mean
                loss = loss_sum * (ctx.world / float(step_total[1]) / group)
                self.scaler.scale(loss).backward()
            total += step_total
            if last_micro:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                if self.writer is not None:
                    self.writer.add_scalar(
                        "train/loss", float(step_total[0] / step_total[1]), self.global_step
                    )
            bar.set_postfix(loss=f"{float(total[0] / total[1]):.4f}")
        return float(total[0] / max(float(total[1]), 1.0))

    def _validate(self, epoch: int, train_loss: float) -> dict[str, float]:
        _, y, p, val_loss = predict_batches(self.model, self.val_loader, self.device)
        if not np.isfinite(p).all():
            raise TrainingDiverged(
                f"validation outputs are not finite after epoch {epoch}; stopped, {self._kept()}"
            )
        metrics = compute_metrics(y, p, self.store.class_names)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_macro_auc": metrics["macro_auc"] if metrics["macro_auc"] is not None else float("nan"),
            "val_macro_f1": metrics["macro_f1"],
            "val_micro_f1": metrics["micro_f1"],
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch":
                    self.writer.add_scalar(
                        key.replace("val_", "val/").replace("train_", "train/epoch_"), value, epoch
                    )
        return row

    def _monitor_score(self, row: dict[str, float]) -> float:
        if self.cfg.monitor == "loss":
            return -row["val_loss"]
        value = row[f"val_{self.cfg.monitor}"]
        return -math.inf if math.isnan(value) else value

    def _diverged(self, epoch: int, batch: int, batches: int, value: float) -> None:
        raise TrainingDiverged(
            f"training loss is {value} at epoch {epoch}, batch {batch}/{batches} "
            f"(optimizer step {self.global_step + 1}); stopped, {self._kept()}"
        )

    def _kept(self) -> str:
        if self.epoch == 0:
            return "no checkpoint was written yet"
        return f"last good checkpoint: {self.out / 'last.pt'} (epoch {self.epoch})"

    # ---- checkpoints and resumption ---------------------------------------------------------------------
    def _payload(self, row: dict[str, float], rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "class_names": self.store.class_names,
            "store_attrs": {
                "patch_shape": list(self.store.patch_shape),
                "source": self.store.attrs.get("source"),
                "crop": self.store.attrs.get("crop"),
                "bags": self.store.attrs.get("params"),
                "max_instances": self.cfg.max_instances,
            },
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "val_metrics": {k: v for k, v in row.items() if k.startswith("val_")},
            "history": self.history,
            "best": self.best,
            "stale": self.stale,
            "finished": self.finished,
            "amp": str(self.amp_dtype),
            "rng": rng_states,
        }

    def _resume(self) -> None:
        path = self.out / "last.pt"
        ckpt = load_checkpoint(path, num_classes=len(self.store.class_names)) if path.is_file() else None
        if self.ctx.world > 1:  # every rank must see the same last.pt, or their collectives would drift apart
            epoch = ckpt["epoch"] if ckpt is not None else 0
            first = int(self.ctx.broadcast(torch.tensor([epoch], dtype=torch.float64))[0])
            if first != epoch:
                raise InputError(f"{path}: rank {self.ctx.rank} sees epoch {epoch}, rank 0 epoch {first}")
        if ckpt is None:
            log.info("resume: no %s yet, starting from the beginning", path)
            return
        if ckpt.get("amp", str(self.amp_dtype)) != str(self.amp_dtype):
            raise InputError(
                f"{path}: trained with autocast {ckpt['amp']}, this device gives {self.amp_dtype}; "
                "resume with the same --amp and device type"
            )
        _check_resumable(path, ckpt["config"], self.cfg)
        if ckpt["class_names"] != self.store.class_names:
            raise InputError(
                f"{path}: classes {ckpt['class_names']} differ from the store's {self.store.class_names}"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.global_step = ckpt["epoch"], ckpt["global_step"]
        self.history, self.best, self.stale = ckpt["history"], ckpt["best"], ckpt["stale"]
        self.finished = ckpt["finished"] or (
            self.cfg.patience is not None and self.stale >= self.cfg.patience
        )
        states = ckpt["rng"]
        if len(states) != self.ctx.world:
            log.warning(
                "%s was written by %d ranks, now %d: random streams restart",
                path,
                len(states),
                self.ctx.world,
            )
        self._set_rng_state(states[self.ctx.rank % len(states)])
        log.info("resumed from %s at epoch %d (optimizer step %d)", path, self.epoch, self.global_step)

    def _rng_state(self) -> dict[str, Any]:
        _, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002  (the legacy global RNG)
        version, py_state, py_gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "numpy": {
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": pos,
                "has_gauss": has_gauss,
                "gauss": gauss,
            },
            "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
            "modules": {
                name: m.rng_state() for name, m in self.model.named_modules() if hasattr(m, "rng_state")
            },
        }

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)
        np_state = state["numpy"]
        keys = np_state["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))  # noqa: NPY002
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        modules = dict(self.model.named_modules())
        for name, module_state in state["modules"].items():
            modules[name].set_rng_state(module_state)


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
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp fp16 needs a CUDA device (use bf16 or off on the CPU)")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _check_resumable(path: Path, saved: TrainConfig, current: TrainConfig) -> None:
    differ = [
        f"{f.name} {getattr(saved, f.name)!r} -> {getattr(current, f.name)!r}"
        for f in fields(TrainConfig)
        if f.name not in TrainConfig.RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(current, f.name)
    ]
    if differ:
        raise InputError(f"{path}: cannot resume with a different configuration ({'; '.join(differ)})")


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
        writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(history)

"""The training loop: plain PyTorch, one bag batch per step, best and last checkpoints, a history CSV."""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hamil.checkpoint import save_checkpoint
from hamil.config import TrainConfig
from hamil.data import BagDataset, make_loader
from hamil.metrics import compute_metrics
from hamil.models import MILModel, build_model
from hamil.predict import predict_batches
from hamil.seeding import seed_everything, select_device
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
    "seconds",
)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.model`` on the train split of ``cfg.store``; select on the val split.

    Writes ``best.pt``, ``last.pt`` and ``history.csv`` into ``cfg.out_dir``; returns the best val metrics.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = BagStore(cfg.store)
    train_bags, val_bags = store.bags_in("train"), store.bags_in("val")
    if len(train_bags) == 0 or len(val_bags) == 0:
        raise InputError(
            f"{cfg.store}: need bags in both train and val splits (have {len(train_bags)}, {len(val_bags)})"
        )

    num_classes = len(store.class_names)
    model = build_model(cfg.model, num_classes, cfg.pretrained, cfg.dropout, **cfg.aggregator_options())
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(cfg, optimizer)
    pin = device.type == "cuda"
    train_loader = make_loader(
        BagDataset(store, train_bags, cfg.max_instances, cfg.augment),
        cfg.batch_bags,
        True,
        cfg.seed,
        cfg.num_workers,
        pin,
    )
    val_loader = make_loader(
        BagDataset(store, val_bags), cfg.batch_bags, False, cfg.seed, cfg.num_workers, pin
    )

    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"score": -math.inf}
    stale = 0
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        train_loss = _train_epoch(model, train_loader, optimizer, device, epoch)
        _, y, p, val_loss = predict_batches(model, val_loader, device)
        metrics = compute_metrics(y, p, store.class_names)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_macro_auc": metrics["macro_auc"] if metrics["macro_auc"] is not None else float("nan"),
            "val_macro_f1": metrics["macro_f1"],
            "val_micro_f1": metrics["micro_f1"],
            "seconds": time.perf_counter() - start,
        }
        history.append(row)
        score = _monitor_score(cfg.monitor, row)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(score)
        elif scheduler is not None:
            scheduler.step()
        payload = {
            "config": cfg.to_dict(),
            "class_names": store.class_names,
            "store_attrs": {"patch_shape": list(store.patch_shape), "source": store.attrs.get("source")},
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "epoch": epoch,
            "val_metrics": {k: v for k, v in row.items() if k.startswith("val_")},
        }
        if score > best["score"] or "epoch" not in best:  # an undefined score (-inf) still gives a best.pt
            best = {"score": score, "epoch": epoch, **payload["val_metrics"]}
            save_checkpoint(out / "best.pt", payload)
            stale = 0
        else:
            stale += 1
        save_checkpoint(out / "last.pt", payload)
        _write_history(history, out / "history.csv")
        log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})
        if cfg.patience is not None and stale >= cfg.patience:
            log.info("early stop: no improvement of %s for %d epochs", cfg.monitor, cfg.patience)
            break
    return best


SCHEDULES = ("constant", "cosine", "plateau")


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    """The learning-rate schedule of ``cfg.schedule``, stepped once per epoch (``None`` for constant)."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.schedule == "plateau":  # on the monitored validation score, which is maximised
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=3)
    return None


def _train_epoch(
    model: MILModel,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
) -> float:
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, mininterval=5.0)
    for images, sizes, labels, _ in bar:
        loss = model.loss(images.to(device, non_blocking=True), sizes.to(device), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(sizes)
        count += len(sizes)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


def _monitor_score(monitor: str, row: dict[str, float]) -> float:
    if monitor == "loss":
        return -row["val_loss"]
    value = row[f"val_{monitor}"]
    return -math.inf if math.isnan(value) else value


def _write_history(history: list[dict[str, float]], path: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(history)

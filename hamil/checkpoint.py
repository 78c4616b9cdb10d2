"""Checkpoints: writing and reading them, the model they hold, and what an exact resumption restores.

A checkpoint is a dict of tensors and primitives, written atomically and loaded with ``weights_only=True``.
Training checkpoints (``last.pt``) also hold the optimizer, schedule and loss-scaler states, the loop
state and every rank's random generators, so that a resumed run continues bit for bit on the CPU.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hamil.config import TrainConfig
from hamil.models import MILModel, build_model
from preprocessing.errors import InputError
from preprocessing.io import atomic_path

CHECKPOINT_FORMAT = "hamil-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Save ``payload`` (must hold ``config``, ``class_names``, ``model``) under a temp name, then rename."""
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}, tmp)


def load_checkpoint(path: str | os.PathLike[str], num_classes: int | None = None) -> dict[str, Any]:
    """Load and check a checkpoint; every problem is an :class:`InputError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: corrupt or unreadable checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a HAMIL checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise InputError(
            f"{path}: checkpoint version {ckpt.get('version')}, this HAMIL reads {CHECKPOINT_VERSION}"
        )
    if num_classes is not None and len(ckpt["class_names"]) != num_classes:
        raise InputError(
            f"{path}: checkpoint has {len(ckpt['class_names'])} classes, the data has {num_classes}"
        )
    ckpt["config"] = TrainConfig.from_dict(ckpt["config"])
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], device: torch.device) -> MILModel:
    """Rebuild the model a checkpoint was trained with and load its weights (eval mode)."""
    cfg = ckpt["config"]
    model = build_model(cfg.model, len(ckpt["class_names"]), None, cfg.dropout, **cfg.aggregator_options())
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def check_resumable(path: Path, saved: TrainConfig, current: TrainConfig) -> None:
    """Refuse to resume with a configuration that changes the computation (one line listing the fields)."""
    differ = [
        f"{f.name} {getattr(saved, f.name)!r} -> {getattr(current, f.name)!r}"
        for f in fields(TrainConfig)
        if f.name not in TrainConfig.RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(current, f.name)
    ]
    if differ:
        raise InputError(f"{path}: cannot resume with a different configuration ({'; '.join(differ)})")


def capture_rng(model: nn.Module, device: torch.device) -> dict[str, Any]:
    """This process's random generators (torch, CUDA, NumPy's and Python's global ones, and those of
    modules with ``rng_state()``, e.g. RAMIL's pairing order) as checkpoint-safe values."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002  (the legacy global RNG)
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
        "modules": {name: m.rng_state() for name, m in model.named_modules() if hasattr(m, "rng_state")},
    }


def restore_rng(model: nn.Module, state: dict[str, Any], device: torch.device) -> None:
    """Set the generators :func:`capture_rng` recorded."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))  # noqa: NPY002
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    modules = dict(model.named_modules())
    for name, module_state in state["modules"].items():
        modules[name].set_rng_state(module_state)

"""Checkpoints: a dict of tensors and primitives, written atomically, loaded with ``weights_only=True``."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from hamil.config import TrainConfig
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

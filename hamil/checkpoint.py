"""Checkpoints: writing and reading them, the model they hold, and what an exact resumption restores.

A checkpoint is a dict of tensors and primitives, written atomically and loaded with ``weights_only=True``.
Training checkpoints (``last.pt``) also hold the optimizer, schedule and loss-scaler states, the loop
state and every rank's random generators, so that a resumed run continues bit for bit on the CPU.
"""

from __future__ import annotations

import hashlib
import io
import logging
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
from hamil.models.registry import Stochastic
from preprocessing.errors import InputError
from preprocessing.io import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "hamil-checkpoint"
CHECKPOINT_VERSION = 2  # 2: the payload is stored as bytes with their SHA-256
READABLE_VERSIONS = (1, 2)  # 1: the payload dict itself, no checksum
REQUIRED_KEYS = ("config", "class_names", "model")
_LOAD_ERRORS = (
    RuntimeError,
    EOFError,
    zipfile.BadZipFile,
    pickle.UnpicklingError,
    OSError,
    KeyError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
)


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Save ``payload`` (must hold ``config``, ``class_names``, ``model``) under a temp name, then rename.

    The payload is serialised once, its SHA-256 stored beside it, so a flipped byte is found on loading.
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    outer = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "sha256": hashlib.sha256(data).hexdigest(),
        "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8),
    }
    wrapped = io.BytesIO()
    torch.save(outer, wrapped)
    with atomic_path(path) as tmp, tmp.open("wb") as fh:  # plain file writes: a full disk is an OSError
        fh.write(wrapped.getbuffer())


def read_payload(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The payload dict :func:`save_checkpoint` was given (``config`` still a dict), checksum verified."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    ckpt = _torch_load(path, path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a HAMIL checkpoint")
    if ckpt.get("version") not in READABLE_VERSIONS:
        raise InputError(
            f"{path}: checkpoint version {ckpt.get('version')}, this HAMIL reads "
            + " and ".join(map(str, READABLE_VERSIONS))
        )
    return _unwrap(path, ckpt) if ckpt["version"] >= 2 else ckpt


def load_checkpoint(path: str | os.PathLike[str], num_classes: int | None = None) -> dict[str, Any]:
    """Load and check a checkpoint; every problem is an :class:`InputError` naming the file.

    Refused: not a checkpoint, an unknown version, a checksum mismatch (a corrupt file), missing keys, a
    configuration this version does not know, and (with ``num_classes``) another number of classes.
    ``config`` is returned as a :class:`TrainConfig`.
    """
    ckpt = read_payload(path)
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise InputError(f"{path}: not a complete HAMIL checkpoint (missing {', '.join(missing)})")
    if num_classes is not None and len(ckpt["class_names"]) != num_classes:
        raise InputError(
            f"{path}: checkpoint has {len(ckpt['class_names'])} classes, the data has {num_classes}"
        )
    try:
        ckpt["config"] = TrainConfig.from_dict(dict(ckpt["config"]))
    except (TypeError, ValueError) as err:
        raise InputError(f"{path}: unreadable training configuration ({err})") from None
    return ckpt


def _torch_load(source: Any, path: Path) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as err:
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise InputError(f"{path}: corrupt or unreadable checkpoint ({first})") from None


def _unwrap(path: Path, outer: dict[str, Any]) -> dict[str, Any]:
    payload = outer.get("payload")
    if not isinstance(payload, torch.Tensor) or not isinstance(outer.get("sha256"), str):
        raise InputError(f"{path}: not a complete HAMIL checkpoint (no payload or checksum)")
    data = payload.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != outer["sha256"]:
        raise InputError(f"{path}: checksum mismatch, the file is corrupt (re-train or restore a copy)")
    inner = _torch_load(io.BytesIO(data), path)
    if not isinstance(inner, dict):
        raise InputError(f"{path}: not a HAMIL checkpoint")
    return inner


def model_from_checkpoint(
    ckpt: dict[str, Any], device: torch.device, source: str | os.PathLike[str] = "checkpoint"
) -> MILModel:
    """Rebuild the model a checkpoint was trained with and load its weights (eval mode).

    Weights that do not fit that model (missing, unexpected or of another shape) are one line naming
    ``source`` (the checkpoint file) and what does not fit.
    """
    cfg, weights = ckpt["config"], ckpt["model"]
    first = weights.get("backbone.trunk.0.weight")
    if first is None or first.ndim != 4:
        raise InputError(f"{source}: its weights have no backbone.trunk.0.weight convolution")
    model = build_model(
        cfg.model,
        len(ckpt["class_names"]),
        None,
        cfg.dropout,
        in_chans=int(first.shape[1]),
        **cfg.aggregator_options(),
    )
    problem = _misfit(model.state_dict(), weights)
    if problem:
        raise InputError(f"{source}: its weights do not fit a {cfg.model} model ({problem})")
    model.load_state_dict(weights)
    return model.to(device).eval()


def _misfit(expected: dict[str, torch.Tensor], given: dict[str, Any]) -> str:
    """What of ``given`` does not fit ``expected`` (empty if it fits): missing, unexpected, reshaped."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} {list(given[k].shape)} for {list(v.shape)}"
        for k, v in expected.items()
        if k in given and tuple(getattr(given[k], "shape", ())) != tuple(v.shape)
    ]
    parts = [
        f"{len(found)} {what}, e.g. {found[0]}"
        for what, found in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
        if found
    ]
    return "; ".join(parts)


def check_resumable(
    path: Path, ckpt: dict[str, Any], cfg: TrainConfig, store: Any, amp: torch.dtype | None
) -> None:
    """Everything a resumption from ``ckpt`` must agree on, each refusal one line naming the file.

    The configuration (apart from ``TrainConfig.RESUMABLE_CHANGES``), the autocast type, and the bag store
    (classes, and the fingerprint of its bags, splits and labels: checkpoints written before it was
    recorded are checked on the class names only). Another CPU thread count is accepted with a warning:
    reductions then sum in another order, so the result is close to an uninterrupted run, not identical.
    """
    saved = ckpt["config"]
    differ = [
        f"{f.name} {getattr(saved, f.name)!r} -> {getattr(cfg, f.name)!r}"
        for f in fields(TrainConfig)
        if f.name not in TrainConfig.RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(cfg, f.name)
    ]
    if differ:
        raise InputError(f"{path}: cannot resume with a different configuration ({'; '.join(differ)})")
    if ckpt.get("amp", str(amp)) != str(amp):
        raise InputError(
            f"{path}: trained with autocast {ckpt['amp']}, this device gives {amp}; "
            "resume with the same --amp and device type"
        )
    if ckpt["class_names"] != store.class_names:
        raise InputError(f"{path}: classes {ckpt['class_names']} differ from the store's {store.class_names}")
    recorded = (ckpt.get("store_attrs") or {}).get("fingerprint")
    if recorded is not None and recorded != store.fingerprint:
        raise InputError(
            f"{path}: trained on another bag store than {store.path} (same classes, but other bags, splits "
            "or labels); resume on the store it was trained on, or start a new run"
        )
    if ckpt.get("threads", torch.get_num_threads()) != torch.get_num_threads():
        log.warning(
            "%s was trained with %d CPU threads, resumed with %d: CPU reductions then sum in another order, "
            "so the result is close to, but not bit-identical with, an uninterrupted run",
            path,
            ckpt["threads"],
            torch.get_num_threads(),
        )


def capture_rng(model: nn.Module, device: torch.device) -> dict[str, Any]:
    """This process's random generators (torch, CUDA, NumPy's and Python's global ones, and those of
    :class:`~hamil.models.registry.Stochastic` modules, e.g. RAMIL's pairing order) as checkpoint-safe
    values."""
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
        "modules": {name: m.rng_state() for name, m in model.named_modules() if isinstance(m, Stochastic)},
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

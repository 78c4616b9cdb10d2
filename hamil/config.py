"""The training configuration: one dataclass, saved inside every checkpoint."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from preprocessing.errors import InputError
from preprocessing.options import opt

SCHEDULES = ("constant", "cosine", "plateau")
#: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:N``, ``mps``
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
AMP_MODES = ("auto", "bf16", "fp16", "off")
MONITORS = ("macro_auc", "macro_f1", "micro_f1", "loss")


@dataclass
class TrainConfig:
    """Everything that defines a training run (paths, model, optimisation, seeds)."""

    store: str = opt(help="the bag store to train on (data/processed/<ds>.zarr)")
    out_dir: str = opt(help="the run folder (best.pt, last.pt, history.csv)")
    model: str = opt("hamil", "a model of the registry (hamil, hamil_a, ramil, mean, max, sum, si, ...)")
    model_options: dict[str, Any] = opt({}, 'aggregator options as JSON, e.g. {"depth": 2, "kernel_size": 7}')
    pretrained: str | None = opt(
        None, "backbone weights: none (random), imagenet, or a ResNet18 state_dict file"
    )
    dropout: float = opt(0.0, "dropout before the linear head")
    seed: int = opt(0, "seed of initialisation, batches, instance subsets and augmentation")
    epochs: int = opt(30, "epochs at most (early stopping may end sooner)")
    batch_bags: int = opt(8, "bags per batch (the global batch with several GPUs); the paper: 8, BDGP 32")
    lr: float = opt(1e-4, "Adam learning rate (the paper: 1e-4)")
    weight_decay: float = opt(0.0, "Adam weight decay")
    schedule: str = opt(
        "constant", "learning-rate schedule", choices=SCHEDULES
    )  # constant (the paper), cosine (to 0 at the last epoch) or plateau (halved on a flat monitor)
    max_instances: int | None = opt(None, "random subset of at most this many instances per bag and step")
    augment: bool = opt(True, "augment training bags (flips/rotations with flip_rotate, intensity jitter)")
    flip_rotate: bool = opt(
        True, "with augment: random flips and 90-degree rotations (turn off where orientation matters)"
    )
    jitter: float = opt(
        0.1, "with augment: intensity jitter strength (contrast 1 ± s, brightness ± s/2); 0 off"
    )
    accumulate: int = opt(1, "batches whose gradients are summed before each optimizer step")
    amp: str = opt(
        "auto", "autocast: auto (bf16, else fp16, on CUDA; off on CPU), bf16, fp16 or off", choices=AMP_MODES
    )
    monitor: str = opt(
        "macro_f1", "validation score for best.pt, early stopping and plateau", choices=MONITORS
    )
    patience: int | None = opt(10, "epochs without improvement before stopping (none: never)")
    num_workers: int = opt(0, "DataLoader worker processes")
    device: str = opt("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")
    threads: int | None = opt(None, "torch CPU threads (default: all cores)")
    freeze_batch_norm: bool = opt(
        False, "batch norm keeps its running statistics in training (small batches)"
    )
    sync_batch_norm: bool = opt(True, "with several CUDA ranks, batch statistics over the global batch")
    tensorboard: bool = opt(False, "also log to <out_dir>/tensorboard (needs the tensorboard package)")
    deterministic: bool = opt(
        False, "deterministic GPU kernels (slower): bit-identical GPU reruns and resumes; no effect on CPU"
    )

    # Fields that may differ between a run and its resumption (they do not change the computation).
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = (
        "store",
        "out_dir",
        "patience",
        "num_workers",
        "device",
        "threads",
        "tensorboard",
    )

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_bags": self.batch_bags >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "dropout": 0 <= self.dropout < 1,
            "jitter": 0 <= self.jitter < 1,  # contrast 1 - jitter must stay positive
            "accumulate": self.accumulate >= 1,
            "patience": self.patience is None or self.patience >= 1,
            "max_instances": self.max_instances is None or self.max_instances >= 1,
            "num_workers": self.num_workers >= 0,
            "schedule": self.schedule in SCHEDULES,
            "amp": self.amp in AMP_MODES,
            "monitor": self.monitor in MONITORS,
            "threads": valid_threads(self.threads),
            "device": valid_device(self.device),
        }
        check_options(checks, self, "training option")
        if not isinstance(self.model_options, dict) or not all(
            isinstance(k, str) for k in self.model_options
        ):
            raise InputError(
                f"model_options must be a JSON object of option names, got {self.model_options!r}"
            )

    def aggregator_options(self) -> dict[str, Any]:
        """``model_options`` plus the run's seed for RAMIL's pairing-order generator."""
        options = dict(self.model_options)
        if self.model == "ramil":
            options.setdefault("seed", self.seed)
        return options

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys with their names."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**data)


def check_options(checks: dict[str, bool], values: Any, what: str = "option") -> None:
    """Raise one :class:`InputError` naming every field of ``values`` whose check failed."""
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise InputError(f"invalid {what}(s): " + ", ".join(f"{n}={getattr(values, n)!r}" for n in bad))


def valid_threads(threads: int | None) -> bool:
    """``None`` (all cores) or a positive thread count."""
    return threads is None or threads >= 1


def valid_device(name: str) -> bool:
    """A device name that :func:`hamil.runtime.select_device` accepts (CUDA presence is checked there)."""
    return DEVICE_NAME.fullmatch(name) is not None

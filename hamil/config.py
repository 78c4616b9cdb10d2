"""The training configuration: one dataclass, saved inside every checkpoint."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from preprocessing.errors import InputError

SCHEDULES = ("constant", "cosine", "plateau")
#: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:N``, ``mps``
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
AMP_MODES = ("auto", "bf16", "fp16", "off")
MONITORS = ("macro_auc", "macro_f1", "micro_f1", "loss")


@dataclass
class TrainConfig:
    """Everything that defines a training run (paths, model, optimisation, seeds)."""

    store: str
    out_dir: str
    model: str = "hamil"
    model_options: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    dropout: float = 0.0
    seed: int = 0
    epochs: int = 30
    batch_bags: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant" (the paper), "cosine" (to 0 at the last epoch) or "plateau"
    max_instances: int | None = None
    augment: bool = True  # random flips / 90° rotations per instance
    jitter: float = 0.1  # intensity jitter strength with augment (contrast 1 ± s, brightness ± s/2); 0: off
    accumulate: int = 1  # batches whose gradients are summed before each optimizer step
    amp: str = (
        "auto"  # "auto" (bf16, or fp16 without bf16 support, on CUDA; off on CPU), "bf16", "fp16", "off"
    )
    monitor: str = "macro_f1"  # validation score for best.pt, early stopping and the plateau schedule
    patience: int | None = 10  # epochs without improvement before stopping (None: never)
    num_workers: int = 0
    device: str = "auto"
    threads: int | None = None
    freeze_batch_norm: bool = False  # batch norm keeps its running statistics in training (small batches)
    sync_batch_norm: bool = True  # with several CUDA ranks, batch statistics over the global batch
    tensorboard: bool = False  # also log to <out_dir>/tensorboard (needs the tensorboard package)
    # deterministic GPU kernels (no TF32, no atomics-based reductions; slower): on one GPU, reruns and
    # resumed runs give identical results, as on the CPU, where this changes nothing
    deterministic: bool = False

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

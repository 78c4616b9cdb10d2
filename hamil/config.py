"""The training configuration: one dataclass, saved inside every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


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
    augment: bool = True
    monitor: str = "macro_auc"
    patience: int | None = None
    num_workers: int = 0
    device: str = "auto"
    threads: int | None = None

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
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**data)

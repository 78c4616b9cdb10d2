"""Where and how a process runs: seeds, the device, and the process group of multi-process training.

With one process nothing is initialised and every collective is the identity, so the training loop has
one code path for CPU, one GPU and ``torchrun --nproc-per-node G`` (NCCL on GPUs, gloo on the CPU).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from preprocessing.errors import InputError

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (seeds third-party code that uses the legacy global RNG)
    torch.manual_seed(seed)


def select_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; an explicit CUDA request without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"device {name!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available")
    return device


def set_deterministic(on: bool) -> None:
    """Deterministic kernels (``torch.use_deterministic_algorithms``) and no TF32, or PyTorch's defaults.

    cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` for deterministic matrix products; it is set here when unset
    (before the first cuBLAS call of the process). An operation without a deterministic kernel then raises.
    """
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = not on
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given (``None``: torch's default, all cores)."""
    if threads:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class DistContext:
    """Rank and world size of this process (``world == 1``: not distributed) and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of ``values`` over ranks, on the CPU (identity with one process)."""
        if self.world == 1:
            return values
        out = values.to(self.device)  # NCCL reduces device tensors
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.cpu()

    def sum_on_device(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of device ``values`` over ranks, left on the device (no host synchronisation)."""
        if self.world == 1:
            return values
        out = values.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` as a list in rank order (pickled; ``[obj]`` with one process)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` of rank 0 on every rank, on the CPU (identity with one process)."""
        if self.world == 1:
            return values
        out = values.to(self.device)
        dist.broadcast(out, src=0)
        return out.cpu()


def setup_distributed(
    device_name: str = "auto", timeout_s: float = 1800.0
) -> tuple[DistContext, torch.device, bool]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), else run as one process.

    Backend NCCL with one GPU per rank (``LOCAL_RANK``) when CUDA is used, gloo on CPU. The flag says
    whether this call joined the group (and so should leave it).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = select_device(device_name)
    if world <= 1:
        return DistContext(device=device), device, False
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        if "LOCAL_RANK" not in os.environ:
            raise InputError("WORLD_SIZE > 1 without LOCAL_RANK: launch with torchrun (one GPU per process)")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    log.info("rank %d of %d on %s (%s)", rank, world, device, backend)
    return DistContext(rank, world, device), device, joined


def cleanup_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()

"""Multi-process training: the process group set up from ``torchrun``'s environment, and a batch sampler
that gives every rank about the same number of instances (not bags) of each global batch.

With one process nothing is initialised and every collective is the identity, so the training loop has
one code path for CPU, one GPU and ``torchrun --nproc-per-node G``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from hamil.seeding import select_device

log = logging.getLogger(__name__)


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
            raise ValueError("WORLD_SIZE > 1 without LOCAL_RANK: launch with torchrun (one GPU per process)")
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


def balance_instances(sizes: Sequence[int], world: int) -> list[list[int]]:
    """Split positions ``0..len(sizes)-1`` into ``world`` parts with near-equal total size.

    Longest-processing-time rule: largest bag first, each to the part with the fewest instances so far
    (ties: lowest rank). Positions inside a part keep their input order. Every part is non-empty when
    ``len(sizes) >= world``.
    """
    parts: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for pos in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(world), key=lambda r: (load[r], len(parts[r]), r))
        parts[target].append(pos)
        load[target] += int(sizes[pos])
    return [sorted(p) for p in parts]


class InstanceBalancedBatchSampler(Sampler[list[int]]):
    """Global batches of ``batch_bags`` bags, each split over ``world`` ranks by instance count.

    The global batches are the same on every rank (drawn from ``(seed, epoch)``), so one process with
    ``world=1`` sees exactly the union of what the ranks see. A last global batch with fewer bags than
    ranks is merged into the one before it so that no rank is ever idle. Call :meth:`set_epoch` before
    each epoch.
    """

    def __init__(
        self,
        sizes: Sequence[int] | np.ndarray,
        batch_bags: int,
        world: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if len(sizes) < world:
            raise ValueError(f"{len(sizes)} bags cannot be shared by {world} ranks")
        if batch_bags < max(world, 1):
            raise ValueError(
                f"batch_bags is the global batch and must be at least the number of ranks ({world})"
            )
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.batch_bags = batch_bags
        self.world, self.rank = world, rank
        self.shuffle, self.seed = shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """The epoch's global batches (dataset positions), identical on every rank."""
        n = len(self.sizes)
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        )
        batches = [order[i : i + self.batch_bags].tolist() for i in range(0, n, self.batch_bags)]
        if len(batches) > 1 and len(batches[-1]) < self.world:
            batches[-2].extend(batches.pop())
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            part = balance_instances(self.sizes[batch].tolist(), self.world)[self.rank]
            yield [batch[i] for i in part]

    def __len__(self) -> int:
        full, rest = divmod(len(self.sizes), self.batch_bags)
        return full + (1 if rest and (rest >= self.world or full == 0) else 0)

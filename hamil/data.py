"""Torch data loading from the bag store: one item per bag, batches packed without padding.

The dataset (:class:`BagDataset`), the augmentations keyed by ``(seed, epoch, bag)``, the packing collate,
and both batch samplers: the evaluation one (bags in order) and :class:`InstanceBalancedBatchSampler`,
which gives every rank about the same number of instances (not bags) of each global batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from preprocessing.store import BagStore


class BagDataset(Dataset):
    """Bags of a store as ``(patches uint8 (n, C, H, W), labels float (K,), bag index)``.

    ``max_instances`` caps the instances per bag (a random subset, in store order); ``augment`` applies a
    random flip / 90° rotation to each instance. Patches stay uint8 here: the float conversion (and the
    intensity jitter) happen late, on the training device.

    Keys are dataset positions, or ``(position, epoch)`` pairs as :func:`make_loader`'s training sampler
    yields them: the random draws then come from ``(seed, epoch, bag)`` alone, so they do not depend on
    worker processes, their order, or where a resumed run restarted.
    """

    def __init__(
        self,
        store: BagStore | str | os.PathLike[str],
        bags: Sequence[int] | np.ndarray,
        max_instances: int | None = None,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self.store = store if isinstance(store, BagStore) else BagStore(store)
        self.bags = np.asarray(bags, dtype=np.int64)
        self.max_instances = max_instances
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.bags)

    def instance_counts(self) -> np.ndarray:
        """Instances each item yields (bag sizes capped by ``max_instances``), ``(len(self),)``."""
        sizes = self.store.bag_sizes()[self.bags]
        return np.minimum(sizes, self.max_instances) if self.max_instances is not None else sizes

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        bag = int(self.bags[i])
        rng = np.random.default_rng([self.seed, epoch, bag])
        n = int(self.store.bag_offsets[bag + 1] - self.store.bag_offsets[bag])
        subset = None
        if self.max_instances is not None and n > self.max_instances:
            subset = rng.permutation(n)[: self.max_instances]
        patches = torch.from_numpy(np.ascontiguousarray(self.store.patches(bag, subset)))  # (n, C, H, W)
        if self.augment:
            patches = random_dihedral(patches, rng)
        labels = torch.from_numpy(self.store.labels[bag].astype(np.float32))  # (K,)
        return patches, labels, bag


def random_dihedral(patches: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Apply a random flip/rotation, drawn independently from ``rng``, to each patch of ``(n, C, H, W)``.

    Square patches get one of the 8 symmetries of the square; non-square ones (whole images) one of the
    4 that keep their shape (none, horizontal flip, vertical flip, both).
    """
    if patches.shape[-1] != patches.shape[-2]:
        ops = rng.integers(0, 4, patches.shape[0]).tolist()
        flips = [[d for d, bit in ((-1, 1), (-2, 2)) if op & bit] for op in ops]
        out = [p.flip(dims) if dims else p for p, dims in zip(patches, flips, strict=True)]
    else:
        ops = rng.integers(0, 8, patches.shape[0]).tolist()
        out = [
            torch.rot90(p.flip(-1) if op >= 4 else p, op % 4, dims=(-2, -1))
            for p, op in zip(patches, ops, strict=True)
        ]
    return torch.stack(out) if out else patches


def jitter_factors(
    seed: int, epoch: int, bags: Sequence[int], sizes: Sequence[int], strength: float
) -> torch.Tensor:
    """Per-instance ``(contrast, brightness)`` ``(N, 2)`` for a batch, drawn from ``(seed, epoch, bag)``.

    Contrast is uniform in ``1 ± s`` and brightness in ``± s / 2`` (``s`` = ``strength``). Keyed like the
    other augmentation draws, so they do not depend on ranks, workers or where a run resumed.
    """
    draws = [
        np.random.default_rng([seed, epoch, int(bag), 1]).uniform(-1.0, 1.0, (int(n), 2))
        for bag, n in zip(bags, sizes, strict=True)
    ]
    unit = torch.from_numpy(np.concatenate(draws) if draws else np.zeros((0, 2))).float()  # (N, 2)
    return unit * torch.tensor([strength, strength / 2]) + torch.tensor([1.0, 0.0])


def intensity_jitter(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float in [0, 1], times ``factors[:, 0]`` plus ``factors[:, 1]``.

    Runs on the images' device, after the late uint8 -> float conversion.
    """
    n = images.shape[0]
    factors = factors.to(images.device)
    x = images.float() / 255.0  # (N, C, H, W)
    return (x * factors[:, 0].view(n, 1, 1, 1) + factors[:, 1].view(n, 1, 1, 1)).clamp_(0.0, 1.0)


def collate_bags(
    items: Sequence[tuple[torch.Tensor, torch.Tensor, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack bags into ``images (N, C, P, P)``, ``bag_sizes (B,)``, ``labels (B, K)``, ``bag_index (B,)``."""
    images = torch.cat([it[0] for it in items])
    sizes = torch.tensor([len(it[0]) for it in items], dtype=torch.long)
    labels = torch.stack([it[1] for it in items])
    index = torch.tensor([it[2] for it in items], dtype=torch.long)
    return images, sizes, labels, index


def make_loader(
    dataset: BagDataset,
    batch_bags: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    world: int = 1,
    rank: int = 0,
) -> DataLoader:
    """A DataLoader of bag batches packed without padding.

    Training (``shuffle``): an :class:`InstanceBalancedBatchSampler` whose batches and
    augmentation draws derive from ``(seed, epoch)``; call ``loader.batch_sampler.set_epoch(e)`` before
    each epoch. ``world``/``rank`` give each process its instance-balanced share of every global batch.
    Evaluation: the bags in order, ``batch_bags`` at a time.
    """
    if shuffle:
        batch_sampler: Any = _EpochKeys(
            InstanceBalancedBatchSampler(dataset.instance_counts(), batch_bags, world, rank, True, seed)
        )
    else:
        batch_sampler = BatchSampler(SequentialSampler(range(len(dataset))), batch_bags, drop_last=False)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_bags,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # its own generator: creating an iterator draws a worker seed, which must not consume the global
        # generator (that would make dropout depend on the number of workers)
        generator=torch.Generator().manual_seed(seed),
    )


class _EpochKeys(Sampler[list[tuple[int, int]]]):
    """Tag every position of a batch sampler with the epoch: ``(position, epoch)`` dataset keys."""

    def __init__(self, sampler: InstanceBalancedBatchSampler) -> None:
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [(i, epoch) for i in batch]

    def __len__(self) -> int:
        return len(self.sampler)


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

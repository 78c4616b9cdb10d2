"""Torch data loading from the bag store: one item per bag, batches packed without padding."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from preprocessing.store import BagStore


class BagDataset(Dataset):
    """Bags of a store as ``(patches uint8 (n, C, P, P), labels float (K,), bag index)``.

    ``max_instances`` caps the instances per bag (a random subset, in store order); ``augment`` applies a
    random flip / 90° rotation to each instance. Randomness comes from torch's global generator, which
    DataLoader seeds per worker, so runs are reproducible for a seed.
    """

    def __init__(
        self,
        store: BagStore | str | os.PathLike[str],
        bags: Sequence[int] | np.ndarray,
        max_instances: int | None = None,
        augment: bool = False,
    ) -> None:
        self.store = store if isinstance(store, BagStore) else BagStore(store)
        self.bags = np.asarray(bags, dtype=np.int64)
        self.max_instances = max_instances
        self.augment = augment

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        bag = int(self.bags[i])
        n = int(self.store.bag_offsets[bag + 1] - self.store.bag_offsets[bag])
        subset = None
        if self.max_instances is not None and n > self.max_instances:
            subset = torch.randperm(n)[: self.max_instances].numpy()
        patches = torch.from_numpy(np.ascontiguousarray(self.store.patches(bag, subset)))  # (n, C, P, P)
        if self.augment:
            patches = random_dihedral(patches)
        labels = torch.from_numpy(self.store.labels[bag].astype(np.float32))  # (K,)
        return patches, labels, bag


def random_dihedral(patches: torch.Tensor) -> torch.Tensor:
    """Apply a random flip/rotation, drawn independently, to each patch of ``(n, C, H, W)``.

    Square patches get one of the 8 symmetries of the square; non-square ones (whole images) one of the
    4 that keep their shape (none, horizontal flip, vertical flip, both).
    """
    if patches.shape[-1] != patches.shape[-2]:
        ops = torch.randint(0, 4, (patches.shape[0],)).tolist()
        flips = [[d for d, bit in ((-1, 1), (-2, 2)) if op & bit] for op in ops]
        out = [p.flip(dims) if dims else p for p, dims in zip(patches, flips, strict=True)]
    else:
        ops = torch.randint(0, 8, (patches.shape[0],)).tolist()
        out = [
            torch.rot90(p.flip(-1) if op >= 4 else p, op % 4, dims=(-2, -1))
            for p, op in zip(patches, ops, strict=True)
        ]
    return torch.stack(out) if out else patches


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
) -> DataLoader:
    """A DataLoader of bag batches; shuffling and worker seeds derive from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_bags,
        shuffle=shuffle,
        collate_fn=collate_bags,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=generator,
        persistent_workers=num_workers > 0,
    )

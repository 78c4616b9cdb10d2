"""The bag stage: choose classes, cut groups into bags, split by group, write the bag store.

Splits are per group. A ``split`` column in the patch tables (carried from the user's table through
``images.tsv``; ``train``, ``val`` or ``test``, any case; empty: none) fixes the split of the groups whose
rows give one: those splits are final, and a group whose rows give two splits is refused. The groups
without one are drawn into train/val/test by ``split_ratio`` (e.g. a table that gives ``test`` for the test
groups and leaves the others empty, with ``split_ratio: [4, 1, 0]``, draws a validation part out of the
rest). A group with more than ``max_bag_size`` instances is cut into several bags, each with the group's
labels (as the paper does for HPA proteins); a part may then miss the instances that carry a label.
``max_bag_size: null`` keeps every group whole (training then sub-samples with ``max_instances``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from preprocessing.errors import InputError
from preprocessing.io import BOX_COLUMNS, PATCH_COLUMNS, read_table, split_labels, write_json, write_tsv
from preprocessing.options import opt
from preprocessing.store import CODECS, SPLITS, check_patches, write_bag_store

SPLIT_COLUMN = "split"  # optional column of the patch tables: the group's own split (train, val, test)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BagParams:
    """Parameters of the bag stage (the ``bags`` section of the config); checked on creation."""

    top_k: int = opt(10, "keep the labels carried by the most groups, this many (unless classes is given)")
    classes: tuple[str, ...] | None = opt(None, "explicit class list; overrides top_k")
    keep_unlabelled: bool = opt(False, "keep groups without any kept label, as negative bags")
    max_bag_size: int | None = opt(
        32,
        "cut larger groups into bags of at most this many instances, each with the group's labels "
        "(none: one bag per group)",
    )
    split_ratio: tuple[float, float, float] = opt(
        (4.0, 1.0, 5.0), "train, val, test proportions for the groups without a split of their own"
    )
    seed: int = opt(0, "seed of the group split and of the bag cutting")
    codec: str = opt("lz4", "patch compression in the bag store: lz4 (fast reads), zstd (smallest) or none")

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise InputError(f"top_k must be >= 1, got {self.top_k}")
        if self.max_bag_size is not None and self.max_bag_size < 1:
            raise InputError(f"max_bag_size must be >= 1, got {self.max_bag_size}")
        ratio = np.asarray(self.split_ratio, dtype=np.float64)
        if ratio.shape != (3,) or (ratio < 0).any() or ratio.sum() <= 0:
            raise InputError(f"split ratio must be three non-negative numbers, got {list(self.split_ratio)}")
        if self.seed < 0:
            raise InputError(f"seed must be >= 0, got {self.seed}")
        if self.codec not in CODECS:
            raise InputError(f"codec must be one of {', '.join(CODECS)}, got {self.codec!r}")


def select_classes(group_labels: Mapping[str, Sequence[str]], top_k: int) -> list[str]:
    """The ``top_k`` labels carried by the most groups; ties broken by name for determinism."""
    counts = Counter(label for labels in group_labels.values() for label in set(labels))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [label for label, _ in ranked[:top_k]]


def split_groups(groups: Iterable[str], ratio: Sequence[float], seed: int) -> dict[str, int]:
    """Assign each group to a split (0 train, 1 val, 2 test) in proportion to ``ratio``.

    Groups are sorted, shuffled with ``seed`` and cut by largest remainders, so the result depends only on
    the set of groups and the seed. ``ratio`` is three non-negative numbers with a positive sum (as
    :class:`BagParams` checks).
    """
    names = sorted(set(groups))
    ratio = np.asarray(ratio, dtype=np.float64)
    exact = ratio / ratio.sum() * len(names)
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: len(names) - counts.sum()]:
        counts[i] += 1
    order = np.random.default_rng(seed).permutation(len(names))
    assignment = np.repeat(np.arange(3), counts)
    return {names[i]: int(assignment[k]) for k, i in enumerate(order)}


def cut_group(n: int, max_bag_size: int | None, group: str, seed: int) -> list[np.ndarray]:
    """Split a group's ``n`` instances into ``ceil(n / max_bag_size)`` near-equal bags (sizes differ by ≤ 1).

    Instances are shuffled with a generator seeded by ``seed`` and the group name (stable across runs
    and Python versions); each bag's indices are returned sorted. ``max_bag_size`` ``None``: one bag.
    """
    if max_bag_size is None or n <= max_bag_size:
        return [np.arange(n)]
    rng = np.random.default_rng([seed, zlib.crc32(group.encode())])
    parts = np.array_split(rng.permutation(n), math.ceil(n / max_bag_size))
    return [np.sort(p) for p in parts]


def build_bags(
    shard_tables: Sequence[str | os.PathLike[str]],
    shard_stores: Sequence[str | os.PathLike[str]],
    dest_store: str | os.PathLike[str],
    dest_table: str | os.PathLike[str],
    params: BagParams,
    source: str,
    workers: int = 1,
) -> dict[str, Any]:
    """Gather the patch shards of a dataset into one bag store and a readable ``bags.tsv``.

    Returns (and writes beside ``dest_table`` as ``bags.json``) counts of bags, patches and dropped groups,
    of the groups that came with a split of their own (``groups_with_given_split``, per split in
    ``groups_given_per_split``) and of the groups cut into several bags (``groups_cut``, giving
    ``bags_from_cut_groups`` bags).
    """
    if len(shard_tables) != len(shard_stores):
        raise ValueError("one table per shard store is required")
    patches = _read_patch_tables(shard_tables)
    if patches.empty:
        raise InputError(f"{shard_tables[0]}: no patches in any shard")
    group_labels = {
        g: split_labels(s) for g, s in patches.groupby("group", sort=True)["labels"].first().items()
    }
    classes, kept = _choose_classes(group_labels, params, str(shard_tables[0]))
    given = {g: s for g, s in given_splits(patches, shard_tables).items() if g in kept}
    bags, picked = _cut_bags(patches, kept, group_labels, params, given)
    cut = _log_splits_and_cuts(bags, kept, given, params)
    labels = np.array([[c in set(ls) for c in classes] for ls in bags["all_labels"]], dtype=np.uint8)
    for shard in shard_stores:  # every chunk file there as written (a lost one would read as zeros)
        check_patches(shard, zarr.open_group(Path(shard), mode="r").attrs, verify=True)
    sources = [zarr.open_array(Path(s) / "patches", mode="r") for s in shard_stores]
    attrs = {
        "class_names": classes,
        "source": source,
        "params": _jsonable(asdict(params)),
        "crop": shard_crop_params(shard_stores),
        # how the fields were read (the acquire stage's read.json, through the shards) and their pixel sizes
        "read": zarr.open_group(Path(shard_stores[0]), mode="r").attrs.get("read"),
        "pixel_sizes_um": pixel_sizes(patches),
    }
    write_bag_store(
        dest_store,
        sources,
        picks=picked[["shard", "patch_index"]].to_numpy(dtype=np.int64),
        bag_offsets=np.concatenate([[0], np.cumsum(bags["n_patches"].to_numpy())]),
        labels=labels,
        split=bags["split"].to_numpy(dtype=np.int8),
        group=bags["group"].tolist(),
        bag_id=bags["bag_id"].tolist(),
        source_image=picked["image_id"].tolist(),
        box=picked[list(BOX_COLUMNS)].to_numpy(dtype=np.int64),
        attrs=attrs,
        codec=params.codec,
        workers=workers,
    )
    write_tsv(_bags_table(bags, labels, classes), dest_table)
    stats = {
        "classes": classes,
        "bags": len(bags),
        "patches": len(picked),
        "groups": len(kept),
        "groups_dropped_without_label": len(group_labels) - len(kept),
        "groups_without_patches": groups_without_patches(shard_tables, set(group_labels)),
        "groups_with_given_split": len(given),
        "groups_given_per_split": {s: sum(v == i for v in given.values()) for i, s in enumerate(SPLITS)},
        **cut,
        "bags_per_split": {s: int((bags["split"] == i).sum()) for i, s in enumerate(SPLITS)},
        "instances_per_split": {
            s: int(bags.loc[bags["split"] == i, "n_patches"].sum()) for i, s in enumerate(SPLITS)
        },
    }
    write_json(stats, Path(dest_table).with_name("bags.json"))
    return stats


def _choose_classes(
    group_labels: Mapping[str, Sequence[str]], params: BagParams, origin: str
) -> tuple[list[str], set[str]]:
    """The classes (explicit, else the ``top_k``) and the groups kept (those carrying one, or all with
    ``keep_unlabelled``). :class:`InputError` naming ``origin`` when no class or no group is left."""
    classes = list(params.classes) if params.classes else select_classes(group_labels, params.top_k)
    if not classes:
        raise InputError(f"{origin}: no labels found, cannot choose classes")
    wanted = set(classes)
    kept = {g for g, labels in group_labels.items() if params.keep_unlabelled or set(labels) & wanted}
    if not kept:
        seen = sorted({label for labels in group_labels.values() for label in labels})
        shown = ", ".join(seen[:10]) + (f", ... ({len(seen)} in all)" if len(seen) > 10 else "")
        raise InputError(
            f"{origin}: no group carries any of the classes {', '.join(classes)} "
            f"(labels seen: {shown or 'none'})"
        )
    return classes, kept


def given_splits(patches: pd.DataFrame, tables: Sequence[str | os.PathLike[str]]) -> dict[str, int]:
    """The groups' own splits from the ``split`` column of the patch rows: {group: 0 train, 1 val, 2 test}.

    Values are case-insensitive; empty cells (or no column) give none. Groups whose rows give no split
    are left out; a group with some rows empty takes the split its other rows give. :class:`InputError`
    with one line: naming the table and line of an invalid value, or a group whose rows give two splits.
    ``patches`` holds the rows of ``tables`` with the columns ``shard`` and ``_line`` (as read here).
    """
    if SPLIT_COLUMN not in patches.columns:
        return {}
    values = patches[SPLIT_COLUMN].fillna("").astype(str).str.strip().str.lower()
    bad = np.flatnonzero(~values.isin(["", *SPLITS]).to_numpy())
    if len(bad):
        row = patches.iloc[bad[0]]
        raise InputError(
            f"{tables[int(row['shard'])]}: line {int(row['_line'])}: split must be train, val, test or "
            f"empty, got {row[SPLIT_COLUMN]!r}" + (f" ({len(bad)} such rows)" if len(bad) > 1 else "")
        )
    named = values != ""
    per_group = values[named].groupby(patches.loc[named, "group"], sort=True).unique()
    for group, splits in per_group.items():
        if len(splits) > 1:
            shown = " and ".join(sorted(splits, key=SPLITS.index))
            shard = int(patches.loc[patches["group"] == group, "shard"].iloc[0])
            raise InputError(
                f"{tables[shard]}: group {group!r} straddles splits {shown}: all rows of a group must "
                "give one split, or none"
            )
    partial = sorted(set(patches.loc[~named, "group"]) & set(per_group.index))
    if partial:
        log.warning(
            "bags: %d group(s) give a split on only some of their rows, e.g. %r: the other rows take it",
            len(partial),
            partial[0],
        )
    return {str(g): SPLITS.index(s[0]) for g, s in per_group.items()}


def _log_splits_and_cuts(
    bags: pd.DataFrame, kept: set[str], given: Mapping[str, int], params: BagParams
) -> dict[str, int]:
    """Log how many groups came with their own split and how many were cut into several bags; return the
    latter counts for ``bags.json`` (``groups_cut``, ``bags_from_cut_groups``)."""
    per_split = Counter(given.values())
    log.info(
        "bags: %d of %d groups came with a split (train %d, val %d, test %d); %d drawn by split_ratio %s",
        len(given),
        len(kept),
        per_split[0],
        per_split[1],
        per_split[2],
        len(kept) - len(given),
        list(params.split_ratio),
    )
    per_group = bags["group"].value_counts()
    cut = per_group[per_group > 1]
    if params.max_bag_size is None:
        log.info(
            "bags: max_bag_size none: every group is one bag (the largest has %d instances)",
            int(bags["n_patches"].max()),
        )
    elif len(cut):
        log.info(
            "bags: %d of %d groups had more than max_bag_size %d instances and were cut into %d bags, each "
            "with its group's labels (a part may miss the instances that carry a label; max_bag_size: null "
            "keeps groups whole)",
            len(cut),
            len(kept),
            params.max_bag_size,
            int(cut.sum()),
        )
    return {"groups_cut": len(cut), "bags_from_cut_groups": int(cut.sum())}


def _cut_bags(
    patches: pd.DataFrame,
    kept: set[str],
    group_labels: Mapping[str, Sequence[str]],
    params: BagParams,
    given: Mapping[str, int],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the kept groups (``given`` splits are final, the others drawn by ``split_ratio``) and cut each
    into bags: (one row per bag: ``bag_id, group, split, n_patches, all_labels``; the patch rows in bag
    order)."""
    split_of = {**split_groups(kept - set(given), params.split_ratio, params.seed), **given}
    rows, picks = [], []
    for group, table in patches[patches["group"].isin(kept)].groupby("group", sort=True):
        for k, idx in enumerate(cut_group(len(table), params.max_bag_size, group, params.seed)):
            part = table.iloc[idx]
            rows.append((f"{group}#{k}", group, split_of[group], len(part), group_labels[group]))
            picks.append(part)
    bags = pd.DataFrame(rows, columns=["bag_id", "group", "split", "n_patches", "all_labels"])
    return bags, pd.concat(picks, ignore_index=True)


def _bags_table(bags: pd.DataFrame, labels: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """The readable ``bags.tsv``: one row per bag of the store, in store order."""
    return pd.DataFrame(
        {
            "bag_index": np.arange(len(bags)),
            "bag_id": bags["bag_id"],
            "group": bags["group"],
            "split": [SPLITS[s] for s in bags["split"]],
            "n_patches": bags["n_patches"],
            "labels": [";".join(c for c, on in zip(classes, row, strict=True) if on) for row in labels],
            "all_labels": [";".join(ls) for ls in bags["all_labels"]],
        }
    )


def pixel_sizes(patches: pd.DataFrame) -> list[list[float]]:
    """The distinct ``(x, y)`` pixel sizes (µm) of the patches' fields, from the folder source's columns
    (empty: not known; ``[]`` when no field says)."""
    if "pixel_size_um_x" not in patches.columns:
        return []
    pairs = patches[["pixel_size_um_x", "pixel_size_um_y"]].astype(str)
    known = {(float(x), float(y)) for x, y in pairs.itertuples(index=False) if x.strip() and y.strip()}
    return [list(p) for p in sorted(known)]


def groups_without_patches(shard_tables: Sequence[str | os.PathLike[str]], with_patches: set[str]) -> int:
    """How many groups the crop stage saw (its ``<shard>.json`` beside each table) that got no patch in any
    shard: their bags are gone; a warning names the count (0 when the shards record no groups)."""
    seen: set[str] = set()
    for table in shard_tables:
        stats = Path(table).with_suffix(".json")
        if stats.is_file():
            try:
                seen.update(json.loads(stats.read_text()).get("groups") or [])
            except (OSError, ValueError):
                continue  # stats are a report, not an input: an unreadable one only loses this count
    missing = len(seen - with_patches)
    if missing:
        log.warning(
            "%s: %d of %d groups got no patch in any shard (no cell found or nothing readable): they have "
            "no bag",
            Path(shard_tables[0]).parent,
            missing,
            len(seen),
        )
    return missing


def shard_crop_params(shard_stores: Sequence[str | os.PathLike[str]]) -> dict[str, Any] | None:
    """The crop parameters the shards were cut with (their ``params`` attribute), as a JSON-able dict.

    ``None`` when no shard carries any (shards not written by the crop stage). :class:`InputError`, naming
    the shards, when they differ or only some carry them: a bag store holds patches of one cropping.
    """
    found = {str(s): _jsonable(zarr.open_group(Path(s), mode="r").attrs.get("params")) for s in shard_stores}
    distinct = {json.dumps(v, sort_keys=True) for v in found.values()}
    if len(distinct) > 1:
        first = next(iter(found.values()))
        odd = [s for s, v in found.items() if v != first]
        raise InputError(
            f"patch shards were cropped with different parameters: {next(iter(found))} differs from "
            f"{', '.join(odd)}"
        )
    return next(iter(found.values()), None)


def _read_patch_tables(paths: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    tables = []
    for shard, path in enumerate(paths):
        table = read_table(path, PATCH_COLUMNS)
        table["shard"] = shard
        table["_line"] = np.arange(len(table)) + 2  # the line in the file (after the header)
        tables.append(table)
    out = pd.concat(tables, ignore_index=True)
    for col in ("patch_index", *BOX_COLUMNS):
        out[col] = pd.to_numeric(out[col], errors="raise").astype(np.int64)
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_jsonable(v) for v in obj]
    return obj

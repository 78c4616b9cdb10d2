"""Bag stage: class choice, bag cutting, group split, and the store round trip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from preprocessing.bags import BagParams, build_bags, cut_group, select_classes, split_groups
from preprocessing.errors import InputError
from preprocessing.store import BagStore


@given(n=st.integers(1, 500), cap=st.integers(1, 64), seed=st.integers(0, 10))
@settings(max_examples=200, deadline=None)
def test_cut_group_sizes_near_equal_and_complete(n, cap, seed):
    parts = cut_group(n, cap, "ENSG0001", seed)
    sizes = [len(p) for p in parts]
    assert max(sizes) <= cap and max(sizes) - min(sizes) <= 1
    assert len(parts) == -(-n // cap)
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    again = cut_group(n, cap, "ENSG0001", seed)
    assert all((a == b).all() for a, b in zip(parts, again, strict=True))


@given(n=st.integers(1, 300), seed=st.integers(0, 100))
@settings(max_examples=100, deadline=None)
def test_split_groups_ratio_and_determinism(n, seed):
    groups = [f"g{i}" for i in range(n)]
    split = split_groups(groups, (4, 1, 5), seed)
    counts = np.bincount(list(split.values()), minlength=3)
    assert counts.sum() == n
    assert np.abs(counts - np.array([0.4, 0.1, 0.5]) * n).max() < 1.0 + 1e-9
    assert split == split_groups(list(reversed(groups)), (4, 1, 5), seed)


def test_select_classes_counts_groups_and_breaks_ties_by_name():
    labels = {"g1": ["b", "a"], "g2": ["a"], "g3": ["c", "b"], "g4": ["d"]}
    assert select_classes(labels, 2) == ["a", "b"]
    assert select_classes(labels, 3) == ["a", "b", "c"]


def test_store_round_trip(tmp_path, two_shards):
    tables, stores, groups = two_shards
    params = BagParams(top_k=4, max_bag_size=10, seed=3)
    stats = build_bags(
        tables, stores, tmp_path / "ds.zarr", tmp_path / "ds" / "bags.tsv", params, "test", workers=2
    )
    store = BagStore(tmp_path / "ds.zarr")
    bags = pd.read_csv(tmp_path / "ds" / "bags.tsv", sep="\t", keep_default_na=False)

    assert store.class_names == ["A", "B", "C", "D"] or len(store.class_names) == 4
    assert stats["bags"] == store.num_bags == len(bags)
    assert (store.bag_sizes() <= 10).all() and (store.bag_sizes() >= 1).all()
    # every patch of every kept group is in exactly one bag, traced back to its shard row
    shard_tables = [pd.read_csv(t, sep="\t") for t in tables]
    shard_arrays = [zarr.open_array(s / "patches", mode="r")[:] for s in stores]
    seen = 0
    for b in range(store.num_bags):
        patches = store.patches(b)
        src, box = store.instance_info(b)
        assert patches.shape[1:] == (3, 8, 8) and patches.dtype == np.uint8
        assert src.shape == (len(patches),) and box.shape == (len(patches), 4)
        for patch, image_id, bx in zip(patches, src, box, strict=True):
            hits = [
                (k, i)
                for k, t in enumerate(shard_tables)
                for i in np.flatnonzero(
                    (t["image_id"] == image_id).to_numpy() & (t["x0"] == bx[0]).to_numpy()
                )
            ]
            assert any((shard_arrays[k][i] == patch).all() for k, i in hits)
        seen += len(patches)
        expected = {c for c in bags.loc[b, "all_labels"].split(";")} & set(store.class_names)
        assert {c for c, on in zip(store.class_names, store.labels[b], strict=True) if on} == expected
    assert seen == stats["patches"]
    # no group on two sides of the split
    assert bags.groupby("group")["split"].nunique().max() == 1
    # subset reads return the chosen instances
    big = int(np.argmax(store.bag_sizes()))
    assert (store.patches(big, np.array([2, 0])) == store.patches(big)[[0, 2]]).all()


def test_build_bags_is_deterministic(tmp_path, two_shards):
    tables, stores, _ = two_shards
    params = BagParams(top_k=3, max_bag_size=7, seed=5)
    for name in ("a", "b"):
        build_bags(tables, stores, tmp_path / f"{name}.zarr", tmp_path / name / "bags.tsv", params, "t")
    a, b = BagStore(tmp_path / "a.zarr"), BagStore(tmp_path / "b.zarr")
    assert (a.bag_offsets == b.bag_offsets).all() and (a.split == b.split).all()
    assert all((a.patches(i) == b.patches(i)).all() for i in range(a.num_bags))


def test_groups_without_kept_labels_are_dropped_or_kept_as_negatives(tmp_path, two_shards):
    tables, stores, groups = two_shards
    dropped = build_bags(
        tables, stores, tmp_path / "d.zarr", tmp_path / "d" / "bags.tsv", BagParams(classes=("A",)), "t"
    )
    kept = build_bags(
        tables,
        stores,
        tmp_path / "k.zarr",
        tmp_path / "k" / "bags.tsv",
        BagParams(classes=("A",), keep_unlabelled=True),
        "t",
    )
    without_a = sum("A" not in labels.split(";") for _, labels in groups.values())
    assert dropped["groups_dropped_without_label"] == without_a
    assert kept["groups"] == len(groups)
    neg = BagStore(tmp_path / "k.zarr").labels.sum(axis=1) == 0
    assert neg.any()


def test_classes_no_group_carries_fail_with_one_line(tmp_path, two_shards):
    tables, stores, _ = two_shards
    with pytest.raises(InputError) as info:
        build_bags(
            tables, stores, tmp_path / "z.zarr", tmp_path / "z" / "bags.tsv", BagParams(classes=("Z",)), "t"
        )
    message = str(info.value)
    assert message.startswith(f"{tables[0]}: no group carries any of the classes Z (labels seen: A, B")
    assert "\n" not in message
    assert not (tmp_path / "z.zarr").exists()


def test_bag_params_checked_on_creation():
    with pytest.raises(InputError, match="split ratio must be three non-negative numbers"):
        BagParams(split_ratio=(1.0, -1.0, 1.0))
    with pytest.raises(InputError, match="codec must be one of"):
        BagParams(codec="gzip")


def test_missing_columns_are_named(tmp_path, two_shards):
    tables, stores, _ = two_shards
    pd.read_csv(tables[0], sep="\t").drop(columns=["group", "x0"]).to_csv(tables[0], sep="\t", index=False)
    with pytest.raises(InputError, match=r"0.tsv: missing columns: group, x0"):
        build_bags(tables, stores, tmp_path / "x.zarr", tmp_path / "x" / "bags.tsv", BagParams(), "t")
    assert not (tmp_path / "x.zarr").exists()


def test_not_a_store(tmp_path):
    with pytest.raises(InputError, match="not a bag store"):
        BagStore(tmp_path)


def test_published_counts_are_printed_beside_ours(tmp_path, two_shards):
    """``hamil bags --paper-counts`` (the paper's Table S1 for the full data sets) adds the published bags
    and instances per split to bags.json, with ours as a fraction of them."""
    import json

    from hamil.cli import main

    tables, stores, _ = two_shards
    table = tmp_path / "ds" / "bags.tsv"
    args = ["bags", "--tables", *map(str, tables), "--stores", *map(str, stores)]
    args += ["--out-store", str(tmp_path / "ds.zarr"), "--out-table", str(table), "--top-k", "3"]
    paper = tmp_path / "s1.tsv"
    paper.write_text("split\tbags\tinstances\ntrain\t10\t100\nval\t4\t40\ntest\t8\t80\n")
    assert main([*args, "--paper-counts", str(paper)]) == 0
    stats = json.loads(table.with_name("bags.json").read_text())
    ours = stats["instances_per_split"]
    assert sum(ours.values()) == stats["patches"]
    published = stats["published_counts"]
    assert published["train"]["bags"] == 10 and published["test"]["instances"] == 80
    assert published["train"]["ours_over_paper_bags"] == round(stats["bags_per_split"]["train"] / 10, 4)
    assert published["val"]["ours_over_paper_instances"] == round(ours["val"] / 40, 4)
    paper.write_text("split\tbags\tinstances\ntrain\t10\t100\n")
    assert main([*args, "--paper-counts", str(paper)]) == 2  # a split missing: one line

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


# ------------------------------------------------------------ own splits, cutting groups (through the CLI)


def _bags_cli(tables, stores, out, *extra: str) -> int:
    from hamil.cli import main

    args = ["bags", "--tables", *map(str, tables), "--stores", *map(str, stores)]
    args += ["--out-store", str(out.with_suffix(".zarr")), "--out-table", str(out / "bags.tsv")]
    return main([*args, "--top-k", "5", "--keep-unlabelled", *extra])


def _with_splits(tables, splits: dict[str, str]) -> None:
    """Add a ``split`` column to the shard tables: ``splits[group]``, empty for groups not named."""
    for path in tables:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        table["split"] = [splits.get(g, "") for g in table["group"]]
        table.to_csv(path, sep="\t", index=False)


def _read_bags(out):
    return pd.read_csv(out / "bags.tsv", sep="\t", dtype=str, keep_default_na=False)


def test_given_splits_are_final_and_split_ratio_draws_only_the_others(tmp_path, two_shards, caplog):
    """Groups with a split in the ``split`` column (any case) keep it; the others are drawn by split_ratio,
    exactly as split_groups draws them alone. The log and bags.json count the groups that came with one."""
    import json
    import logging

    tables, stores, groups = two_shards
    given = {"G00": "Test", "G01": "test", "G02": "VAL", "G03": "train", "G04": "test"}
    _with_splits(tables, given)
    out = tmp_path / "ds"
    with caplog.at_level(logging.INFO):
        assert _bags_cli(tables, stores, out, "--split-ratio", "3", "1", "0", "--seed", "4") == 0
    split = _read_bags(out).groupby("group")["split"].agg(set).to_dict()
    assert all(len(s) == 1 for s in split.values())
    split = {g: s.pop() for g, s in split.items()}
    assert {g: split[g] for g in given} == {g: s.lower() for g, s in given.items()}
    rest = sorted(set(groups) - set(given))
    drawn = split_groups(rest, (3, 1, 0), 4)
    assert {g: split[g] for g in rest} == {g: ["train", "val", "test"][drawn[g]] for g in rest}
    assert {split[g] for g in rest} == {"train", "val"}  # a validation part out of the unsplit groups
    stats = json.loads((out / "bags.json").read_text())
    assert stats["groups_with_given_split"] == 5
    assert stats["groups_given_per_split"] == {"train": 1, "val": 1, "test": 3}
    assert (
        f"bags: 5 of {len(groups)} groups came with a split (train 1, val 1, test 3); 8 drawn" in caplog.text
    )


def test_a_group_straddling_splits_is_refused_in_one_line(tmp_path, two_shards, capsys):
    tables, stores, _ = two_shards
    _with_splits(tables, {"G00": "train"})
    table = pd.read_csv(tables[0], sep="\t", dtype=str, keep_default_na=False)
    table.loc[table.index[table["group"] == "G00"][-1], "split"] = "test"
    table.to_csv(tables[0], sep="\t", index=False)
    assert _bags_cli(tables, stores, tmp_path / "ds") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert f"{tables[0]}: group 'G00' straddles splits train and test" in err
    assert not (tmp_path / "ds.zarr").exists()


def test_an_invalid_split_value_names_the_table_and_line(tmp_path, two_shards, capsys):
    tables, stores, _ = two_shards
    _with_splits(tables, {"G01": "validation"})
    line = pd.read_csv(tables[1], sep="\t")["group"].tolist().index("G01") + 2
    assert _bags_cli(tables, stores, tmp_path / "ds") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert f"{tables[1]}: line {line}: split must be train, val, test or empty, got 'validation'" in err


def test_cut_groups_are_counted_and_max_bag_size_none_keeps_groups_whole(tmp_path, two_shards, caplog):
    """Groups larger than max_bag_size are cut (each part with the group's labels): the log and bags.json
    say how many and into how many bags. ``--max-bag-size none`` (config ``max_bag_size: null``) keeps one
    bag per group."""
    import json
    import logging

    tables, stores, groups = two_shards
    sizes = {g: n for g, (n, _) in groups.items()}
    big = {g: n for g, n in sizes.items() if n > 10}
    assert big  # the fixture has groups to cut
    with caplog.at_level(logging.INFO):
        assert _bags_cli(tables, stores, tmp_path / "cut", "--max-bag-size", "10") == 0
    stats = json.loads((tmp_path / "cut" / "bags.json").read_text())
    n_bags = sum(-(-n // 10) for n in big.values())
    assert stats["groups_cut"] == len(big) and stats["bags_from_cut_groups"] == n_bags
    assert f"{len(big)} of {len(groups)} groups had more than max_bag_size 10 instances" in caplog.text
    assert f"were cut into {n_bags} bags" in caplog.text
    cut = _read_bags(tmp_path / "cut")
    for g in big:  # every part carries the group's labels
        assert cut.loc[cut["group"] == g, "all_labels"].nunique() == 1

    assert _bags_cli(tables, stores, tmp_path / "whole", "--max-bag-size", "none") == 0
    whole = _read_bags(tmp_path / "whole")
    assert sorted(whole["group"]) == sorted(groups)
    assert {g: int(n) for g, n in zip(whole["group"], whole["n_patches"], strict=True)} == sizes
    stats = json.loads((tmp_path / "whole" / "bags.json").read_text())
    assert stats["groups_cut"] == 0 and stats["bags_from_cut_groups"] == 0
    assert BagStore(tmp_path / "whole.zarr").bag_sizes().max() == max(sizes.values())
    with pytest.raises(InputError, match="max_bag_size must be >= 1"):
        BagParams(max_bag_size=0)


def test_bag_params_have_help_and_the_schema_accepts_max_bag_size_null():
    import dataclasses
    from pathlib import Path

    import jsonschema
    import yaml

    assert all(f.metadata.get("help") for f in dataclasses.fields(BagParams))
    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    bags = schema["$defs"]["bags"]
    jsonschema.validate({"max_bag_size": None}, bags)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"max_bag_size": 0}, bags)

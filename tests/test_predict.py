"""``hamil predict`` on a user's bags of images, with checkpoints trained through the CLI on synthetic data.

One module fixture runs ``hamil synth``, then ``crop``, ``bags`` and ``train`` twice: once cutting cells,
once with whole images as instances (a few seconds each on 32x32 patches).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image

from hamil.checkpoint import load_checkpoint, read_payload, save_checkpoint
from hamil.cli import main
from hamil.predict import bag_instances, crop_params_of, predict_images, read_bags
from hamil.tables import INSTANCE_COLUMNS
from preprocessing.bags import BagParams, build_bags
from preprocessing.errors import InputError

SYNTH = ["--proteins", "10", "--fields-min", "1", "--fields-max", "2", "--cells-min", "3", "--cells-max", "4"]
SYNTH += ["--field-size", "256", "--cell-size", "60", "--poor-fraction", "0", "--seed", "0"]
CROP = {
    "cells": ["--backend", "opencv", "--downscale", "256", "--patch-size", "32"],
    "whole": ["--instances", "whole", "--whole-size", "32", "32"],
}
MODEL = {"cells": ["--model", "hamil", "--model-options", '{"depth": 1}'], "whole": ["--model", "mean"]}
BAGS = ["--top-k", "3", "--max-bag-size", "4", "--split-ratio", "2", "1", "1"]
TRAIN = ["--epochs", "1", "--batch-bags", "4", "--threads", "2", "--no-augment"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Synthetic fields, and per mode (cells, whole) its crop shard, bag store and checkpoint."""
    root = tmp_path_factory.mktemp("predict")
    raw = root / "raw"
    assert main(["synth", "--out", str(raw), *SYNTH]) == 0
    out = {"root": root, "raw": raw}
    for mode in ("cells", "whole"):
        shard = root / mode / "patches"
        crop = ["crop", "--images", str(raw / "images.tsv"), "--out-zarr", str(shard / "0.zarr")]
        assert main([*crop, "--out-tsv", str(shard / "0.tsv"), *CROP[mode]]) == 0
        store = root / mode / "ds.zarr"
        bags = ["bags", "--tables", str(shard / "0.tsv"), "--stores", str(shard / "0.zarr")]
        assert (
            main([*bags, "--out-store", str(store), "--out-table", str(root / mode / "bags.tsv"), *BAGS]) == 0
        )
        run = root / mode / "run"
        assert main(["train", "--store", str(store), "--out-dir", str(run), *MODEL[mode], *TRAIN]) == 0
        ckpt = load_checkpoint(run / "best.pt")
        assert "crop" in ckpt["store_attrs"], "hamil train must copy the bag store's crop attribute"
        out[mode] = {"shard": shard, "store": store, "checkpoint": run / "best.pt"}
    return out


@pytest.fixture(scope="module")
def user_bags(trained: dict) -> dict:
    """Three bags of synthetic fields as a user would give them: a folder of bag folders, and a TSV."""
    raw = trained["raw"]
    images = pd.read_csv(raw / "images.tsv", sep="\t")
    groups = sorted(images["group"].unique())[:3]
    folder = trained["root"] / "mine"
    rows = []
    for group in groups:
        (folder / group).mkdir(parents=True)
        for path in images.loc[images["group"] == group, "path"]:
            shutil.copy(raw / path, folder / group / Path(path).name)
            rows.append({"bag": group, "path": f"{group}/{Path(path).name}", "image_id": Path(path).stem})
    table = pd.DataFrame(rows)
    table[["bag", "path"]].to_csv(folder / "bags.tsv", sep="\t", index=False)
    return {"folder": folder, "tsv": folder / "bags.tsv", "rows": table}


def _predict(tmp_path: Path, checkpoint: Path, inputs: Path, *extra: str) -> pd.DataFrame:
    out = tmp_path / "out"
    assert (
        main(["predict", "--checkpoint", str(checkpoint), "--inputs", str(inputs), "--out", str(out), *extra])
        == 0
    )
    return pd.read_csv(out / "predictions.tsv", sep="\t", keep_default_na=False)


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("hamil predict: error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


# ------------------------------------------------------------------------------------------ bag store


def test_bags_records_the_crop_parameters(trained: dict) -> None:
    cells = zarr.open_group(trained["cells"]["store"], mode="r").attrs["crop"]
    whole = zarr.open_group(trained["whole"]["store"], mode="r").attrs["crop"]
    assert cells["instances"] == "cells" and cells["patch_size"] == 32 and cells["backend"] == "opencv"
    assert whole["instances"] == "whole" and whole["whole_size"] == [32, 32]
    assert load_checkpoint(trained["cells"]["checkpoint"])["store_attrs"]["crop"] == cells


def test_shards_cropped_differently_fail(trained: dict, tmp_path: Path, two_shards) -> None:
    shard = trained["cells"]["shard"]
    for name in ("a", "b"):
        shutil.copytree(shard / "0.zarr", tmp_path / f"{name}.zarr")
        shutil.copy(shard / "0.tsv", tmp_path / f"{name}.tsv")
    group = zarr.open_group(tmp_path / "b.zarr", mode="r+")
    group.attrs["params"] = {**group.attrs["params"], "min_score": 0.5}
    tables, stores = [tmp_path / "a.tsv", tmp_path / "b.tsv"], [tmp_path / "a.zarr", tmp_path / "b.zarr"]
    with pytest.raises(InputError, match="different parameters") as err:
        build_bags(
            tables, stores, tmp_path / "ds.zarr", tmp_path / "ds" / "bags.tsv", BagParams(top_k=3), "t"
        )
    assert "a.zarr" in str(err.value) and "b.zarr" in str(err.value)
    assert not (tmp_path / "ds.zarr").exists()
    # shards without crop parameters (not written by the crop stage) give crop = None
    tables, stores, _ = two_shards
    dest = tmp_path / "plain.zarr"
    build_bags(tables, stores, dest, tmp_path / "plain" / "bags.tsv", BagParams(top_k=3), "t")
    assert zarr.open_group(dest, mode="r").attrs["crop"] is None


# ------------------------------------------------------------------------------------------ predictions


def test_folder_and_tsv_inputs_agree(trained: dict, user_bags: dict, tmp_path: Path) -> None:
    ckpt = trained["cells"]["checkpoint"]
    by_folder = _predict(tmp_path / "f", ckpt, user_bags["folder"])
    by_tsv = _predict(tmp_path / "t", ckpt, user_bags["tsv"])
    classes = load_checkpoint(ckpt)["class_names"]
    columns = ["bag_id", "group", "n_instances", "predicted_labels", *[f"p_{c}" for c in classes]]
    assert list(by_folder.columns) == columns
    assert sorted(by_folder["bag_id"]) == sorted(user_bags["rows"]["bag"].unique())
    assert (by_folder["group"] == by_folder["bag_id"]).all()  # no group given: each bag is its own
    probs = by_folder.filter(like="p_").to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all()
    pd.testing.assert_frame_equal(
        by_folder.sort_values("bag_id", ignore_index=True), by_tsv.sort_values("bag_id", ignore_index=True)
    )
    expected = [";".join(c for c, p in zip(classes, row, strict=True) if p >= 0.5) for row in probs]
    assert list(by_folder["predicted_labels"]) == expected
    assert not (tmp_path / "f" / "out" / "metrics.json").exists()  # no labels, no metrics


def test_cells_are_cut_as_the_crop_stage_cut_them(trained: dict, user_bags: dict, tmp_path: Path) -> None:
    ckpt = trained["cells"]["checkpoint"]
    table = _predict(tmp_path, ckpt, user_bags["folder"], "--instance-scores")
    shard = pd.read_csv(trained["cells"]["shard"] / "0.tsv", sep="\t")
    rows = user_bags["rows"]
    per_bag = rows.groupby("bag")["image_id"].apply(lambda ids: int(shard["image_id"].isin(ids).sum()))
    assert dict(zip(table["bag_id"], table["n_instances"], strict=True)) == per_bag.to_dict()
    n_images = rows.groupby("bag").size()
    assert (table.set_index("bag_id")["n_instances"] > n_images).all()  # several cells per field
    instances = pd.read_csv(tmp_path / "out" / "instances.tsv", sep="\t")
    assert list(instances.columns) == list(INSTANCE_COLUMNS)
    assert len(instances) == table["n_instances"].sum()
    assert (instances.groupby("bag_id")["instance"].max() + 1).to_dict() == per_bag.to_dict()
    assert np.isfinite(instances["score"]).all()
    # the same windows and pixels as the crop stage
    params = crop_params_of(load_checkpoint(ckpt)["store_attrs"], ckpt)
    bag = read_bags(user_bags["folder"])[0]
    got = bag_instances(bag, params)
    ids = [Path(p).stem for p in bag.paths]
    stage = shard[shard["image_id"].isin(ids)]
    np.testing.assert_array_equal(got.boxes, stage[["x0", "y0", "x1", "y1"]].to_numpy())
    patches = zarr.open_array(trained["cells"]["shard"] / "0.zarr" / "patches", mode="r")
    np.testing.assert_array_equal(got.patches, patches.oindex[stage["patch_index"].to_numpy()])


def test_whole_image_checkpoint_gives_one_instance_per_image(
    trained: dict, user_bags: dict, tmp_path: Path
) -> None:
    out = predict_images(
        trained["whole"]["checkpoint"], user_bags["tsv"], tmp_path / "w", instance_scores=True
    )
    table = pd.read_csv(out / "predictions.tsv", sep="\t")
    n_images = user_bags["rows"].groupby("bag").size()
    assert table.set_index("bag_id")["n_instances"].to_dict() == n_images.to_dict()
    instances = pd.read_csv(out / "instances.tsv", sep="\t")
    assert (instances[["x0", "y0"]] == 0).all().all() and (instances[["x1", "y1"]] == 256).all().all()
    assert sorted(instances["source_image"]) == sorted(user_bags["rows"]["path"])


def test_checkpoint_without_crop_uses_whole_images(
    trained: dict, user_bags: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = read_payload(trained["cells"]["checkpoint"])
    del ckpt["store_attrs"]["crop"]  # as written before the bag store recorded it
    old = tmp_path / "old.pt"
    save_checkpoint(old, ckpt)
    with caplog.at_level(logging.WARNING):
        table = _predict(tmp_path, old, user_bags["folder"])
    assert "does not record how its data were cropped" in caplog.text
    assert (
        table.set_index("bag_id")["n_instances"].to_dict()
        == user_bags["rows"].groupby("bag").size().to_dict()
    )


def test_tuned_thresholds_from_evaluate(trained: dict, user_bags: dict, tmp_path: Path) -> None:
    ckpt, store = trained["cells"]["checkpoint"], trained["cells"]["store"]
    assert (
        main(
            ["evaluate", "--checkpoint", str(ckpt), "--store", str(store), "--out-dir", str(tmp_path / "ev")]
        )
        == 0
    )
    per_class = pd.read_csv(tmp_path / "ev" / "per_class.tsv", sep="\t")
    per_class["threshold_tuned"] = [0.0, 1.0, 0.5][: len(per_class)]
    per_class.to_csv(tmp_path / "per_class.tsv", sep="\t", index=False)
    table = _predict(tmp_path, ckpt, user_bags["folder"], "--thresholds", str(tmp_path / "per_class.tsv"))
    classes = list(per_class["class"])
    cut = dict(zip(classes, per_class["threshold_tuned"], strict=True))
    expected = [";".join(c for c in classes if row[f"p_{c}"] >= cut[c]) for _, row in table.iterrows()]
    tuned = table["predicted_labels_tuned"]
    assert list(tuned) == expected and all(classes[0] in labels for labels in tuned)
    fixed = [";".join(c for c in classes if row[f"p_{c}"] >= 0.5) for _, row in table.iterrows()]
    assert list(table["predicted_labels"]) == fixed


def test_bag_without_cells_is_skipped(trained: dict, user_bags: dict, tmp_path: Path, caplog) -> None:
    folder = tmp_path / "in"
    shutil.copytree(user_bags["folder"], folder, ignore=shutil.ignore_patterns("*.tsv"))
    (folder / "dark").mkdir()
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(folder / "dark" / "black.png")
    with caplog.at_level(logging.WARNING):
        table = _predict(tmp_path, trained["cells"]["checkpoint"], folder)
    assert "dark" not in set(table["bag_id"]) and len(table) == user_bags["rows"]["bag"].nunique()
    skipped = pd.read_csv(tmp_path / "out" / "skipped.tsv", sep="\t")
    assert list(skipped["bag_id"]) == ["dark"] and skipped["n_images"].tolist() == [1]
    assert "bag dark: no instance found" in caplog.text


def test_large_bag_warning_counts_instances_not_images(
    trained: dict, user_bags: dict, tmp_path: Path, caplog
) -> None:
    """Training bags held at most 4 instances (max_bag_size 4). One field gives 3-4 cells, so a bag of two
    fields has fewer images than that but more instances: it is the one to warn about."""
    rows = user_bags["rows"]
    folder = tmp_path / "in"
    (folder / "big").mkdir(parents=True)
    (folder / "small").mkdir()
    sources = [user_bags["folder"] / p for p in rows["path"]]
    for k, src in enumerate(sources[:2]):
        shutil.copy(src, folder / "big" / f"{k}.png")
    shutil.copy(sources[0], folder / "small" / "0.png")
    with caplog.at_level(logging.WARNING):
        table = _predict(tmp_path, trained["cells"]["checkpoint"], folder)
    n = dict(zip(table["bag_id"], table["n_instances"], strict=True))
    assert n["big"] > 4 >= n["small"]
    assert "more instances than the training bags had (max_bag_size 4), e.g. big" in caplog.text
    assert "small" not in caplog.text.split("e.g.")[-1]


def _training_table(trained: dict, path: Path) -> pd.DataFrame:
    """The whole-image store's images as a user's training table (``path, group, labels, split``), the
    split of each group taken from the store's ``bags.tsv``; only groups the bag stage kept."""
    bags = pd.read_csv(trained["root"] / "whole" / "bags.tsv", sep="\t", keep_default_na=False)
    assert bags.groupby("group").size().max() == 1, "a group cut into several bags: bags would differ"
    split_of = dict(zip(bags["group"], bags["split"], strict=True))
    images = pd.read_csv(trained["raw"] / "images.tsv", sep="\t", keep_default_na=False)
    images = images[images["group"].isin(split_of)]
    table = pd.DataFrame(
        {
            "path": [str(trained["raw"] / p) for p in images["path"]],
            "group": images["group"],
            "labels": images["labels"],
            "split": [split_of[g] for g in images["group"]],
        }
    )
    table.to_csv(path, sep="\t", index=False)
    return images


def test_predict_on_a_labelled_table_reproduces_evaluate(trained: dict, tmp_path: Path) -> None:
    """The training table of one split given to predict: whole images make the instances identical, so
    predictions, metrics.json, per_class.tsv and instance scores equal evaluate's on that split."""
    ckpt, store, split = trained["whole"]["checkpoint"], trained["whole"]["store"], "train"
    ev, pr = tmp_path / "ev", tmp_path / "pr"
    args = ["evaluate", "--checkpoint", str(ckpt), "--store", str(store), "--out-dir", str(ev)]
    assert main([*args, "--split", split]) == 0
    images = _training_table(trained, tmp_path / "table.tsv")
    args = ["predict", "--checkpoint", str(ckpt), "--inputs", str(tmp_path / "table.tsv"), "--out", str(pr)]
    args += ["--split", split, "--thresholds", str(ev / "per_class.tsv"), "--instance-scores"]
    assert main(args) == 0
    # metrics.json: the same numbers and keys (predict adds where its bags came from)
    want = json.loads((ev / "metrics.json").read_text())
    got = json.loads((pr / "metrics.json").read_text())
    assert got["bags"] == want["bags"] >= 3
    assert set(got) - set(want) == {"inputs", "bags_skipped"} and got["bags_skipped"] == 0
    assert got["tuned"].pop("on") == str(ev / "per_class.tsv") and want["tuned"].pop("on") == "val"
    for key in ("thresholds", "positives", "tuned_classes"):
        assert got["tuned"].pop(key) == want["tuned"].pop(key), key
    for key in ("model", "seed", "split", "threshold", "epoch", "subset_accuracy", "auc_classes"):
        assert got[key] == want[key], key
    for key in ("macro_auc", "macro_f1", "micro_f1", "loss", "tuned"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    pd.testing.assert_frame_equal(
        pd.read_csv(pr / "per_class.tsv", sep="\t"), pd.read_csv(ev / "per_class.tsv", sep="\t")
    )
    # predictions.tsv: one layout; the store's bag ids are <group>#<part>, predict's bags are the groups
    ev_table = pd.read_csv(ev / "predictions.tsv", sep="\t", keep_default_na=False)
    pr_table = pd.read_csv(pr / "predictions.tsv", sep="\t", keep_default_na=False)
    assert list(pr_table.columns) == list(ev_table.columns)
    assert list(ev_table.columns[:6]) == [
        "bag_id",
        "group",
        "n_instances",
        "true_labels",
        "predicted_labels",
        "predicted_labels_tuned",
    ]
    assert (pr_table["bag_id"] == pr_table["group"]).all()
    ev_table = ev_table.drop(columns="bag_id").sort_values("group", ignore_index=True)
    pr_table = pr_table.drop(columns="bag_id").sort_values("group", ignore_index=True)
    pd.testing.assert_frame_equal(pr_table, ev_table, check_exact=False, atol=1e-6)
    # instances.tsv: the same scores per image (evaluate names images by id, predict by path)
    image_id = dict(zip((str(trained["raw"] / p) for p in images["path"]), images["image_id"], strict=True))
    ev_inst = pd.read_csv(ev / "instances.tsv", sep="\t")
    pr_inst = pd.read_csv(pr / "instances.tsv", sep="\t")
    assert list(pr_inst.columns) == list(ev_inst.columns) == list(INSTANCE_COLUMNS)
    pr_inst["source_image"] = pr_inst["source_image"].map(image_id)
    keys = ["group", "source_image", "x0", "y0", "x1", "y1"]
    both = ev_inst.merge(pr_inst, on=keys, suffixes=("_ev", "_pr"), validate="one_to_one")
    assert len(both) == len(ev_inst) == len(pr_inst) == ev_table["n_instances"].sum()
    np.testing.assert_allclose(both["score_pr"], both["score_ev"], atol=1e-5)


def test_table_layouts(trained: dict, user_bags: dict, tmp_path: Path, capsys) -> None:
    """``bag`` and ``group`` together: the bag is scored, the group reported; a bag in two groups, a
    split without a split column and an empty split are one-line errors."""
    rows = user_bags["rows"][["bag", "path"]].copy()
    rows["path"] = [str(user_bags["folder"] / p) for p in rows["path"]]
    rows["group"] = "all"
    rows.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    table = _predict(tmp_path / "a", trained["whole"]["checkpoint"], tmp_path / "t.tsv")
    assert sorted(table["bag_id"]) == sorted(rows["bag"].unique()) and set(table["group"]) == {"all"}
    args = ["predict", "--checkpoint", str(trained["whole"]["checkpoint"]), "--out", str(tmp_path / "o")]
    rows.loc[0, "group"] = "other"
    rows.iloc[[0, 0]].assign(group=["x", "y"]).to_csv(tmp_path / "two.tsv", sep="\t", index=False)
    assert main([*args, "--inputs", str(tmp_path / "two.tsv")]) == 2
    _one_line_error(capsys, "two.tsv", "lies in groups x and y")
    assert main([*args, "--inputs", str(tmp_path / "t.tsv"), "--split", "test"]) == 2
    _one_line_error(capsys, "t.tsv", "no split column")
    rows.assign(split="train").to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    assert main([*args, "--inputs", str(tmp_path / "s.tsv"), "--split", "test"]) == 2
    _one_line_error(capsys, "s.tsv", "no rows in the test split")


# ------------------------------------------------------------------------------------------ bad input


def test_missing_file_is_named(trained: dict, user_bags: dict, tmp_path: Path, capsys) -> None:
    table = tmp_path / "bags.tsv"
    rows = user_bags["rows"][["bag", "path"]].copy()
    rows["path"] = [str(user_bags["folder"] / p) for p in rows["path"]]
    rows.loc[len(rows)] = ["extra", "nowhere/missing.png"]
    rows.to_csv(table, sep="\t", index=False)
    args = ["predict", "--checkpoint", str(trained["cells"]["checkpoint"]), "--out", str(tmp_path / "out")]
    assert main([*args, "--inputs", str(table)]) == 2
    _one_line_error(capsys, str(tmp_path / "nowhere" / "missing.png"), "file not found")
    assert not (tmp_path / "out").exists()


def test_non_image_files_are_named(trained: dict, tmp_path: Path, capsys) -> None:
    args = ["predict", "--checkpoint", str(trained["cells"]["checkpoint"]), "--out", str(tmp_path / "out")]
    (tmp_path / "in" / "b1").mkdir(parents=True)
    (tmp_path / "in" / "b1" / "fake.png").write_text("not an image\n")
    assert main([*args, "--inputs", str(tmp_path / "in")]) == 2
    _one_line_error(capsys, "fake.png", "unreadable image")
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "t.tsv").write_text("bag\tpath\nb1\tnotes.txt\n")
    assert main([*args, "--inputs", str(tmp_path / "t.tsv")]) == 2
    _one_line_error(capsys, "notes.txt", "unsupported extension")


def test_empty_inputs_are_clear(trained: dict, tmp_path: Path, capsys) -> None:
    args = ["predict", "--checkpoint", str(trained["cells"]["checkpoint"]), "--out", str(tmp_path / "out")]
    (tmp_path / "empty").mkdir()
    assert main([*args, "--inputs", str(tmp_path / "empty")]) == 2
    _one_line_error(capsys, str(tmp_path / "empty"), "no bags")
    (tmp_path / "empty" / "b1").mkdir()
    assert main([*args, "--inputs", str(tmp_path / "empty")]) == 2
    _one_line_error(capsys, "b1", "no images")
    (tmp_path / "t.tsv").write_text("bag\tpath\n")
    assert main([*args, "--inputs", str(tmp_path / "t.tsv")]) == 2
    _one_line_error(capsys, "t.tsv", "no images listed")
    (tmp_path / "u.tsv").write_text("image\tpath\nb\tx.png\n")
    assert main([*args, "--inputs", str(tmp_path / "u.tsv")]) == 2
    _one_line_error(capsys, "u.tsv", "missing columns: bag or group")


def test_huge_image_header_is_one_line(
    trained: dict, user_bags: dict, tmp_path: Path, capsys, monkeypatch
) -> None:
    """An image whose header claims huge dimensions (PIL's decompression-bomb error, or more pixels than
    HAMIL_MAX_IMAGE_PIXELS) is named in one line, like any unusable image, not a traceback."""
    from test_io import huge_header_jpeg, huge_header_png

    args = ["predict", "--checkpoint", str(trained["whole"]["checkpoint"]), "--out", str(tmp_path / "out")]
    bags = tmp_path / "in"
    shutil.copytree(user_bags["folder"], bags, ignore=shutil.ignore_patterns("*.tsv"))
    first = sorted(p for p in bags.iterdir() if p.is_dir())[0]
    bomb = huge_header_png(first / "zz_bomb.png", 60_000, 60_000)  # past PIL's own error limit
    assert main([*args, "--inputs", str(bags)]) == 2
    _one_line_error(capsys, str(bomb), "image too large")
    bomb.unlink()
    big = huge_header_jpeg(first / "zz_big.jpg", 3000, 2000)
    monkeypatch.setenv("HAMIL_MAX_IMAGE_PIXELS", "1000000")
    assert main([*args, "--inputs", str(bags)]) == 2
    _one_line_error(capsys, f"{big}: image too large (3000 x 2000 = 6000000 pixels", "limit of 1000000")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["bag folder", "image file"])
def test_a_name_that_is_not_utf8_is_refused_before_any_output(
    trained: dict, user_bags: dict, tmp_path: Path, capsys, where: str
) -> None:
    """Issue 26: a latin-1 file or folder name gave a UnicodeEncodeError after partial outputs."""
    folder = tmp_path / "in"
    shutil.copytree(user_bags["folder"], folder, ignore=shutil.ignore_patterns("*.tsv"))
    first = sorted(p for p in folder.iterdir() if p.is_dir())[0]
    if where == "bag folder":
        first.rename(folder / os.fsdecode(b"caf\xe9"))
    else:
        image = sorted(first.iterdir())[0]
        image.rename(first / os.fsdecode(b"\xe9t\xe9" + image.suffix.encode()))
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(trained["cells"]["checkpoint"]), "--inputs", str(folder)]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hamil predict: error:") and "not valid UTF-8" in err and "\\xe9" in err
    assert not out.exists() or not any(out.iterdir())

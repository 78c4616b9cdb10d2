"""The ``folder`` source: checks every image before writing, reports all problems at once, keeps negatives."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from PIL import Image

from preprocessing.bags import BagParams, build_bags
from preprocessing.errors import InputError
from preprocessing.io import read_images_table
from preprocessing.sources.folder import prepare_folder
from preprocessing.store import create_patch_array, seal_patches

RNG = np.random.default_rng(0)
PIXEL_SIZE = ("pixel_size_um_x", "pixel_size_um_y")  # added by the folder source, empty where unknown


def _rgb(h: int = 20, w: int = 24) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _gray(h: int = 20, w: int = 24) -> np.ndarray:
    return RNG.integers(0, 256, (h, w), dtype=np.uint8)


def _write_table(path: Path, rows: list[dict[str, str]]) -> Path:
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def _good_images(root: Path) -> list[str]:
    """PNG, JPEG and TIFF (8 and 16 bit), grayscale and RGB (and RGBA), under ``root``; relative names."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rgb()).save(root / "img/rgb.png")
    Image.fromarray(_gray()).save(root / "img/gray.png")
    Image.fromarray(np.dstack([_rgb(), _gray()])).save(root / "img/rgba.png")
    Image.fromarray(_rgb()).save(root / "img/rgb.jpg", quality=90)
    Image.fromarray(_gray()).save(root / "img/gray.JPEG", quality=90)
    tifffile.imwrite(root / "img/rgb8.tif", _rgb())
    tifffile.imwrite(root / "img/gray8.tiff", _gray())
    tifffile.imwrite(root / "img/gray16.tif", RNG.integers(0, 65536, (20, 24), dtype=np.uint16))
    tifffile.imwrite(root / "img/rgb16.TIF", RNG.integers(0, 65536, (20, 24, 3), dtype=np.uint16))
    cv2.imwrite(str(root / "img/gray16.png"), RNG.integers(0, 65536, (20, 24), dtype=np.uint16))
    return sorted(f"img/{p.name}" for p in (root / "img").iterdir())


def _bad_images(root: Path) -> dict[str, str]:
    """Relative name -> expected fragment of the reason."""
    (root / "bad").mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rgb(200, 200)).save(root / "bad/full.jpg", quality=95)
    data = (root / "bad/full.jpg").read_bytes()
    (root / "bad/truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "bad/full.jpg").unlink()
    (root / "bad/page.jpg").write_text("<!DOCTYPE html><html><body>Not Found</body></html>\n")
    Image.fromarray(_rgb()).save(root / "bad/bitmap.bmp")
    return {
        "bad/missing.png": "file not found",
        "bad/truncated.jpg": "unreadable image",
        "bad/page.jpg": "unreadable image",
        "bad/bitmap.bmp": "unsupported extension",
    }


def test_accepts_png_jpeg_tiff_8_and_16_bit_gray_and_rgb(tmp_path: Path) -> None:
    names = _good_images(tmp_path)
    table = _write_table(
        tmp_path / "in.tsv", [{"path": n, "group": f"G{i % 3}", "labels": "a"} for i, n in enumerate(names)]
    )
    out = prepare_folder(table, tmp_path / "out")
    assert len(out) == len(names) == 10
    assert list(out.columns) == ["image_id", "group", "path", "labels", "pixel_size_um_x", "pixel_size_um_y"]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in out["path"])
    back = read_images_table(tmp_path / "out/images.tsv")
    assert back["path"].tolist() == out["path"].tolist()
    rejected = pd.read_csv(tmp_path / "out/rejected.tsv", sep="\t")
    assert list(rejected.columns) == ["path", "reason"] and rejected.empty


def test_all_problems_reported_in_one_line_and_listed(tmp_path: Path) -> None:
    good = _good_images(tmp_path)[:3]
    bad = _bad_images(tmp_path)
    rows = [{"path": n, "group": "G", "labels": "a"} for n in [*good, *bad]]
    table = _write_table(tmp_path / "in.tsv", rows)
    out_dir = tmp_path / "out"
    with pytest.raises(InputError) as info:
        prepare_folder(table, out_dir)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{table}: 4 of 7 images unusable, first: bad/missing.png: file not found")
    assert msg.endswith(f"full list in {out_dir}/rejected.tsv")
    assert not (out_dir / "images.tsv").exists()
    rejected = pd.read_csv(out_dir / "rejected.tsv", sep="\t", dtype=str)
    assert rejected["path"].tolist() == list(bad)
    for path, reason in zip(rejected["path"], rejected["reason"], strict=True):
        assert bad[path] in reason and "\n" not in reason


def test_max_bad_fraction_skips_and_lists(tmp_path: Path) -> None:
    good = _good_images(tmp_path)
    bad = _bad_images(tmp_path)
    rows = [{"path": n, "group": "G", "labels": "a"} for n in [*good, *bad]]
    table = _write_table(tmp_path / "in.tsv", rows)
    with pytest.raises(InputError, match="4 of 14 images unusable"):
        prepare_folder(table, tmp_path / "out", max_bad_fraction=0.25)  # 4/14 > 0.25
    out = prepare_folder(table, tmp_path / "out", max_bad_fraction=0.3, workers=4)
    assert len(out) == len(good)
    assert out["path"].tolist() == [str(tmp_path / n) for n in good]
    assert out["image_id"].is_unique  # gray.png and gray.JPEG share a stem
    assert (tmp_path / "out/images.tsv").is_file()
    assert pd.read_csv(tmp_path / "out/rejected.tsv", sep="\t")["path"].tolist() == list(bad)


def test_all_bad_fails_even_when_skipping_allowed(tmp_path: Path) -> None:
    bad = _bad_images(tmp_path)
    table = _write_table(tmp_path / "in.tsv", [{"path": n, "group": "G", "labels": ""} for n in bad])
    with pytest.raises(InputError, match="4 of 4 images unusable"):
        prepare_folder(table, tmp_path / "out", max_bad_fraction=1.0)


def test_missing_columns_named(tmp_path: Path) -> None:
    table = _write_table(tmp_path / "in.tsv", [{"path": "x.png", "class": "a"}])
    with pytest.raises(InputError, match="missing columns: group, labels"):
        prepare_folder(table, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_table(tmp_path: Path) -> None:
    table = tmp_path / "in.tsv"
    table.write_text("path\tgroup\tlabels\n")
    with pytest.raises(InputError, match="no images listed"):
        prepare_folder(table, tmp_path / "out")


def test_duplicate_stems_get_unique_ids_and_extra_columns_carried(tmp_path: Path) -> None:
    for sub in ("a", "b", "c"):
        (tmp_path / "imgs" / sub).mkdir(parents=True)
        Image.fromarray(_rgb()).save(tmp_path / "imgs" / sub / "field.png")
    Image.fromarray(_rgb()).save(tmp_path / "imgs/field_2.png")
    rows = [
        {"path": f"{s}/field.png", "group": "G", "labels": "x; y", "plate": f"P{i}", "well": "A01"}
        for i, s in enumerate("abc")
    ]
    rows.append({"path": "field_2.png", "group": "H", "labels": "", "plate": "P9", "well": "B02"})
    table = _write_table(tmp_path / "in.tsv", rows)
    out = prepare_folder(table, tmp_path / "out", image_root=tmp_path / "imgs")
    # stems clash: first keeps the stem, the others get suffixes that avoid the real "field_2"
    assert out["image_id"].tolist() == ["field", "field_3", "field_4", "field_2"]
    assert list(out.columns) == [*("image_id", "group", "path", "labels", "plate", "well"), *PIXEL_SIZE]
    assert out["plate"].tolist() == ["P0", "P1", "P2", "P9"]
    assert out["labels"].tolist() == ["x;y", "x;y", "x;y", ""]
    again = prepare_folder(table, tmp_path / "out2", image_root=tmp_path / "imgs")
    assert again["image_id"].tolist() == out["image_id"].tolist()


def test_explicit_image_ids_kept_and_duplicates_refused(tmp_path: Path) -> None:
    Image.fromarray(_rgb()).save(tmp_path / "a.png")
    Image.fromarray(_rgb()).save(tmp_path / "b.png")
    rows = [
        {"image_id": "first", "path": str(tmp_path / "a.png"), "group": "G", "labels": "a"},
        {"image_id": "", "path": "b.png", "group": "G", "labels": "a"},
    ]
    out = prepare_folder(_write_table(tmp_path / "in.tsv", rows), tmp_path / "out")
    assert out["image_id"].tolist() == ["first", "b"]
    rows[1]["image_id"] = "first"
    with pytest.raises(InputError, match="duplicate image_id 'first'"):
        prepare_folder(_write_table(tmp_path / "in2.tsv", rows), tmp_path / "out")


def test_empty_labels_survive_to_negative_bags(tmp_path: Path) -> None:
    """Screening: one class "hit"; wells without a label become negative bags with keep_unlabelled."""
    (tmp_path / "img").mkdir()
    rows = []
    for w in range(6):
        for f in range(2):
            Image.fromarray(_rgb()).save(tmp_path / f"img/w{w}_f{f}.png")
            rows.append({"path": f"img/w{w}_f{f}.png", "group": f"W{w}", "labels": "hit" if w < 2 else ""})
    images = prepare_folder(_write_table(tmp_path / "in.tsv", rows), tmp_path / "out")
    assert (images["labels"] == "").sum() == 8
    back = read_images_table(tmp_path / "out/images.tsv")
    assert back["labels"].tolist() == images["labels"].tolist()

    # whole-image patches: one per field, written like the crop stage's shard
    shard = back[["image_id", "group", "labels"]].copy()
    shard.insert(0, "patch_index", np.arange(len(shard)))
    shard["x0"], shard["y0"], shard["x1"], shard["y1"] = 0, 0, 24, 20
    shard.to_csv(tmp_path / "0.tsv", sep="\t", index=False)
    root = zarr.open_group(tmp_path / "0.zarr", mode="w", zarr_format=3)
    create_patch_array(root, len(shard), 3, 8)[:] = np.zeros((len(shard), 3, 8, 8), np.uint8)
    seal_patches(tmp_path / "0.zarr")

    params = BagParams(classes=("hit",), keep_unlabelled=True, split_ratio=(1.0, 1.0, 1.0))
    stats = build_bags(
        [tmp_path / "0.tsv"],
        [tmp_path / "0.zarr"],
        tmp_path / "bags.zarr",
        tmp_path / "bags.tsv",
        params,
        "x",
    )
    assert stats["groups"] == 6 and stats["groups_dropped_without_label"] == 0
    bags = pd.read_csv(tmp_path / "bags.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert sorted(bags["labels"].tolist()) == ["", "", "", "", "hit", "hit"]
    assert (bags["n_patches"] == "2").all()

    dropped = build_bags(
        [tmp_path / "0.tsv"],
        [tmp_path / "0.zarr"],
        tmp_path / "bags2.zarr",
        tmp_path / "bags2.tsv",
        BagParams(classes=("hit",), keep_unlabelled=False),
        "x",
    )
    assert dropped["groups"] == 2 and dropped["groups_dropped_without_label"] == 4


# ------------------------------------------------------------------------- through the CLI (hamil download)


def _download_folder(table: Path, out: Path, *extra: str) -> int:
    from hamil.cli import main

    return main(["download", "folder", "--table", str(table), "--out", str(out), *extra])


def test_huge_image_headers_are_rejected_not_a_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    """A header claiming huge dimensions (PIL's decompression-bomb error, or more pixels than
    HAMIL_MAX_IMAGE_PIXELS) is an unusable image listed in rejected.tsv with its reason."""
    from test_io import huge_header_jpeg, huge_header_png

    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.fromarray(_rgb()).save(tmp_path / f"img/ok{i}.png")
    huge_header_png(tmp_path / "img/bomb.png", 60_000, 60_000)  # past PIL's own error limit
    huge_header_jpeg(tmp_path / "img/big.jpg", 3000, 2000)  # 6 M pixels, over the limit set below
    monkeypatch.setenv("HAMIL_MAX_IMAGE_PIXELS", "1000000")
    names = ["img/ok0.png", "img/bomb.png", "img/ok1.png", "img/big.jpg", "img/ok2.png"]
    table = _write_table(tmp_path / "in.tsv", [{"path": n, "group": "G", "labels": "a"} for n in names])
    out = tmp_path / "out"
    assert _download_folder(table, out, "--max-bad-fraction", "0.4") == 0
    rejected = pd.read_csv(out / "rejected.tsv", sep="\t", dtype=str)
    assert rejected["path"].tolist() == ["img/bomb.png", "img/big.jpg"]
    assert all(r.startswith("image too large (") for r in rejected["reason"])
    assert "3000 x 2000 = 6000000 pixels, more than the limit of 1000000" in rejected["reason"].iloc[1]
    kept = read_images_table(out / "images.tsv")["path"]
    assert [Path(p).name for p in kept] == ["ok0.png", "ok1.png", "ok2.png"]
    assert _download_folder(table, out) == 2  # none allowed: one line naming the first
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "2 of 5 images unusable, first: img/bomb.png: image too large" in err


def test_failed_rerun_removes_the_earlier_images_table(tmp_path: Path) -> None:
    """After a good run, a rerun that fails leaves no images.tsv for the workflow to go on with."""
    (tmp_path / "img").mkdir()
    for i in range(2):
        Image.fromarray(_rgb()).save(tmp_path / f"img/f{i}.png")
    rows = [{"path": f"img/f{i}.png", "group": "G", "labels": "a"} for i in range(2)]
    table = _write_table(tmp_path / "in.tsv", rows)
    out = tmp_path / "out"
    assert _download_folder(table, out) == 0 and (out / "images.tsv").is_file()
    (tmp_path / "img/f1.png").write_bytes(b"<html>gone</html>")
    assert _download_folder(table, out) == 2
    assert not (out / "images.tsv").exists()
    assert pd.read_csv(out / "rejected.tsv", sep="\t")["path"].tolist() == ["img/f1.png"]
    _write_table(tmp_path / "in.tsv", [{"path": "img/f0.png", "group": "G", "labels": "b"}])
    assert _download_folder(table, out) == 0  # a good rerun writes it again
    assert read_images_table(out / "images.tsv")["labels"].tolist() == ["b"]
    assert pd.read_csv(out / "rejected.tsv", sep="\t").empty


def test_images_listed_twice_are_warned_about(tmp_path: Path, caplog) -> None:
    """The same file twice in one group, or in two groups (then possibly in train and test): a warning
    that names the file and the groups."""
    (tmp_path / "img").mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(_rgb()).save(tmp_path / f"img/{name}.png")
    rows = [
        {"path": "img/a.png", "group": "G1", "labels": "x"},
        {"path": "img/b.png", "group": "G1", "labels": "x"},
        {"path": "img/./b.png", "group": "G1", "labels": "x"},  # the same file, spelt differently
        {"path": str(tmp_path / "img/a.png"), "group": "G2", "labels": "y"},
        {"path": "img/c.png", "group": "G2", "labels": "y"},
    ]
    table = _write_table(tmp_path / "in.tsv", rows)
    with caplog.at_level(logging.WARNING):
        assert _download_folder(table, tmp_path / "out") == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    a, b = tmp_path / "img/a.png", tmp_path / "img/b.png"
    both = "in groups G1, G2: the same image can then sit in train and test"
    assert f"{table}: {a} is listed 2 times {both}" in warned
    assert f"{table}: {b} is listed 2 times in group 'G1': its instances count 2 times in that bag" in warned
    assert not any("c.png" in w for w in warned)


def test_the_tables_own_split_reaches_the_bags(tmp_path: Path) -> None:
    """A ``split`` column in the user's table (any case; empty: drawn by split_ratio) goes through
    ``hamil download folder`` (images.tsv, lower case), ``hamil crop`` (whole images: the patch table) and
    ``hamil bags``: every bag of a group with a given split has that split."""
    from hamil.cli import main

    (tmp_path / "img").mkdir()
    given = {"B0": "Train", "B1": "train", "B2": "TEST", "B3": "test", "B4": "val", "B5": "", "B6": ""}
    rows = []
    for g, split in given.items():
        for k in range(3):
            Image.fromarray(_rgb()).save(tmp_path / f"img/{g}_{k}.png")
            rows.append(
                {
                    "path": f"img/{g}_{k}.png",
                    "group": g,
                    "labels": "hit" if g in "B0B2" else "",
                    "split": split,
                }
            )
    table = _write_table(tmp_path / "in.tsv", rows)
    raw = tmp_path / "raw"
    assert _download_folder(table, raw) == 0
    images = read_images_table(raw / "images.tsv")
    assert images["split"].tolist() == [s.lower() for s in given.values() for _ in range(3)]

    crop = ["crop", "--images", str(raw / "images.tsv"), "--instances", "whole", "--whole-size", "8", "8"]
    assert main([*crop, "--out-zarr", str(tmp_path / "0.zarr"), "--out-tsv", str(tmp_path / "0.tsv")]) == 0
    bags = ["bags", "--tables", str(tmp_path / "0.tsv"), "--stores", str(tmp_path / "0.zarr")]
    bags += ["--out-store", str(tmp_path / "ds.zarr"), "--out-table", str(tmp_path / "ds" / "bags.tsv")]
    bags += ["--classes", "hit", "--keep-unlabelled", "--max-bag-size", "2", "--split-ratio", "1", "0", "0"]
    assert main(bags) == 0
    out = pd.read_csv(tmp_path / "ds" / "bags.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert len(out) == 2 * len(given)  # 3 images per group, bags of at most 2
    want = {g: s.lower() or "train" for g, s in given.items()}  # the unsplit groups: all drawn into train
    assert dict(zip(out["group"], out["split"], strict=True)) == want
    assert out.groupby("group")["split"].nunique().max() == 1


def test_invalid_or_straddling_splits_are_refused_at_download(tmp_path: Path, capsys) -> None:
    (tmp_path / "img").mkdir()
    for k in range(3):
        Image.fromarray(_rgb()).save(tmp_path / f"img/f{k}.png")
    rows = [
        {"path": f"img/f{k}.png", "group": "G" if k < 2 else "H", "labels": "a", "split": ""}
        for k in range(3)
    ]
    rows[2]["split"] = "holdout"
    table = _write_table(tmp_path / "in.tsv", rows)
    assert _download_folder(table, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert (
        "\n" not in err and f"{table}: line 4: split must be train, val, test or empty, got 'holdout'" in err
    )
    rows[2]["split"], rows[0]["split"], rows[1]["split"] = "", "train", "Test"
    _write_table(table, rows)
    assert _download_folder(table, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{table}: group 'G' straddles splits train and test" in err
    assert not (tmp_path / "out" / "images.tsv").exists()

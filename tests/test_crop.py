"""Boxes arithmetic, cell proposals (both backends) and shard cropping to Zarr."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from preprocessing import boxes as bx
from preprocessing.crop import CropParams, crop_shard, cut_patches, patch_windows, propose_boxes
from preprocessing.errors import InputError
from preprocessing.io import read_image
from preprocessing.sources.synthetic import SynthParams, generate

# ------------------------------------------------------------------------------------------ references


def _iou_ref(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            union = (
                max(0.0, p[2] - p[0]) * max(0.0, p[3] - p[1])
                + max(0.0, q[2] - q[0]) * max(0.0, q[3] - q[1])
                - inter
            )
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def _nms_ref(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    for i in order:
        if all(_iou_ref(boxes[i : i + 1], boxes[k : k + 1])[0, 0] <= thr for k in kept):
            kept.append(i)
    return kept


def _random_boxes(rng: np.random.Generator, n: int, size: int = 50) -> np.ndarray:
    xy = rng.integers(0, size, (n, 2))
    wh = rng.integers(0, size // 2, (n, 2))  # includes empty boxes
    return np.concatenate([xy, xy + wh], axis=1)  # (n, 4)


# ------------------------------------------------------------------------------------------ boxes


@pytest.mark.parametrize("seed", range(5))
def test_iou_matches_bruteforce(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = _random_boxes(rng, 17), _random_boxes(rng, 11)
    np.testing.assert_allclose(bx.iou(a, b), _iou_ref(a, b), atol=1e-12)
    assert bx.iou(a, np.zeros((0, 4))).shape == (17, 0)
    assert bx.iou(np.zeros((0, 4)), b).shape == (0, 11)


def test_iou_exclusive_ends() -> None:
    assert bx.iou([[0, 0, 10, 10]], [[10, 0, 20, 10]])[0, 0] == 0.0  # touching, no shared pixel
    assert bx.iou([[0, 0, 10, 10]], [[5, 0, 15, 10]])[0, 0] == pytest.approx(50 / 150)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5])
def test_nms_matches_bruteforce(seed: int, thr: float) -> None:
    rng = np.random.default_rng(seed)
    boxes = _random_boxes(rng, 40)
    scores = rng.integers(0, 5, 40).astype(float)  # many ties
    assert bx.nms(boxes, scores, thr).tolist() == _nms_ref(boxes, scores, thr)
    assert bx.nms(np.zeros((0, 4)), np.zeros(0), thr).tolist() == []


def test_recall() -> None:
    true = np.array([[0, 0, 10, 10], [20, 20, 30, 30]])
    assert bx.recall(np.array([[0, 0, 10, 11]]), true) == 0.5
    assert bx.recall(np.zeros((0, 4)), true) == 0.0
    assert bx.recall(true, true) == 1.0
    assert np.isnan(bx.recall(true, np.zeros((0, 4))))


# ------------------------------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 512x512 fields (one of poor quality), cell_size 110."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, SynthParams(proteins=2, fields_min=2, fields_max=2, poor_fraction=0.25, seed=3))
    return out


def _true_boxes(root: Path) -> dict[str, np.ndarray]:
    table = pd.read_csv(root / "boxes.tsv", sep="\t")
    return {k: g[["x0", "y0", "x1", "y1"]].to_numpy() for k, g in table.groupby("image_id")}


# ------------------------------------------------------------------------------------------ proposals


@pytest.mark.parametrize("backend", ["opencv", "selectivesearch"])
def test_recall_on_synthetic_fields(synth: Path, backend: str) -> None:
    images = pd.read_csv(synth / "images.tsv", sep="\t")
    truth = _true_boxes(synth)
    params = CropParams(backend=backend)
    matched = n_true = n_pred = 0
    for row in images.itertuples():
        boxes = propose_boxes(read_image(synth / row.path), params)
        assert boxes.dtype == np.int64 and boxes.shape[1] == 4
        matched += int(bx.matched(boxes, truth[row.image_id]).sum())
        n_true += len(truth[row.image_id])
        n_pred += len(boxes)
    assert matched / n_true >= 0.8
    assert n_pred <= 1.25 * n_true  # not many more boxes than cells


def test_proposals_deterministic(synth: Path) -> None:
    field = read_image(synth / "images" / "P0001_F01.png")
    params = CropParams()
    first = propose_boxes(field, params)
    assert len(first) > 0
    np.testing.assert_array_equal(first, propose_boxes(field.copy(), params))


def test_blank_field_has_no_boxes() -> None:
    assert propose_boxes(np.zeros((300, 400, 3), np.uint8), CropParams()).shape == (0, 4)
    assert propose_boxes(np.full((64, 64, 3), 200, np.uint8), CropParams()).shape == (0, 4)


def test_bad_params() -> None:
    with pytest.raises(InputError, match="backend"):
        CropParams(backend="edgeboxes")


# ------------------------------------------------------------------------------------------ patches


def test_cut_patches_square_and_padding() -> None:
    field = np.zeros((100, 120, 3), np.uint8)
    field[..., 0] = np.arange(120, dtype=np.uint8)[None, :]  # red = x
    field[..., 2] = 255
    boxes = np.array([[10, 20, 50, 40], [0, 0, 30, 10]])  # (2, 4)
    windows, clipped = patch_windows(boxes, field.shape[:2], square=True)
    assert windows.tolist() == [[10, 10, 50, 50], [0, -10, 30, 20]]
    assert clipped.tolist() == [[10, 10, 50, 50], [0, 0, 30, 20]]
    patches = cut_patches(field, boxes, 16, square=True)
    assert patches.shape == (2, 3, 16, 16) and patches.dtype == np.uint8
    assert (patches[1, 2, :5] == 0).all() and (patches[1, 2, 6:] == 255).all()  # top third padded
    assert patches[0, 0, 8, 0] < patches[0, 0, 8, 15]  # channels-first, x increases to the right
    flat = cut_patches(field, boxes, 16, square=False)
    assert (flat[1, 2] == 255).all()  # no padding without square
    assert cut_patches(field, np.zeros((0, 4)), 16, square=True).shape == (0, 3, 16, 16)


# ------------------------------------------------------------------------------------------ shards


def _write_images_tsv(root: Path, synth: Path, bad: bool) -> Path:
    images = pd.read_csv(synth / "images.tsv", sep="\t")
    images["path"] = [str(synth / p) for p in images["path"]]
    if bad:
        png = (synth / images["path"].iloc[0]).read_bytes()
        (root / "truncated.png").write_bytes(png[: len(png) // 2])
        (root / "notes.png").write_text("not an image\n")
        extra = pd.DataFrame(
            {
                "image_id": ["T1", "T2"],
                "group": ["P0009", "P0009"],
                "path": ["truncated.png", "notes.png"],
                "labels": ["Cytosol", "Cytosol"],
                "quality": ["good", "good"],
            }
        )
        images = pd.concat([images, extra], ignore_index=True)
    dest = root / "images.tsv"
    images.to_csv(dest, sep="\t", index=False)
    return dest


def test_crop_shard_end_to_end(synth: Path, tmp_path: Path) -> None:
    images_tsv = _write_images_tsv(tmp_path, synth, bad=True)  # 4 good + 2 bad
    out_zarr, out_tsv = tmp_path / "out" / "patches.zarr", tmp_path / "out" / "patches.tsv"
    params = CropParams(patch_size=64)
    stats = crop_shard(
        images_tsv, 0, 1, out_zarr, out_tsv, params, boxes_tsv=synth / "boxes.tsv", max_bad_fraction=0.5
    )

    rejected = pd.read_csv(tmp_path / "out" / "patches.rejected.tsv", sep="\t")
    assert rejected["image_id"].tolist() == ["T1", "T2"]
    assert list(rejected.columns) == ["image_id", "path", "reason"]
    assert all("truncated.png" in r or "notes.png" in r for r in rejected["reason"])

    group = zarr.open_group(out_zarr, mode="r")
    patches = group["patches"]
    table = pd.read_csv(out_tsv, sep="\t", keep_default_na=False)
    assert patches.dtype == np.uint8
    assert patches.shape == (len(table), 3, 64, 64) and len(table) > 0
    assert patches.chunks == (1, 3, 64, 64)
    assert group.attrs["patch_shape"] == [64, 64]
    assert group.attrs["params"] == json.loads(json.dumps(asdict(params)))  # JSON: tuples become lists
    assert list(table.columns) == [
        *("patch_index", "image_id", "group", "labels", "x0", "y0", "x1", "y1"),
        "quality",
    ]
    assert table["patch_index"].tolist() == list(range(len(table)))
    assert set(table["image_id"]) <= {"P0001_F01", "P0001_F02", "P0002_F01", "P0002_F02"}

    # each row's window, cut from the field and resized, is its patch (square windows inside the field)
    data = patches[:]
    for row in table.itertuples():
        if row.x1 - row.x0 == row.y1 - row.y0:
            field = read_image(synth / "images" / f"{row.image_id}.png")
            box = np.array([[row.x0, row.y0, row.x1, row.y1]])
            np.testing.assert_array_equal(cut_patches(field, box, 64, square=False)[0], data[row.patch_index])

    on_disk = json.loads((tmp_path / "out" / "patches.json").read_text())
    assert on_disk == stats
    assert stats["fields"] == 6 and stats["fields_rejected"] == 2 and stats["patches"] == len(table)
    assert stats["recall"] >= 0.8 and stats["backend"] == "opencv" and stats["seconds"] >= 0


def test_crop_shard_fails_when_too_many_bad(synth: Path, tmp_path: Path) -> None:
    images_tsv = _write_images_tsv(tmp_path, synth, bad=True)
    out_zarr, out_tsv = tmp_path / "out" / "p.zarr", tmp_path / "out" / "p.tsv"
    with pytest.raises(InputError) as info:
        crop_shard(images_tsv, 0, 1, out_zarr, out_tsv, CropParams(patch_size=32))
    message = str(info.value)
    assert str(images_tsv) in message and "2 of 6" in message and "p.rejected.tsv" in message
    assert "\n" not in message
    assert len(pd.read_csv(tmp_path / "out" / "p.rejected.tsv", sep="\t")) == 2
    assert not out_zarr.exists() and not out_tsv.exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp left


def test_crop_shard_empty_shard(synth: Path, tmp_path: Path) -> None:
    images_tsv = _write_images_tsv(tmp_path, synth, bad=False)  # 4 fields, shard 5 of 6 is empty
    out_zarr, out_tsv = tmp_path / "e.zarr", tmp_path / "e.tsv"
    stats = crop_shard(images_tsv, 5, 6, out_zarr, out_tsv, CropParams(patch_size=32), boxes_tsv=None)
    assert zarr.open_group(out_zarr, mode="r")["patches"].shape == (0, 3, 32, 32)
    assert len(pd.read_csv(out_tsv, sep="\t")) == 0
    assert len(pd.read_csv(tmp_path / "e.rejected.tsv", sep="\t")) == 0
    assert stats["fields"] == 0 and stats["patches"] == 0 and stats["recall"] is None
    with pytest.raises(InputError, match="shard"):
        crop_shard(images_tsv, 6, 6, out_zarr, out_tsv, CropParams())


def test_crop_shard_deterministic_across_workers(synth: Path, tmp_path: Path) -> None:
    images_tsv = _write_images_tsv(tmp_path, synth, bad=False)
    params = CropParams(patch_size=32)
    runs = []
    for workers in (1, 2):
        out_zarr, out_tsv = tmp_path / f"w{workers}.zarr", tmp_path / f"w{workers}.tsv"
        crop_shard(images_tsv, 1, 2, out_zarr, out_tsv, params, workers=workers)
        runs.append((zarr.open_group(out_zarr, mode="r")["patches"][:], out_tsv.read_text()))
    assert runs[0][1] == runs[1][1]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    shard_ids = set(pd.read_csv(tmp_path / "w1.tsv", sep="\t")["image_id"])
    assert shard_ids <= {"P0001_F02", "P0002_F02"}  # rows 1 and 3


def test_whole_images_as_instances(tmp_path: Path) -> None:
    """instances="whole": every image becomes one (H, W) instance, non-square allowed, no proposals."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i, (h, w) in enumerate([(90, 160), (200, 300), (50, 50)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"e{i}.png")
        rows.append(f"E{i}\tG{i % 2}\te{i}.png\tventral ectoderm")
    (tmp_path / "images.tsv").write_text("image_id\tgroup\tpath\tlabels\n" + "\n".join(rows) + "\n")
    params = CropParams(instances="whole", whole_size=(18, 32))
    stats = crop_shard(tmp_path / "images.tsv", 0, 1, tmp_path / "0.zarr", tmp_path / "0.tsv", params)
    patches = zarr.open_array(tmp_path / "0.zarr" / "patches", mode="r")
    assert stats["patches"] == 3 and patches.shape == (3, 3, 18, 32) and patches.chunks == (1, 3, 18, 32)
    table = pd.read_csv(tmp_path / "0.tsv", sep="\t")
    assert table[["x0", "y0", "x1", "y1"]].values.tolist()[1] == [0, 0, 300, 200]
    with pytest.raises(InputError, match="instances must be one of"):
        CropParams(instances="tiles")


def test_huge_image_header_is_rejected_not_a_crash(tmp_path: Path, monkeypatch, capsys) -> None:
    """Through ``hamil crop``: an image whose header claims huge dimensions (PIL's decompression-bomb
    error, or more pixels than HAMIL_MAX_IMAGE_PIXELS) goes to the shard's rejected list and counts
    against max_bad_fraction; it does not take the shard down with a traceback."""
    from PIL import Image
    from test_io import huge_header_jpeg, huge_header_png

    from hamil.cli import main

    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / f"ok{i}.png")
        rows.append(f"OK{i}\tG{i % 2}\tok{i}.png\ta")
    huge_header_png(tmp_path / "bomb.png", 60_000, 60_000)  # past PIL's own error limit
    huge_header_jpeg(tmp_path / "big.jpg", 3000, 2000)  # over the limit set below
    rows += ["BOMB\tG0\tbomb.png\ta", "BIG\tG1\tbig.jpg\ta"]
    (tmp_path / "images.tsv").write_text("image_id\tgroup\tpath\tlabels\n" + "\n".join(rows) + "\n")
    monkeypatch.setenv("HAMIL_MAX_IMAGE_PIXELS", "1000000")
    whole = ["--instances", "whole", "--whole-size", "8", "8"]
    crop = ["crop", "--images", str(tmp_path / "images.tsv"), *whole]
    out = ["--out-zarr", str(tmp_path / "0.zarr"), "--out-tsv", str(tmp_path / "0.tsv")]
    assert main([*crop, *out, "--max-bad-fraction", "0.5"]) == 0
    rejected = pd.read_csv(tmp_path / "0.rejected.tsv", sep="\t")
    assert rejected["image_id"].tolist() == ["BOMB", "BIG"]
    assert all("image too large (" in r for r in rejected["reason"])
    assert pd.read_csv(tmp_path / "0.tsv", sep="\t")["image_id"].tolist() == ["OK0", "OK1", "OK2", "OK3"]
    assert json.loads((tmp_path / "0.json").read_text())["fields_rejected"] == 2
    assert main([*crop, *out, "--max-bad-fraction", "0.2"]) == 2  # 2 of 6 is too many: one line
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "2 of 6" in err and "bomb.png: image too large" in err


def test_the_split_column_reaches_the_patch_table(tmp_path: Path) -> None:
    """Extra columns of images.tsv (the data set's own ``split``, empty cells included) are copied to every
    patch of the image, whole-image instances included, so the bag stage can keep the split."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i, split in enumerate(["train", "", "test"]):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / f"f{i}.png")
        rows.append(f"F{i}\tG{i}\tf{i}.png\ta\t{split}")
    (tmp_path / "images.tsv").write_text("image_id\tgroup\tpath\tlabels\tsplit\n" + "\n".join(rows) + "\n")
    params = CropParams(instances="whole", whole_size=(8, 8))
    crop_shard(tmp_path / "images.tsv", 0, 1, tmp_path / "0.zarr", tmp_path / "0.tsv", params)
    table = pd.read_csv(tmp_path / "0.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert table["split"].tolist() == ["train", "", "test"]
    assert table["image_id"].tolist() == ["F0", "F1", "F2"]

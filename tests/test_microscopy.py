"""Microscope files (preprocessing.microscopy) through the folder source and the crop stage: files written
by tifffile (OME-TIFF, ImageJ hyperstacks, plain multi-page TIFF), checked on pixels: the patch channels
equal the chosen planes, scaled as the read block says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from preprocessing.crop import CropParams, crop_shard
from preprocessing.errors import InputError
from preprocessing.io import read_images_table
from preprocessing.microscopy import ReadParams, open_stack
from preprocessing.sources.folder import prepare_folder

NAMES = ["DAPI", "GFP", "mCherry", "Cy5"]
H, W = 24, 32


def planes(seed: int, shape: tuple[int, ...] = (5, 4, H, W)) -> np.ndarray:
    """Random 12-bit camera values (0-4095) as uint16, ``shape`` (Z, C, Y, X) by default."""
    return np.random.default_rng(seed).integers(0, 4096, shape, dtype=np.uint16)


def write_ome(path: Path, data: np.ndarray, axes: str = "ZCYX", names: list[str] = NAMES) -> None:
    meta = {"axes": axes, "Channel": {"Name": names}, "PhysicalSizeX": 0.325, "PhysicalSizeY": 0.33}
    tifffile.imwrite(path, data, ome=True, metadata=meta, photometric="minisblack")


def folder(tmp_path: Path, files: dict[str, np.ndarray], write=write_ome) -> Path:
    """Files written with ``write``, two per group, and the folder source's table listing them."""
    rows = ["path\tgroup\tlabels"]
    for i, (name, data) in enumerate(files.items()):
        write(tmp_path / name, data)
        rows.append(f"{name}\tG{i // 2}\t{'hit' if i % 2 else ''}")
    (tmp_path / "plate.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path / "plate.tsv"


def crop_whole(tmp_path: Path, out: Path) -> tuple[np.ndarray, zarr.Group]:
    """The crop stage on the folder's images.tsv, each field one instance at its own size (no resize)."""
    params = CropParams(instances="whole", whole_size=(H, W))
    crop_shard(out / "images.tsv", 0, 1, tmp_path / "p.zarr", tmp_path / "p.tsv", params)
    group = zarr.open_group(tmp_path / "p.zarr", mode="r")
    return group["patches"][:], group


def scaled(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Independent reference of the intensity scaling: lo -> 0, hi -> 255, rounded, clipped."""
    return np.clip(np.round((values.astype(np.float64) - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)


def test_an_ome_tiff_says_what_it_holds(tmp_path):
    write_ome(tmp_path / "a.ome.tif", planes(0))
    stack = open_stack(tmp_path / "a.ome.tif")
    assert stack.format == "OME-TIFF" and stack.data.shape == (1, 1, 4, 5, H, W)
    assert stack.channel_names == NAMES and stack.pixel_size_um == pytest.approx((0.325, 0.33))
    assert stack.describe() == "4 channels (DAPI, GFP, mCherry, Cy5) × 5 Z"


def test_planes_not_chosen_are_refused_naming_what_the_file_holds(tmp_path):
    table = folder(tmp_path, {f"f{i}.ome.tif": planes(i) for i in range(2)})
    with pytest.raises(InputError) as err:
        prepare_folder(table, tmp_path / "out")
    assert "4 channels (DAPI, GFP, mCherry, Cy5) × 5 Z: set read.channels and read.z" in str(err.value)
    assert "\n" not in str(err.value)
    plain = folder(
        tmp_path, {"g0.tif": planes(0, (2, H, W)), "g1.tif": planes(1, (2, H, W))}, tifffile.imwrite
    )
    with pytest.raises(InputError, match=r"2 pages: set read.channels"):  # a 16-bit 2-channel TIFF: not cut
        prepare_folder(plain, tmp_path / "out2")


def test_chosen_channels_and_z_are_the_patch_channels(tmp_path):
    data = {f"f{i}.ome.tif": planes(i) for i in range(4)}
    table = folder(tmp_path, data)
    read = {"channels": ["gfp", 0], "z": 2, "intensity": {"range": [0, 4095]}}  # names case-insensitive
    out = prepare_folder(table, tmp_path / "out", read=read)
    assert list(out["pixel_size_um_x"]) == ["0.325"] * 4 and list(out["pixel_size_um_y"]) == ["0.33"] * 4
    spec = json.loads((tmp_path / "out/read.json").read_text())
    assert spec["ranges"] == [[0, 4095], [0, 4095]] and spec["channel_names"] == ["GFP", "DAPI"]
    patches, group = crop_whole(tmp_path, tmp_path / "out")
    assert (
        spec.pop("summary")
        == "OME-TIFF, 4 channels (DAPI, GFP, mCherry, Cy5) × 5 Z; using GFP, DAPI at z 2, range 0-4095"
    )
    assert patches.shape == (4, 2, H, W) and group.attrs["read"] == spec
    for k, values in enumerate(data.values()):
        assert np.array_equal(patches[k], scaled(values[2][[1, 0]], 0, 4095))  # (GFP, DAPI) at z 2


@pytest.mark.parametrize("z", ["max", "mean"])
def test_z_projections(tmp_path, z):
    data = {f"f{i}.ome.tif": planes(i) for i in range(2)}
    read = {"channels": ["Cy5"], "z": z, "intensity": {"range": [100, 4000]}}
    prepare_folder(folder(tmp_path, data), tmp_path / "out", read=read)
    patches, _ = crop_whole(tmp_path, tmp_path / "out")
    for k, values in enumerate(data.values()):
        cy5 = values[:, 3].astype(np.float64)  # (Z, Y, X)
        expected = scaled(
            cy5.max(axis=0) if z == "max" else np.rint(cy5.mean(axis=0)), 100, 4000
        )  # mean: in uint16
        assert np.array_equal(patches[k, 0], expected)


def test_time_and_scenes(tmp_path):
    """ImageJ hyperstack time points, and OME scenes: `scene: all` makes each scene its own field."""
    stack = planes(5, (3, 2, 2, H, W))  # (T, Z, C, Y, X)
    path = tmp_path / "t.tif"
    tifffile.imwrite(
        path, stack, imagej=True, resolution=(2.0, 2.0), metadata={"axes": "TZCYX", "unit": "um"}
    )
    held = open_stack(path)
    assert held.format == "ImageJ TIFF" and held.describe() == "2 channels × 2 Z × 3 time points"
    assert held.pixel_size_um == pytest.approx((0.5, 0.5))
    scenes = tmp_path / "s.ome.tif"
    with tifffile.TiffWriter(scenes, ome=True) as tif:
        for k in range(2):
            tif.write(
                planes(10 + k, (2, H, W)), metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "GFP"]}}
            )
    (tmp_path / "t.tsv").write_text(f"path\tgroup\tlabels\n{path}\tG0\thit\n")
    read = {"channels": [1], "z": 1, "time": 2, "intensity": {"range": [0, 4095]}}
    prepare_folder(tmp_path / "t.tsv", tmp_path / "out", read=read)
    patches, _ = crop_whole(tmp_path, tmp_path / "out")
    assert np.array_equal(patches[0, 0], scaled(stack[2, 1, 1], 0, 4095))  # time 2, Z 1, channel 1
    (tmp_path / "s.tsv").write_text(f"path\tgroup\tlabels\n{scenes}\tG1\t\n")
    read = {"channels": ["GFP"], "scene": "all", "intensity": {"range": [0, 4095]}}
    out = prepare_folder(tmp_path / "s.tsv", tmp_path / "out2", read=read)
    assert list(out["image_id"]) == ["s.ome_s0", "s.ome_s1"] and list(out["scene"]) == ["0", "1"]
    patches, _ = crop_whole(tmp_path, tmp_path / "out2")
    for k in range(2):
        assert np.array_equal(patches[k, 0], scaled(planes(10 + k, (2, H, W))[1], 0, 4095))


def test_percentiles_are_computed_once_over_the_training_images(tmp_path):
    data = {f"f{i}.ome.tif": planes(i) * (1 + 3 * (i >= 2)) for i in range(4)}  # test images brighter
    table = folder(tmp_path, data)
    text = table.read_text().splitlines()
    table.write_text(
        "\n".join(
            [text[0] + "\tsplit"] + [f"{r}\t{'train' if i < 2 else 'test'}" for i, r in enumerate(text[1:])]
        )
        + "\n"
    )
    read = {"channels": ["DAPI"], "z": 0, "intensity": {"percentiles": [1, 99]}}
    prepare_folder(table, tmp_path / "out", read=read)
    ((lo, hi),) = json.loads((tmp_path / "out/read.json").read_text())["ranges"]
    train = np.concatenate([v[0, 0].ravel() for v in list(data.values())[:2]]).astype(np.float64)
    assert (lo, hi) == pytest.approx((np.percentile(train, 1), np.percentile(train, 99)))
    patches, _ = crop_whole(tmp_path, tmp_path / "out")
    assert np.array_equal(patches[3, 0], scaled(list(data.values())[3][0, 0], lo, hi))  # the same range


def test_unscaled_floats_and_unknown_channels_are_refused(tmp_path):
    floats = folder(
        tmp_path, {"a.ome.tif": planes(0).astype(np.float32), "b.ome.tif": planes(1).astype(np.float32)}
    )
    with pytest.raises(InputError, match=r"float32 pixels .*: set read.intensity"):
        prepare_folder(floats, tmp_path / "o1", read={"channels": ["DAPI"], "z": 0})
    with pytest.raises(InputError, match=r"no channel named 'YFP' \(4 channels \(DAPI, GFP"):
        prepare_folder(floats, tmp_path / "o2", read={"channels": ["YFP"], "z": 0})
    with pytest.raises(InputError, match=r"read.z must be an index, max or mean"):
        ReadParams.from_dict({"z": "median"})


def test_rgb_files_read_as_before(tmp_path):
    """No read block, an 8-bit RGB TIFF and PNG: three channels, pixels as they are."""
    from PIL import Image

    rgb = np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "b.tif", rgb, photometric="rgb")
    (tmp_path / "plate.tsv").write_text("path\tgroup\tlabels\na.png\tG0\thit\nb.tif\tG1\t\n")
    prepare_folder(tmp_path / "plate.tsv", tmp_path / "out")
    patches, _ = crop_whole(tmp_path, tmp_path / "out")
    assert patches.shape == (2, 3, H, W)
    assert np.array_equal(patches[0], rgb.transpose(2, 0, 1)) and np.array_equal(patches[1], patches[0])
    assert read_images_table(tmp_path / "out/images.tsv")["pixel_size_um_x"].tolist() == ["", ""]


@pytest.mark.parametrize("in_chans", [1, 2, 5])
def test_backbone_adapts_rgb_weights_as_timm_does(in_chans):
    """timm's adapt_input_conv, written out independently: one channel sums RGB; more repeat RGB cyclically,
    scaled by 3 / C."""
    from hamil.models.backbone import adapt_input_conv

    weight = torch.randn(64, 3, 7, 7, dtype=torch.float64)
    got = adapt_input_conv(in_chans, weight)
    if in_chans == 1:
        expected = weight[:, 0:1] + weight[:, 1:2] + weight[:, 2:3]
    else:
        expected = torch.stack([weight[:, c % 3] for c in range(in_chans)], dim=1) * 3 / in_chans
    assert got.shape == (64, in_chans, 7, 7)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)  # float64: sums of three terms


def test_two_channel_ome_tiffs_train_and_predict_through_the_cli(tmp_path, caplog):
    """download folder --read, crop, bags, train (a 2-channel backbone), predict: the checkpoint carries
    the read spec and pixel size, predict reads new files the same way and warns on another pixel size."""
    from hamil.checkpoint import load_checkpoint
    from hamil.cli import main

    rows = ["path\tgroup\tlabels"]
    for g in range(12):
        for f in range(2):
            data = planes(100 + 2 * g + f, (3, 2, H, W))  # (Z, C, Y, X)
            if g % 2:
                data[:, 1, 8:16, 8:20] = 4000  # a bright GFP blob marks a hit
            write_ome(tmp_path / f"g{g}_{f}.ome.tif", data, names=["DAPI", "GFP"])
            rows.append(f"g{g}_{f}.ome.tif\tG{g:02d}\t{'hit' if g % 2 else ''}")
    (tmp_path / "plate.tsv").write_text("\n".join(rows) + "\n")
    raw, shard, store, run = tmp_path / "raw", tmp_path / "patches", tmp_path / "ds.zarr", tmp_path / "run"
    read = json.dumps({"channels": ["GFP", "DAPI"], "z": "max", "intensity": {"range": [0, 4095]}})
    caplog.set_level("INFO")
    assert (
        main(
            ["download", "folder", "--table", str(tmp_path / "plate.tsv"), "--out", str(raw), "--read", read]
        )
        == 0
    )
    assert "OME-TIFF, 2 channels (DAPI, GFP) × 3 Z; using GFP, DAPI at z max, range 0-4095" in caplog.text
    crop = ["crop", "--images", str(raw / "images.tsv"), "--out-zarr", str(shard / "0.zarr")]
    assert (
        main([*crop, "--out-tsv", str(shard / "0.tsv"), "--instances", "whole", "--whole-size", "24", "32"])
        == 0
    )
    bags = [
        "bags",
        "--tables",
        str(shard / "0.tsv"),
        "--stores",
        str(shard / "0.zarr"),
        "--out-store",
        str(store),
    ]
    assert (
        main(
            [
                *bags,
                "--out-table",
                str(tmp_path / "bags.tsv"),
                "--keep-unlabelled",
                "--split-ratio",
                "2",
                "1",
                "1",
            ]
        )
        == 0
    )
    train = ["train", "--store", str(store), "--out-dir", str(run), "--model", "mean", "--epochs", "1"]
    assert main([*train, "--batch-bags", "4", "--threads", "1", "--no-augment"]) == 0
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["model"]["backbone.trunk.0.weight"].shape[1] == 2
    attrs = ckpt["store_attrs"]
    assert attrs["read"]["channel_names"] == ["GFP", "DAPI"] and attrs["pixel_sizes_um"] == [[0.325, 0.33]]
    # a new file at another pixel size: read as in training, with a warning
    data = planes(7, (3, 2, H, W))
    meta = {
        "axes": "ZCYX",
        "Channel": {"Name": ["DAPI", "GFP"]},
        "PhysicalSizeX": 0.65,
        "PhysicalSizeY": 0.65,
    }
    tifffile.imwrite(tmp_path / "new.ome.tif", data, ome=True, metadata=meta, photometric="minisblack")
    (tmp_path / "new.tsv").write_text(f"path\tbag\n{tmp_path / 'new.ome.tif'}\tnew\n")
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(run / "best.pt"),
                "--inputs",
                str(tmp_path / "new.tsv"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "pixel size 0.65 x 0.65 µm, the training fields had [(0.325, 0.33)]" in caplog.text
    assert (out / "predictions.tsv").read_text().count("\n") == 2  # header and the one bag


# ------------------------------------------------------------------------------------------ guard rails


def test_fields_without_patches_and_groups_without_bags_are_counted_and_warned(tmp_path, caplog):
    """After a bad read (here: dark fields where no cell is found), the crop stage warns and counts the
    fields without a patch, the bag stage the groups left without any bag."""
    from PIL import Image

    from preprocessing.bags import BagParams, build_bags

    rng = np.random.default_rng(0)
    rows = ["image_id\tgroup\tpath\tlabels"]
    for g in range(8):
        field = np.zeros((128, 128, 3), np.uint8)
        if g < 3:  # three groups show cells: bright discs with a blue nucleus
            for cy, cx in rng.integers(24, 104, (4, 2)):
                cv2_disc(field, int(cx), int(cy))
        Image.fromarray(field).save(tmp_path / f"f{g}.png")
        rows.append(f"f{g}\tG{g}\t{tmp_path / f'f{g}.png'}\t{'a' if g % 2 else 'b'}")
    (tmp_path / "images.tsv").write_text("\n".join(rows) + "\n")
    caplog.set_level("WARNING")
    params = CropParams(backend="opencv", downscale=128, patch_size=16)
    stats = crop_shard(tmp_path / "images.tsv", 0, 1, tmp_path / "0.zarr", tmp_path / "0.tsv", params)
    assert stats["fields_without_patches"] >= 5 and stats["groups"] == [f"G{g}" for g in range(8)]
    assert "fields gave no patch" in caplog.text
    bag_stats = build_bags(
        [tmp_path / "0.tsv"], [tmp_path / "0.zarr"], tmp_path / "b.zarr", tmp_path / "b/bags.tsv",
        BagParams(top_k=2, split_ratio=(1, 1, 1)), "folder",
    )  # fmt: skip
    assert (
        bag_stats["groups_without_patches"]
        == 8 - bag_stats["groups"] - bag_stats["groups_dropped_without_label"]
    )
    assert bag_stats["groups_without_patches"] >= 5 and "groups got no patch in any shard" in caplog.text


def cv2_disc(field: np.ndarray, cx: int, cy: int) -> None:
    import cv2

    cv2.circle(field, (cx, cy), 10, (200, 180, 60), -1)
    cv2.circle(field, (cx, cy), 4, (60, 60, 255), -1)


def test_a_split_of_one_class_is_warned(caplog):
    from hamil.evaluate import warn_one_class_split

    caplog.set_level("WARNING")
    labels = np.array([[1, 0], [1, 1]])  # class a: positives only; b: both
    assert warn_one_class_split(labels, ["a", "b"], "test") == ["a"]
    assert "test split: 2 bags; 1 of 2 classes hold only positives or only negatives (a)" in caplog.text
    caplog.clear()
    assert warn_one_class_split(np.array([[1, 0], [0, 1]]), ["a", "b"], "test") == [] and not caplog.text


def test_the_readme_read_block_reaches_the_download_job(tmp_path):
    """The README's `read:` example is valid config and reaches `hamil download folder --read` as JSON."""
    import re
    import subprocess
    import sys

    import yaml

    repo = Path(__file__).resolve().parents[1]
    section = (repo / "README.md").read_text().split("### Microscope files", 1)[1]
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    read = example["datasets"]["screen"]["read"]
    ReadParams.from_dict(read)
    config = yaml.safe_load((repo / "config/tiny.yaml").read_text())
    (tmp_path / "plate.tsv").write_text("path\tgroup\tlabels\n")
    config["datasets"] = {"screen": {"source": "folder", "table": str(tmp_path / "plate.tsv"), "read": read}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-n", "-p", "-s", str(repo / "Snakefile"), "acquire"]
    cmd += ["--directory", str(tmp_path), "--configfile", str(tmp_path / "c.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shell = next(line for line in proc.stdout.splitlines() if "hamil download folder" in line)
    passed = json.loads(shell.split("--read '", 1)[1].split("'", 1)[0])
    assert passed == read


# ------------------------------------------------------------------------------------------ bioio formats


def write_ome_zarr(path: Path, data: np.ndarray) -> None:
    """``(C, Z, Y, X)`` as an OME-Zarr image with bioio-ome-zarr's writer (channels DAPI, GFP, 0.5 µm)."""
    from bioio_ome_zarr.writers import Channel, OMEZarrWriter

    channels = [Channel(label=n, color=c) for n, c in (("DAPI", "0000FF"), ("GFP", "00FF00"))]
    writer = OMEZarrWriter(
        path,
        level_shapes=(1, *data.shape),
        dtype=data.dtype,
        channels=channels,
        axes_names=["t", "c", "z", "y", "x"],
        axes_types=["time", "channel", "space", "space", "space"],
        axes_units=[None, None, "micrometer", "micrometer", "micrometer"],
        physical_pixel_size=[1.0, 1.0, 2.0, 0.5, 0.5],
    )
    writer.write_full_volume(data[None])


def write_czi(path: Path, data: np.ndarray) -> None:
    """``(C, Z, Y, X)`` as a CZI with pylibCZIrw (channels DAPI, GFP, 0.5 µm)."""
    from pylibCZIrw import czi as pyczi

    with pyczi.create_czi(str(path), exist_ok=True) as doc:
        for c in range(data.shape[0]):
            for z in range(data.shape[1]):
                doc.write(data=data[c, z], plane={"C": c, "Z": z, "T": 0}, scene=0)
        doc.write_metadata(channel_names={0: "DAPI", 1: "GFP"}, scale_x=0.5e-6, scale_y=0.5e-6, scale_z=2e-6)


@pytest.mark.parametrize(("suffix", "write"), [(".ome.zarr", write_ome_zarr), (".czi", write_czi)])
def test_ome_zarr_and_czi_give_the_chosen_planes(tmp_path, suffix, write):
    pytest.importorskip("bioio")
    data = {f"f{i}{suffix}": planes(20 + i, (2, 3, H, W)) for i in range(2)}  # (C, Z, Y, X)
    table = folder(tmp_path, data, write)
    with pytest.raises(InputError, match=r"2 channels \(DAPI, GFP\) × 3 Z: set read.channels and read.z"):
        prepare_folder(table, tmp_path / "refused")
    read = {"channels": ["GFP"], "z": 1, "intensity": {"range": [0, 4095]}}
    out = prepare_folder(table, tmp_path / "out", read=read)
    assert list(out["pixel_size_um_x"]) == ["0.5", "0.5"]
    patches, _ = crop_whole(tmp_path, tmp_path / "out")
    for k, values in enumerate(data.values()):
        assert np.array_equal(patches[k, 0], scaled(values[1, 1], 0, 4095))  # GFP at z 1


def test_a_missing_format_plugin_names_the_extra(tmp_path, monkeypatch):
    import sys

    (tmp_path / "a.nd2").write_bytes(b"not read: the plugin is missing")
    monkeypatch.setitem(sys.modules, "bioio_nd2", None)  # as if `.[formats]` were not installed
    with pytest.raises(
        InputError,
        match=r"a.nd2: reading .nd2 files needs bioio and bioio-nd2: pip install -e '.\[formats\]'",
    ):
        open_stack(tmp_path / "a.nd2")


def test_channel_roles_by_name_become_indices_of_the_chosen_channels(tmp_path):
    data = {f"f{i}.ome.tif": planes(30 + i) for i in range(2)}
    read = {"channels": ["GFP", 0], "z": 0, "intensity": {"range": [0, 4095]}}  # GFP, then DAPI by index
    prepare_folder(folder(tmp_path, data), tmp_path / "out", read=read)
    images = tmp_path / "out/images.tsv"
    params = CropParams(backend="seeded", nucleus_channel="dapi", cytoplasm_channels=("GFP",), downscale=32)
    crop_shard(images, 0, 1, tmp_path / "s.zarr", tmp_path / "s.tsv", params)
    recorded = zarr.open_group(tmp_path / "s.zarr", mode="r").attrs["params"]
    assert (recorded["nucleus_channel"], recorded["cytoplasm_channels"]) == (1, [0])  # the store's order
    with pytest.raises(
        InputError, match=r"nucleus_channel: no chosen channel named 'Cy5' \(chosen: gfp, 0/dapi\)"
    ):
        crop_shard(images, 0, 1, tmp_path / "t.zarr", tmp_path / "t.tsv", CropParams(nucleus_channel="Cy5"))


def test_predict_warns_when_new_files_name_other_channels(tmp_path, caplog):
    from hamil.predict import warn_if_unlike_training
    from preprocessing.microscopy import ReadSpec

    spec = ReadSpec(ReadParams(channels=(1,), z=0), ((0.0, 4095.0),), ("GFP",))  # trained on channel 1: GFP
    write_ome(tmp_path / "new.ome.tif", planes(0, (1, 2, H, W)), names=["DAPI", "YFP"])
    caplog.set_level("WARNING")
    warn_if_unlike_training(tmp_path / "new.ome.tif", spec, {"pixel_sizes_um": [[0.325, 0.33]]})
    assert "channels ['YFP'], the model was trained on ['GFP']" in caplog.text
    assert "pixel size" not in caplog.text  # the same pixel size


# ------------------------------------------------------------------------------------------ review cases


def test_single_plane_tiffs_without_a_read_block_read_as_read_image_does(tmp_path):
    """RGBA, palette and 16-bit grey TIFFs (PIL-written) give exactly what read_image gives."""
    from PIL import Image

    from preprocessing.io import read_image

    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (H, W, 4), dtype=np.uint8), "RGBA").save(tmp_path / "a.tif")
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).convert("P").save(tmp_path / "b.tif")
    Image.fromarray(rng.integers(0, 65536, (H, W), dtype=np.uint16)).save(tmp_path / "c.tif")
    (tmp_path / "plate.tsv").write_text("path\tgroup\tlabels\na.tif\tG0\thit\nb.tif\tG1\t\nc.tif\tG2\thit\n")
    prepare_folder(tmp_path / "plate.tsv", tmp_path / "out")
    patches, _ = crop_whole(tmp_path, tmp_path / "out")
    for k, name in enumerate(("a.tif", "b.tif", "c.tif")):
        assert np.array_equal(patches[k], read_image(tmp_path / name).transpose(2, 0, 1)), name


def test_pages_and_series_are_never_taken_for_colours(tmp_path):
    tifffile.imwrite(
        tmp_path / "three.tif", planes(0, (3, H, W)), photometric="minisblack"
    )  # 3 pages: Z or channels?
    with pytest.raises(InputError, match=r"three.tif: 3 pages: set read.channels"):
        open_stack_checked(tmp_path / "three.tif")
    with tifffile.TiffWriter(tmp_path / "two.tif") as tif:  # two series of other shapes
        tif.write(planes(1, (H, W)))
        tif.write(planes(2, (8, 8)))
    with pytest.raises(InputError, match=r"two.tif: 2 image series .*only OME-TIFF scenes are read"):
        open_stack(tmp_path / "two.tif")
    (tmp_path / "bad.tif").write_bytes(tifffile_bytes()[:200])  # a truncated file
    with pytest.raises(InputError, match=r"bad.tif: unreadable TIFF"):
        open_stack(tmp_path / "bad.tif")


def open_stack_checked(path: Path) -> None:
    from preprocessing.microscopy import inspect_file

    inspect_file(path, ReadParams())


def tifffile_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, planes(3, (64, 64)), compression="zlib")
    return buffer.getvalue()


def test_a_mean_projection_of_16_bit_data_needs_no_range(tmp_path):
    data = {f"f{i}.ome.tif": planes(40 + i) for i in range(2)}
    prepare_folder(folder(tmp_path, data), tmp_path / "out", read={"channels": ["GFP"], "z": "mean"})
    patches, _ = crop_whole(tmp_path, tmp_path / "out")
    mean = np.rint(list(data.values())[0][:, 1].astype(np.float64).mean(axis=0))
    assert np.array_equal(patches[0, 0], scaled(mean, 0, 65535))  # the type's range, as without z


def test_a_users_scene_column_is_refused_not_read(tmp_path):
    table = folder(tmp_path, {"f0.ome.tif": planes(0), "f1.ome.tif": planes(1)})
    text = table.read_text().splitlines()
    table.write_text("\n".join([text[0] + "\tscene"] + [r + "\tA1" for r in text[1:]]) + "\n")
    with pytest.raises(InputError, match=r"column 'scene' is written by this stage"):
        prepare_folder(table, tmp_path / "out", read={"channels": [0], "z": 0})


def test_box_finders_see_the_nucleus_channel_of_any_field():
    """Two channels with the default nucleus channel 2: one line; five channels, nucleus 4: the view puts
    it last, as the RGB backends expect the nucleus in blue."""
    from preprocessing.crop import proposal_view

    two = np.zeros((32, 32, 2), np.uint8)
    with pytest.raises(InputError, match=r"channel role 2 out of range for fields of 2 channels"):
        proposal_view(two, CropParams())
    five = np.stack([np.full((32, 32), v, np.uint8) for v in (10, 20, 30, 40, 50)], axis=2)
    view, roles = proposal_view(five, CropParams(nucleus_channel=4, cytoplasm_channels=(0,)))
    assert view[0, 0].tolist() == [10, 20, 50] and roles.nucleus_channel == 2


def test_scenes_naming_channels_differently_are_refused(tmp_path):
    path = tmp_path / "s.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        for names in (["DAPI", "GFP"], ["GFP", "DAPI"]):
            tif.write(planes(0, (2, H, W)), metadata={"axes": "CYX", "Channel": {"Name": names}})
    with pytest.raises(InputError, match=r"s.ome.tif: its scenes name their channels differently"):
        open_stack(path)


def test_percentiles_over_files_of_other_channel_counts_are_refused(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "rgb.png")
    (tmp_path / "plate.tsv").write_text("path\tgroup\tlabels\ngrey.png\tG0\thit\nrgb.png\tG1\t\n")
    with pytest.raises(InputError, match=r"the files hold \[1, 3\] channels; set read.channels"):
        prepare_folder(tmp_path / "plate.tsv", tmp_path / "out", read={"intensity": {"percentiles": [1, 99]}})


def test_a_single_plane_czi_without_a_read_block_reaches_the_patches(tmp_path):
    """PIL cannot read a CZI: without a read block it is read through its plugin, grey repeated to RGB."""
    pytest.importorskip("bioio_czi")
    data = {f"f{i}.czi": planes(50 + i, (1, 1, H, W)) for i in range(2)}  # one channel, one Z
    prepare_folder(folder(tmp_path, data, write_czi_grey), tmp_path / "out")
    patches, _ = crop_whole(tmp_path, tmp_path / "out")
    for k, values in enumerate(data.values()):
        expected = scaled(values[0, 0], 0, 65535)  # 16-bit by its type's range, as without a block
        assert all(np.array_equal(patches[k, c], expected) for c in range(3))


def write_czi_grey(path: Path, data: np.ndarray) -> None:
    from pylibCZIrw import czi as pyczi

    with pyczi.create_czi(str(path), exist_ok=True) as doc:
        doc.write(data=data[0, 0], plane={"C": 0, "Z": 0, "T": 0}, scene=0)

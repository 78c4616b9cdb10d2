"""The seeded crop backend (cells grown from their nuclei), channel roles, dense synthetic fields and the crop
preview (``hamil crop-preview``)."""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from hamil.cli import build_parser, main
from preprocessing import boxes as bx
from preprocessing import seeded
from preprocessing.crop import CropParams, crop_shard, params_from_attrs, propose_boxes
from preprocessing.errors import InputError
from preprocessing.io import read_image
from preprocessing.preview import BOX_COLOUR, draw_boxes, preview_crop
from preprocessing.sources import synthetic
from preprocessing.sources.synthetic import SynthParams, generate

REPO = Path(__file__).resolve().parents[1]
SEEDED = CropParams(backend="seeded")
DENSE = SynthParams(  # touching cells: 256x256 fields, 10-14 cells of ~60 px
    proteins=3,
    fields_min=1,
    fields_max=1,
    field_size=256,
    cell_size=60,
    cells_min=10,
    cells_max=14,
    seed=4,
    touching=0.1,
)


# ------------------------------------------------------------------------------------------ known cells


def _ellipse(shape: tuple[int, int], centre: tuple[int, int], axes: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 1, -1)
    return mask.astype(bool)  # (h, w)


def _box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _two_touching_cells(size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """An RGB field ``(size, size, 3)`` with two cell bodies (red) that overlap over a few pixels, each with
    a nucleus (blue), and their true boxes ``(2, 4)``."""
    shape = (size, size)
    bodies = [_ellipse(shape, (80, 128), (52, 40)), _ellipse(shape, (178, 128), (50, 44))]
    nuclei = [_ellipse(shape, (72, 126), (20, 16)), _ellipse(shape, (186, 132), (19, 17))]
    assert (bodies[0] & bodies[1]).any()  # they touch
    rng = np.random.default_rng(0)
    field = rng.normal(6, 2, (*shape, 3))  # (h, w, 3) dark, noisy background
    for body, nucleus in zip(bodies, nuclei, strict=True):
        field[body, 0] += 60  # cytoplasm (microtubules)
        field[body, 1] += 25  # a dim protein stain
        field[nucleus, 2] += 170
    field = cv2.GaussianBlur(field, (0, 0), 1.0)
    return np.clip(field, 0, 255).astype(np.uint8), np.array([_box(b) for b in bodies])


def test_two_touching_cells_give_two_boxes() -> None:
    field, truth = _two_touching_cells()
    boxes = propose_boxes(field, SEEDED)
    assert len(boxes) == 2
    overlaps = bx.iou(boxes, truth)  # (2, 2)
    assert sorted(overlaps.argmax(axis=1).tolist()) == [0, 1]  # one box per cell
    assert overlaps.max(axis=1).min() >= 0.7
    nuclei = propose_boxes(field, dataclasses.replace(SEEDED, cytoplasm_channels=()))  # (2, 4) nuclei only
    assert len(nuclei) == 2 and bx.iou(nuclei, truth).max() < 0.5  # the cell boxes are not the nuclei's


def test_touching_nuclei_are_split() -> None:
    """Two overlapping round nuclei in a grey image: two boxes, each on its own nucleus."""
    shape = (200, 200)
    nuclei = [_ellipse(shape, (80, 100), (24, 24)), _ellipse(shape, (118, 100), (22, 22))]
    assert (nuclei[0] & nuclei[1]).any()
    grey = np.full(shape, 8, np.uint8)
    for nucleus in nuclei:
        grey[nucleus] = 150
    boxes = propose_boxes(grey, dataclasses.replace(SEEDED, min_size=0.05))
    assert len(boxes) == 2
    assert bx.iou(boxes, np.array([_box(n) for n in nuclei])).max(axis=1).min() >= 0.5


@pytest.mark.parametrize("radius", [18, 23])
def test_large_nuclei_on_a_4_3_field(radius: int) -> None:
    """Nuclei over 32 px across at the working size are segmented at a smaller scale; on a 4:3 field the
    rounding of that scale once left the cytoplasm a pixel off the nuclei (a crash, found in review)."""
    rng = np.random.default_rng(0)
    small = np.zeros((384, 512, 3), np.uint8)  # (h, w, 3)
    centres = [
        (x, y)
        for y in range(2 * radius, 384 - 2 * radius, int(radius * 3.2))
        for x in range(2 * radius, 512 - 2 * radius, int(radius * 3.2))
    ]
    for x, y in centres:
        cv2.circle(small, (x, y), int(radius * 1.5), (120, 90, 0), -1)  # cell body
        cv2.circle(small, (x, y), radius, (120, 90, 220), -1)  # nucleus
    small = cv2.GaussianBlur(small, (0, 0), 1.5)
    small = np.clip(small.astype(int) + rng.integers(0, 10, small.shape), 0, 255).astype(np.uint8)
    field = cv2.resize(small, (2048, 1536), interpolation=cv2.INTER_LINEAR)  # a 4:3 camera field
    boxes = propose_boxes(field, SEEDED)
    assert len(boxes) >= 0.8 * len(centres)


def test_grey_fields_are_nuclei_only() -> None:
    field, _ = _two_touching_cells()
    grey = field[:, :, 2]  # (h, w): the nuclei
    from_2d = propose_boxes(grey, SEEDED)
    from_rgb = propose_boxes(np.repeat(grey[:, :, None], 3, axis=2), SEEDED)  # equal channels: grey
    nuclei_only = propose_boxes(field, dataclasses.replace(SEEDED, cytoplasm_channels=()))
    np.testing.assert_array_equal(from_2d, from_rgb)
    np.testing.assert_array_equal(from_2d, nuclei_only)
    cells = propose_boxes(field, SEEDED)
    assert len(from_2d) == 2 and bx.area(from_2d).sum() < 0.5 * bx.area(cells).sum()  # nuclei, not cells


def test_channel_roles_follow_the_params() -> None:
    field, truth = _two_touching_cells()
    field[:, :, 1] = 0  # cytoplasm in red only, nuclei in blue
    moved = np.dstack(
        [field[:, :, 2], field[:, :, 0], np.zeros_like(field[:, :, 0])]
    )  # nuclei red, cyto green
    params = dataclasses.replace(SEEDED, nucleus_channel=0, cytoplasm_channels=(1,))
    boxes = propose_boxes(moved, params)
    np.testing.assert_array_equal(boxes, propose_boxes(field, SEEDED))
    assert len(boxes) == 2 and bx.iou(boxes, truth).max(axis=1).min() >= 0.7
    assert len(propose_boxes(moved, SEEDED)) == 0  # the default roles look for nuclei in the empty blue


def test_cytoplasm_without_signal_gives_nucleus_boxes() -> None:
    field, _ = _two_touching_cells()
    nuclei_only = field.copy()
    nuclei_only[:, :, :2] = 0  # a nuclear stain alone, saved as RGB
    np.testing.assert_array_equal(
        propose_boxes(nuclei_only, SEEDED),
        propose_boxes(field, dataclasses.replace(SEEDED, cytoplasm_channels=())),
    )


@pytest.mark.parametrize(
    "field",
    [
        np.zeros((128, 160, 3), np.uint8),
        np.full((64, 64, 3), 200, np.uint8),
        np.zeros((100, 100), np.uint8),
        np.dstack(
            [np.full((96, 96), 90, np.uint8), np.zeros((96, 96), np.uint8), np.full((96, 96), 40, np.uint8)]
        ),
    ],
    ids=["black", "constant", "grey-black", "constant-nucleus-channel"],
)
def test_empty_fields_have_no_boxes(field: np.ndarray) -> None:
    assert propose_boxes(field, SEEDED).shape == (0, 4)


def test_bad_channel_roles_are_one_line() -> None:
    with pytest.raises(InputError, match="channel index 3 out of range for a field with 3 channels"):
        propose_boxes(np.zeros((64, 64, 3), np.uint8), CropParams(backend="seeded", nucleus_channel=3))
    with pytest.raises(InputError, match="cytoplasm_channels: channel -1 is negative"):
        CropParams(cytoplasm_channels=(0, -1))
    assert CropParams(nucleus_channel="2", cytoplasm_channels=("0", "GFP")).cytoplasm_channels == (0, "GFP")
    with pytest.raises(InputError, match="seeded_threshold"):
        CropParams(seeded_threshold="otsu2")
    with pytest.raises(InputError, match="seeded_split"):
        CropParams(seeded_split=0)
    with pytest.raises(InputError, match="channel index 2 out of range for a field with 2 channels"):
        seeded.channel_roles(np.zeros((8, 8, 2), np.uint8), 2, (0,))


def test_filters_apply_to_seeded_boxes() -> None:
    field, truth = _two_touching_cells()
    too_big = dataclasses.replace(SEEDED, min_size=0.5, max_size=0.9)
    assert len(propose_boxes(field, too_big)) == 0  # the cells are ~0.4 of the field's side
    assert len(propose_boxes(field, dataclasses.replace(SEEDED, max_patches_per_field=1))) == 1
    assert len(propose_boxes(field, dataclasses.replace(SEEDED, min_nucleus_fraction=0.5))) == 0
    shifted = np.zeros_like(field)
    shifted[:, :-28] = field[:, 28:]  # the left cell now touches the field's edge
    assert len(propose_boxes(shifted, SEEDED)) == 2
    kept = propose_boxes(shifted, dataclasses.replace(SEEDED, drop_border=True))
    assert len(kept) == 1 and bx.iou(kept, truth - [28, 0, 28, 0])[0, 1] >= 0.7


def test_deterministic() -> None:
    field, _ = _two_touching_cells()
    np.testing.assert_array_equal(propose_boxes(field, SEEDED), propose_boxes(field.copy(), SEEDED))


# ------------------------------------------------------------------------------------------ synthetic


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 256x256 fields of 10-14 touching cells (cell_size 60, one field of poor quality)."""
    out = tmp_path_factory.mktemp("dense")
    generate(out, DENSE)
    return out


def test_dense_fields_have_touching_cells() -> None:
    cells = touching = 0
    for spec in synthetic._plan(DENSE):
        masks = synthetic._render_field(spec, with_masks=True).cell_masks  # (h, w) int16
        for i in range(1, int(masks.max()) + 1):
            grown = cv2.dilate((masks == i).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
            touching += bool(((masks != i) & (masks > 0) & grown).any())
            cells += 1
    assert cells >= 25 and touching / cells >= 0.5


def test_touching_is_checked_and_off_by_default() -> None:
    assert SynthParams().touching is None
    with pytest.raises(InputError, match="touching"):
        SynthParams(touching=0.5)


def test_seeded_recall_on_dense_fields(dense: Path, tmp_path: Path) -> None:
    stats = crop_shard(
        dense / "images.tsv",
        0,
        1,
        tmp_path / "p.zarr",
        tmp_path / "p.tsv",
        dataclasses.replace(SEEDED, patch_size=32),
        boxes_tsv=dense / "boxes.tsv",
    )
    assert stats["backend"] == "seeded" and stats["recall"] >= 0.9
    assert stats["patches"] <= 1.1 * stats["true_boxes"]
    import zarr

    attrs = zarr.open_group(tmp_path / "p.zarr", mode="r").attrs["params"]
    assert attrs["cytoplasm_channels"] == [0, 1]
    assert params_from_attrs(attrs) == dataclasses.replace(SEEDED, patch_size=32)


# ------------------------------------------------------------------------------------------ command line


def test_cli_channel_roles() -> None:
    parser = build_parser()
    base = ["crop", "--images", "i.tsv", "--out-zarr", "o.zarr", "--out-tsv", "o.tsv", "--backend", "seeded"]
    args = parser.parse_args([*base, "--nucleus-channel", "0", "--cytoplasm-channels", "1", "GFP"])
    params = CropParams(
        nucleus_channel=args.nucleus_channel, cytoplasm_channels=tuple(args.cytoplasm_channels)
    )
    assert (params.nucleus_channel, params.cytoplasm_channels) == (0, (1, "GFP"))  # indices, or names
    assert parser.parse_args([*base, "--cytoplasm-channels"]).cytoplasm_channels == []  # nuclei only


def test_schema_accepts_the_seeded_options() -> None:
    import jsonschema

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    config = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    crop = {"backend": "seeded", "nucleus_channel": 2, "cytoplasm_channels": [], "drop_border": True}
    config["datasets"]["tiny"]["crop"].update(
        crop, seeded_threshold="otsu", seeded_split=0.3, seeded_sigma=1.5
    )
    config["datasets"]["tiny"]["synthetic"]["touching"] = 0.1
    jsonschema.validate(config, schema)
    config["datasets"]["tiny"]["crop"]["nucleus_channel"] = -1  # 3 is fine: fields may have more channels
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


def test_a_data_set_selects_the_seeded_backend(tmp_path: Path) -> None:
    """A dataset's crop block reaches its crop jobs' command lines, nuclei-only included (dry run)."""
    config = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    config["datasets"]["tiny"]["crop"].update(backend="seeded", nucleus_channel=0, cytoplasm_channels=[])
    configfile = tmp_path / "seeded.yaml"
    configfile.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path)]
    cmd += ["-n", "-p", "crop", "--configfile", str(configfile)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split("hamil crop ", 1)[1] for line in proc.stdout.splitlines() if "hamil crop " in line]
    assert len(lines) == 2  # two shards
    args = build_parser().parse_args(["crop", *shlex.split(lines[0].split(" > ")[0])])
    assert (args.backend, args.nucleus_channel, args.cytoplasm_channels) == ("seeded", "0", [])
    assert CropParams(nucleus_channel=args.nucleus_channel).nucleus_channel == 0


# ------------------------------------------------------------------------------------------ preview


def test_draw_boxes_outlines_each_box() -> None:
    field = np.zeros((100, 120, 3), np.uint8)
    field[20:60, 30:90] = 40
    out = draw_boxes(field, np.array([[30, 20, 90, 60]]))
    assert out.shape == field.shape
    assert tuple(out[20, 50]) == BOX_COLOUR and tuple(out[59, 50]) == BOX_COLOUR  # top and bottom edges
    assert tuple(out[40, 30]) == BOX_COLOUR and tuple(out[40, 89]) == BOX_COLOUR  # left and right edges
    assert tuple(out[40, 60]) != BOX_COLOUR  # inside: the field, brightened
    assert tuple(draw_boxes(np.zeros((2000, 1000, 3), np.uint8), [[0, 0, 1000, 2000]])[0, 0]) == BOX_COLOUR


def test_preview_writes_a_png_with_the_boxes(dense: Path, tmp_path: Path) -> None:
    dest = tmp_path / "figs" / "preview.png"
    counts = preview_crop([dense / "images.tsv"], SEEDED, dest, max_fields=2)
    assert list(counts) == ["P0001_F01", "P0002_F01"] and min(counts.values()) >= 8
    with Image.open(dest) as img:
        assert img.format == "PNG"
        pixels = np.asarray(img.convert("RGB"))
    assert (pixels == BOX_COLOUR).all(axis=2).sum() > 500  # the outlines of ~20 boxes
    assert [p.name for p in dest.parent.iterdir()] == ["preview.png"]  # no temporary file left


def test_crop_preview_command(dense: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    field = dense / "images" / "P0001_F01.png"
    dest = tmp_path / "p.png"
    assert main(["crop-preview", str(field), "--out", str(dest), "--backend", "seeded"]) == 0
    assert read_image(dest).shape[2] == 3
    assert main(["crop-preview", str(tmp_path / "missing.png"), "--out", str(dest)]) == 2
    assert capsys.readouterr().err.strip().endswith("missing.png: file not found")


def test_documented_commands_parse() -> None:
    """The hamil command lines of docs/crop-backends.md go through the argument parser."""
    text = (REPO / "docs/crop-backends.md").read_text()
    commands = re.findall(r"^(hamil [^\n]+)$", text, flags=re.M)
    assert len(commands) >= 2
    parser = build_parser()
    for command in commands:
        parser.parse_args(shlex.split(command)[1:])


def test_no_torch_in_the_crop_modules() -> None:
    code = "import sys, preprocessing.seeded, preprocessing.preview; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_bench_settings_are_valid() -> None:
    """The benchmark's dense setting is a valid SynthParams (the benchmark itself is not run here)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_crop
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    for setting in bench_crop.SETTINGS.values():
        SynthParams(field_size=2048, **setting)
    assert pd.Series(bench_crop.REAL_PARAMS).notna().all()
    CropParams(backend="seeded", **bench_crop.REAL_PARAMS)

"""Tests for the synthetic HPA-like field generator (tiny fields so the whole module runs in seconds)."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from preprocessing.errors import InputError
from preprocessing.sources import synthetic
from preprocessing.sources.synthetic import LOCATIONS, QUALITIES, SynthParams, generate

TINY = SynthParams(proteins=3, field_size=256, cell_size=60, seed=1)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("synth")
    return out, generate(out, TINY)


def _read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def test_tables_have_the_right_columns(tiny: tuple[Path, pd.DataFrame]) -> None:
    out, images = tiny
    assert list(images.columns) == ["image_id", "group", "path", "labels", "quality"]
    assert list(_read_tsv(out / "images.tsv").columns) == list(images.columns)
    assert list(_read_tsv(out / "boxes.tsv").columns) == ["image_id", "x0", "y0", "x1", "y1"]
    assert images["image_id"].is_unique
    assert set(images["quality"]) <= set(QUALITIES)
    assert all(
        iid.startswith(f"{group}_F") for iid, group in zip(images["image_id"], images["group"], strict=True)
    )
    assert images["group"].nunique() == TINY.proteins
    counts = images.groupby("group").size()
    assert counts.between(TINY.fields_min, TINY.fields_max).all()
    assert not any(p.name.startswith(".") for p in out.rglob("*"))  # no temporary files left


def test_images_are_rgb_uint8_of_field_size(tiny: tuple[Path, pd.DataFrame]) -> None:
    out, images = tiny
    for rel in images["path"]:
        assert not Path(rel).is_absolute()
        with Image.open(out / rel) as img:
            assert img.format == "PNG" and img.mode == "RGB"
            arr = np.asarray(img)
        assert arr.dtype == np.uint8 and arr.shape == (TINY.field_size, TINY.field_size, 3)
        assert arr.max() > 30  # cells are visible (poor fields included)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    generate(tmp_path / "a", TINY)
    generate(tmp_path / "b", TINY)
    generate(tmp_path / "c", dataclasses.replace(TINY, seed=2))
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert any(a[k] != c.get(k) for k in a)


def test_workers_give_the_same_output(tmp_path: Path, tiny: tuple[Path, pd.DataFrame]) -> None:
    generate(tmp_path / "w2", TINY, workers=2)
    assert _files(tmp_path / "w2") == _files(tiny[0])


def test_boxes_inside_the_field_and_not_overlapping(tiny: tuple[Path, pd.DataFrame]) -> None:
    out, images = tiny
    boxes = _read_tsv(out / "boxes.tsv")
    assert set(boxes["image_id"]) == set(images["image_id"])  # every field has cells, poor ones too
    coords = boxes[["x0", "y0", "x1", "y1"]].astype(int)
    assert (coords[["x0", "y0"]] >= 0).all().all()
    assert (coords[["x1", "y1"]] <= TINY.field_size).all().all()
    assert ((coords["x1"] > coords["x0"]) & (coords["y1"] > coords["y0"])).all()
    sizes = np.maximum(coords["x1"] - coords["x0"], coords["y1"] - coords["y0"])
    assert sizes.between(0.5 * TINY.cell_size, 1.5 * TINY.cell_size).all()
    per_image = boxes.groupby("image_id").size()
    assert per_image.le(TINY.cells_max).all()
    assert per_image.ge(TINY.cells_min).mean() > 0.8
    for _, group in coords.groupby(boxes["image_id"]):
        for a, b in itertools.combinations(group.to_numpy().tolist(), 2):
            assert synthetic._iou(a, b) < 0.1


def test_every_protein_has_one_to_three_known_labels() -> None:
    specs = synthetic._plan(SynthParams(proteins=300, seed=3))
    by_group = {s.protein.group: s.protein.labels for s in specs}
    assert len(by_group) == 300
    counts = {name: 0 for name in LOCATIONS}
    for labels in by_group.values():
        assert 1 <= len(labels) <= 3
        assert len(set(labels)) == len(labels) and set(labels) <= set(LOCATIONS)
        assert list(labels) == sorted(labels, key=LOCATIONS.index)
        assert not any(
            frozenset(pair) in synthetic._INCOMPATIBLE for pair in itertools.combinations(labels, 2)
        )
        for name in labels:
            counts[name] += 1
    assert all(counts.values())  # every class occurs
    assert counts["Nucleoplasm"] == max(counts.values())  # HPA-like imbalance
    assert counts["Nucleoplasm"] > 2 * counts["Nuclear speckles"]


def test_labels_in_the_table_match_the_protein(tiny: tuple[Path, pd.DataFrame]) -> None:
    _, images = tiny
    assert images.groupby("group")["labels"].nunique().eq(1).all()
    for cell in images["labels"]:
        names = cell.split(";")
        assert 1 <= len(names) <= 3 and set(names) <= set(LOCATIONS)


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5])
def test_poor_fraction_is_respected(fraction: float) -> None:
    specs = synthetic._plan(SynthParams(proteins=40, poor_fraction=fraction, seed=4))
    poor = [s.quality for s in specs if s.quality != "good"]
    assert len(poor) == round(fraction * len(specs))
    if fraction >= 0.2:
        assert set(poor) == set(QUALITIES) - {"good"}  # all four kinds, roughly balanced


def _green_by_region(labels: list[str], quality: str = "good") -> dict[str, float]:
    """Mean green above the background in the nucleus, the cytoplasm, and the ring along the cell border."""
    params = SynthParams(field_size=256, cell_size=60, seed=7)
    result = synthetic._preview_field(labels, params, quality=quality, protein=11)
    assert result.cell_masks is not None and result.nucleus_masks is not None
    green = result.image[:, :, 1].astype(np.float64)
    cells = (result.cell_masks > 0).astype(np.uint8)
    nucleus = result.nucleus_masks > 0
    inner = cv2.erode(cells, np.ones((9, 9), np.uint8)) > 0
    nucleus_core = cv2.erode(nucleus.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    near_nucleus = cv2.dilate(nucleus.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    background = green[cv2.dilate(cells, np.ones((15, 15), np.uint8)) == 0].mean()
    return {
        "nucleus": green[nucleus_core].mean() - background,
        "cytoplasm": green[inner & ~near_nucleus].mean() - background,
        "border": green[(cells > 0) & ~inner].mean() - background,
        "background": background,
    }


@pytest.mark.parametrize("location", ["Nucleoplasm", "Nucleus", "Nucleoli", "Nuclear speckles"])
def test_nuclear_patterns_are_inside_the_nucleus(location: str) -> None:
    g = _green_by_region([location])
    assert g["nucleus"] > 2.5 * g["cytoplasm"]
    assert g["nucleus"] > 2.5 * g["border"]


@pytest.mark.parametrize(
    "location", ["Cytosol", "Mitochondria", "Vesicles", "Golgi apparatus", "Endoplasmic reticulum"]
)
def test_cytoplasmic_patterns_avoid_the_nucleus(location: str) -> None:
    g = _green_by_region([location])
    assert max(g["cytoplasm"], g["border"]) > 2 * g["nucleus"]
    assert g["nucleus"] < 0.5 * max(g["cytoplasm"], g["border"])


def test_plasma_membrane_is_at_the_border() -> None:
    g = _green_by_region(["Plasma membrane"])
    assert g["border"] > 2.5 * g["cytoplasm"]  # the 1-2 px membrane is diluted in a 4 px ring
    assert g["border"] > 2.5 * g["nucleus"]


def test_nucleoli_are_compact_and_nucleoplasm_fills_the_nucleus() -> None:
    def bright_fraction(location: str) -> float:
        r = synthetic._preview_field(
            [location], SynthParams(field_size=256, cell_size=60, seed=7), protein=11
        )
        assert r.nucleus_masks is not None
        green = r.image[:, :, 1][r.nucleus_masks > 0].astype(np.float64)
        return float((green > 0.5 * np.percentile(green, 99)).mean())

    assert bright_fraction("Nucleoli") < 0.35
    assert bright_fraction("Nucleoplasm") > 0.6


def test_nucleus_has_a_bright_rim_and_nucleoplasm_does_not() -> None:
    def rim_contrast(location: str) -> float:
        r = synthetic._preview_field(
            [location], SynthParams(field_size=256, cell_size=60, seed=7), protein=11
        )
        assert r.nucleus_masks is not None
        green = r.image[:, :, 1].astype(np.float64)
        ratios = []
        for i in range(1, len(r.boxes) + 1):
            nucleus = (r.nucleus_masks == i).astype(np.uint8)
            core = cv2.erode(nucleus, np.ones((7, 7), np.uint8)) > 0
            edge = (nucleus > 0) & ~core
            ratios.append(np.percentile(green[edge], 90) / np.median(green[core]))
        return float(np.median(ratios))

    assert rim_contrast("Nucleus") > 1.8
    assert rim_contrast("Nucleoplasm") < 1.6


def test_nosignal_has_no_specific_green() -> None:
    good = _green_by_region(["Nucleoplasm"])
    none = _green_by_region(["Nucleoplasm"], quality="nosignal")
    assert none["nucleus"] < 0.2 * good["nucleus"]
    assert none["nucleus"] < 10  # grey levels above the background


def test_bad_params_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="fields_min"):
        SynthParams(fields_min=5, fields_max=4)
    with pytest.raises(InputError, match="field_size"):
        SynthParams(field_size=100, cell_size=60)
    with pytest.raises(ValueError, match="labels"):
        synthetic._preview_field(["Cytoplasm"], TINY)


def test_does_not_import_torch() -> None:
    code = "import sys, preprocessing.sources.synthetic; assert 'torch' not in sys.modules"
    root = Path(synthetic.__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_label_skew_zero_balances_the_classes() -> None:
    specs = synthetic._plan(SynthParams(proteins=600, seed=3, label_skew=0.0))
    counts = {name: 0 for name in LOCATIONS}
    for labels in {s.protein.group: s.protein.labels for s in specs}.values():
        for name in labels:
            counts[name] += 1
    # uniform draws (up to the few incompatible pairs): no class is more than 1.6x another
    assert max(counts.values()) < 1.6 * min(counts.values())

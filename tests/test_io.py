"""Shared I/O: one-line errors for bad tables and images, atomic writes."""

from __future__ import annotations

import logging
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from preprocessing.errors import InputError
from preprocessing.io import (
    MAX_IMAGE_PIXELS,
    atomic_path,
    check_fraction,
    check_rejected,
    max_image_pixels,
    read_image,
    read_images_table,
    resolve_path,
    split_labels,
    to_rgb8,
)


def test_images_table_missing_columns_are_named(tmp_path):
    path = tmp_path / "images.tsv"
    path.write_text("image_id\tpath\nA\ta.png\n")
    with pytest.raises(InputError, match=r"images.tsv: missing columns: group, labels$"):
        read_images_table(path)


def test_images_table_paths_resolve_and_duplicates_fail(tmp_path):
    path = tmp_path / "images.tsv"
    path.write_text("image_id\tgroup\tpath\tlabels\nA\tg\tsub/a.png\tx;y\nB\tg\t/abs/b.png\t\n")
    table = read_images_table(path)
    assert table["path"].tolist() == [str(tmp_path / "sub/a.png"), "/abs/b.png"]
    assert split_labels(table["labels"][0]) == ["x", "y"] and split_labels(table["labels"][1]) == []
    path.write_text("image_id\tgroup\tpath\tlabels\nA\tg\ta.png\tx\nA\tg\tb.png\tx\n")
    with pytest.raises(InputError, match="duplicate image_id 'A'"):
        read_images_table(path)
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(InputError, match="empty.tsv: empty table"):
        read_images_table(tmp_path / "empty.tsv")


def test_read_image_formats(tmp_path):
    gray16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.tif")
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "g16.tif").shape == (8, 8, 3)
    assert read_image(tmp_path / "g16.tif")[..., 0].max() == round(63000 / 65535 * 255)
    assert (read_image(tmp_path / "rgb.png") == rgb).all()
    assert (read_image(tmp_path / "rgba.png") == rgb).all()
    assert to_rgb8(np.ones((4, 4), dtype=bool)).max() == 255


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "file not found"),
        (b"<html><body>Service unavailable</body></html>", "unreadable image"),
        ("truncated", "unreadable image"),
    ],
)
def test_bad_images_give_one_line(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        Image.fromarray(np.full((64, 64, 3), 99, np.uint8)).save(path, quality=95)
        path.write_bytes(path.read_bytes()[:300])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {reason}") and "\n" not in message


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out.tsv"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(dest) as tmp:
        tmp.write_text("done")
    assert dest.read_text() == "done" and list(tmp_path.iterdir()) == [dest]
    store = tmp_path / "store.zarr"
    with atomic_path(store) as tmp:
        tmp.mkdir()
        (tmp / "zarr.json").write_text("{}")
    with atomic_path(store) as tmp:  # replacing a directory
        tmp.mkdir()
        (tmp / "new").write_text("x")
    assert sorted(p.name for p in store.iterdir()) == ["new"]


def test_check_rejected_writes_warns_and_fails(tmp_path):
    path = tmp_path / "rejected.tsv"
    none = pd.DataFrame([], columns=["image_id", "reason"], dtype=str)
    check_rejected(none, 4, path, 0.0, "t.tsv")
    assert path.read_text() == "image_id\treason\n"  # header only
    one = pd.DataFrame([("A", "file not found")], columns=["image_id", "reason"])
    check_rejected(one, 4, path, 0.25, "t.tsv")  # 1 of 4 is not more than 25 %: skipped
    assert pd.read_csv(path, sep="\t")["image_id"].tolist() == ["A"]
    with pytest.raises(InputError) as info:
        check_rejected(one, 4, path, 0.2, "t.tsv", problem="unusable", first_key="image_id")
    assert str(info.value) == f"t.tsv: 1 of 4 images unusable, first: A: file not found; full list in {path}"
    with pytest.raises(InputError, match="1 of 1 images failed"):
        check_rejected(one, 1, path, 1.0, "t.tsv")  # all failed: always an error
    with pytest.raises(InputError, match=r"max_bad_fraction must be in \[0, 1\], got 1.5"):
        check_fraction(1.5)


def test_resolve_path_relative_absolute_and_home(tmp_path):
    assert resolve_path("a/b.png", tmp_path) == tmp_path / "a/b.png"
    assert resolve_path(str(tmp_path / "c.png"), Path("/elsewhere")) == tmp_path / "c.png"
    assert resolve_path("~/d.png", tmp_path) == Path.home() / "d.png"


# ------------------------------------------------------------------------------- colour modes, huge headers


RNG = np.random.default_rng(1)
RGB = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
SIXTEEN = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000


def _palette(path: Path) -> np.ndarray:
    palette = Image.fromarray(RGB).quantize(16)  # "P": the pixels are indices into the palette
    palette.save(path)
    return np.asarray(palette.convert("RGB"))


def _grey_alpha(path: Path) -> np.ndarray:
    Image.fromarray(np.dstack([GREY, np.full((8, 8), 7, np.uint8)]), "LA").save(path)
    return np.dstack([GREY] * 3)  # alpha dropped, grey repeated


def _rgba(path: Path) -> np.ndarray:
    Image.fromarray(np.dstack([RGB, np.full((8, 8), 7, np.uint8)])).save(path)
    return RGB


def _cmyk_jpeg(path: Path) -> np.ndarray:
    blocks = np.zeros((32, 32, 3), np.uint8)  # flat red, green, blue and yellow quarters survive JPEG
    blocks[:16, :16], blocks[:16, 16:], blocks[16:, :16], blocks[16:, 16:] = (
        (230, 20, 20),
        (20, 200, 40),
        (30, 40, 220),
        (240, 230, 30),
    )
    Image.fromarray(blocks).convert("CMYK").save(path, quality=100)
    return blocks


def _one_bit(path: Path) -> np.ndarray:
    Image.fromarray(np.eye(8, dtype=bool)).save(path)
    return np.dstack([np.eye(8, dtype=np.uint8) * 255] * 3)


def _int16(path: Path) -> np.ndarray:
    Image.fromarray(SIXTEEN).save(path)
    return np.dstack([np.round(SIXTEEN / 65535 * 255).astype(np.uint8)] * 3)  # by the type's range


def _int32(path: Path) -> np.ndarray:
    Image.fromarray(SIXTEEN.astype(np.int32)).save(path)
    return _int16(path.with_name("same16.tif"))  # 16-bit data in 32 bits: the same as 16-bit


def _int32_wide(path: Path) -> np.ndarray:
    Image.fromarray(np.arange(64, dtype=np.int32).reshape(8, 8) * 10_000 - 100_000).save(path)
    return np.dstack([np.round(np.arange(64) / 63 * 255).reshape(8, 8).astype(np.uint8)] * 3)  # own range


def _float_wide(path: Path) -> np.ndarray:
    Image.fromarray(np.linspace(0.0, 1000.0, 64, dtype=np.float32).reshape(8, 8)).save(path)
    return np.dstack([np.round(np.arange(64) / 63 * 255).reshape(8, 8).astype(np.uint8)] * 3)  # not clipped


def _float_unit(path: Path) -> np.ndarray:
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(path)  # already in 0-1: kept so
    return np.full((8, 8, 3), 128, np.uint8)


def _float_constant(path: Path) -> np.ndarray:
    Image.fromarray(np.full((8, 8), 700.0, np.float32)).save(path)  # no range: clipped to 0-1, no 0/0
    return np.full((8, 8, 3), 255, np.uint8)


def _int32_constant(path: Path) -> np.ndarray:
    Image.fromarray(np.full((8, 8), 70_000, np.int32)).save(path)
    return np.full((8, 8, 3), 255, np.uint8)


@pytest.mark.parametrize(
    ("make", "name", "mode", "tolerance"),
    [
        (_palette, "p.png", "P", 0),
        (_grey_alpha, "la.png", "LA", 0),
        (_rgba, "rgba.png", "RGBA", 0),
        (_cmyk_jpeg, "cmyk.jpg", "CMYK", 12),
        (_one_bit, "bit.png", "1", 0),
        (_int16, "i16.tif", "I;16", 0),
        (_int32, "i32.tif", "I", 0),
        (_int32_wide, "wide.tif", "I", 0),
        (_float_wide, "f.tif", "F", 0),
        (_float_unit, "unit.tif", "F", 0),
        (_float_constant, "flat.tif", "F", 0),
        (_int32_constant, "flat32.tif", "I", 0),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_read_image_converts_colour_modes(tmp_path, make, name, mode, tolerance):
    """Each mode, built with PIL, gives the right RGB pixels (no palette indices, no alpha, no CMY as RGB,
    no clipped floats), with no numpy warning (a constant image must not divide by zero)."""
    expected = make(tmp_path / name)
    assert Image.open(tmp_path / name).mode == mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = read_image(tmp_path / name)
    assert got.shape == expected.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= tolerance


def test_multi_page_tiff_warns_that_only_the_first_page_is_used(tmp_path, caplog):
    pages = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 20, 30)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    with caplog.at_level(logging.WARNING, logger="preprocessing.io"):
        assert (read_image(tmp_path / "pages.tif") == 10).all()
    assert "pages.tif: 3 pages, only the first page is used" in caplog.text


def huge_header_png(path: Path, width: int, height: int) -> Path:
    """A tiny (8 x 8) PNG whose header claims ``width x height`` (CRC fixed, so PIL opens it)."""
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR: width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR's CRC over type + data
    path.write_bytes(bytes(data))
    return path


def huge_header_jpeg(path: Path, width: int, height: int) -> Path:
    """A tiny (8 x 8) JPEG whose frame header claims ``width x height`` (at most 65535 each)."""
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, quality=90)
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")  # SOF0: marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def test_huge_image_headers_are_refused_with_their_reason(tmp_path, monkeypatch):
    """A header claiming more pixels than the limit is refused before decoding, as one line."""
    bomb = huge_header_png(tmp_path / "bomb.png", 60_000, 60_000)  # past PIL's own error limit
    with pytest.raises(InputError) as info:
        read_image(bomb)
    message = str(info.value)
    assert message.startswith(f"{bomb}: image too large") and "\n" not in message

    jpeg = huge_header_jpeg(tmp_path / "big.jpg", 5000, 4000)  # 20 M pixels: below PIL's limit
    monkeypatch.setenv("HAMIL_MAX_IMAGE_PIXELS", "1000000")
    with pytest.raises(InputError) as info:
        read_image(jpeg)
    assert str(info.value) == (
        f"{jpeg}: image too large (5000 x 4000 = 20000000 pixels, more than the limit of 1000000; "
        "set HAMIL_MAX_IMAGE_PIXELS to change it)"
    )
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "small.png")
    monkeypatch.setenv("HAMIL_MAX_IMAGE_PIXELS", "400")
    assert read_image(tmp_path / "small.png").shape == (20, 20, 3)  # 400 pixels: at the limit
    monkeypatch.setenv("HAMIL_MAX_IMAGE_PIXELS", "399")
    with pytest.raises(InputError, match="20 x 20 = 400 pixels, more than the limit of 399"):
        read_image(tmp_path / "small.png")
    monkeypatch.setenv("HAMIL_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(InputError, match="HAMIL_MAX_IMAGE_PIXELS must be a positive whole number"):
        read_image(tmp_path / "small.png")
    monkeypatch.delenv("HAMIL_MAX_IMAGE_PIXELS")
    assert max_image_pixels() == MAX_IMAGE_PIXELS

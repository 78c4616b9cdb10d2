"""Shared I/O: one-line errors for bad tables and images, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from preprocessing.errors import InputError
from preprocessing.io import (
    atomic_path,
    check_fraction,
    check_rejected,
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

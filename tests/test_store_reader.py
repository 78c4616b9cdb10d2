"""The bag store's direct chunk-file reader gives exactly what Zarr reads, and declines other layouts."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from preprocessing.store import BagStore, ChunkFileReader, create_patch_array, write_bag_store


@pytest.mark.parametrize("codec", ["lz4", "zstd", "none"])
def test_direct_reads_equal_zarr_reads(tmp_path, codec):
    src = zarr.open_group(tmp_path / "src.zarr", mode="w", zarr_format=3)
    patches = create_patch_array(src, 7, 3, (6, 10))
    data = np.random.default_rng(0).integers(0, 256, (7, 3, 6, 10), dtype=np.uint8)
    data[5] = 0  # an all-zero patch has its chunk file too (write_empty_chunks) and reads as zeros
    patches[:] = data
    write_bag_store(
        tmp_path / "bags.zarr",
        [patches],
        picks=np.stack([np.zeros(7, np.int64), np.arange(7)], axis=1),
        bag_offsets=np.array([0, 3, 7]),
        labels=np.array([[1, 0], [0, 1]]),
        split=np.array([0, 1], np.int8),
        group=["a", "b"],
        bag_id=["a#0", "b#0"],
        source_image=[f"f{i}" for i in range(7)],
        box=np.zeros((7, 4)),
        attrs={"class_names": ["x", "y"], "source": "test"},
        codec=codec,
    )
    store = BagStore(tmp_path / "bags.zarr")
    assert ChunkFileReader.open(store.path / "patches") is not None
    np.testing.assert_array_equal(store.patches(0), data[:3])
    np.testing.assert_array_equal(store.patches(1), data[3:])
    np.testing.assert_array_equal(store.patches(1, np.array([3, 0])), data[[3, 6]])
    np.testing.assert_array_equal(store.patches(1), store.root["patches"][3:7])


def test_other_layouts_fall_back_to_zarr(tmp_path):
    root = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3)
    arr = root.create_array("patches", shape=(4, 3, 5, 5), chunks=(2, 3, 5, 5), dtype="uint8")
    arr[:] = 7
    assert ChunkFileReader.open(tmp_path / "s.zarr" / "patches") is None
    sharded = root.create_array(
        "sharded", shape=(4, 3, 5, 5), chunks=(1, 3, 5, 5), shards=(2, 3, 5, 5), dtype="uint8"
    )
    sharded[:] = 1
    assert ChunkFileReader.open(tmp_path / "s.zarr" / "sharded") is None
    assert ChunkFileReader.open(tmp_path / "missing") is None


def test_rows_outside_the_array_are_an_error(tmp_path):
    root = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3)
    create_patch_array(root, 3, 3, 4)[:] = 1
    reader = ChunkFileReader.open(tmp_path / "s.zarr" / "patches")
    with pytest.raises(IndexError, match=r"outside 0\.\.2"):
        reader.read(np.array([1, 3]))

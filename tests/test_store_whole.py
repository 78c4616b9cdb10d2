"""A patch store proves it is whole: chunk files lost or truncated by an interrupted copy are refused with
one line at open (they used to read as zeros, exit 0), a changed byte with ``--verify``; crop shards too."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import zarr
from conftest import write_shard

from hamil.cli import main
from preprocessing.bags import BagParams, build_bags
from preprocessing.errors import InputError
from preprocessing.store import BagStore, check_patches

TRAIN = ["--model", "mean", "--epochs", "1", "--batch-bags", "4", "--threads", "1"]


def _chunks(store: Path) -> list[Path]:
    rows = zarr.open_array(store / "patches", mode="r").shape[0]
    paths = [store / "patches" / "c" / str(row) / "0" / "0" / "0" for row in range(rows)]
    return [path for path in paths if path.is_file()]


def _last_line(capsys: pytest.CaptureFixture[str], stage: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"hamil {stage}: error:"), err
    return err


@pytest.fixture
def copy(tmp_path: Path, small_store: Path) -> Path:
    out = tmp_path / "ds.zarr"
    shutil.copytree(small_store, out)
    return out


def test_every_patch_has_its_chunk_file(small_store: Path) -> None:
    n = int(BagStore(small_store).bag_offsets[-1])
    assert len(_chunks(small_store)) == n == BagStore(small_store).attrs["patch_chunks"]["count"]


def test_half_the_chunks_missing_is_refused_by_train_and_evaluate(copy, trained_runs, tmp_path, capsys):
    for path in _chunks(copy)[::2]:
        path.unlink()
    assert main(["train", "--store", str(copy), "--out-dir", str(tmp_path / "run"), *TRAIN]) == 2
    err = _last_line(capsys, "train")
    assert str(copy) in err and "patch chunk files missing (patches 0, 2, 4, 6, 8, ...)" in err
    checkpoint = trained_runs[1]["hamil"] / "best.pt"
    args = ["evaluate", "--checkpoint", str(checkpoint), "--store", str(copy), "--out-dir", str(tmp_path)]
    assert main(args) == 2
    assert "patch chunk files missing" in _last_line(capsys, "evaluate")
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "metrics.json").exists()


def test_a_truncated_chunk_is_refused(copy: Path, tmp_path: Path, capsys) -> None:
    chunk = _chunks(copy)[3]
    chunk.write_bytes(chunk.read_bytes()[:-5])
    assert main(["train", "--store", str(copy), "--out-dir", str(tmp_path / "run"), *TRAIN]) == 2
    assert "truncated or replaced" in _last_line(capsys, "train")


def test_a_changed_byte_is_found_by_verify(copy: Path, trained_runs, tmp_path: Path, capsys) -> None:
    chunk = _chunks(copy)[1]
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF  # same size: only the hash sees it
    chunk.write_bytes(bytes(data))
    BagStore(copy)  # the cheap check passes
    with pytest.raises(InputError, match="differ from those written"):
        BagStore(copy, verify=True)
    checkpoint = trained_runs[1]["hamil"] / "best.pt"
    args = ["evaluate", "--checkpoint", str(checkpoint), "--store", str(copy), "--out-dir", str(tmp_path)]
    assert main([*args, "--verify"]) == 2
    assert "corrupt" in _last_line(capsys, "evaluate")


@pytest.mark.parametrize("gone", ["bag_offsets", "patches/zarr.json"])
def test_a_store_without_one_of_its_arrays_is_one_line(copy: Path, gone: str) -> None:
    target = copy / gone
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(InputError, match=r"incomplete bag store \(no (bag_offsets|patches)\); rebuild it"):
        BagStore(copy)


def test_the_bag_stage_refuses_a_shard_with_a_chunk_missing(tmp_path: Path) -> None:
    table, shard = write_shard(tmp_path, "0", {"G1": (4, "A"), "G2": (3, "B")})
    check_patches(shard, zarr.open_group(shard, mode="r").attrs)
    _chunks(shard)[2].unlink()
    with pytest.raises(InputError, match=r"1 of 7 patch chunk files missing \(patches 2\)"):
        build_bags([table], [shard], tmp_path / "ds.zarr", tmp_path / "bags.tsv", BagParams(top_k=2), "t")
    assert not (tmp_path / "ds.zarr").exists()


BAGS_CHILD = """
import resource, signal, sys
from pathlib import Path
from preprocessing.bags import BagParams, build_bags
from preprocessing.errors import InputError
tmp = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2500, 2500))  # a patch chunk (3 KiB of noise) cannot be written
try:
    build_bags([tmp / "0.tsv"], [tmp / "0.zarr"], tmp / "ds.zarr", tmp / "bags.tsv", BagParams(top_k=2), "t",
               workers=2)
except InputError as err:
    print("error:", err)
    sys.exit(2)
"""


def test_a_full_disk_in_the_bag_stage_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """Issue 26: the clean-up raced the Zarr writes still pending, left ``.ds.zarr.*.tmp`` and hundreds of
    asyncio warnings. All block writes are now waited for before the temporary store is removed."""
    import subprocess
    import sys

    import numpy as np

    _, shard = write_shard(tmp_path, "0", {f"G{g}": (30, "A" if g % 2 else "B") for g in range(20)}, patch=32)
    arr = zarr.open_group(shard, mode="r+")["patches"]
    arr[:] = np.random.default_rng(0).integers(0, 256, arr.shape, dtype=np.uint8)  # incompressible
    from preprocessing.store import seal_patches

    seal_patches(shard)
    proc = subprocess.run([sys.executable, "-c", BAGS_CHILD, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Task exception" not in proc.stderr, proc.stderr[-3000:]
    assert "ds.zarr" in proc.stdout and "file too large" in proc.stdout
    assert not list(tmp_path.glob(".ds.zarr*")) and not (tmp_path / "ds.zarr").exists()

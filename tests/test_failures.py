"""Faults a user meets outside the happy path, each through the CLI: corrupt checkpoints and stores,
resuming on something else, read-only and full disks, and what killed runs leave behind."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import make_store

from hamil.checkpoint import load_checkpoint
from hamil.cli import main
from hamil.train import KILL_AFTER_ENV
from preprocessing.errors import InputError
from preprocessing.io import write_tsv

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--model", "mean", "--epochs", "1", "--batch-bags", "4", "--threads", "1"]


def _train(store: Path, out: Path, *extra: str) -> int:
    return main(["train", "--store", str(store), "--out-dir", str(out), *TRAIN, *extra])


def _one_line(capsys: pytest.CaptureFixture[str], stage: str, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1].split("\r")[-1]  # after progress bars
    assert err.startswith(f"hamil {stage}: error:"), err
    for needle in needles:
        assert needle in err, err
    return err


def _flip_inside_largest_member(path: Path) -> None:
    """Flip one byte in the middle of the largest member of a torch checkpoint (a zip): tensor data."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- checkpoints -------------------------------------------------------------------------------------


def test_a_flipped_byte_in_a_checkpoint_is_refused(tmp_path, trained_runs, capsys):
    store, runs = trained_runs
    run = tmp_path / "run"
    shutil.copytree(runs["hamil"], run)
    _flip_inside_largest_member(run / "best.pt")
    args = ["evaluate", "--checkpoint", str(run / "best.pt"), "--store", str(store), "--out-dir", str(run)]
    assert main(args) == 2
    _one_line(capsys, "evaluate", "best.pt", "corrupt")
    _flip_inside_largest_member(run / "last.pt")
    extra = ["--model", "hamil", "--epochs", "2", "--batch-bags", "4", "--threads", "1", "--resume"]
    assert main(["train", "--store", str(store), "--out-dir", str(run), *extra]) == 2
    _one_line(capsys, "train", "last.pt", "corrupt")


def test_text_files_and_incomplete_dicts_are_one_line(tmp_path, small_store, capsys):
    evaluate = ["evaluate", "--store", str(small_store), "--out-dir", str(tmp_path / "out")]
    text = tmp_path / "notes.pt"
    text.write_text("epochs: 3\nlearning rate: 0.001\n" * 20)
    assert main([*evaluate, "--checkpoint", str(text)]) == 2
    _one_line(capsys, "evaluate", "notes.pt")
    partial = tmp_path / "partial.pt"
    torch.save({"format": "hamil-checkpoint", "version": 1, "model": {}}, partial)
    assert main([*evaluate, "--checkpoint", str(partial)]) == 2
    _one_line(capsys, "evaluate", "partial.pt", "missing config, class_names")


# ---- bag stores and resumption ---------------------------------------------------------------------


def test_an_edited_bag_store_is_refused(tmp_path, capsys):
    store = make_store(tmp_path / "data", patch=16)
    labels = zarr.open_group(store, mode="r+")["labels"]
    edited = labels[:]
    edited[0] = 1 - edited[0]
    labels[:] = edited
    assert _train(store, tmp_path / "run") == 2
    _one_line(capsys, "train", "ds.zarr", "does not match its checksum")


def test_resume_on_another_store_with_the_same_classes_is_refused(tmp_path, small_store, capsys):
    other = make_store(tmp_path / "other", patch=16, split_seed=5)  # same classes and bags, other splits
    assert _train(small_store, tmp_path / "run") == 0
    assert _train(other, tmp_path / "run", "--resume") == 2
    _one_line(capsys, "train", "last.pt", "trained on another bag store")


def test_resume_with_another_thread_count_says_the_result_differs(tmp_path, small_store, caplog):
    run = tmp_path / "run"
    args = ["train", "--store", str(small_store), "--out-dir", str(run), *TRAIN, "--epochs", "2"]
    env = {**os.environ, KILL_AFTER_ENV: "2:1"}  # killed in epoch 2, after epoch 1's checkpoint
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    killed = subprocess.run([sys.executable, "-m", "hamil.cli", *args], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--threads", "2", "--resume"]) == 0
    assert "trained with 1 CPU threads, resumed with 2" in caplog.text
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


# ---- disks -------------------------------------------------------------------------------------------


@pytest.fixture
def mount_tmpfs(tmp_path) -> Iterator[Callable[..., Path]]:
    """Mount small tmpfs folders (root only: skipped elsewhere); unmounted at the end."""
    mounted: list[Path] = []

    def mount(size: str = "1m", read_only: bool = False) -> Path:
        where = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_output_folder_fails_before_the_first_step(tmp_path, small_store, mount_tmpfs, capsys):
    read_only = mount_tmpfs(read_only=True)
    assert _train(small_store, read_only / "run") == 2
    err = _one_line(capsys, "train", str(read_only / "run"))
    assert "epoch" not in err


def test_full_disk_is_named(tmp_path, small_store, mount_tmpfs, capsys):
    small = mount_tmpfs(size="1m")  # a checkpoint of ResNet18 is ~45 MB
    assert _train(small_store, small / "run") == 2
    _one_line(capsys, "train", f"no space left on device ({small}) writing {small / 'run'}")
    assert not list((small / "run").glob(".*.tmp")), "the temporary file must be removed"
    with pytest.raises(InputError, match="no space left on device"):
        write_tsv(__import__("pandas").DataFrame({"x": np.arange(300_000)}), small / "big.tsv")


# ---- what killed runs leave ----------------------------------------------------------------------------


def test_temporary_files_of_killed_runs_are_removed(tmp_path, small_store):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".last.pt.k3j4l5.tmp").write_bytes(b"half a checkpoint")
    (run / ".history.csv.a1b2c3.tmp").write_text("epoch\n")
    (run / ".best.pt.zz.tmp").mkdir()  # a folder too (atomic_path makes both)
    keep = run / "notes.tmp"
    keep.write_text("not ours")
    assert _train(small_store, run) == 0
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "history.csv", "last.pt", "notes.tmp"]
    (tmp_path / ".table.tsv.x1.tmp").write_text("stale")
    write_tsv(__import__("pandas").DataFrame({"a": [1]}), tmp_path / "table.tsv")
    assert not (tmp_path / ".table.tsv.x1.tmp").exists()


@pytest.mark.parametrize("change", ["drop", "reshape"])
def test_weights_that_do_not_fit_the_model_are_one_line(tmp_path, trained_runs, capsys, change):
    """Issue 26: a checkpoint whose weights do not fit its model gave a load_state_dict traceback."""
    from hamil.checkpoint import read_payload, save_checkpoint

    store, runs = trained_runs
    payload = read_payload(runs["hamil"] / "best.pt")
    key = next(k for k in payload["model"] if k.startswith("head") and k.endswith("weight"))
    if change == "drop":
        del payload["model"][key]
    else:
        payload["model"][key] = payload["model"][key][:, :-1]
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, payload)
    args = ["evaluate", "--checkpoint", str(bad), "--store", str(store), "--out-dir", str(tmp_path / "ev")]
    assert main(args) == 2
    err = _one_line(capsys, "evaluate", str(bad), "do not fit a hamil model")
    assert ("1 missing, e.g. " + key if change == "drop" else "1 of another shape, e.g. " + key) in err
    assert not (tmp_path / "ev" / "metrics.json").exists()
    bag = tmp_path / "bags" / "b1"  # predict loads the checkpoint before reading the images
    bag.mkdir(parents=True)
    args = ["predict", "--checkpoint", str(bad), "--inputs", str(bag.parent), "--out", str(tmp_path / "pr")]
    assert main(args) == 2
    _one_line(capsys, "predict", str(bad), "do not fit a hamil model")

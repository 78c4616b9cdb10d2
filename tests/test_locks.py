"""One writer per destination (preprocessing.locks): a second writer is refused with one line, a dead
holder's lock is taken over, and a training folder that holds a run is not replaced without being asked."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hamil.cli import main
from preprocessing.errors import InputError
from preprocessing.io import atomic_path
from preprocessing.locks import lock_path, writer_lock

HOLD = "import sys, time; from preprocessing.locks import writer_lock\nwith writer_lock(sys.argv[1]):\n"
HOLD += "    print('held', flush=True); time.sleep(600)\n"
TRAIN = ["--model", "mean", "--epochs", "1", "--batch-bags", "4", "--threads", "1"]


def _holder(dest: Path) -> subprocess.Popen:
    """Another process holding the lock of ``dest`` (until it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(dest)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    dest = tmp_path / "out.zarr"
    proc = _holder(dest)
    try:
        with pytest.raises(InputError) as err, writer_lock(dest):
            pass
        message = str(err.value)
        assert message.count("\n") == 0 and str(dest) in message
        assert f"pid {proc.pid} on {socket.gethostname()}" in message
        with pytest.raises(InputError, match="another writer"), atomic_path(dest):
            pass
    finally:
        proc.kill()
        proc.wait()


def test_a_dead_holders_lock_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dest = tmp_path / "out.tsv"
    proc = _holder(dest)
    proc.send_signal(signal.SIGKILL)  # no clean-up: the lock file stays, with the dead holder's pid
    proc.wait()
    assert json.loads(lock_path(dest).read_text())["pid"] == proc.pid
    with caplog.at_level("INFO"), writer_lock(dest):
        assert json.loads(lock_path(dest).read_text())["pid"] == os.getpid()
    assert f"pid {proc.pid}" in caplog.text and "stale" in caplog.text
    assert not lock_path(dest).exists()  # released: the lock file is gone


def test_a_crop_does_not_touch_another_writers_live_temporary(tmp_path: Path, capsys) -> None:
    """The bug: a second ``hamil crop`` on one output deleted the first's temporary store."""
    out = tmp_path / "0.zarr"
    live = tmp_path / ".0.zarr.abc123.tmp"  # what the first writer is filling
    live.mkdir()
    (tmp_path / "images.tsv").write_text("image_id\tgroup\tpath\tlabels\n")
    proc = _holder(out)
    try:
        args = ["crop", "--images", str(tmp_path / "images.tsv"), "--out-zarr", str(out)]
        assert main([*args, "--out-tsv", str(tmp_path / "0.tsv")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("hamil crop: error:") and "another writer" in err and str(out) in err
        assert live.is_dir() and not out.exists()
    finally:
        proc.kill()
        proc.wait()


def test_train_refuses_a_folder_with_a_run_unless_resume_or_overwrite(tmp_path, small_store, capsys) -> None:
    run = tmp_path / "run"
    base = ["train", "--store", str(small_store), "--out-dir", str(run), *TRAIN]
    assert main(base) == 0
    before = {name: (run / name).read_bytes() for name in ("best.pt", "last.pt", "history.csv")}
    assert main([*base, "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds a training run (best.pt, last.pt, history.csv)" in err and "--overwrite" in err
    assert {name: (run / name).read_bytes() for name in before} == before  # nothing replaced
    assert main([*base, "--resume", "--overwrite"]) == 2
    assert main([*base, "--resume"]) == 0  # finished: nothing more to train, the run is kept
    assert (run / "best.pt").read_bytes() == before["best.pt"]
    assert main([*base, "--seed", "1", "--overwrite"]) == 0
    assert (run / "best.pt").read_bytes() != before["best.pt"]


def test_two_trainings_into_one_folder(tmp_path, small_store, capsys) -> None:
    run = tmp_path / "run"
    proc = _holder(run)  # a training of another process holds the folder
    try:
        assert main(["train", "--store", str(small_store), "--out-dir", str(run), *TRAIN]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "another writer" in err and f"pid {proc.pid}" in err
        assert not (run / "last.pt").exists()
    finally:
        proc.kill()
        proc.wait()
    # the holder is gone: the folder is free again
    assert main(["train", "--store", str(small_store), "--out-dir", str(run), *TRAIN]) == 0


def test_two_spellings_of_one_folder_share_one_lock(tmp_path: Path, monkeypatch) -> None:
    """``--out-dir .`` from inside a folder and its absolute path (or a symbolic link) are one writer."""
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (tmp_path / "link").symlink_to(run)
    monkeypatch.chdir(run)
    with writer_lock("."):
        for other in (run, tmp_path / "link", Path("..") / "x"):
            with pytest.raises(InputError, match="another writer"), writer_lock(other):
                pass

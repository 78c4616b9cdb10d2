"""One writer per destination: an exclusive lock file beside what a stage writes.

The lock of ``dest`` is ``.<name>.lock`` in ``dest``'s folder. Its holder keeps an ``flock`` on it (the
kernel drops that when the holder dies, however it dies) and writes its pid, host and start time into it,
so that a second writer is refused with one line naming the holder. A lock file whose holder has gone is
stale: the next writer takes it over (and says whose it was). Without ``fcntl`` (Windows) nothing is
locked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from preprocessing.errors import InputError

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


def lock_path(dest: str | os.PathLike[str]) -> Path:
    """The lock file of ``dest`` (a file or a folder): ``.<name>.lock`` beside it, for its real path (so
    ``.``, a symbolic link and the absolute path of one folder share one lock)."""
    dest = Path(os.path.realpath(dest))
    return dest.parent / f".{dest.name}.lock"


def _holder_text(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


def _take(path: Path) -> int | None:
    """The open, ``flock``-ed descriptor of ``path``, or None when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:  # pragma: no cover - not POSIX
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder released and removed the file after we opened it: lock the new one


@contextlib.contextmanager
def writer_lock(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the lock of ``dest`` for the block; :class:`InputError` (one line) if another writer has it."""
    dest = Path(dest)
    path = lock_path(dest)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _take(path)
    except OSError as err:
        raise InputError(f"{path}: cannot create the lock file of {dest} ({err.strerror or err})") from None
    if fd is None:
        raise InputError(
            f"{dest}: another writer is at work ({_holder_text(path)}, lock {path}); one writer per output"
        )
    previous = _holder_text(path) if os.fstat(fd).st_size else None
    if previous is not None:
        log.info("took over the stale lock %s of %s (that process has gone)", path, previous)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder).encode())
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding it, so no other writer has it in between
        os.close(fd)

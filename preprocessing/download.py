"""One downloader for every data source: resumable, verified, polite, atomic.

A file is streamed to ``<dest>.part`` and renamed onto ``dest`` only once its length, size, hashes and
kind (magic bytes) all check out, so an existing ``dest`` is always complete. An interrupted download
resumes with an HTTP ``Range`` request carrying ``If-Range`` with the validator (ETag, else Last-Modified)
recorded in ``<dest>.part.json`` when the part was started; a part without one, a 200 answer, or a 206
whose ``Content-Range`` (start, total) or ETag does not continue the recorded version restarts from zero,
so two versions of a file are never spliced. Transient failures (connection errors, timeouts, short
bodies, 429, 5xx) are retried with exponential backoff and full jitter, honouring ``Retry-After``; other
4xx fail at once. Requests to one host are limited in number (a semaphore) and spaced in time
(``min_interval``).

Uses the standard library only (``urllib``), over real sockets; progress bars come from :mod:`tqdm`.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import email.utils
import hashlib
import http
import http.client
import json
import os
import random
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from preprocessing.errors import InputError
from preprocessing.io import env_positive_int, remove_stale_temps
from preprocessing.locks import writer_lock

T = TypeVar("T")
CHUNK = 1 << 16
MANIFEST_COLUMNS = ("url", "path", "size", "sha256", "time")
IMAGE_KINDS = frozenset({"jpeg", "png", "tiff"})
EXPECT_KINDS = {
    "any": None,
    "jpeg": frozenset({"jpeg"}),
    "png": frozenset({"png"}),
    "tiff": frozenset({"tiff"}),
    "image": IMAGE_KINDS,
    "zip": frozenset({"zip"}),
    "gzip": frozenset({"gzip"}),
    "xml": frozenset({"xml"}),
}


@dataclass(frozen=True)
class DownloadPolicy:
    """How hard to try and how politely: retries, backoff, timeouts and per-host limits."""

    retries: int = 5  # attempts after the first, for transient failures
    backoff: float = 1.0  # base seconds of exponential backoff (full jitter), capped by max_backoff
    max_backoff: float = 60.0
    timeout: float = 60.0  # socket timeout per request
    concurrency: int = 4  # max simultaneous connections per host
    min_interval: float = 0.0  # minimum seconds between request starts per host (BDGP: 1.0)
    low_speed_limit: float = 1024.0  # a body arriving slower than this many bytes/s ...
    low_speed_time: float = 60.0  # ... over this many seconds is a transient failure (curl's -Y / -y)
    user_agent: str = "hamil-downloader/0.1 (+https://github.com/)"


@dataclass(frozen=True)
class FetchItem:
    """One file to fetch, with what is known about it (checked after download)."""

    url: str
    dest: Path
    expect: str = "any"
    size: int | None = None
    sha256: str | None = None
    md5_b64: str | None = None


@dataclass(frozen=True)
class FetchResult:
    """Outcome of one :class:`FetchItem`: ``path`` on success, else ``error`` (one line)."""

    item: FetchItem
    path: Path | None
    error: str | None


class DownloadError(InputError):
    """A download (or an archive) failed for good; the message is ``"<url or file>: <problem>"``."""


class _Transient(Exception):
    """Retry, keeping the part file (resume)."""

    def __init__(self, problem: str, retry_after: float | None = None) -> None:
        super().__init__(problem)
        self.retry_after = retry_after


class _Mismatch(Exception):
    """The finished body is wrong: delete the part file and retry from scratch."""


class _Fatal(Exception):
    """Do not retry."""


class _Cancelled(Exception):
    """The run was interrupted (Ctrl-C): stop, keeping the part file for the next run."""


# ---------------------------------------------------------------------------------------------- sniffing


def sniff(head: bytes) -> str:
    """Kind of a body from its first bytes.

    Returns one of ``"jpeg"``, ``"png"``, ``"tiff"``, ``"gzip"``, ``"zip"``, ``"html"``, ``"xml"``,
    ``"unknown"``.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    text = head[:1024].lstrip(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith(b"<"):
        if re.search(rb"<!doctype\s+html|<html[\s>]|<head[\s>]|<body[\s>]", text):
            return "html"
        return "xml"
    return "unknown"


def _check_kind(expect: str, head: bytes) -> None:
    accepted = EXPECT_KINDS[expect]
    if accepted is None:
        return
    kind = sniff(head)
    if kind not in accepted:
        raise _Fatal(f"expected {expect}, got {kind}")


# --------------------------------------------------------------------------------------------- helpers


def _digest(path: Path, md5: bool = False) -> tuple[int, str, str | None]:
    """``(size, sha256 hex, base64 MD5 or None)`` of a file, in one pass."""
    sha = hashlib.sha256()
    md = hashlib.md5(usedforsecurity=False) if md5 else None
    size = 0
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            size += len(block)
            sha.update(block)
            if md is not None:
                md.update(block)
    return size, sha.hexdigest(), base64.b64encode(md.digest()).decode() if md is not None else None


def _head(path: Path, n: int = 1024) -> bytes:
    with path.open("rb") as fh:
        return fh.read(n)


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _content_length(headers: http.client.HTTPMessage) -> int | None:
    value = headers.get("Content-Length")
    return int(value) if value is not None and value.strip().isdigit() else None


def _content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``(start, end, total or None for *)`` of ``Content-Range: bytes <start>-<end>/<total>``, or None."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not match:
        return None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), int(match.group(2)), total


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        err = err.reason if isinstance(err.reason, BaseException) else err
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text and text[0] else type(err).__name__


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc.lower()


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _state_path(dest: Path) -> Path:
    """The sidecar of ``<dest>.part``: URL, validator (ETag / Last-Modified) and total size of its version."""
    return dest.with_name(dest.name + ".part.json")


def _write_part_state(dest: Path, url: str, headers: http.client.HTTPMessage) -> None:
    """Record which version of ``url`` the fresh ``<dest>.part`` holds (written before any body byte)."""
    state = {
        "url": url,
        "etag": headers.get("ETag"),
        "last_modified": headers.get("Last-Modified"),
        "size": _content_length(headers),
    }
    path = _state_path(dest)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def _read_part_state(dest: Path, url: str) -> dict | None:
    """The recorded state of ``<dest>.part`` with an ``If-Range`` validator, or None (then restart).

    None when no sidecar exists (a part from an older version of this code), it is unreadable, it is for
    another URL, or the server gave no strong validator (a weak ETag may not be used in ``If-Range``).
    """
    try:
        state = json.loads(_state_path(dest).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("url") != url:
        return None
    etag, modified = state.get("etag"), state.get("last_modified")
    validator = etag if etag and not str(etag).startswith("W/") else modified
    if not validator:
        return None
    size = state.get("size")
    return {**state, "validator": str(validator), "size": size if isinstance(size, int) else None}


def _discard_part(dest: Path) -> None:
    _part_path(dest).unlink(missing_ok=True)
    _state_path(dest).unlink(missing_ok=True)


class _HostGate:
    """At most ``concurrency`` requests at once to one host, starts at least ``min_interval`` apart."""

    def __init__(self, concurrency: int, min_interval: float) -> None:
        self._slots = threading.BoundedSemaphore(max(1, concurrency))
        self._interval = max(0.0, min_interval)
        self._lock = threading.Lock()
        self._next_start = 0.0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        with self._slots:
            if self._interval:
                with self._lock:
                    now = time.monotonic()
                    start = max(now, self._next_start)
                    self._next_start = start + self._interval
                if start > now:
                    time.sleep(start - now)
            yield


# ---------------------------------------------------------------------------------------------- manifest


class _Manifest:
    """Append-only TSV of completed downloads (url, path, size, sha256, time); last row per path wins."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._rows: dict[str, tuple[int, str]] = {}
        if self.path.is_file():
            with self.path.open(newline="") as fh:
                for row in csv.DictReader(fh, delimiter="\t"):
                    with contextlib.suppress(KeyError, TypeError, ValueError):
                        self._rows[row["path"]] = (int(row["size"]), row["sha256"])

    def lookup(self, dest: Path) -> tuple[int, str] | None:
        with self._lock:
            return self._rows.get(str(dest))

    def record(self, url: str, dest: Path, size: int, sha256: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        line = "\t".join(_tsv_field(v) for v in (url, str(dest), str(size), sha256, stamp)) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                with _file_lock(fd):
                    data = line if os.fstat(fd).st_size else "\t".join(MANIFEST_COLUMNS) + "\n" + line
                    os.write(fd, data.encode())
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._rows[str(dest)] = (size, sha256)

    def forget(self, dest: Path) -> None:
        """Remove every row of ``dest`` (a file deleted as bad); the file is rewritten atomically."""
        with self._lock:
            self._rows.pop(str(dest), None)
            if not self.path.is_file():
                return
            fd = os.open(self.path, os.O_RDWR)
            try:
                with _file_lock(fd):
                    with open(fd, closefd=False, newline="") as fh:
                        lines = fh.read().splitlines(keepends=True)
                    kept = [ln for ln in lines if ln.split("\t")[1:2] != [_tsv_field(str(dest))]]
                    if len(kept) == len(lines):
                        return
                    tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                    with tmp.open("w", newline="") as out:
                        out.writelines(kept)
                        out.flush()
                        os.fsync(out.fileno())
                    os.replace(tmp, self.path)
            finally:
                os.close(fd)


def _tsv_field(value: str) -> str:
    return value.replace("\t", " ").replace("\n", " ").replace("\r", " ")


@contextlib.contextmanager
def _file_lock(fd: int) -> Iterator[None]:
    """An exclusive ``flock`` where available (other processes appending to the same manifest)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


# -------------------------------------------------------------------------------------------- downloader


class Downloader:
    """Fetch URLs to files (or bytes) with retries, resume, verification and per-host politeness.

    ``manifest``: a TSV where every completed download is recorded (and consulted to skip files already
    complete). ``sleep`` is the function used for backoff waits (injectable for tests).
    """

    def __init__(
        self,
        policy: DownloadPolicy = DownloadPolicy(),  # noqa: B008 - frozen dataclass, immutable default
        manifest: Path | None = None,
        progress: bool = True,
        *,
        sleep: Callable[[float], Any] | None = None,
    ) -> None:
        self.policy = policy
        self.progress = progress
        self._cancel = threading.Event()  # set on Ctrl-C: every transfer stops at its next chunk
        self._sleep = sleep or self._cancel.wait  # a backoff wait ends early on Ctrl-C
        self._manifest = _Manifest(Path(manifest)) if manifest is not None else None
        self._opener = urllib.request.build_opener()
        self._lock = threading.Lock()
        self._gates: dict[str, _HostGate] = {}
        self._dest_locks: dict[str, threading.Lock] = {}

    # ------------------------------------------------------------------------------------ public API

    def fetch(
        self,
        url: str,
        dest: Path,
        *,
        expect: str = "any",
        size: int | None = None,
        sha256: str | None = None,
        md5_b64: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Path:
        """Download ``url`` to ``dest`` (resuming ``<dest>.part``) and return ``dest``.

        Skipped when ``dest`` already exists and matches ``size``/``sha256``/``md5_b64``/``expect`` (and
        the manifest's record of it, if any). ``expect`` is ``"any"`` or a kind from :func:`sniff`
        (``"image"`` = jpeg, png or tiff); a body of another kind (an HTML error page) is refused at once,
        without retry. Raises :class:`DownloadError` naming the URL and the problem. After giving up on a
        transient failure the part file is kept, so the next run resumes it; after a mismatch or a refusal
        nothing is left behind.
        """
        if expect not in EXPECT_KINDS:
            raise ValueError(f"expect must be one of {sorted(EXPECT_KINDS)}, not {expect!r}")
        item = FetchItem(url, Path(dest), expect, size, sha256, md5_b64)
        _check_scheme(url)
        with self._dest_lock(item.dest):
            if self._is_complete(item):
                return item.dest
            return self._fetch_with_retries(item, headers)

    def fetch_many(self, items: Sequence[FetchItem], workers: int | None = None) -> list[FetchResult]:
        """Fetch several items in threads (per-host limits still apply); one result per item, in order.

        A failed item gives a result with ``error`` set; nothing is raised for it.
        """
        workers = workers or max(1, self.policy.concurrency)
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            with tqdm(total=len(items), unit="file", desc="download", disable=not self.progress) as bar:
                futures = [pool.submit(self._fetch_item, item, bar) for item in items]
                return [f.result() for f in futures]
        except BaseException:  # Ctrl-C: drop the queue, stop the transfers under way (parts are kept)
            self._cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)

    def discard(self, dest: Path) -> None:
        """Delete a downloaded file found bad after the fact (an HTML page, a corrupt table) and its
        manifest rows, so that nothing records it as good and the next run fetches it again."""
        dest = Path(dest)
        with self._dest_lock(dest):
            dest.unlink(missing_ok=True)
            _discard_part(dest)
            if self._manifest is not None:
                self._manifest.forget(dest)

    def get_bytes(self, url: str, headers: dict[str, str] | None = None) -> bytes:
        """GET a small response (a listing, an XML page) into memory, with the same retry policy."""
        _check_scheme(url)
        return self._retry(url, lambda: self._get_once(url, headers), cleanup=lambda: None)

    # ------------------------------------------------------------------------------------- internals

    def _fetch_item(self, item: FetchItem, bar: tqdm) -> FetchResult:
        try:
            path = self.fetch(
                item.url,
                item.dest,
                expect=item.expect,
                size=item.size,
                sha256=item.sha256,
                md5_b64=item.md5_b64,
            )
            result = FetchResult(item, path, None)
        except (InputError, OSError, ValueError) as err:
            result = FetchResult(item, None, str(err).splitlines()[0] if str(err) else type(err).__name__)
        bar.update(1)
        return result

    def _fetch_with_retries(self, item: FetchItem, headers: dict[str, str] | None) -> Path:
        part = _part_path(item.dest)
        item.dest.parent.mkdir(parents=True, exist_ok=True)

        def attempt() -> Path:
            self._download_once(item, part, headers)
            size, sha = self._verify(item, part)
            os.replace(part, item.dest)
            _state_path(item.dest).unlink(missing_ok=True)
            if self._manifest is not None:
                self._manifest.record(item.url, item.dest, size, sha)
            return item.dest

        return self._retry(item.url, attempt, cleanup=lambda: _discard_part(item.dest))

    def _retry(self, url: str, attempt: Callable[[], T], cleanup: Callable[[], None]) -> T:
        """Run ``attempt`` up to ``1 + retries`` times; ``cleanup`` runs on a mismatch or a fatal error."""
        tries = 1 + max(0, self.policy.retries)
        for n in range(tries):
            if self._cancel.is_set():
                raise _Cancelled(url)
            try:
                return attempt()
            except _Fatal as err:
                cleanup()
                raise DownloadError(f"{url}: {err}") from None
            except _Mismatch as err:
                cleanup()
                problem, delay = str(err), None
            except _Transient as err:
                problem, delay = str(err), err.retry_after
            if n + 1 < tries:
                self._sleep(self._delay(n, delay))
        raise DownloadError(f"{url}: {problem} (gave up after {tries} attempts)")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        cap = self.policy.max_backoff
        if retry_after is not None:
            return min(cap, max(0.0, retry_after))
        return random.uniform(0.0, min(cap, self.policy.backoff * 2**attempt))

    def _gate(self, url: str) -> _HostGate:
        host = _host(url)
        with self._lock:
            gate = self._gates.get(host)
            if gate is None:
                gate = self._gates[host] = _HostGate(self.policy.concurrency, self.policy.min_interval)
            return gate

    @contextlib.contextmanager
    def _dest_lock(self, dest: Path) -> Iterator[None]:
        key = str(dest.resolve())
        with self._lock:
            lock = self._dest_locks.setdefault(key, threading.Lock())
        with lock:
            yield

    def _is_complete(self, item: FetchItem) -> bool:
        """Whether ``dest`` exists and agrees with everything known about it (so no download)."""
        if not item.dest.is_file():
            return False
        if item.size is not None and item.dest.stat().st_size != item.size:
            return False
        if EXPECT_KINDS[item.expect] is not None and sniff(_head(item.dest)) not in EXPECT_KINDS[item.expect]:
            return False
        record = self._manifest.lookup(item.dest) if self._manifest is not None else None
        if item.sha256 is None and item.md5_b64 is None and record is None:
            if self._manifest is not None:  # known good by construction (atomic rename): record it
                size, sha, _ = _digest(item.dest)
                self._manifest.record(item.url, item.dest, size, sha)
            return True
        size, sha, md5 = _digest(item.dest, md5=item.md5_b64 is not None)
        if item.sha256 is not None and sha != item.sha256.lower():
            return False
        if item.md5_b64 is not None and md5 != item.md5_b64:
            return False
        if record is not None and record != (size, sha):
            return False
        if record is None and self._manifest is not None:
            self._manifest.record(item.url, item.dest, size, sha)
        return True

    def _open(self, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        """Open a GET; map HTTP and network errors onto transient / fatal."""
        request = urllib.request.Request(url, headers=headers, method="GET")
        try:
            return self._opener.open(request, timeout=self.policy.timeout)
        except urllib.error.HTTPError as err:
            retry_after = _parse_retry_after(err.headers.get("Retry-After")) if err.headers else None
            err.close()
            problem = f"HTTP {err.code} {_reason(err)}"
            if err.code == 429 or err.code >= 500:
                raise _Transient(problem, retry_after) from None
            if err.code == 416:
                raise _Mismatch(f"{problem} (stale partial file)") from None
            raise _Fatal(problem) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            raise _Transient(_describe(err)) from None

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        return {"User-Agent": self.policy.user_agent, "Accept-Encoding": "identity", **(extra or {})}

    def _download_once(self, item: FetchItem, part: Path, headers: dict[str, str] | None) -> None:
        """Resume ``part`` if that is safe, else (or if the server's answer does not fit) start from zero.

        A part is resumed only with the validator recorded when it was started (``<dest>.part.json``),
        sent as ``If-Range``: a server whose file changed answers 200 with the whole new file. A 206 is
        accepted only if its ``Content-Range`` starts at the part's end, is not empty, and its total (and
        ETag, if sent) agree with the recorded version and the expected size; anything else discards
        the part and fetches the whole file again in the same attempt.
        """
        offset = part.stat().st_size if part.exists() else 0
        state = _read_part_state(item.dest, item.url) if offset else None
        recorded = state["size"] if state else None
        expected = item.size if item.size is not None else recorded
        if offset and (
            state is None
            or (item.size is not None and recorded is not None and recorded != item.size)
            or (expected is not None and offset > expected)
        ):
            _discard_part(item.dest)  # no recorded version, or a part of another version: restart
            offset, state = 0, None
        if offset and expected is not None and offset == expected:
            return  # the whole recorded version is there: go straight to verification
        if offset and state is not None:
            try:
                self._request(item, part, headers, offset, state)
                return
            except _Mismatch:
                pass
            _discard_part(item.dest)  # the answer does not continue the recorded version: restart
        self._request(item, part, headers, 0, None)

    def _request(
        self,
        item: FetchItem,
        part: Path,
        headers: dict[str, str] | None,
        offset: int,
        state: dict | None,
    ) -> None:
        """One GET into ``part``, ranged from ``offset`` with ``If-Range`` when ``state`` is given."""
        request_headers = self._headers(headers)
        if offset and state is not None:
            request_headers["Range"] = f"bytes={offset}-"
            request_headers["If-Range"] = state["validator"]
        with self._gate(item.url).slot(), self._open(item.url, request_headers) as resp:
            announced = _content_length(resp.headers)
            if resp.status == 206:
                if not offset or state is None:
                    raise _Mismatch("206 Partial Content to a request without Range")
                want = self._check_partial(item, resp.headers, offset, state, announced)
                mode = "ab"
            else:  # 200 (or another 2xx): the whole body (a changed file answers If-Range so)
                offset, want, mode = 0, announced, "wb"
                _write_part_state(item.dest, item.url, resp.headers)
            total = offset + announced if announced is not None else item.size
            received = self._stream(resp, part, mode, offset, total, item.dest.name)
        if want is not None and received < want:
            raise _Transient(f"incomplete body: got {received} of {want} bytes")

    @staticmethod
    def _check_partial(
        item: FetchItem,
        headers: http.client.HTTPMessage,
        offset: int,
        state: dict,
        announced: int | None,
    ) -> int:
        """Raise :class:`_Mismatch` unless a 206 continues the recorded version at ``offset``; its length."""
        value = headers.get("Content-Range")
        parsed = _content_range(value)
        if parsed is None or parsed[0] != offset or parsed[1] < parsed[0]:
            raise _Mismatch(f"bad Content-Range {value!r} for {offset=}")
        start, end, total = parsed
        for name, known in (("expected", item.size), ("recorded", state["size"])):
            if total is not None and known is not None and total != known:
                raise _Mismatch(f"Content-Range total {total} differs from the {name} size {known}")
        if total is not None and end != total - 1:
            raise _Mismatch(f"bad Content-Range {value!r}: does not reach the end of {total} bytes")
        if announced is not None and announced != end - start + 1:
            raise _Mismatch(f"Content-Length {announced} disagrees with Content-Range {value!r}")
        etag = headers.get("ETag")
        if etag and state.get("etag") and etag != state["etag"]:
            raise _Mismatch(f"ETag changed from {state['etag']} to {etag}")
        return end - start + 1

    def _stream(self, resp, part: Path, mode: str, offset: int, total: int | None, name: str) -> int:
        """Copy the body to ``part``; bytes written so far stay there (for resume) if the read fails."""
        received = 0
        with (
            part.open(mode) as fh,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=name,
                leave=False,
                disable=not self.progress,
            ) as bar,
        ):
            speed = _SpeedCheck(self.policy.low_speed_limit, self.policy.low_speed_time)
            while True:
                if self._cancel.is_set():
                    raise _Cancelled(str(part))
                try:
                    chunk = resp.read1(CHUNK)  # whatever has arrived: a trickle cannot block a read
                except (OSError, http.client.HTTPException) as err:
                    raise _Transient(
                        f"connection lost after {offset + received} bytes ({_describe(err)})"
                    ) from None
                if not chunk:
                    return received
                try:
                    fh.write(chunk)
                except OSError as err:
                    raise _write_error(err, part) from None
                received += len(chunk)
                bar.update(len(chunk))
                speed.add(len(chunk), offset + received)

    def _verify(self, item: FetchItem, part: Path) -> tuple[int, str]:
        """Check kind, size and hashes of a finished part file; returns ``(size, sha256)``."""
        _check_kind(item.expect, _head(part))
        actual = part.stat().st_size
        if item.size is not None and actual != item.size:
            raise _Mismatch(f"size mismatch: expected {item.size} bytes, got {actual}")
        size, sha, md5 = _digest(part, md5=item.md5_b64 is not None)
        if item.sha256 is not None and sha != item.sha256.lower():
            raise _Mismatch(f"sha256 mismatch: expected {item.sha256}, got {sha}")
        if item.md5_b64 is not None and md5 != item.md5_b64:
            raise _Mismatch(f"Content-MD5 mismatch: expected {item.md5_b64}, got {md5}")
        return size, sha

    def _get_once(self, url: str, headers: dict[str, str] | None) -> bytes:
        with self._gate(url).slot(), self._open(url, self._headers(headers)) as resp:
            announced = _content_length(resp.headers)
            try:
                body = resp.read(announced) if announced is not None else resp.read()
            except (OSError, http.client.HTTPException) as err:
                raise _Transient(f"connection lost ({_describe(err)})") from None
        if announced is not None and len(body) < announced:
            raise _Transient(f"incomplete body: got {len(body)} of {announced} bytes")
        return body


class _SpeedCheck:
    """A transfer slower than ``limit`` bytes/s over each window of ``window`` seconds is given up."""

    def __init__(self, limit: float, window: float) -> None:
        self.limit, self.window = limit, window
        self.start, self.count = time.monotonic(), 0

    def add(self, n: int, received: int) -> None:
        self.count += n
        elapsed = time.monotonic() - self.start
        if self.window <= 0 or elapsed < self.window:
            return
        rate = self.count / elapsed
        if rate < self.limit:
            raise _Transient(
                f"too slow: {rate:.0f} bytes/s over {elapsed:.0f} s after {received} bytes "
                f"(low_speed_limit {self.limit:g} over low_speed_time {self.window:g} s)"
            )
        self.start, self.count = time.monotonic(), 0


def _write_error(err: OSError, path: Path) -> DownloadError:
    """A part file that cannot be written (a full disk, a quota, a file size limit): one line, no retry;
    the bytes written so far stay for the next run."""
    return DownloadError(f"{path}: cannot write ({err.strerror or err}); free space and run again")


def _reason(err: urllib.error.HTTPError) -> str:
    if err.reason:
        return str(err.reason)
    try:
        return http.HTTPStatus(err.code).phrase
    except ValueError:
        return ""


def _check_scheme(url: str) -> None:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"{url}: not an http(s) URL")


# ---------------------------------------------------------------------------------------------- archives


def _unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    """Why extracting this entry could write outside the target, or None if it is safe."""
    name = info.filename.replace("\\", "/")
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        return "symbolic link"
    if name.startswith("/"):
        return "absolute path"
    if re.match(r"^[A-Za-z]:", name):
        return "drive letter"
    if ".." in name.split("/"):
        return "'..' component"
    if "\x00" in name:
        return "NUL in name"
    return None


#: an archive's entries may unpack to at most this many bytes in all (``HAMIL_MAX_ZIP_BYTES`` overrides)
MAX_ZIP_BYTES = 64 * 2**30
#: an entry over 1 MiB may unpack to at most this many times its compressed size (a zip bomb: ~1000x;
#: ``HAMIL_MAX_ZIP_RATIO`` overrides, e.g. for archives of mostly empty uncompressed TIFFs)
MAX_ZIP_RATIO = 100


def _bomb_reason(infos: list[zipfile.ZipInfo], limit: int) -> str | None:
    """Why unpacking these entries would be a zip bomb (too large, too compressed), or None."""
    ratio = env_positive_int("HAMIL_MAX_ZIP_RATIO", MAX_ZIP_RATIO, "times")
    total = sum(i.file_size for i in infos)
    if total > limit:
        return f"entries unpack to {total} bytes, over the limit of {limit} (HAMIL_MAX_ZIP_BYTES)"
    for info in infos:
        if info.file_size > 2**20 and info.file_size > ratio * max(info.compress_size, 1):
            return (
                f"entry {info.filename!r} unpacks {info.compress_size} bytes to {info.file_size} "
                f"(over {ratio}x: a zip bomb? HAMIL_MAX_ZIP_RATIO raises the limit)"
            )
    return None


def safe_extract_zip(archive: Path, target: Path) -> list[Path]:
    """Extract ``archive`` into ``target`` and return the extracted files (not directories).

    Every entry is checked before anything is written: one that could escape ``target`` (``..``, an
    absolute path, a drive letter, a symbolic link), or entries that would unpack to more than
    :data:`MAX_ZIP_BYTES` or more than :data:`MAX_ZIP_RATIO` times their size, raise :class:`DownloadError`
    naming them. Files are extracted into a temporary folder beside
    ``target`` (one writer at a time; a killed extraction's folder is removed by the next) and then moved
    into place.
    """
    archive, target = Path(archive), Path(target)
    limit = env_positive_int("HAMIL_MAX_ZIP_BYTES", MAX_ZIP_BYTES, "bytes")
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                reason = _unsafe_reason(info)
                if reason:
                    raise DownloadError(f"{archive}: unsafe zip entry {info.filename!r} ({reason})")
            clash = _file_folder_clash(infos)
            if clash:
                raise DownloadError(f"{archive}: zip entry {clash!r} is both a file and a folder")
            bomb = _bomb_reason(infos, limit)
            if bomb:
                raise DownloadError(f"{archive}: {bomb}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with writer_lock(target):
                remove_stale_temps(target)
                tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
                try:
                    relative = _extract_all(zf, infos, tmp)
                    return _move_into(tmp, relative, target)
                except (NotADirectoryError, IsADirectoryError, FileExistsError) as err:
                    where = err.filename or target
                    raise DownloadError(
                        f"{archive}: cannot place an entry at {where} (a file and a folder of one name)"
                    ) from None
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    except FileNotFoundError:
        raise DownloadError(f"{archive}: file not found") from None
    except (zipfile.BadZipFile, EOFError) as err:
        raise DownloadError(f"{archive}: not a valid zip archive ({err})") from None


def _entry_parts(name: str) -> tuple[str, ...]:
    return tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


def _file_folder_clash(infos: list[zipfile.ZipInfo]) -> str | None:
    """A name that is a file entry and also a folder (a folder entry or a parent of another entry)."""
    files: dict[tuple[str, ...], str] = {}
    folders: set[tuple[str, ...]] = set()
    for info in infos:
        parts = _entry_parts(info.filename)
        if not parts:
            continue
        folders.update(parts[:k] for k in range(1, len(parts)))
        if info.is_dir():
            folders.add(parts)
        else:
            files[parts] = info.filename
    return next((name for parts, name in files.items() if parts in folders), None)


def _extract_all(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], root: Path) -> list[Path]:
    relative: list[Path] = []
    resolved_root = root.resolve()
    for info in infos:
        parts = _entry_parts(info.filename)
        if not parts:
            continue
        rel = Path(*parts)
        out = root / rel
        if not out.resolve().is_relative_to(resolved_root):  # belt and braces after _unsafe_reason
            raise DownloadError(f"{zf.filename}: unsafe zip entry {info.filename!r} (escapes target)")
        if info.is_dir():
            out.mkdir(parents=True, exist_ok=True)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        relative.append(rel)
    return relative


def _move_into(tmp: Path, relative: list[Path], target: Path) -> list[Path]:
    if not target.exists():
        os.replace(tmp, target)
        return [target / rel for rel in relative]
    out = []
    for rel in relative:
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, dest)
        out.append(dest)
    return out

"""The downloader against a scripted local HTTP server (127.0.0.1, real sockets, no internet)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocessing.download import (
    Downloader,
    DownloadError,
    DownloadPolicy,
    FetchItem,
    _parse_retry_after,
    _part_path,
    safe_extract_zip,
    sniff,
)
from preprocessing.errors import InputError

BODY = bytes(range(256)) * 400  # 102,400 bytes: several read chunks
HTML = b"<!DOCTYPE html><html><head><title>Error</title></head><body>Try later</body></html>"
FAST = DownloadPolicy(retries=2, backoff=0.001, max_backoff=5.0, timeout=5.0)

from localhttp import Handler, Script, etag_of, send, send_ranged, serve  # noqa: E402


def serve_ranges(h: Handler, body: bytes) -> None:
    """A well-behaved server: honours ``Range: bytes=n-`` with 206 (and ``If-Range`` with its ETag)."""
    send_ranged(h, body)


def drop_half(h: Handler, body: bytes, keep: int | None = None) -> None:
    """Announce the whole body (with its ETag), write half (or ``keep`` bytes), close the connection."""
    send(
        h, body[: len(body) // 2 if keep is None else keep], length=len(body), headers={"ETag": etag_of(body)}
    )
    h.close_connection = True


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Script]]:
    with serve(monkeypatch) as running:
        yield running


def make_downloader(tmp_path: Path | None = None, sleeps: list[float] | None = None, **policy) -> Downloader:
    base = FAST.__dict__ | policy
    manifest = tmp_path / "manifest.tsv" if tmp_path is not None else None
    sleep = sleeps.append if sleeps is not None else (lambda s: None)
    return Downloader(DownloadPolicy(**base), manifest=manifest, progress=False, sleep=sleep)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 120, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- downloads


def test_plain_download_writes_manifest_row(server, tmp_path):
    url, script = server
    script.routes["/a.bin"] = lambda h, n: send(h, BODY)
    dest = tmp_path / "out" / "a.bin"
    got = make_downloader(tmp_path).fetch(f"{url}/a.bin", dest, size=len(BODY), sha256=sha(BODY))
    assert got == dest and dest.read_bytes() == BODY
    assert not (tmp_path / "out" / "a.bin.part").exists()
    lines = (tmp_path / "manifest.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["url", "path", "size", "sha256", "time"]
    row = lines[1].split("\t")
    assert row[:4] == [f"{url}/a.bin", str(dest), str(len(BODY)), sha(BODY)]
    assert datetime.strptime(row[4], "%Y-%m-%dT%H:%M:%SZ")
    assert script.headers["/a.bin"][0]["User-Agent"].startswith("hamil-downloader/")


def test_skip_when_complete(server, tmp_path):
    url, script = server
    script.routes["/a.bin"] = lambda h, n: send(h, BODY)
    dest = tmp_path / "a.bin"
    make_downloader(tmp_path).fetch(f"{url}/a.bin", dest, sha256=sha(BODY))
    make_downloader(tmp_path).fetch(f"{url}/a.bin", dest, sha256=sha(BODY))  # known hash
    make_downloader(tmp_path).fetch(f"{url}/a.bin", dest)  # the manifest's record
    make_downloader().fetch(f"{url}/a.bin", dest, size=len(BODY))  # no manifest: the known size
    make_downloader().fetch(f"{url}/a.bin", dest)  # nothing known: dest only ever appears complete
    assert script.count("/a.bin") == 1


def test_manifest_record_disagrees_redownloads(server, tmp_path):
    url, script = server
    script.routes["/a.bin"] = lambda h, n: send(h, BODY)
    dest = tmp_path / "a.bin"
    make_downloader(tmp_path).fetch(f"{url}/a.bin", dest)
    dest.write_bytes(b"tampered")
    make_downloader(tmp_path).fetch(f"{url}/a.bin", dest)
    assert script.count("/a.bin") == 2 and dest.read_bytes() == BODY


def test_dropped_connection_resumes_with_range(server, tmp_path):
    url, script = server
    script.routes["/big"] = lambda h, n: drop_half(h, BODY) if n == 0 else serve_ranges(h, BODY)
    sleeps: list[float] = []
    dest = tmp_path / "big"
    make_downloader(tmp_path, sleeps).fetch(f"{url}/big", dest, sha256=sha(BODY))
    assert dest.read_bytes() == BODY
    assert script.count("/big") == 2 and len(sleeps) == 1
    assert "Range" not in script.headers["/big"][0]
    assert script.headers["/big"][1]["Range"] == f"bytes={len(BODY) // 2}-"


def interrupt(url: str, dest: Path) -> None:
    """A first run that loses its connection and gives up (no retry), leaving ``<dest>.part``."""
    with pytest.raises(DownloadError, match="incomplete body"):
        make_downloader(retries=0).fetch(url, dest)
    assert _part_path(dest).exists()


def test_resume_answered_206_is_appended(server, tmp_path):
    """A part file left by an earlier run is resumed (If-Range: its ETag), and only the rest is sent."""
    url, script = server
    served: list[int] = []

    def route(h: Handler, n: int) -> None:
        if n == 0:
            return drop_half(h, BODY, keep=1000)
        served.append(int(h.headers["Range"].removeprefix("bytes=").rstrip("-")))  # before answering
        serve_ranges(h, BODY)

    script.routes["/big"] = route
    dest = tmp_path / "big"
    interrupt(f"{url}/big", dest)
    make_downloader().fetch(f"{url}/big", dest, size=len(BODY))
    assert served == [1000] and dest.read_bytes() == BODY
    assert script.headers["/big"][1]["If-Range"] == etag_of(BODY)
    assert not _part_path(dest).exists() and not (tmp_path / "big.part.json").exists()


def test_bad_content_range_or_416_restarts_from_zero(server, tmp_path):
    url, script = server
    wrong = {"Content-Range": f"bytes 0-{len(BODY) - 1}/{len(BODY)}", "ETag": etag_of(BODY)}

    def bad(answer):
        return lambda h, n: (
            drop_half(h, BODY, keep=5000) if n == 0 else answer(h) if n == 1 else serve_ranges(h, BODY)
        )

    script.routes["/cr"] = bad(lambda h: send(h, BODY, 206, headers=wrong))
    script.routes["/416"] = bad(lambda h: h.send_error(416))
    for name in ("cr", "416"):
        interrupt(f"{url}/{name}", tmp_path / name)
        sleeps: list[float] = []
        make_downloader(sleeps=sleeps).fetch(f"{url}/{name}", tmp_path / name)
        assert (tmp_path / name).read_bytes() == BODY
        assert [m.get("Range") for m in script.headers[f"/{name}"]] == [None, "bytes=5000-", None]
        assert sleeps == []  # restarted at once, in the same attempt


V2 = bytes(255 - b for b in BODY)  # the file as changed on the server: same length, other bytes


@pytest.mark.parametrize(
    "server_kind", ["if-range", "ignores if-range, new etag", "ignores if-range, new size"]
)
def test_file_changed_between_attempts_gives_the_new_file_exactly(server, tmp_path, server_kind):
    """Issue 12.2: a resume must never splice the old file's prefix onto the new file's tail."""
    url, script = server
    new = V2 if server_kind != "ignores if-range, new size" else V2[:70000]
    etag = "" if server_kind == "ignores if-range, new size" else None  # None: the body's ETag

    def route(h: Handler, n: int) -> None:
        if n == 0:
            return drop_half(h, BODY)  # v1, with its ETag
        send_ranged(h, new, etag=etag, if_range=server_kind == "if-range")

    script.routes["/f"] = route
    dest = tmp_path / "f"
    interrupt(f"{url}/f", dest)
    make_downloader(tmp_path).fetch(f"{url}/f", dest)
    assert dest.read_bytes() == new
    sent = script.headers["/f"]
    assert sent[1]["Range"] == f"bytes={len(BODY) // 2}-" and sent[1]["If-Range"] == etag_of(BODY)
    if server_kind != "if-range":  # the 206 did not continue the recorded version: fetched again whole
        assert [m.get("Range") for m in sent[2:]] == [None]


def test_stale_longer_part_and_empty_206_is_not_accepted(server, tmp_path):
    """Issue 12.2: a part longer than the (new, shorter) file, answered 206 with an empty body."""
    url, script = server
    new = V2[:30000]

    def route(h: Handler, n: int) -> None:
        if n == 0:
            return drop_half(h, BODY, keep=80000)
        rng = h.headers.get("Range")
        if rng:  # a bad server: ignores If-Range, answers any range 206 with what is left (nothing)
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            send(h, new[start:], 206, headers={"Content-Range": f"bytes {start}-{len(new) - 1}/{len(new)}"})
        else:
            send(h, new)

    script.routes["/f"] = route
    dest = tmp_path / "f"
    interrupt(f"{url}/f", dest)
    make_downloader(tmp_path).fetch(f"{url}/f", dest)
    assert dest.read_bytes() == new
    assert [m.get("Range") for m in script.headers["/f"]] == [None, "bytes=80000-", None]


def test_expected_size_and_content_range_total_must_agree(server, tmp_path):
    """A 206 whose total differs from the size the caller expects restarts from zero."""
    url, script = server
    longer = BODY + b"tail"

    def route(h: Handler, n: int) -> None:
        if n == 0:
            return drop_half(h, BODY)
        send_ranged(h, longer if h.headers.get("Range") else BODY, etag=etag_of(BODY), if_range=False)

    script.routes["/f"] = route
    dest = tmp_path / "f"
    interrupt(f"{url}/f", dest)
    make_downloader().fetch(f"{url}/f", dest, size=len(BODY))
    assert dest.read_bytes() == BODY
    assert [m.get("Range") for m in script.headers["/f"]] == [None, "bytes=51200-", None]


def test_part_without_recorded_validator_restarts_from_zero(server, tmp_path):
    """No ETag nor Last-Modified when the part was started (or a part of unknown origin): no Range."""
    url, script = server

    def route(h: Handler, n: int) -> None:
        if n == 0:
            send(h, BODY[:5000], length=len(BODY))
            h.close_connection = True
        else:
            send_ranged(h, BODY, etag="")

    script.routes["/f"] = route
    script.routes["/g"] = lambda h, n: send_ranged(h, BODY)
    interrupt(f"{url}/f", tmp_path / "f")
    make_downloader().fetch(f"{url}/f", tmp_path / "f")
    (tmp_path / "g.part").write_bytes(V2[:5000])  # a part file with no record of its version
    make_downloader().fetch(f"{url}/g", tmp_path / "g")
    assert (tmp_path / "f").read_bytes() == BODY == (tmp_path / "g").read_bytes()
    assert [m.get("Range") for m in script.headers["/f"]] == [None, None]
    assert [m.get("Range") for m in script.headers["/g"]] == [None]


def test_last_modified_is_the_validator_without_etag(server, tmp_path):
    url, script = server
    stamp = "Mon, 01 Mar 2021 00:00:00 GMT"

    def route(h: Handler, n: int) -> None:
        if n == 0:
            send(h, BODY[:5000], length=len(BODY), headers={"Last-Modified": stamp})
            h.close_connection = True
        else:
            send_ranged(h, BODY, etag="", last_modified=stamp)

    script.routes["/f"] = route
    interrupt(f"{url}/f", tmp_path / "f")
    make_downloader().fetch(f"{url}/f", tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == BODY
    assert script.headers["/f"][1]["If-Range"] == stamp and script.count("/f") == 2


def test_progress_bars_do_not_break_anything(server, tmp_path, capsys):
    url, script = server
    script.routes["/a"] = lambda h, n: send(h, BODY)
    dl = Downloader(FAST, progress=True)
    results = dl.fetch_many([FetchItem(f"{url}/a", tmp_path / "a")])
    assert results[0].error is None and (tmp_path / "a").read_bytes() == BODY
    assert "download" in capsys.readouterr().err


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    url, script = server
    script.routes["/big"] = lambda h, n: drop_half(h, BODY) if n == 0 else send(h, BODY)
    dest = tmp_path / "big"
    make_downloader().fetch(f"{url}/big", dest)
    assert script.headers["/big"][1]["Range"] == f"bytes={len(BODY) // 2}-"
    assert dest.read_bytes() == BODY and not (tmp_path / "big.part").exists()


def test_500_then_200_is_retried(server, tmp_path):
    url, script = server
    script.routes["/f"] = lambda h, n: h.send_error(500) if n == 0 else send(h, BODY)
    sleeps: list[float] = []
    make_downloader(sleeps=sleeps).fetch(f"{url}/f", tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == BODY and script.count("/f") == 2
    assert len(sleeps) == 1 and 0.0 <= sleeps[0] <= FAST.backoff


def test_429_honours_retry_after(server, tmp_path):
    url, script = server
    script.routes["/zero"] = lambda h, n: (
        send(h, b"slow down", 429, headers={"Retry-After": "0"}) if n == 0 else send(h, BODY)
    )
    script.routes["/long"] = lambda h, n: (
        send(h, b"slow down", 429, headers={"Retry-After": "120"}) if n == 0 else send(h, BODY)
    )
    sleeps: list[float] = []
    dl = make_downloader(sleeps=sleeps, max_backoff=3.0)
    dl.fetch(f"{url}/zero", tmp_path / "zero")
    dl.fetch(f"{url}/long", tmp_path / "long")
    assert sleeps == [0.0, 3.0]  # Retry-After as given, capped by max_backoff
    assert (tmp_path / "zero").read_bytes() == BODY == (tmp_path / "long").read_bytes()


def test_parse_retry_after():
    assert _parse_retry_after("5") == 5.0
    assert _parse_retry_after(None) is None and _parse_retry_after("soon") is None
    later = datetime.now(UTC) + timedelta(seconds=30)
    assert 25 <= _parse_retry_after(format_datetime(later, usegmt=True)) <= 31
    assert _parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_404_fails_at_once_naming_the_url(server, tmp_path):
    url, script = server
    sleeps: list[float] = []
    with pytest.raises(DownloadError, match=rf"^{url}/missing: HTTP 404 Not Found$") as info:
        make_downloader(sleeps=sleeps).fetch(f"{url}/missing", tmp_path / "m")
    assert isinstance(info.value, InputError)
    assert script.count("/missing") == 1 and sleeps == []
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.part").exists()


def test_html_where_jpeg_expected_is_rejected(server, tmp_path):
    url, script = server
    script.routes["/img.jpg"] = lambda h, n: send(h, HTML, ctype="text/html")
    with pytest.raises(DownloadError, match=rf"^{url}/img.jpg: expected jpeg, got html$"):
        make_downloader().fetch(f"{url}/img.jpg", tmp_path / "img.jpg", expect="jpeg")
    assert not (tmp_path / "img.jpg").exists() and not (tmp_path / "img.jpg.part").exists()
    assert list(tmp_path.iterdir()) == []


def test_expected_kinds_accept_the_right_bodies(server, tmp_path):
    url, script = server
    png, jpeg = image_bytes("PNG"), image_bytes("JPEG")
    script.routes["/p.png"] = lambda h, n: send(h, png)
    script.routes["/j.jpg"] = lambda h, n: send(h, jpeg)
    dl = make_downloader()
    assert dl.fetch(f"{url}/p.png", tmp_path / "p.png", expect="image").read_bytes() == png
    assert dl.fetch(f"{url}/j.jpg", tmp_path / "j.jpg", expect="jpeg").read_bytes() == jpeg
    with pytest.raises(DownloadError, match="expected png, got jpeg"):
        dl.fetch(f"{url}/j.jpg", tmp_path / "j.png", expect="png")


@pytest.mark.parametrize(
    "check, message",
    [
        ({"size": len(BODY) + 10}, "size mismatch"),
        ({"size": len(BODY) - 10}, "size mismatch"),
        ({"sha256": "0" * 64}, "sha256 mismatch"),
        ({"md5_b64": base64.b64encode(b"\0" * 16).decode()}, "Content-MD5 mismatch"),
    ],
)
def test_mismatch_fails_after_retries_and_stores_nothing(server, tmp_path, check, message):
    url, script = server
    script.routes["/f"] = lambda h, n: serve_ranges(h, BODY)
    with pytest.raises(DownloadError, match=rf"^{url}/f: {message}.*gave up after 3 attempts"):
        make_downloader(tmp_path).fetch(f"{url}/f", tmp_path / "f", **check)
    assert script.count("/f") == 3  # 1 + retries
    assert not (tmp_path / "f").exists() and not (tmp_path / "f.part").exists()
    assert not (tmp_path / "manifest.tsv").exists()


def test_correct_md5_b64_is_accepted(server, tmp_path):
    url, script = server
    script.routes["/blob"] = lambda h, n: send(h, BODY)
    md5 = base64.b64encode(hashlib.md5(BODY).digest()).decode()
    make_downloader().fetch(f"{url}/blob", tmp_path / "blob", md5_b64=md5)
    assert (tmp_path / "blob").read_bytes() == BODY


def test_timeout_is_retried(server, tmp_path):
    url, script = server

    def route(h: Handler, n: int) -> None:
        if n == 0:
            time.sleep(0.6)
        send(h, BODY)

    script.routes["/slow"] = route
    make_downloader(timeout=0.2).fetch(f"{url}/slow", tmp_path / "slow")
    assert (tmp_path / "slow").read_bytes() == BODY and script.count("/slow") == 2


def test_connection_refused_gives_up(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sleeps: list[float] = []
    with pytest.raises(DownloadError, match=rf"127.0.0.1:{port}/x: .*gave up after 3 attempts"):
        make_downloader(sleeps=sleeps).fetch(f"http://127.0.0.1:{port}/x", tmp_path / "x")
    assert len(sleeps) == 2 and not (tmp_path / "x").exists()


def test_backoff_is_exponential_with_full_jitter(server, tmp_path):
    url, script = server
    script.routes["/f"] = lambda h, n: h.send_error(503)
    sleeps: list[float] = []
    with pytest.raises(DownloadError, match="HTTP 503"):
        make_downloader(sleeps=sleeps, retries=4, backoff=1.0, max_backoff=5.0).fetch(
            f"{url}/f", tmp_path / "f"
        )
    assert len(sleeps) == 4
    assert all(0.0 <= s <= cap for s, cap in zip(sleeps, [1.0, 2.0, 4.0, 5.0], strict=True))


def test_per_host_concurrency_limit(server, tmp_path):
    url, script = server
    lock, active, most = threading.Lock(), [0], [0]

    def route(h: Handler, n: int) -> None:
        # counted here, and released before the response is sent: the client cannot have the whole body
        # (and start its next request) while this request still counts (script.max_active can, under load)
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.1)
        with lock:
            active[0] -= 1
        send(h, BODY[:100])

    items = []
    for k in range(6):
        script.routes[f"/c{k}"] = route
        items.append(FetchItem(f"{url}/c{k}", tmp_path / f"c{k}"))
    results = make_downloader(concurrency=2).fetch_many(items, workers=6)
    assert all(r.error is None and r.path == r.item.dest for r in results)
    assert most[0] == 2


def test_min_interval_between_request_starts(server, tmp_path):
    url, script = server
    interval = 0.2
    items = []
    for k in range(4):
        script.routes[f"/i{k}"] = lambda h, n: send(h, b"x")
        items.append(FetchItem(f"{url}/i{k}", tmp_path / f"i{k}"))
    results = make_downloader(min_interval=interval, concurrency=4).fetch_many(items, workers=4)
    assert all(r.error is None for r in results)
    starts = sorted(t for k in range(4) for t in script.starts[f"/i{k}"])
    assert all(b - a >= interval - 0.05 for a, b in zip(starts, starts[1:], strict=False))


def test_fetch_many_reports_errors_per_item(server, tmp_path):
    url, script = server
    script.routes["/ok"] = lambda h, n: send(h, BODY)
    script.routes["/page"] = lambda h, n: send(h, HTML, ctype="text/html")
    items = [
        FetchItem(f"{url}/ok", tmp_path / "ok"),
        FetchItem(f"{url}/gone", tmp_path / "gone"),
        FetchItem(f"{url}/page", tmp_path / "page.jpg", expect="jpeg"),
        FetchItem("ftp://example.org/x", tmp_path / "x"),
    ]
    results = make_downloader().fetch_many(items)
    assert [r.item for r in results] == items
    assert results[0].path == tmp_path / "ok" and results[0].error is None
    assert results[1].path is None and results[1].error == f"{url}/gone: HTTP 404 Not Found"
    assert results[2].error == f"{url}/page: expected jpeg, got html"
    assert results[3].error == "ftp://example.org/x: not an http(s) URL"


def test_same_dest_twice_downloads_once(server, tmp_path):
    url, script = server
    script.routes["/a"] = lambda h, n: send(h, BODY)
    items = [FetchItem(f"{url}/a", tmp_path / "a")] * 3
    results = make_downloader(tmp_path).fetch_many(items, workers=3)
    assert all(r.error is None for r in results) and script.count("/a") == 1


def test_get_bytes(server):
    url, script = server
    listing = b'<?xml version="1.0" encoding="utf-8"?><EnumerationResults/>'
    script.routes["/list"] = lambda h, n: h.send_error(503) if n == 0 else send(h, listing)
    script.routes["/private"] = lambda h, n: h.send_error(403)
    dl = make_downloader()
    assert dl.get_bytes(f"{url}/list", headers={"x-ms-version": "2021-08-06"}) == listing
    assert script.headers["/list"][1]["x-ms-version"] == "2021-08-06"
    with pytest.raises(DownloadError, match=rf"^{url}/private: HTTP 403 Forbidden$"):
        dl.get_bytes(f"{url}/private")
    assert script.count("/private") == 1


# ---------------------------------------------------------------------------------------------- sniffing


def test_sniff_real_magic_bytes():
    assert sniff(image_bytes("JPEG")) == "jpeg"
    assert sniff(image_bytes("PNG")) == "png"
    assert sniff(image_bytes("TIFF")) == "tiff"
    assert sniff(gzip.compress(b"hello")) == "gzip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.txt", "a")
    assert sniff(buf.getvalue()) == "zip"
    assert sniff(HTML) == "html"
    assert sniff(b"\n  <html lang='en'><body>x</body></html>") == "html"
    assert sniff(b'\xef\xbb\xbf<?xml version="1.0"?><EnumerationResults/>') == "xml"
    assert sniff(b"hello world") == "unknown" and sniff(b"") == "unknown"


# ---------------------------------------------------------------------------------------------- archives


def make_zip(path: Path, entries: dict[str | zipfile.ZipInfo, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def test_safe_extract_zip_extracts_a_normal_archive(tmp_path):
    archive = make_zip(tmp_path / "ok.zip", {"a.txt": b"a", "sub/b.txt": b"b", "sub/": b""})
    target = tmp_path / "target"
    files = safe_extract_zip(archive, target)
    assert sorted(files) == [target / "a.txt", target / "sub" / "b.txt"]
    assert (target / "sub" / "b.txt").read_bytes() == b"b"
    # into an existing folder, keeping what is there
    again = safe_extract_zip(make_zip(tmp_path / "two.zip", {"c.txt": b"c"}), target)
    assert again == [target / "c.txt"] and (target / "a.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def symlink_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16) | 0
    return info


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "drive", "symlink"])
def test_safe_extract_zip_refuses_escaping_entries(tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    name = {
        "dotdot": "../evil",
        "absolute": str(outside / "evil"),
        "drive": "C:/evil",
        "symlink": "link",
    }[kind]
    entry: str | zipfile.ZipInfo = symlink_entry(name) if kind == "symlink" else name
    archive = make_zip(tmp_path / "bad.zip", {"fine.txt": b"ok", entry: b"/etc/passwd"})
    if kind == "absolute":
        assert name in zipfile.ZipFile(archive).namelist()  # the entry really is absolute
    target = tmp_path / "inner" / "target"
    with pytest.raises(DownloadError, match=rf"bad.zip: unsafe zip entry '{name}'"):
        safe_extract_zip(archive, target)
    assert not target.exists() and list(outside.iterdir()) == []
    assert not (tmp_path / "inner").exists() and not (tmp_path / "evil").exists()  # checked before writing


def test_safe_extract_zip_bad_archive(tmp_path):
    (tmp_path / "x.zip").write_bytes(HTML)
    with pytest.raises(DownloadError, match="x.zip: not a valid zip archive"):
        safe_extract_zip(tmp_path / "x.zip", tmp_path / "t")


@pytest.mark.parametrize("entries", [["hpa/G", "hpa/G/a.jpg"], ["hpa/G/a.jpg", "hpa/G"], ["x/", "x"]])
def test_safe_extract_zip_file_and_folder_of_one_name_is_one_error(tmp_path, entries):
    """Issue 12.9: a name that is both a file and a folder gives a DownloadError, not an OSError."""
    archive = make_zip(tmp_path / "clash.zip", dict.fromkeys(entries, b"x"))
    clash = next(e for e in entries if not e.endswith("/") and any(o.startswith(e + "/") for o in entries))
    with pytest.raises(DownloadError, match=rf"clash.zip: zip entry '{clash}' is both a file and a folder"):
        safe_extract_zip(archive, tmp_path / "target")
    assert not (tmp_path / "target").exists()
    # a folder of the target already holding a file where the archive has a folder
    (tmp_path / "t2").mkdir()
    (tmp_path / "t2" / "hpa").write_bytes(b"old file")
    with pytest.raises(DownloadError, match="ok.zip: cannot place an entry"):
        safe_extract_zip(make_zip(tmp_path / "ok.zip", {"hpa/G/a.jpg": b"x"}), tmp_path / "t2")


def test_safe_extract_zip_refuses_a_zip_bomb_before_writing(tmp_path, monkeypatch):
    """Issue 26: a 1 MiB archive that unpacks to 1 GiB was extracted whole. Here 16 MiB of zeros deflate
    to about 16 KiB (1000x): refused on the entry headers, nothing written; a total over the limit too."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("hpa/G/a.jpg", b"\0" * 16 * 2**20)
    assert archive.stat().st_size < 2**20 // 8
    with pytest.raises(DownloadError, match=r"bomb.zip: entry 'hpa/G/a.jpg' unpacks \d+ bytes to 16777216"):
        safe_extract_zip(archive, tmp_path / "target")
    assert not (tmp_path / "target").exists() and not list(tmp_path.glob(".target.*"))
    monkeypatch.setenv("HAMIL_MAX_ZIP_BYTES", "100")
    small = make_zip(tmp_path / "small.zip", {"a.txt": b"a" * 60, "b.txt": b"b" * 60})
    with pytest.raises(DownloadError, match="unpack to 120 bytes, over the limit of 100"):
        safe_extract_zip(small, tmp_path / "target")


def test_a_killed_extractions_temporary_folder_is_removed_by_the_next(tmp_path):
    left = tmp_path / ".target.k1ll3d.tmp"  # what a SIGKILL during an extraction leaves
    (left / "hpa").mkdir(parents=True)
    (left / "hpa" / "big.jpg").write_bytes(b"x" * 1000)
    files = safe_extract_zip(make_zip(tmp_path / "ok.zip", {"a.txt": b"a"}), tmp_path / "target")
    assert files == [tmp_path / "target" / "a.txt"] and not left.exists()


def _trickle(h: Handler, n: int, size: int = 4000, pause: float = 0.05) -> None:
    """A server that announces ``size`` bytes and sends one every ``pause`` seconds."""
    h.send_response(200)
    h.send_header("Content-Length", str(size))
    h.end_headers()
    for _ in range(size):
        try:
            h.wfile.write(b"x")
            h.wfile.flush()
        except OSError:
            return
        time.sleep(pause)


def test_a_trickling_server_is_given_up_on_by_the_low_speed_limit(server, tmp_path):
    """Issue 26: a byte every few seconds hung a download for ever (each read within the socket timeout)."""
    base, script = server
    script.routes["/slow.bin"] = _trickle
    policy = DownloadPolicy(retries=1, backoff=0, low_speed_limit=100, low_speed_time=0.5)
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"slow.bin: too slow: \d+ bytes/s .*gave up after 2 attempts"):
        Downloader(policy, progress=False).fetch(f"{base}/slow.bin", tmp_path / "slow.bin")
    assert time.monotonic() - start < 10 and script.count("/slow.bin") == 2
    assert (tmp_path / "slow.bin.part").stat().st_size > 0  # kept for a resume


CHILD = """
import json, resource, signal, sys
from pathlib import Path
from preprocessing.download import Downloader, DownloadPolicy, FetchItem
from preprocessing.errors import InputError
base, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
if mode == "full":  # a file size limit: writes past it fail as on a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
dl = Downloader(DownloadPolicy(retries=0, concurrency=2, low_speed_limit=0), progress=False)
try:
    if mode == "full":
        dl.fetch(base + "/big.bin", out / "big.bin")
    else:
        print("started", flush=True)
        dl.fetch_many([FetchItem(f"{base}/f{i}.bin", out / f"f{i}.bin") for i in range(40)])
except InputError as err:
    print("error:", err)
    sys.exit(2)
except KeyboardInterrupt:
    print("interrupted")
    sys.exit(130)
"""


def test_ctrl_c_drops_the_queue_keeps_the_parts_and_exits_promptly(server, tmp_path):
    """Issue 26: Ctrl-C during fetch_many first made every queued request (hours at BDGP's rate)."""
    import signal
    import subprocess
    import sys

    base, script = server
    for i in range(40):
        script.routes[f"/f{i}.bin"] = _trickle
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, base, str(tmp_path), "many"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("*.part"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # two transfers under way (concurrency 2)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130 and out.strip().splitlines()[-1] == "interrupted"
    assert time.monotonic() - start < 5  # not the 38 queued files of 200 s each
    assert sum(script.count(f"/f{i}.bin") for i in range(40)) == 2
    assert len(list(tmp_path.glob("*.part"))) == 2 and not list(tmp_path.glob("f*.bin"))


def test_a_full_disk_during_a_download_is_one_line_and_keeps_the_part(server, tmp_path):
    import subprocess
    import sys

    base, script = server
    script.routes["/big.bin"] = (200, bytes(200_000))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, base, str(tmp_path), "full"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(f"error: {tmp_path / 'big.bin.part'}: cannot write (File too large)")
    assert 0 < (tmp_path / "big.bin.part").stat().st_size <= 20000 and not (tmp_path / "big.bin").exists()


def test_zip_limits_from_the_environment_are_checked(tmp_path, monkeypatch):
    archive = tmp_path / "sparse.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("mask.tif", b"\0" * 4 * 2**20)  # a mostly empty image: far over 100x
    monkeypatch.setenv("HAMIL_MAX_ZIP_BYTES", "64G")
    bad = r"HAMIL_MAX_ZIP_BYTES must be a positive whole number of bytes, got '64G'"
    with pytest.raises(InputError, match=bad):
        safe_extract_zip(archive, tmp_path / "t")
    monkeypatch.delenv("HAMIL_MAX_ZIP_BYTES")
    with pytest.raises(DownloadError, match="HAMIL_MAX_ZIP_RATIO raises the limit"):
        safe_extract_zip(archive, tmp_path / "t")
    monkeypatch.setenv("HAMIL_MAX_ZIP_RATIO", "5000")
    assert safe_extract_zip(archive, tmp_path / "t") == [tmp_path / "t" / "mask.tif"]

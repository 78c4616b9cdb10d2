"""A scripted HTTP server on 127.0.0.1 for the download and source tests (real sockets, no internet).

A test sets ``script.routes[path]`` to ``(status, body)`` or to ``route(handler, n)`` (``n``: how many
requests for that path came before), and reads back what the server saw: ``script.headers[path]`` (one
entry per request), ``script.starts`` and ``script.max_active``.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

Route = Callable[["Handler", int], None]


class Script:
    """What the server does per path, and what it saw (headers and start time of every request)."""

    def __init__(self) -> None:
        self.routes: dict[str, Route | tuple[int, bytes]] = {}
        self.headers: dict[str, list[Message]] = defaultdict(list)
        self.starts: dict[str, list[float]] = defaultdict(list)
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    def count(self, path: str) -> int:
        return len(self.headers[path])


class Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        script = self.server.script
        with script.lock:
            n = script.count(self.path)
            script.headers[self.path].append(self.headers)  # case-insensitive lookups
            script.starts[self.path].append(time.monotonic())
            script.active += 1
            script.max_active = max(script.max_active, script.active)
        try:
            route = script.routes.get(self.path, lambda h, n: h.send_error(404))
            if isinstance(route, tuple):  # (status, body)
                send(self, route[1], route[0])
            else:
                route(self, n)
        finally:
            with script.lock:
                script.active -= 1

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    script: Script

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that time out leave broken pipes behind: not interesting here


def send(
    h: Handler,
    body: bytes,
    status: int = 200,
    ctype: str = "application/octet-stream",
    headers: dict[str, str] | None = None,
    length: int | None = None,
) -> None:
    """Answer with ``body``; ``length`` announces a different Content-Length (a dropped connection)."""
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body) if length is None else length))
    for key, value in (headers or {}).items():
        h.send_header(key, value)
    h.end_headers()
    h.wfile.write(body)
    h.wfile.flush()


def etag_of(body: bytes) -> str:
    """A strong ETag for a body (quoted, as servers send it)."""
    return '"' + hashlib.sha256(body).hexdigest()[:16] + '"'


def send_ranged(
    h: Handler,
    body: bytes,
    etag: str | None = None,
    last_modified: str | None = None,
    if_range: bool = True,
) -> None:
    """Answer like a real file server: ``Range: bytes=n-`` gives 206 with ``Content-Range``, unless an
    ``If-Range`` validator no longer matches (then 200 with the whole body). ``etag`` defaults to
    :func:`etag_of` (pass ``""`` to send none); ``if_range=False`` ignores ``If-Range`` (a bad server)."""
    etag = etag_of(body) if etag is None else etag
    headers = {k: v for k, v in (("ETag", etag), ("Last-Modified", last_modified)) if v}
    rng, cond = h.headers.get("Range"), h.headers.get("If-Range")
    fresh = not cond or not if_range or cond in (etag, last_modified)
    if rng and fresh:
        start = int(rng.removeprefix("bytes=").rstrip("-"))
        content_range = f"bytes {start}-{len(body) - 1}/{len(body)}"
        send(h, body[start:], 206, headers={**headers, "Content-Range": content_range})
    else:
        send(h, body, headers=headers)


@contextlib.contextmanager
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Script]]:
    """Run the server for the duration of the block; yield its base URL and its script."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    httpd = _Server(("127.0.0.1", 0), Handler)
    httpd.script = Script()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.script
    finally:
        httpd.shutdown()
        httpd.server_close()


#: An HTML error page, as servers send instead of the file asked for.
HTML_PAGE = b"<!DOCTYPE html><html><head><title>Error</title></head><body>Not found</body></html>"


def zipped(members: dict[str, bytes]) -> bytes:
    """A ZIP archive (bytes) holding ``members`` (name -> content), to serve or to read as a download."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def jpeg(value: int = 120, size: int = 4) -> bytes:
    """A tiny uniform JPEG (``size`` x ``size``, grey level ``value``) to serve as an image."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()

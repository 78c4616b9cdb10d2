"""Real data sources (BDGP, HPA, the HPA paper's patches) against a scripted local HTTP server.

Fixtures are small byte strings shaped like the real files (see DATA_SOURCES.md); no internet is used.
"""

from __future__ import annotations

import gzip
import io
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from preprocessing.download import Downloader, DownloadError, DownloadPolicy
from preprocessing.errors import InputError
from preprocessing.sources import bdgp

FAST = DownloadPolicy(retries=1, backoff=0.001, max_backoff=0.01, timeout=5.0)
HTML = b"<!DOCTYPE html><html><head><title>Oops</title></head><body>Not found</body></html>"


# ------------------------------------------------------------------------------------------ local server


class Site:
    """What the server answers per path (query string included), and which paths were requested."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[BaseHTTPRequestHandler], None] | tuple[int, bytes]] = {}
        self.requests: dict[str, list[dict[str, str]]] = defaultdict(list)
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        site = self.server.site
        with site.lock:
            site.requests[self.path].append(dict(self.headers.items()))
        route = site.routes.get(self.path)
        if route is None:
            self.send_error(404)
        elif callable(route):
            route(self)
        else:
            reply(self, route[1], route[0])

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    site: Site

    def handle_error(self, request: object, client_address: object) -> None:
        pass


def reply(h: BaseHTTPRequestHandler, body: bytes, status: int = 200) -> None:
    h.send_response(status)
    h.send_header("Content-Type", "application/octet-stream")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Site]]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.site = Site()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.site
    httpd.shutdown()
    httpd.server_close()


def downloader(tmp_path: Path) -> Downloader:
    return Downloader(FAST, manifest=tmp_path / "manifest.tsv", progress=False, sleep=lambda s: None)


def jpeg(value: int = 120, size: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- BDGP

ANNOT_ROWS = [
    ("tll", "CG1378", "FBgn0003720", "2", "anterior endoderm anlage"),
    ("tll", "CG1378", "FBgn0003720", "2", "posterior endoderm anlage"),
    ("tll", "CG1378", "FBgn0003720", "2", "maternal"),
    ("tll", "CG1378", "FBgn0003720", "4", "brain primordium"),
    ("tll", "CG1378", "FBgn0003720", "4", "list_1"),
    ("hb", "CG9786", "FBgn0001180", "2", "ubiquitous"),
    ("hb", "CG9786", "FBgn0001180", "2", "no staining"),
    ("hb", "CG9786", "FBgn0001180", "5", "ventral nerve cord primordium, P3"),
]
# Column order of the real images table is unconfirmed: this fixture puts the path in the middle.
IMAGE_ROWS = [
    ("101", "CG1378", "img_dir_10/insitu10383.jpe", "2", "lateral"),
    ("102", "CG1378", "img_dir_10/insitu10384.jpe", "2", "dorsal"),
    ("103", "CG1378", "img_dir_11/insitu11001.jpe", "4", "lateral"),
    ("104", "CG1378", "img_dir_11/insitu11002.jpe", "4", "anterior"),  # view filtered out
    ("105", "CG9786", "img_dir_12/insitu12000.jpe", "2", "lateral"),  # only non-anatomical terms
    ("106", "CG9786", "img_dir_12/insitu12001.jpe", "5", "ventral"),
    ("107", "CG9786", "img_dir_12/insitu12002.jpe", "1", "lateral"),  # stage 1-3 not kept by default
]


def annot_bytes(delimiter: str) -> bytes:
    lines = []
    for row in ANNOT_ROWS:
        cells = [f'"{c}"' if delimiter in c else c for c in row]
        lines.append(delimiter.join(cells))
    return gzip.compress(("\n".join(lines) + "\n").encode())


def images_bytes() -> bytes:
    return gzip.compress(("\n".join(",".join(r) for r in IMAGE_ROWS) + "\n").encode())


def test_bdgp_tab_and_comma_annotations_parse_identically():
    tab = bdgp.parse_annotations(annot_bytes("\t"))
    comma = bdgp.parse_annotations(annot_bytes(","))
    pd.testing.assert_frame_equal(tab, comma)
    assert len(tab) == len(ANNOT_ROWS)
    assert tab["term"].iloc[-1] == "ventral nerve cord primordium, P3"
    assert tab["stage"].tolist()[:4] == [2, 2, 2, 4]


def test_bdgp_annotations_tolerate_plain_text_and_refuse_html():
    plain = bdgp.parse_annotations(gzip.decompress(annot_bytes("\t")))
    assert len(plain) == len(ANNOT_ROWS)
    with pytest.raises(InputError, match="annot.csv.gz: got an HTML page"):
        bdgp.parse_annotations(HTML, "annot.csv.gz")
    with pytest.raises(InputError, match="no valid annotation row"):
        bdgp.parse_annotations(gzip.compress(b"a,b\nc,d\n"))


def test_bdgp_images_columns_found_by_content_in_any_order():
    annot = bdgp.parse_annotations(annot_bytes(","))
    keys = bdgp._gene_keys(annot)
    shuffled = [(r[4], r[2], r[0], r[3], r[1]) for r in IMAGE_ROWS]  # view, path, id, stage, gene
    data = gzip.compress(("\n".join("\t".join(r) for r in shuffled) + "\n").encode())
    a = bdgp.parse_images(images_bytes(), keys)
    b = bdgp.parse_images(data, keys)
    pd.testing.assert_frame_equal(a, b)
    assert a.columns.tolist() == ["gene", "stage", "view", "path"]
    assert a["path"].iloc[0] == "img_dir_10/insitu10383.jpe"
    no_view = gzip.compress(b"1,CG1378,img_dir_1/insitu1.jpe,2\n")
    with pytest.raises(InputError, match="view"):
        bdgp.parse_images(no_view, keys, "images.csv.gz")


def test_bdgp_groups_drop_terms_and_filter_views():
    annot = bdgp.parse_annotations(annot_bytes(","))
    images = bdgp.parse_images(images_bytes(), bdgp._gene_keys(annot))
    groups = bdgp.build_groups(annot, images, bdgp.BdgpOptions())
    assert groups["group"].tolist() == ["CG1378_s2", "CG1378_s2", "CG1378_s4", "CG9786_s5"]
    assert groups["labels"].iloc[0] == "anterior endoderm anlage;posterior endoderm anlage"
    assert groups["labels"].iloc[2] == "brain primordium"  # list_1 dropped
    assert "insitu11002" not in "".join(groups["path"])  # anterior view dropped
    keep = bdgp.build_groups(annot, images, bdgp.BdgpOptions(keep_unlabelled=True, stages=(1, 2, 5)))
    assert keep["group"].tolist() == ["CG1378_s2", "CG1378_s2", "CG9786_s1", "CG9786_s2", "CG9786_s5"]
    assert keep.set_index("group").loc["CG9786_s2", "labels"] == ""
    dorsal = bdgp.build_groups(annot, images, bdgp.BdgpOptions(views=("dorsal",)))
    assert dorsal["path"].tolist() == ["img_dir_10/insitu10384.jpe"]


def bdgp_site(site: Site, bad: bool = True) -> None:
    site.routes["/insitu-mysql-dump/insitu_annot.csv.gz"] = (200, annot_bytes("\t"))
    site.routes["/insitu-mysql-dump/insitu_images.csv.gz"] = (200, images_bytes())
    for k, row in enumerate(IMAGE_ROWS):
        site.routes[f"/insitu_image_storage/{row[2]}"] = (200, jpeg(10 * k))
    if bad:
        site.routes["/insitu_image_storage/img_dir_12/insitu12001.jpe"] = (200, HTML)


def test_bdgp_acquire_end_to_end_rejects_html(site, tmp_path):
    url, s = site
    bdgp_site(s)
    opts = bdgp.BdgpOptions(base_url=url + "/", min_interval=0.0, max_bad_fraction=0.3)
    out = tmp_path / "bdgp"
    table = bdgp.acquire(out, opts, downloader(tmp_path))
    assert table.columns.tolist() == list(bdgp.IMAGES_TSV_COLUMNS)
    assert table["image_id"].tolist() == ["insitu10383", "insitu10384", "insitu11001"]
    assert table["stage"].tolist() == ["4-6", "4-6", "9-10"]
    written = pd.read_csv(out / "images.tsv", sep="\t", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(written, table.astype(str))
    for p in table["path"]:
        assert Image.open(out / p).format == "JPEG"
    assert not (out / "images/img_dir_12/insitu12001.jpe").exists()
    rejected = pd.read_csv(out / "rejected.tsv", sep="\t", dtype=str)
    assert rejected["image_id"].tolist() == ["insitu12001"]
    assert "expected jpeg, got html" in rejected["reason"].iloc[0]


def test_bdgp_acquire_fails_above_max_bad_fraction_and_limit(site, tmp_path):
    url, s = site
    bdgp_site(s)
    opts = bdgp.BdgpOptions(base_url=url, min_interval=0.0)
    with pytest.raises(DownloadError, match="1 of 4 images failed"):
        bdgp.acquire(tmp_path / "a", opts, downloader(tmp_path))
    assert not (tmp_path / "a" / "images.tsv").exists()
    table = bdgp.acquire(tmp_path / "b", opts, downloader(tmp_path), limit=1)
    assert set(table["group"]) == {"CG1378_s2"} and len(table) == 2


def test_bdgp_default_downloader_is_polite(site, tmp_path, monkeypatch):
    url, s = site
    bdgp_site(s, bad=False)
    made: list[DownloadPolicy] = []
    real_init = Downloader.__init__

    def spy(self, policy=DownloadPolicy(), *args, **kwargs):  # noqa: B008
        made.append(policy)
        real_init(self, policy, *args, **{**kwargs, "progress": False})

    monkeypatch.setattr(Downloader, "__init__", spy)
    bdgp.acquire(tmp_path, bdgp.BdgpOptions(base_url=url, min_interval=0.01), limit=1)
    assert made[0].concurrency == 1 and made[0].min_interval == 0.01
    assert (tmp_path / "manifest.tsv").is_file()

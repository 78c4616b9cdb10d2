"""Issue 13, the authors' patches (``hpa_paper``) on the real samples in ``tests/data/real/hpa_paper``.

The labels table and its index -> name mapping ship with the source (``preprocessing/sources/data``); the
mapping is re-derived here from the authors' group's named copy of the same table. The end-to-end tests
run ``hamil download hpa_paper`` with no labels option against a local server that answers like Azure
(listing in the recorded shape, recorded error documents when the listing is refused).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from localhttp import Handler, Script, jpeg, send_ranged, zipped
from PIL import Image

from hamil.cli import main
from preprocessing.errors import InputError
from preprocessing.sources import hpa_paper

REAL = Path(__file__).parent / "data" / "real" / "hpa_paper"
SHIPPED = Path(hpa_paper.__file__).parent / "data"
AUTHORS_SHA256 = "380df377ac33d7e0d1b1c03d6879e141521409f6f3a399d80630767305a212b6"  # Outliers1106/AVA_hpa


def read_csv(path: Path) -> list[tuple[str, str]]:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert table.columns.tolist() == ["Gene", "label"]
    return list(zip(table["Gene"], table["label"], strict=True))


# ---------------------------------------------------------------------------------------- the labels


def test_shipped_table_is_the_authors_enhanced_csv_byte_for_byte():
    data = (SHIPPED / hpa_paper.AUTHORS_LABELS_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == AUTHORS_SHA256 and len(data) == 30005
    rows = hpa_paper.authors_labels()
    assert len(rows) == 1600 and len({g for g, _ in rows}) == 1600
    assert all(re.fullmatch(r"ENSG\d{11}", g) for g, _ in rows)
    indices = {int(t) for _, c in rows for t in c.split(";")}
    assert indices == set(range(27))
    readme = (SHIPPED / "README.md").read_text()
    assert AUTHORS_SHA256 in readme and hpa_paper.AUTHORS_LABEL_NAMES_FILE in readme


def test_mapping_rederived_from_the_named_copy_1598_of_1600_rows_align():
    """Align enhanced.csv (indices) with ImPloc's enhanced.txt (names), row by row, token by token."""
    indexed, named = hpa_paper.authors_labels(), read_csv(REAL / "ImPloc_label_enhanced.txt")
    assert [g for g, _ in indexed] == [g for g, _ in named]  # same 1,600 genes, same order
    votes: dict[int, Counter] = {}
    aligned, other = 0, []
    for (gene, cell), (_, names) in zip(indexed, named, strict=True):
        idx, nm = cell.split(";"), names.split(";")
        if len(idx) != len(nm):
            other.append((gene, cell, names))
            continue
        aligned += 1
        for i, n in zip(idx, nm, strict=True):
            votes.setdefault(int(i), Counter())[n] += 1
    assert aligned == 1598
    assert all(len(v) == 1 for v in votes.values())  # no index ever meets two names
    derived = tuple(votes[i].most_common(1)[0][0] for i in range(len(votes)))
    assert derived == hpa_paper.authors_label_names() and len(derived) == 27
    # the two others hold one location more, outside the 27 classes (dropped by the authors)
    assert other == [
        ("ENSG00000178035", "7", "Cytosol;Rods & Rings"),
        ("ENSG00000178999", "6", "Midbody;Nucleoplasm"),
    ]
    assert {"Rods & Rings", "Midbody"}.isdisjoint(derived)


def test_default_labels_are_named_and_agree_with_the_named_copy():
    labels = hpa_paper.read_labels_table(None, hpa_paper.HpaPaperOptions())
    named = dict(read_csv(REAL / "ImPloc_label_enhanced.txt"))
    assert len(labels) == 1600
    classes = {c for cell in labels.values() for c in cell.split(";")}
    assert len(classes) == 27 and not any(c.isdigit() for c in classes)
    agree = [g for g, cell in labels.items() if set(cell.split(";")) == set(named[g].split(";"))]
    assert len(agree) == 1598
    assert labels["ENSG00000004478"] == "Cytosol;Nucleoplasm"  # "7;6"
    assert labels["ENSG00000178035"] == "Cytosol"  # named copy: Cytosol;Rods & Rings
    # Independent check of the mapping: the ten most frequent classes are the ones the authors name
    # (DATA_SOURCES.md), in the same order, Nuclear bodies 11th.
    counts = Counter(c for cell in labels.values() for c in cell.split(";"))
    assert [c for c, _ in counts.most_common(11)] == [
        "Nucleoplasm",
        "Cytosol",
        "Nucleus",
        "Mitochondria",
        "Plasma membrane",
        "Nucleoli",
        "Vesicles",
        "Golgi apparatus",
        "Endoplasmic reticulum",
        "Nuclear speckles",
        "Nuclear bodies",
    ]


def test_numeric_labels_refused_without_a_mapping(tmp_path):
    own = tmp_path / "own.csv"
    own.write_text("Gene,label\nENSG00000001167,3\nENSG00000001630,1;2\n")  # not the authors' rows
    with pytest.raises(InputError) as err:
        hpa_paper.read_labels_table(own, hpa_paper.HpaPaperOptions())
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{own}: labels are class indices")
    assert "label_names" in message
    named = hpa_paper.HpaPaperOptions(label_names=("a", "b", "c", "d"))
    assert hpa_paper.read_labels_table(own, named) == {"ENSG00000001167": "d", "ENSG00000001630": "b;c"}
    # the authors' own rows (a user's copy of enhanced.csv, or part of it) take the shipped names
    copy = tmp_path / "enhanced.csv"
    copy.write_text("Gene,label\r\nENSG00000001167,6\r\nENSG00000004478,7;6\r\n")
    assert hpa_paper.read_labels_table(copy, hpa_paper.HpaPaperOptions()) == {
        "ENSG00000001167": "Nucleoplasm",
        "ENSG00000004478": "Cytosol;Nucleoplasm",
    }


# ------------------------------------------------------------------------------------------ patch names


def test_both_published_patch_spellings_read_others_reported(tmp_path, caplog):
    readme = (REAL / "AVA_hpa_README_dataset_section.txt").read_text()
    docstring = (REAL / "AVA_hpa_datasets_py_excerpt.txt").read_text()
    assert "686_A3_2_blue_red_green.jpg_1.jpg" in readme and "686_A3_2_blue_red_green_1.jpg" in docstring
    files = {
        "hpa/ENSG00000001167/686_A3_2_blue_red_green.jpg_1.jpg",  # README
        "hpa/ENSG00000001167/686_A3_2_blue_red_green_2.jpg",  # docstring
        "hpa/ENSG00000001167/686_A3_2_blue_red_green_1.jpg",  # the README's _1 under the other spelling
        "__MACOSX/hpa/ENSG00000001167/._686_A3_2_blue_red_green.jpg_1.jpg",
        "hpa/ENSG00000001167/._686_A3_2_blue_red_green_2.jpg",
        "hpa/.DS_Store",
        "hpa/ENSG00000001167/686_A3_2_blue_red_green.jpg",  # a whole field, not a patch
        "hpa/NFYA/686_A3_2_blue_red_green.jpg_3.jpg",  # not an ENSG folder
    }
    with caplog.at_level(logging.WARNING):
        table = hpa_paper.scan_patches(tmp_path, files)
    assert table["path"].tolist() == [
        "hpa/ENSG00000001167/686_A3_2_blue_red_green.jpg_1.jpg",
        "hpa/ENSG00000001167/686_A3_2_blue_red_green_1.jpg",
        "hpa/ENSG00000001167/686_A3_2_blue_red_green_2.jpg",
    ]
    assert set(table["source_field"]) == {"686_A3_2_blue_red_green.jpg"}
    assert table["image_id"].is_unique and table["image_id"].iloc[2] == "686_A3_2_2"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "2 file(s) that are not patches" in warnings[0]
    assert "hpa/ENSG00000001167/686_A3_2_blue_red_green.jpg" in warnings[0]
    assert "MACOSX" not in warnings[0] and "._" not in warnings[0] and "DS_Store" not in warnings[0]


# ------------------------------------------------------------------------------------ Azure, end to end


def listing(blobs: dict[str, bytes]) -> bytes:
    """A List Blobs page: the recorded response (list_blobs_recorded_md5.xml) with its one ``<Blob>``
    repeated for our blobs (name, Content-Length, Content-MD5 substituted)."""
    recorded = (REAL / "list_blobs_recorded_md5.xml").read_text()
    blob = re.search(r"<Blob>.*</Blob>", recorded).group(0)
    items = ""
    for name, data in blobs.items():
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        one = re.sub(r"<Name>[^<]*</Name>", f"<Name>{name}</Name>", blob)
        one = re.sub(
            r"<Content-Length>\d+</Content-Length>", f"<Content-Length>{len(data)}</Content-Length>", one
        )
        items += re.sub(r"<Content-MD5>[^<]*</Content-MD5>", f"<Content-MD5>{md5}</Content-MD5>", one)
    page = recorded.replace(blob, items).replace("fakestorageaccount", "bioimagestore")
    return ("\ufeff" + re.sub(r'ContainerName="[^"]*"', 'ContainerName="dataset"', page)).encode()


def azure_error(fixture: str, status: int, reason: str):
    """Answer like Azure refusing a request: its status line, a BOM and the recorded error document."""
    body = "\ufeff".encode() + (REAL / fixture).read_bytes()

    def route(h: Handler, n: int) -> None:
        h.send_response(status, reason)
        h.send_header("Content-Type", "application/xml")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("x-ms-error-code", re.search(rb"<Code>(\w+)</Code>", body).group(1).decode())
        h.end_headers()
        h.wfile.write(body)

    return route


# The archives: genes and labels of the authors' table, both patch spellings, macOS debris, one odd file,
# and a gene the table does not label (ATP2C1: "Enhanced" in v18 but with no Enhanced location).
ARCHIVES = {
    "hpa dataSet_part1.zip": {
        "hpa/ENSG00000001167/686_A3_2_blue_red_green.jpg_1.jpg": jpeg(10),
        "hpa/ENSG00000001167/686_A3_2_blue_red_green.jpg_2.jpg": jpeg(20),
        "__MACOSX/hpa/ENSG00000001167/._686_A3_2_blue_red_green.jpg_1.jpg": b"\x00\x05\x16\x07",
        "hpa/ENSG00000001167/._686_A3_2_blue_red_green.jpg_2.jpg": b"\x00\x05\x16\x07",
        "hpa/ENSG00000001167/686_A3_2_blue_red_green.jpg": jpeg(30),  # odd: a whole field
    },
    "hpa_dataSet_part2.zip": {
        "hpa/ENSG00000004478/1104_E2_1_blue_red_green_1.jpg": jpeg(40),  # the docstring's spelling
        "hpa/ENSG00000004478/1104_E2_1_blue_red_green_2.jpg": jpeg(50),
        "hpa/ENSG00000017260/1023_F1_3_blue_red_green.jpg_1.jpg": jpeg(60),  # no label
    },
    "hpa_dataSet_part3.zip": {"hpa/ENSG00000001630/1208_C4_1_blue_red_green.jpg_1.jpg": jpeg(70)},
    "hpa_dataSet_part4.zip": {"hpa/ENSG00000002330/39_G11_2_blue_red_green.jpg_1.jpg": jpeg(80)},
}
EXPECTED = {  # gene -> labels, named through the shipped mapping
    "ENSG00000001167": "Nucleoplasm",
    "ENSG00000001630": "Endoplasmic reticulum",
    "ENSG00000002330": "Mitochondria",
    "ENSG00000004478": "Cytosol;Nucleoplasm",
}
LIST = "/dataset?restype=container&comp=list"


def serve_archives(s: Script, archives: dict[str, bytes], listed: bool = True) -> None:
    if listed:
        s.routes[LIST] = (200, listing(archives))
    for name, data in archives.items():
        s.routes["/dataset/" + name.replace(" ", "%20")] = lambda h, n, data=data: send_ranged(h, data)


def download(out: Path, options: dict, *extra: str) -> int:
    args = ["download", "hpa_paper", "--out", str(out), "--options", json.dumps(options), "--retries", "0"]
    return main([*args, *extra])


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def check_result(out: Path) -> pd.DataFrame:
    table = read_tsv(out / "images.tsv")
    assert dict(zip(table["group"], table["labels"], strict=True)) == EXPECTED
    assert len(table) == 6 and table["image_id"].is_unique
    assert set(table["source_field"]) == {
        "686_A3_2_blue_red_green.jpg",
        "1104_E2_1_blue_red_green.jpg",
        "1208_C4_1_blue_red_green.jpg",
        "39_G11_2_blue_red_green.jpg",
    }
    for path in table["path"]:
        assert Image.open(out / path).format == "JPEG"
    skipped = read_tsv(out / "skipped.tsv")
    assert skipped.values.tolist() == [
        [
            "data/hpa/ENSG00000001167/686_A3_2_blue_red_green.jpg",
            f"not a patch: expected {hpa_paper.PATCH_FORM}",
        ],
        ["ENSG00000017260", "gene without a label in preprocessing/sources/data/hpa_paper_enhanced.csv"],
    ]
    return table


def test_download_with_zero_configuration(site, tmp_path, caplog):
    url, s = site
    archives = {name: zipped(entries) for name, entries in ARCHIVES.items()}
    serve_archives(s, archives)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert download(out, {"container_url": f"{url}/dataset"}) == 0
    check_result(out)
    assert read_tsv(out / "rejected.tsv").empty
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    assert "1 file(s) that are not patches" in warnings[0] and "686_A3_2_blue_red_green.jpg" in warnings[0]
    assert "1 gene(s) without a label" in warnings[1] and "ENSG00000017260" in warnings[1]
    assert all(str(out / "skipped.tsv") in w for w in warnings)
    assert not any("MACOSX" in w or "._" in w for w in warnings)
    assert any(
        "labels of 1600 genes from preprocessing/sources/data" in r.getMessage() for r in caplog.records
    )
    assert [h["x-ms-version"] for h in s.headers[LIST]] == ["2020-10-02"]


@pytest.mark.parametrize(
    ("fixture", "status", "reason"),
    [
        ("azure_error_ResourceNotFound_404.xml", 404, "The specified resource does not exist."),
        (
            "azure_error_AuthorizationFailure_403.xml",
            403,
            "This request is not authorized to perform this operation.",
        ),
    ],
)
def test_refused_listing_falls_back_to_the_known_blobs(site, tmp_path, caplog, fixture, status, reason):
    url, s = site
    archives = {name: zipped(entries) for name, entries in ARCHIVES.items()}
    readme = (REAL / "AVA_hpa_README_dataset_section.txt").read_text()
    links = re.findall(r"https://bioimagestore\.blob\.core\.windows\.net/dataset/([^)\s]+)", readme)
    assert [name.replace("%20", " ") for name in links] == list(hpa_paper.KNOWN_BLOBS) == list(archives)
    serve_archives(s, archives, listed=False)
    s.routes[LIST] = azure_error(fixture, status, reason)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert download(out, {"container_url": f"{url}/dataset", "blobs": []}) == 0
    check_result(out)
    messages = [r.getMessage() for r in caplog.records]
    refused = [m for m in messages if "listing the container was refused" in m]
    assert len(refused) == 1 and f"HTTP {status}" in refused[0] and "4 known blob(s)" in refused[0]
    for name, data in archives.items():
        assert any(m.startswith(f"hpa_paper: {name}: {len(data)} bytes") for m in messages), name
    assert len(s.headers[LIST]) == 1  # a refusal is not retried
    assert download(out, {"container_url": f"{url}/dataset", "blobs": []}) == 0  # again: kept, not fetched
    assert all(s.count("/dataset/" + name.replace(" ", "%20")) == 1 for name in archives)
    check_result(out)


def test_refused_listing_and_a_missing_blob_is_listed_in_rejected(site, tmp_path):
    url, s = site
    archives = {name: zipped(entries) for name, entries in ARCHIVES.items()}
    serve_archives(s, {k: v for k, v in archives.items() if k != "hpa_dataSet_part4.zip"}, listed=False)
    s.routes[LIST] = azure_error(
        "azure_error_ResourceNotFound_404.xml", 404, "The specified resource does not exist."
    )
    s.routes["/dataset/hpa_dataSet_part4.zip"] = azure_error(
        "azure_error_ResourceNotFound_404.xml", 404, "The specified blob does not exist."
    )
    out = tmp_path / "out"
    assert download(out, {"container_url": f"{url}/dataset"}, "--max-bad-fraction", "0.5") == 0
    rejected = read_tsv(out / "rejected.tsv")
    assert rejected["blob"].tolist() == ["hpa_dataSet_part4.zip"] and "HTTP 404" in rejected["reason"][0]
    assert "ENSG00000002330" not in set(read_tsv(out / "images.tsv")["group"])


def test_error_document_in_a_200_is_a_refusal_and_later_pages_do_not_fall_back():
    body = "\ufeff".encode() + (REAL / "azure_error_AuthorizationFailure_403.xml").read_bytes()
    with pytest.raises(
        hpa_paper.ListingRefused, match=r"u: listing refused \(AuthorizationFailure: This request"
    ):
        hpa_paper.parse_listing(body, "u")


def test_later_page_refused_is_an_error_not_a_fallback(site, tmp_path):
    url, s = site
    first = listing({"hpa dataSet_part1.zip": b"x"}).replace(
        b"<NextMarker />", b"<NextMarker>2!72!MDAw</NextMarker>"
    )
    s.routes[LIST] = (200, first)
    s.routes[LIST + "&marker=2%2172%21MDAw"] = azure_error(
        "azure_error_AuthorizationFailure_403.xml",
        403,
        "This request is not authorized to perform this operation.",
    )
    assert download(tmp_path / "out", {"container_url": f"{url}/dataset"}) == 2
    assert not (tmp_path / "out" / "raw").exists()


def test_own_numeric_table_refused_in_one_line(site, tmp_path, capsys):
    url, s = site
    own = tmp_path / "own.csv"
    own.write_text("Gene,label\nENSG00000001167,3\n")
    assert download(tmp_path / "out", {"container_url": f"{url}/dataset", "labels_table": str(own)}) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "hamil download: error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err and f"{own}: labels are class indices" in lines[0]
    assert not s.headers  # refused before anything was fetched


def test_a_file_named_as_a_patch_that_is_not_an_image_is_left_out(tmp_path):
    """Extracted files are sniffed as downloads are: an HTML page named as a patch is skipped, with why."""
    good = "hpa/ENSG00000001167/686_A3_2_blue_red_green_1.jpg"
    bad = "hpa/ENSG00000001167/686_A3_2_blue_red_green_2.jpg"
    for rel, data in ((good, b"\xff\xd8\xff\xe0" + b"\0" * 20), (bad, b"<!DOCTYPE html><html></html>")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    table = hpa_paper.scan_patches(tmp_path, [good, bad])
    kept, others = hpa_paper._drop_non_images(table, tmp_path)
    assert kept["path"].tolist() == [good] and others == [(bad, "html")]

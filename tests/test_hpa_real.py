"""The ``hpa`` source on the real HPA samples (tests/data/real/hpa/, origins in its README.md).

The complete v18 location table gives the paper's gene set with the default reliability (the authors'
1,600 genes and their labels), v19+ labels honour the reliability filter, the real v18 gene XML gives its
18 IF fields (a ciliated-cell-line ``subtype`` is not a field, an odd ``imageUrl`` is rejected, not fatal),
the location table falls back on an HTML answer, and ``hamil download hpa`` runs end to end against a
local server built from these files.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from localhttp import jpeg, send
from PIL import Image

from hamil.cli import main
from preprocessing.download import Downloader, DownloadError, DownloadPolicy
from preprocessing.errors import InputError
from preprocessing.options import options_of
from preprocessing.sources import hpa

REAL = Path(__file__).parent / "data" / "real" / "hpa"
ROOT = Path(__file__).resolve().parents[1]
V18_TABLE = REAL / "subcellular_location_v18_full_ImPloc.tsv.gz"
CCNB1 = "ENSG00000134057"
NFYA = "ENSG00000001167"
ATP2C1 = "ENSG00000017260"
TSPAN6 = "ENSG00000000003"
HTML = b"<!DOCTYPE html><html><head><title>Downloads</title></head><body>Moved</body></html>"
FAST = DownloadPolicy(retries=0, backoff=0.001, max_backoff=0.01, timeout=5.0)

# The 12 genes of reliability "Enhanced" in the v18 table that are not among the authors' 1,600: none has
# a location in the Enhanced column; their locations are listed at lower levels only (as here).
NOT_IN_THE_PAPER = {
    "ENSG00000017260": "Supported: Golgi apparatus",  # ATP2C1
    "ENSG00000041357": "Supported: Cytosol;Nucleus, Approved: Vesicles",  # PSMA4
    "ENSG00000083520": "Supported: Cytosol;Nucleus",  # DIS3
    "ENSG00000085721": "Supported: Nucleoli",  # RRN3
    "ENSG00000090863": "Supported: Golgi apparatus",  # GLG1
    "ENSG00000102317": "Supported: Nucleoplasm",  # RBM3
    "ENSG00000104824": "Supported: Nucleoplasm",  # HNRNPL
    "ENSG00000131013": "Supported: Nucleoplasm",  # PPIL4
    "ENSG00000136451": "Supported: Nucleoplasm",  # VEZF1
    "ENSG00000143033": "Supported: Nucleoplasm",  # MTF2
    "ENSG00000149269": "Supported: Cytosol;Plasma membrane",  # PAK1
    "ENSG00000176788": "Supported: Plasma membrane",  # BASP1
}


def read_tsv(path: Path, sep: str = "\t") -> pd.DataFrame:
    return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)


def sorted_labels(cell: str) -> str:
    return ";".join(sorted(x for x in cell.split(";") if x))


@pytest.fixture(scope="module")
def v18() -> tuple[pd.DataFrame, pd.DataFrame, list[tuple[str, str]]]:
    """The complete v18 table, parsed once: (raw table, genes with the default reliability, skipped)."""
    table = read_tsv(V18_TABLE)
    skipped: list[tuple[str, str]] = []
    genes = hpa.parse_location_table(table, hpa.HpaOptions().reliability, V18_TABLE.name, skipped)
    return table, genes, skipped


def location_zip(text: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("subcellular_location.tsv", text)
    return buf.getvalue()


def real_rows(*genes: str) -> str:
    """The header and the rows of ``genes`` of the real v18 table, verbatim."""
    lines = gzip.decompress(V18_TABLE.read_bytes()).decode().splitlines()
    return "\n".join([lines[0], *(ln for ln in lines[1:] if ln.split("\t", 1)[0] in genes)]) + "\n"


def real_xml() -> str:
    return gzip.decompress((REAL / "ENSG00000134057_v18_gene.xml.gz").read_bytes()).decode()


def replace_nth(text: str, old: str, new: str, n: int) -> str:
    """``text`` with the ``n``-th (0-based) occurrence of ``old`` replaced."""
    at = -1
    for _ in range(n + 1):
        at = text.index(old, at + 1)
    return text[:at] + new + text[at + len(old) :]


# The third human IF sub-assay of the real XML is antibody HPA061448's (A549, MCF7, U-2 OS: 6 fields). The
# edit gives it the attribute that ciliated-cell-line sub-assays carry in newer releases (real_samples/hpa/
# image_url_patterns.txt: <subAssay type="human" subtype="ciliated cell lines">, 21 z planes per field).
HUMAN = '<subAssay type="human">'
CILIATED = '<subAssay type="human" subtype="ciliated cell lines">'


# ----------------------------------------------------------------------------------- v18: the paper's set


def test_v18_default_reliability_gives_the_authors_1600_genes(v18):
    table, genes, skipped = v18
    assert len(table) == 12073 and table["Gene"].is_unique
    enhanced = table[table["Reliability"] == "Enhanced"]
    assert len(enhanced) == 1612  # pass the reliability filter
    authors = read_tsv(REAL / "ImPloc_label_enhanced_full.txt", sep=",")
    assert len(authors) == 1600
    # 1,600 keep a label: exactly the authors' genes, in the table's order, with the same labels
    assert genes["gene"].tolist() == authors["Gene"].tolist()
    assert set(genes["reliability"]) == {"Enhanced"}
    assert genes["labels"].tolist() == [sorted_labels(x) for x in authors["label"]]
    # the other 12: Enhanced genes with no Enhanced-level location, reported with where they are listed
    assert set(enhanced["Gene"]) - set(authors["Gene"]) == set(NOT_IN_THE_PAPER)
    assert dict(skipped) == {
        g: f"reliability Enhanced but no location at the kept levels (Enhanced); listed at {where}"
        for g, where in NOT_IN_THE_PAPER.items()
    }
    assert (enhanced.set_index("Gene").loc[list(NOT_IN_THE_PAPER), "Enhanced"] == "").all()
    # the shipped config selects the same set; the old default (Enhanced..Approved) gave 7 times as many
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["datasets"]["hpa"]["download"]
    options = options_of(hpa.HpaOptions, config)
    assert options.reliability == hpa.HpaOptions().reliability == ("Enhanced",)
    assert options.base_url == "https://v18.proteinatlas.org"
    old_default = ("Enhanced", "Validated", "Supported", "Approved")
    assert len(hpa.parse_location_table(table, old_default, "v18")) == 11377


def test_v18_labels_match_the_authors_class_indices_but_two(v18):
    """The published table (class indices, AVA_hpa enhanced.csv) through the derived index->name map: equal
    for 1,598 genes; the other 2 lack one name that is not among the 27 classes."""
    _, genes, _ = v18
    names = dict(read_tsv(REAL / "label_index_to_name_DERIVED.tsv").itertuples(index=False))
    assert len(names) == 27
    published = read_tsv(REAL / "AVA_hpa_enhanced_full.csv", sep=",")
    theirs = {
        g: {names[i] for i in cell.split(";")}
        for g, cell in zip(published["Gene"], published["label"], strict=True)
    }
    ours = {g: set(cell.split(";")) for g, cell in zip(genes["gene"], genes["labels"], strict=True)}
    assert set(theirs) == set(ours)
    differ = {g: ours[g] - theirs[g] for g in ours if ours[g] != theirs[g]}
    assert differ == {"ENSG00000178035": {"Rods & Rings"}, "ENSG00000178999": {"Midbody"}}
    assert all(theirs[g] < ours[g] for g in differ)  # only the extra name differs
    assert not {"Rods & Rings", "Midbody"} & set(names.values())


# ------------------------------------------------------------------------------------- v19+: level columns


def v19_rows() -> pd.DataFrame:
    """Real v19 rows (HPAanalyze; the v22.0 sample is byte-identical): the head and the two rows where
    Main/Additional location hold a location of a lower level than the gene's (MTMR7, ANLN)."""
    head = read_tsv(REAL / "subcellular_location_v19_values_header_rebuilt_head.tsv")
    examples = read_tsv(REAL / "subcellular_location_v19_level_vs_main_examples.tsv")
    assert head.columns.tolist() == examples.columns.tolist()
    return pd.concat([head, examples], ignore_index=True)


def labels_of(table: pd.DataFrame, reliability: tuple[str, ...]) -> dict[str, str]:
    out = hpa.parse_location_table(table, reliability, "v19")
    return dict(zip(out["gene_name"], out["labels"], strict=True))


def test_v19_labels_come_from_the_kept_reliability_columns():
    table = v19_rows()
    # ANLN (Enhanced): Main "Nucleoplasm", Additional "Midbody", but Midbody is only Supported
    assert labels_of(table, ("Enhanced",)) == {"ANLN": "Nucleoplasm"}
    assert labels_of(table, ("Enhanced", "Supported", "Approved")) == {
        "TSPAN6": "Cell Junctions;Cytosol;Nucleoli fibrillar center",
        "C1orf112": "Mitochondria",
        "FGR": "Aggresome;Plasma membrane",
        "CFH": "Vesicles",  # not its Extracellular location "Predicted to be secreted"
        "MTMR7": "Cytosol",  # Main location lists Nucleoplasm too, at level Uncertain
        "ANLN": "Midbody;Nucleoplasm",
    }
    assert labels_of(table, ("Uncertain",)) == {"SCYL3": "Microtubules;Nuclear bodies"}
    # a table without level columns: Main/Additional location, the gene's Reliability the only filter
    bare = table.drop(columns=["Enhanced", "Supported", "Approved", "Uncertain"])
    assert labels_of(bare, ("Enhanced",)) == {"ANLN": "Midbody;Nucleoplasm"}
    assert labels_of(bare, ("Approved",)) == {
        "TSPAN6": "Cell Junctions;Cytosol;Nucleoli fibrillar center",
        "C1orf112": "Mitochondria",
        "FGR": "Aggresome;Plasma membrane",
        "CFH": "Vesicles",
        "MTMR7": "Cytosol;Nucleoplasm",
    }
    with pytest.raises(InputError, match="v19: no location columns"):
        labels_of(bare.drop(columns=["Main location"]), ("Approved",))


# ------------------------------------------------------------------------------------------ the gene XML


def test_real_gene_xml_gives_its_18_human_if_fields():
    images = list(hpa.parse_gene_xml(io.BytesIO(real_xml().encode()), CCNB1))
    assert len(images) == 18 and {im.gene for im in images} == {CCNB1}
    per_antibody = pd.Series([im.antibody for im in images]).value_counts().to_dict()
    assert per_antibody == {"CAB000115": 6, "HPA030741": 6, "HPA061448": 6}  # CAB003804: no IF
    assert sorted({im.cell_line for im in images}) == ["A-431", "A549", "MCF7", "U-2 OS", "U-251 MG"]
    assert {im.locations for im in images} == {("cytosol",)} and not any(im.subtype for im in images)
    assert images[0].image_url == "http://v18.proteinatlas.org/images/115/672_E2_1_blue_red_green.jpg"
    assert all(re.search(r"/\d+/\d+_[A-H]\d+_\d+_blue_red_green\.jpg$", im.image_url) for im in images)
    # mouse, siRNA and GFP sub-assays, the FUCCI custom assay and the "selected" images are not fields
    urls = " ".join(im.image_url for im in images)
    for other in ("686_F11_1", "si28_", "fp7_", "200_382_1", "selected"):
        assert other not in urls


def test_ciliated_cell_line_subassays_are_not_fields():
    xml = replace_nth(real_xml(), HUMAN, CILIATED, 2)
    fields = list(hpa.parse_gene_xml(io.BytesIO(xml.encode()), CCNB1))
    assert len(fields) == 12 and "HPA061448" not in {im.antibody for im in fields}
    every = list(hpa.parse_gene_xml(io.BytesIO(xml.encode()), CCNB1, subtypes=True))
    assert len(every) == 18
    assert [im.subtype for im in every if im.antibody == "HPA061448"] == ["ciliated cell lines"] * 6
    # the attribute on one data block (A-431 of CAB000115) leaves out that block only
    data = replace_nth(
        real_xml(),
        "<data>\n\t\t\t\t\t\t<cellLine>A-431",
        '<data subtype="x">\n\t\t\t\t\t\t<cellLine>A-431',
        0,
    )
    left = list(hpa.parse_gene_xml(io.BytesIO(data.encode()), CCNB1))
    assert len(left) == 16 and "672_E2_1_blue" not in " ".join(im.image_url for im in left)


# ---------------------------------------------------------------------------------------- location table


def test_location_paths_documented_path_of_the_release_first():
    current, archive = hpa.CURRENT_TABLE_PATH, hpa.ARCHIVE_TABLE_PATH
    assert current == "download/tsv/subcellular_location.tsv.zip"
    assert archive == "download/subcellular_location.tsv.zip"
    assert hpa.location_paths_for("https://v18.proteinatlas.org") == (archive, current)
    assert hpa.location_paths_for("https://V20.proteinatlas.org/") == (archive, current)
    assert hpa.location_paths_for("https://www.proteinatlas.org") == (current, archive)
    assert hpa.location_paths_for("http://127.0.0.1:8000/mirror") == (current, archive)
    assert hpa.location_paths_for("http://127.0.0.1:8000", "v18") == (archive, current)
    assert hpa.location_paths_for("https://v18.proteinatlas.org", "current") == (current, archive)
    with pytest.raises(InputError, match="release must be"):
        hpa.location_paths_for("https://www.proteinatlas.org", "18")


def html_page(ctype: str, body: bytes):
    return lambda h, n: send(h, body, ctype=ctype)


def test_location_table_falls_back_on_an_html_page(site, tmp_path):
    url, s = site
    table = location_zip(real_rows(CCNB1, NFYA))
    downloader = Downloader(FAST, progress=False, sleep=lambda t: None)
    current, archive = f"/{hpa.CURRENT_TABLE_PATH}", f"/{hpa.ARCHIVE_TABLE_PATH}"
    s.routes[archive] = (200, table)
    for k, answer in enumerate(
        [
            html_page("text/html; charset=utf-8", HTML),  # 200 with an HTML page
            html_page("text/html", b"The download page has moved."),  # 200 text/html, not HTML-looking
        ]
    ):
        s.routes[current] = answer
        paths = hpa.location_paths_for(url)
        data, got = hpa.fetch_location_table(downloader, url, paths, tmp_path / f"{k}.zip")
        assert (data, got) == (table, f"{url}{archive}")
    assert s.count(current) == 2 and s.count(archive) == 2
    # release v18: its documented path is asked first and answers, the other is never asked
    data, got = hpa.fetch_location_table(
        downloader, url, hpa.location_paths_for(url, "v18"), tmp_path / "v.zip"
    )
    assert got == f"{url}{archive}" and s.count(current) == 2
    # neither holds a zip: one error naming both; a server error does not fall back
    s.routes[archive] = html_page("text/html", HTML)
    with pytest.raises(DownloadError, match="no location table found: .*zip, got unknown; .*zip, got html"):
        hpa.fetch_location_table(downloader, url, hpa.location_paths_for(url), tmp_path / "h.zip")
    s.routes[current] = (500, b"oops")
    asked = s.count(archive)
    with pytest.raises(DownloadError, match="HTTP 500"):
        hpa.fetch_location_table(downloader, url, hpa.location_paths_for(url), tmp_path / "e.zip")
    assert s.count(archive) == asked


# -------------------------------------------------------------------------------------- hamil download


def nfya_xml() -> str:
    """The real XML made NFYA's (real-shaped edits): other gene id and image folders but one field that
    CCNB1 lists too (an antibody may bind both), one ``imageUrl`` with no ``_blue`` part (the
    ``..._selected.jpg`` shape of the real XML), and HPA061448's human sub-assay a ciliated-cell-line one."""
    xml = real_xml().replace(CCNB1, NFYA).replace("<name>CCNB1</name>", "<name>NFYA</name>")
    for folder in ("115", "30741", "61448"):
        xml = xml.replace(f"/images/{folder}/", f"/images/9{folder}/")
    xml = xml.replace("/images/930741/800_A6_1_", "/images/30741/800_A6_1_")
    xml = xml.replace("/images/9115/672_E2_2_blue_red_green.jpg", "/images/9115/672_E2_2_selected.jpg")
    return replace_nth(xml, HUMAN, CILIATED, 2)


def hamil_download(out: Path, options: dict, *extra: str) -> int:
    args = ["download", "hpa", "--out", str(out), "--options", json.dumps(options), "--retries", "0"]
    return main([*args, *extra])


def test_hamil_download_hpa_real_samples_end_to_end(site, tmp_path, caplog):
    url, s = site
    # the real table's rows of CCNB1 and NFYA (Enhanced), ATP2C1 (Enhanced, locations Supported only) and
    # TSPAN6 (Approved); served at the v18 documented path, with an HTML page at the other one
    s.routes[f"/{hpa.ARCHIVE_TABLE_PATH}"] = (200, location_zip(real_rows(CCNB1, NFYA, ATP2C1, TSPAN6)))
    s.routes[f"/{hpa.CURRENT_TABLE_PATH}"] = html_page("text/html", HTML)
    xmls = {CCNB1: real_xml(), NFYA: nfya_xml()}
    for gene, xml in xmls.items():
        s.routes[f"/{gene}.xml"] = (200, xml.encode())
        for path in re.findall(r"<imageUrl>http://v18\.proteinatlas\.org(/images/[^<]+)</imageUrl>", xml):
            s.routes[path] = (200, jpeg())
    out = tmp_path / "hpa"
    options = {"base_url": url, "image_base_url": url, "release": "v18"}
    assert hamil_download(out, options) == 0  # default --max-bad-fraction: one bad image of 29 is fine

    table = read_tsv(out / "images.tsv")
    assert table.groupby("group").size().to_dict() == {CCNB1: 17, NFYA: 11}
    assert dict(zip(table["group"], table["labels"], strict=True)) == {CCNB1: "Cytosol", NFYA: "Nucleoplasm"}
    assert dict(zip(table["group"], table["gene_name"], strict=True)) == {CCNB1: "CCNB1", NFYA: "NFYA"}
    assert table["group"].tolist() == [NFYA] * 11 + [CCNB1] * 17  # the location table's order
    first = table.set_index("image_id").loc["115_672_E2_1"]
    assert first["url"] == f"{url}/images/115/672_E2_1_blue_red_green.jpg"
    assert (first["group"], first["antibody"], first["cell_line"]) == (CCNB1, "CAB000115", "A-431")
    assert "HPA061448" not in set(table.loc[table["group"] == NFYA, "antibody"])
    for path in table["path"]:
        assert Image.open(out / path).format == "JPEG"
    # listed with their reasons: the odd imageUrl (rejected), the 12 genes' kind and the z-stack fields
    rejected = read_tsv(out / "rejected.tsv")
    assert rejected["image_id"].tolist() == ["9115_672_E2_2_selected"]
    assert rejected["url"].iloc[0] == "http://v18.proteinatlas.org/images/9115/672_E2_2_selected.jpg"
    assert "no '_blue' channel part" in rejected["reason"].iloc[0]
    skipped = read_tsv(out / "skipped.tsv")
    assert skipped["item"].iloc[0] == ATP2C1
    assert skipped["reason"].iloc[0].endswith("listed at Supported: Golgi apparatus")
    ciliated = skipped.iloc[1:7]
    assert len(ciliated) == 6 and all("'ciliated cell lines'" in r for r in ciliated["reason"])
    assert all(i.startswith("961448_") for i in ciliated["item"])
    # the field of both genes is in the first gene's bag (NFYA comes first in the table), listed for CCNB1
    assert skipped.iloc[7:].values.tolist() == [
        [
            "30741_800_A6_1",
            "http://v18.proteinatlas.org/images/30741/800_A6_1_blue_red_green.jpg",
            f"same field already in the bag of {NFYA}",
        ]
    ]
    assert table.set_index("image_id").at["30741_800_A6_1", "group"] == NFYA
    assert read_tsv(out / "rejected_genes.tsv").empty
    assert any("skipped 1 of 29 images" in r.getMessage() for r in caplog.records)
    # what was asked: the v18 path only, no XML of TSPAN6 or ATP2C1, no image left out
    asked = set(s.headers)
    assert f"/{hpa.CURRENT_TABLE_PATH}" not in asked
    assert not {f"/{TSPAN6}.xml", f"/{ATP2C1}.xml"} & asked
    assert not [p for p in asked if "selected" in p or p.startswith("/images/961448/")]
    assert not [p for p in asked if re.search(r"/(686_F11|si28_|fp7_|200_382)", p)]
    assert json.loads((out / "source.json").read_text())["location_url"] == f"{url}/{hpa.ARCHIVE_TABLE_PATH}"


def test_hamil_download_hpa_too_many_bad_records_is_one_line(site, tmp_path, capsys):
    """Rejections still count against --max-bad-fraction: a gene whose every imageUrl is odd stops a
    strict run with one line naming the list, and a lenient run goes on."""
    url, s = site
    s.routes[f"/{hpa.CURRENT_TABLE_PATH}"] = (200, location_zip(real_rows(CCNB1)))
    xml = re.sub(r"_blue_red_green\.jpg</imageUrl>", "_selected.jpg</imageUrl>", real_xml())
    s.routes[f"/{CCNB1}.xml"] = (200, xml.encode())
    options = {"base_url": url, "image_base_url": url}
    assert hamil_download(tmp_path / "strict", options) == 2
    err = capsys.readouterr().err
    assert "18 of 18 images failed" in err and "no '_blue' channel part" in err and "Traceback" not in err
    assert not (tmp_path / "strict" / "images.tsv").exists()
    assert len(read_tsv(tmp_path / "strict" / "rejected.tsv")) == 18

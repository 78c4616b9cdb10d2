"""Real data sources (BDGP, HPA, the HPA paper's patches) against a scripted local HTTP server.

Fixtures are small byte strings shaped like the real files (see DATA_SOURCES.md); no internet is used.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
from pathlib import Path

import pandas as pd
import pytest
from localhttp import Script, jpeg, zipped  # noqa: E402
from PIL import Image

from preprocessing.download import Downloader, DownloadError, DownloadPolicy
from preprocessing.errors import InputError
from preprocessing.sources import bdgp, hpa, hpa_paper

FAST = DownloadPolicy(retries=1, backoff=0.001, max_backoff=0.01, timeout=5.0)
HTML = b"<!DOCTYPE html><html><head><title>Oops</title></head><body>Not found</body></html>"


# ------------------------------------------------------------------------------------------ local server


def downloader(tmp_path: Path) -> Downloader:
    return Downloader(FAST, manifest=tmp_path / "manifest.tsv", progress=False, sleep=lambda s: None)


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
# insitu_images.csv in the documented ten-column order (CG id, symbol, annotation symbol, FBgn, cDNA clone,
# path, stage, view, comment, resolution; tomsing1 notebook in shared/real_samples/bdgp); clone names and
# image numbers are placeholders.
IMAGE_ROWS = [
    (
        "CG1378",
        "tll",
        "tll",
        "FBgn0003720",
        "LD00001",
        "img_dir_10/insitu10383.jpe",
        "2",
        "lateral",
        "",
        "low",
    ),
    ("CG1378", "tll", "tll", "FBgn0003720", "LD00001", "img_dir_10/insitu10384.jpe", "2", "dorsal", "", ""),
    (
        "CG1378",
        "tll",
        "tll",
        "FBgn0003720",
        "LD00001",
        "img_dir_11/insitu11001.jpe",
        "4",
        "lateral",
        "AP_inverted",
        "",
    ),
    (
        "CG1378",
        "tll",
        "tll",
        "FBgn0003720",
        "LD00001",
        "img_dir_11/insitu11002.jpe",
        "4",
        "",
        "",
        "low",
    ),  # no view
    (
        "CG9786",
        "hb",
        "hb",
        "FBgn0001180",
        "LD00002",
        "img_dir_12/insitu12000.jpe",
        "2",
        "lateral",
        "",
        "",
    ),  # no label
    ("CG9786", "hb", "hb", "FBgn0001180", "LD00002", "img_dir_12/insitu12001.jpe", "5", "ventral", "", "low"),
    (
        "CG9786",
        "hb",
        "hb",
        "FBgn0001180",
        "LD00002",
        "img_dir_12/insitu12002.jpe",
        "1",
        "lateral",
        "",
        "",
    ),  # stage 1-3
]


def annot_bytes(delimiter: str) -> bytes:
    lines = []
    for row in ANNOT_ROWS:
        cells = [f'"{c}"' if delimiter in c else c for c in row]
        lines.append(delimiter.join(cells))
    return gzip.compress(("\n".join(lines) + "\n").encode())


def images_bytes() -> bytes:
    return gzip.compress(("\n".join(",".join(r) for r in IMAGE_ROWS) + "\n").encode("latin1"))


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


def test_bdgp_images_documented_layout_else_columns_found_by_content():
    annot = bdgp.parse_annotations(annot_bytes(","))
    keys = bdgp._gene_keys(annot)
    shuffled = [(r[7], r[5], r[4], r[6], r[0]) for r in IMAGE_ROWS]  # view, path, clone, stage, gene
    data = gzip.compress(("\n".join("\t".join(r) for r in shuffled) + "\n").encode())
    a = bdgp.parse_images(images_bytes(), keys)
    b = bdgp.parse_images(data, keys)
    cols = ["gene", "stage", "view", "path", "skip"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert a.columns.tolist() == ["gene", "stage", "view", "path", "resolution", "skip"]
    assert a["path"].iloc[0] == "img_dir_10/insitu10383.jpe" and a["resolution"].iloc[0] == "low"
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
    assert "insitu11002" not in "".join(groups["path"])  # no view: dropped
    keep = bdgp.build_groups(annot, images, bdgp.BdgpOptions(keep_unlabelled=True, stages=(1, 2, 5)))
    assert keep["group"].tolist() == ["CG1378_s2", "CG1378_s2", "CG9786_s1", "CG9786_s2", "CG9786_s5"]
    assert keep.set_index("group").loc["CG9786_s2", "labels"] == ""
    dorsal = bdgp.build_groups(annot, images, bdgp.BdgpOptions(views=("dorsal",)))
    assert dorsal["path"].tolist() == ["img_dir_10/insitu10384.jpe"]


def bdgp_site(site: Script, bad: bool = True) -> None:
    site.routes["/insitu-mysql-dump/insitu_annot.csv.gz"] = (200, annot_bytes("\t"))
    site.routes["/insitu-mysql-dump/insitu_images.csv.gz"] = (200, images_bytes())
    for k, row in enumerate(IMAGE_ROWS):
        site.routes[f"/insitu_image_storage/{row[5]}"] = (200, jpeg(10 * k))
    if bad:
        site.routes["/insitu_image_storage/img_dir_12/insitu12001.jpe"] = (200, HTML)


def test_bdgp_acquire_end_to_end_rejects_html(site, tmp_path):
    url, s = site
    bdgp_site(s)
    opts = bdgp.BdgpOptions(base_url=url + "/", min_interval=0.0)
    out = tmp_path / "bdgp"
    table = bdgp.acquire(out, opts, downloader(tmp_path), max_bad_fraction=0.3)
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
    s.routes["/insitu-mysql-dump/insitu_annot.csv.gz"] = (200, HTML)
    with pytest.raises(DownloadError, match="insitu_annot.csv.gz: got an HTML page"):
        bdgp.acquire(tmp_path / "c", opts, downloader(tmp_path))
    assert not (tmp_path / "c" / "raw" / "insitu_annot.csv.gz").exists()


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


# -------------------------------------------------------------------------------------------------- HPA

OLD_TSV = (
    "Gene\tGene name\tReliability\tEnhanced\tSupported\tApproved\tUncertain\tGO id\n"
    "ENSG00000000003\tTSPAN6\tApproved\t\t\tCell Junctions;Cytosol\t\tCell Junctions (GO:0030054)\n"
    "ENSG00000000457\tSCYL3\tUncertain\t\t\t\tGolgi apparatus\t\n"
    "ENSG00000001036\tFUCA2\tEnhanced\tNucleoplasm\t\tCytosol\tVesicles\t\n"
)
V17_TSV = OLD_TSV.replace("Enhanced", "Validated")
NEW_TSV = (
    "Gene\tGene name\tReliability\tMain location\tAdditional location\tExtracellular location\t"
    "Enhanced\tSupported\tApproved\tUncertain\n"
    "ENSG00000000003\tTSPAN6\tApproved\tCell Junctions\tCytosol\t\t\t\tCell Junctions;Cytosol\t\n"
    "ENSG00000000457\tSCYL3\tUncertain\tGolgi apparatus\t\t\t\t\t\tGolgi apparatus\n"
    "ENSG00000001036\tFUCA2\tEnhanced\tNucleoplasm\tCytosol;Vesicles\tPredicted to be secreted\t"
    "Nucleoplasm\t\tCytosol\tVesicles\n"
)


def gene_xml(gene: str, image_host: str = "https://images.proteinatlas.org") -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<proteinAtlas xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" schemaVersion="2.6">
<entry version="18" url="http://v18.proteinatlas.org/{gene}">
  <name>FUCA2</name>
  <identifier id="{gene}" db="Ensembl" version="88.38"><xref id="Q9BTY2" db="Uniprot/SWISSPROT"/></identifier>
  <tissueExpression source="HPA" technology="IHC"><data><tissue>liver</tissue>
    <location>should not be read</location></data></tissueExpression>
  <antibody id="HPA000001">
    <tissueExpression source="HPA" technology="IHC"><data><tissue>liver</tissue></data></tissueExpression>
    <cellExpression source="HPA" technology="ICC/IF">
      <summary>Localized to the nucleoplasm.</summary>
      <subAssay type="human">
        <data>
          <cellLine cellosaurusID="CVCL_0023" organ="Lung">A-549</cellLine>
          <location GOId="GO:0005654">Nucleoplasm</location>
          <assayImage>
            <image><channel>blue</channel><channel>red</channel><channel>green</channel>
              <imageUrl>{image_host}/4109/1832_C1_2_blue_red_green.jpg</imageUrl></image>
            <image><channel>blue</channel><channel>red</channel><channel>green</channel>
              <imageUrl>{image_host}/4109/1832_C1_3_blue_red_green.jpg</imageUrl></image>
          </assayImage>
        </data>
      </subAssay>
      <subAssay type="mouse"><data><cellLine>NIH-3T3</cellLine>
        <assayImage><image><imageUrl>{image_host}/4109/9_A1_1_blue_red_green.jpg</imageUrl></image>
        </assayImage></data></subAssay>
    </cellExpression>
  </antibody>
  <antibody id="CAB000002">
    <cellExpression source="HPA" technology="ICC/IF">
      <subAssay type="human">
        <data>
          <cellLine cellosaurusID="CVCL_0030" organ="Cervix">HeLa</cellLine>
          <location GOId="GO:0005654">Nucleoplasm</location>
          <location GOId="GO:0005829">Cytosol</location>
          <assayImage>
            <image><channel>blue</channel><channel>red</channel><channel>green</channel>
              <imageUrl>{image_host}/5120/1843_B2_17_cr5af971a263864_blue_red_green.jpg</imageUrl></image>
          </assayImage>
        </data>
      </subAssay>
    </cellExpression>
    <cellExpression source="other" technology="ICC/IF"><subAssay type="human"><data>
      <assayImage><image><imageUrl>{image_host}/1/7_A1_1_blue_red_green.jpg</imageUrl></image></assayImage>
    </data></subAssay></cellExpression>
  </antibody>
</entry>
</proteinAtlas>
""".encode()


# the pre-Enhanced-only default: these checks are about the filter, not the default (test_hpa_real.py)
ABOVE_UNCERTAIN = ("Enhanced", "Validated", "Supported", "Approved")


def test_hpa_location_table_both_layouts_and_reliability():
    assert hpa.HpaOptions().reliability == ("Enhanced",)  # the paper's gene set
    old = hpa.parse_location_table(
        pd.read_csv(io.StringIO(OLD_TSV), sep="\t", dtype=str, keep_default_na=False),
        ABOVE_UNCERTAIN,
        "old",
    )
    assert old["gene"].tolist() == ["ENSG00000000003", "ENSG00000001036"]  # Uncertain gene dropped
    assert old["labels"].tolist() == [
        "Cell Junctions;Cytosol",
        "Cytosol;Nucleoplasm",
    ]  # Uncertain locs dropped
    assert old["gene_name"].tolist() == ["TSPAN6", "FUCA2"]
    v17 = hpa.parse_location_table(
        hpa.read_location_zip(zipped({"x.tsv": V17_TSV.encode()}), "v17"), ("Enhanced",), "v17"
    )
    assert v17["gene"].tolist() == ["ENSG00000001036"] and v17["labels"].iloc[0] == "Nucleoplasm"
    new = hpa.parse_location_table(
        hpa.read_location_zip(zipped({"subcellular_location.tsv": NEW_TSV.encode()}), "new"),
        ABOVE_UNCERTAIN,
        "new",
    )
    # labels from the kept level columns: FUCA2's Uncertain "Vesicles" (in Additional location) is not one
    assert new["labels"].tolist() == ["Cell Junctions;Cytosol", "Cytosol;Nucleoplasm"]
    every = hpa.parse_location_table(
        pd.read_csv(io.StringIO(NEW_TSV), sep="\t", dtype=str, keep_default_na=False), hpa.LEVELS, "new"
    )
    assert every["gene"].tolist()[1] == "ENSG00000000457"
    with pytest.raises(InputError, match="bad: missing columns: Reliability"):
        hpa.parse_location_table(pd.DataFrame({"Gene": ["x"]}), ("Approved",), "bad")
    with pytest.raises(InputError, match="zz: not a valid zip"):
        hpa.read_location_zip(HTML, "zz")


def test_hpa_gene_xml_two_antibodies_and_extra_token(tmp_path):
    gene = "ENSG00000001036"
    images = list(hpa.parse_gene_xml(io.BytesIO(gene_xml(gene))))
    assert [(im.antibody, im.cell_line) for im in images] == [
        ("HPA000001", "A-549"),
        ("HPA000001", "A-549"),
        ("CAB000002", "HeLa"),
    ]
    assert {im.gene for im in images} == {gene}
    assert images[2].locations == ("Nucleoplasm", "Cytosol")
    assert images[2].image_url.endswith("/5120/1843_B2_17_cr5af971a263864_blue_red_green.jpg")
    path = tmp_path / "g.xml"
    path.write_bytes(gene_xml(gene))
    assert list(hpa.parse_gene_xml(path)) == images
    path.write_bytes(b"<entry><antibody>")
    with pytest.raises(InputError, match="g.xml: malformed XML"):
        list(hpa.parse_gene_xml(path))


def test_hpa_channel_urls_composite_per_channel_and_mirror():
    url = "https://images.proteinatlas.org/5120/1843_B2_17_cr5af971a263864_blue_red_green.jpg"
    assert hpa.channel_urls(url, ("blue_red_green",)) == {"blue_red_green": url}
    per = hpa.channel_urls(url, ("green", "yellow"))
    assert per["yellow"] == "https://images.proteinatlas.org/5120/1843_B2_17_cr5af971a263864_yellow.jpg"
    assert per["green"].endswith("_cr5af971a263864_green.jpg")
    plain = hpa.channel_urls("https://images.proteinatlas.org/4109/1832_C1_2_blue_red_green.jpg", ("red",))
    assert plain["red"] == "https://images.proteinatlas.org/4109/1832_C1_2_red.jpg"
    mirror = hpa.channel_urls(url, ("blue",), "http://127.0.0.1:1/m/")
    assert mirror["blue"] == "http://127.0.0.1:1/m/5120/1843_B2_17_cr5af971a263864_blue.jpg"
    assert hpa.image_id_of(url) == "5120_1843_B2_17_cr5af971a263864"
    with pytest.raises(InputError, match="no '_blue'"):
        hpa.channel_urls("https://x/1/a_green.jpg", ("blue",))
    with pytest.raises(InputError, match="channels"):
        hpa.HpaOptions(channels=("purple",))


def hpa_site(url: str, site: Script, new_path: bool = False) -> None:
    genes = ["ENSG00000000003", "ENSG00000001036"]
    table = zipped({"subcellular_location.tsv": OLD_TSV.encode()})
    if new_path:
        site.routes["/download/tsv/subcellular_location.tsv.zip"] = (200, table)
    else:  # the tsv/ path answers 404 (no route): the old path is used
        site.routes["/download/subcellular_location.tsv.zip"] = (200, table)
    for g in genes:
        site.routes[f"/{g}.xml"] = (200, gene_xml(g, f"{url}/img").replace(b"FUCA2", g.encode()))
    site.routes["/ENSG00000000003.xml"] = (404, b"gone")
    for stem in ("4109/1832_C1_2", "4109/1832_C1_3", "5120/1843_B2_17_cr5af971a263864"):
        for c in ("blue_red_green", "blue", "green"):
            site.routes[f"/img/{stem}_{c}.jpg"] = (200, jpeg())


def test_hpa_acquire_falls_back_to_old_table_path(site, tmp_path):
    url, s = site
    hpa_site(url, s)
    out = tmp_path / "hpa"
    table = hpa.acquire(
        out,
        hpa.HpaOptions(base_url=url, reliability=ABOVE_UNCERTAIN),
        downloader(tmp_path),
        max_bad_fraction=0.5,
    )
    assert s.headers["/download/tsv/subcellular_location.tsv.zip"]
    assert table.columns.tolist() == list(hpa.IMAGES_TSV_COLUMNS)
    assert table["image_id"].tolist() == [
        "4109_1832_C1_2",
        "4109_1832_C1_3",
        "5120_1843_B2_17_cr5af971a263864",
    ]
    assert set(table["group"]) == {"ENSG00000001036"}
    assert set(table["labels"]) == {"Cytosol;Nucleoplasm"}
    assert table["url"].iloc[2] == f"{url}/img/5120/1843_B2_17_cr5af971a263864_blue_red_green.jpg"
    assert table["cell_line"].tolist() == ["A-549", "A-549", "HeLa"]
    for p in table["path"]:
        assert Image.open(out / p).format == "JPEG"
    written = pd.read_csv(out / "images.tsv", sep="\t", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(written, table.astype(str))
    bad_genes = pd.read_csv(out / "rejected_genes.tsv", sep="\t", dtype=str)
    assert bad_genes["gene"].tolist() == ["ENSG00000000003"] and "404" in bad_genes["reason"].iloc[0]
    assert "/9_A1_1_" not in " ".join(s.headers)  # the mouse sub-assay is not fetched


def test_hpa_acquire_per_channel_new_path_and_mirror(site, tmp_path):
    url, s = site
    hpa_site("https://images.proteinatlas.org", s, new_path=True)
    opts = hpa.HpaOptions(
        base_url=url,
        image_base_url=url,
        channels=("blue", "green"),
        max_genes=5,
        reliability=ABOVE_UNCERTAIN,
    )
    table = hpa.acquire(tmp_path, opts, downloader(tmp_path), limit=2, max_bad_fraction=0.5)
    assert "/download/subcellular_location.tsv.zip" not in s.headers
    assert {"path_blue", "path_green", "url_blue", "url_green"} <= set(table.columns)
    assert table["path"].tolist() == table["path_blue"].tolist()
    assert all((tmp_path / p).is_file() for p in table["path_green"])
    assert table["url_green"].iloc[0] == f"{url}/img/4109/1832_C1_2_green.jpg"


def test_hpa_acquire_image_failures_and_missing_table(site, tmp_path):
    url, s = site
    hpa_site(url, s)
    s.routes["/ENSG00000000003.xml"] = (200, gene_xml("ENSG00000000003", f"{url}/img"))  # same images
    s.routes["/img/4109/1832_C1_3_blue_red_green.jpg"] = (200, HTML)
    s.routes["/download/tsv/subcellular_location.tsv.zip"] = (403, b"Forbidden")  # 403 also moves on
    with pytest.raises(DownloadError, match="1 of 3 images failed"):
        hpa.acquire(
            tmp_path / "a", hpa.HpaOptions(base_url=url, reliability=ABOVE_UNCERTAIN), downloader(tmp_path)
        )
    table = hpa.acquire(
        tmp_path / "b",
        hpa.HpaOptions(base_url=url, reliability=ABOVE_UNCERTAIN),
        downloader(tmp_path),
        max_bad_fraction=0.5,
    )
    assert len(table) == 2
    assert pd.read_csv(tmp_path / "b" / "rejected.tsv", sep="\t")["image_id"].tolist() == ["4109_1832_C1_3"]
    s.routes.pop("/download/subcellular_location.tsv.zip")
    with pytest.raises(DownloadError, match="no location table found.*404"):
        hpa.acquire(
            tmp_path / "c", hpa.HpaOptions(base_url=url, reliability=ABOVE_UNCERTAIN), downloader(tmp_path)
        )


# -------------------------------------------------------------------------------------------- HPA paper

NS = "http://schemas.microsoft.com/windowsazure"


def listing_page(blobs: list[tuple[str, bytes | None]], marker: str = "", namespace: bool = False) -> bytes:
    items = []
    for name, data in blobs:
        md5 = (
            f"<Content-MD5>{base64.b64encode(hashlib.md5(data).digest()).decode()}</Content-MD5>"
            if data
            else ""
        )
        length = (
            f"<Content-Length>{len(data)}</Content-Length>" if data else "<Content-Length>7</Content-Length>"
        )
        items.append(
            f"<Blob><Name>{name}</Name><Properties>"
            "<Last-Modified>Mon, 01 Mar 2021 00:00:00 GMT</Last-Modified>"
            f"<Etag>0x8D8</Etag>{length}<Content-Type>application/x-zip-compressed</Content-Type>{md5}"
            f"</Properties><OrMetadata /></Blob>"
        )
    xmlns = f' xmlns="{NS}"' if namespace else ""
    next_marker = f"<NextMarker>{marker}</NextMarker>" if marker else "<NextMarker />"
    return (
        f'\ufeff<?xml version="1.0" encoding="utf-8"?><EnumerationResults{xmlns} '
        f'ServiceEndpoint="https://bioimagestore.blob.core.windows.net/" ContainerName="dataset">'
        f"<MaxResults>2</MaxResults><Blobs>{''.join(items)}</Blobs>{next_marker}</EnumerationResults>"
    ).encode()


PATCH_ZIP = {
    "hpa/ENSG00000001036/1832_C1_2_blue_red_green.jpg_0.jpg": jpeg(1),
    "hpa/ENSG00000001036/1832_C1_2_blue_red_green.jpg_1.jpg": jpeg(2),
    "hpa/ENSG00000000003/1843_B2_17_blue_red_green.jpg_0.jpg": jpeg(3),
    "hpa/ENSG00000000003/notes.txt": b"not a patch",
}
LIST = "/dataset?restype=container&comp=list"


def paper_site(site: Script, part1: bytes) -> None:
    site.routes[LIST] = (
        200,
        listing_page([("hpa dataSet_part1.zip", part1), ("readme.txt", None)], "2!72!MDAw"),
    )
    site.routes[LIST + "&marker=2%2172%21MDAw"] = (200, listing_page([("hpa_dataSet_part2.zip", b"x" * 7)]))
    site.routes["/dataset/hpa%20dataSet_part1.zip"] = (200, part1)


def test_hpa_paper_listing_two_pages_and_namespaces(site):
    url, s = site
    part1 = zipped(PATCH_ZIP)
    paper_site(s, part1)
    blobs = hpa_paper.list_blobs(Downloader(FAST, progress=False), f"{url}/dataset/", "2020-10-02")
    assert [b.name for b in blobs] == ["hpa dataSet_part1.zip", "readme.txt", "hpa_dataSet_part2.zip"]
    assert (
        blobs[0].size == len(part1)
        and blobs[0].md5_b64 == base64.b64encode(hashlib.md5(part1).digest()).decode()
    )
    assert blobs[1].md5_b64 is None
    pages = s.headers[LIST] + s.headers[LIST + "&marker=2%2172%21MDAw"]
    assert len(pages) == 2 and all(h["x-ms-version"] == "2020-10-02" for h in pages)
    ns_blobs, marker = hpa_paper.parse_listing(listing_page([("a.zip", b"abc")], "m1", namespace=True))
    assert [b.name for b in ns_blobs] == ["a.zip"] and marker == "m1"
    with pytest.raises(DownloadError, match="x: not a blob listing"):
        hpa_paper.parse_listing(HTML, "x")


def test_hpa_paper_blob_names_encoded_and_checked():
    assert (
        hpa_paper.blob_url("https://h/dataset/", "hpa dataSet_part1.zip")
        == "https://h/dataset/hpa%20dataSet_part1.zip"
    )
    assert hpa_paper.blob_url("https://h/dataset", "a/b#c.zip") == "https://h/dataset/a/b%23c.zip"
    assert hpa_paper.check_blob_name("sub/hpa dataSet_part1.zip") == "sub/hpa dataSet_part1.zip"
    for bad in ("../evil.zip", "/etc/passwd", "a/../../b.zip", "C:evil.zip", "a\\..\\b", ""):
        with pytest.raises(DownloadError, match="unsafe blob name"):
            hpa_paper.check_blob_name(bad, "https://h/dataset")


def write_labels(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_hpa_paper_labels_table_forms(tmp_path):
    loc = tmp_path / "loc.tsv.zip"
    loc.write_bytes(zipped({"subcellular_location.tsv": OLD_TSV.encode()}))
    opts = hpa_paper.HpaPaperOptions(location_table=loc, label_names=("Nucleoplasm", "Cytosol"))
    path = write_labels(tmp_path, 'Gene,label\nENSG00000001036,"Nucleoplasm;Cytosol"\nTSPAN6,\nENSG9,0|1\n')
    assert hpa_paper.read_labels_table(path, opts) == {
        "ENSG00000001036": "Cytosol;Nucleoplasm",
        "ENSG00000000003": "Cell Junctions;Cytosol",  # by name, labels from the location table
        "ENSG9": "Cytosol;Nucleoplasm",
    }
    tab = write_labels(tmp_path, "Gene\tLabel\nENSG1\tGolgi apparatus\n", "labels.tsv")
    assert hpa_paper.read_labels_table(tab, hpa_paper.HpaPaperOptions()) == {"ENSG1": "Golgi apparatus"}
    with pytest.raises(InputError, match="missing column 'label'"):
        hpa_paper.read_labels_table(write_labels(tmp_path, "Gene,x\nA,b\n"), opts)


def test_hpa_paper_zip_with_escaping_entry_refused(site, tmp_path):
    url, s = site
    evil = zipped({"hpa/ENSG1/a_blue_red_green.jpg_0.jpg": jpeg(), "../evil": b"owned"})
    paper_site(s, evil)
    opts = hpa_paper.HpaPaperOptions(
        container_url=f"{url}/dataset",
        blobs=("hpa dataSet_part1.zip",),
        labels_table=write_labels(tmp_path, "Gene,label\nENSG1,Cytosol\n"),
    )
    with pytest.raises(DownloadError, match=r"unsafe zip entry '\.\./evil'"):
        hpa_paper.acquire(tmp_path / "out", opts, downloader(tmp_path))
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out" / "data").exists()


def test_hpa_paper_refuses_escaping_blob_name_from_listing(site, tmp_path):
    url, s = site
    s.routes[LIST] = (200, listing_page([("../evil.zip", b"abc")]))
    opts = hpa_paper.HpaPaperOptions(
        container_url=f"{url}/dataset", blobs=(), labels_table=write_labels(tmp_path, "Gene,label\nA,b\n")
    )
    with pytest.raises(DownloadError, match="unsafe blob name '../evil.zip'"):
        hpa_paper.acquire(tmp_path / "out", opts, downloader(tmp_path))


def test_hpa_paper_acquire_end_to_end(site, tmp_path):
    url, s = site
    part1 = zipped(PATCH_ZIP)
    paper_site(s, part1)
    labels = write_labels(
        tmp_path, "Gene,label\nENSG00000001036,Nucleoplasm\nENSG00000000003,Cytosol;Vesicles\n"
    )
    opts = hpa_paper.HpaPaperOptions(
        container_url=f"{url}/dataset", blobs=("hpa dataSet_part1.zip",), labels_table=labels
    )
    out = tmp_path / "paper"
    table = hpa_paper.acquire(out, opts, downloader(tmp_path))
    assert table.columns.tolist() == list(hpa_paper.IMAGES_TSV_COLUMNS)
    assert table["image_id"].tolist() == ["1843_B2_17_0", "1832_C1_2_0", "1832_C1_2_1"]
    assert table["group"].tolist() == ["ENSG00000000003", "ENSG00000001036", "ENSG00000001036"]
    assert table["labels"].tolist() == ["Cytosol;Vesicles", "Nucleoplasm", "Nucleoplasm"]
    assert table["source_field"].iloc[1] == "1832_C1_2_blue_red_green.jpg"
    for p in table["path"]:
        assert Image.open(out / p).format == "JPEG"
    written = pd.read_csv(out / "images.tsv", sep="\t", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(written, table.astype(str))
    assert "hpa_dataSet_part2.zip" not in " ".join(s.headers)
    again = hpa_paper.acquire(out, opts, downloader(tmp_path), limit=1)  # archive kept: not fetched again
    assert len(s.headers["/dataset/hpa%20dataSet_part1.zip"]) == 1
    assert again["group"].tolist() == ["ENSG00000000003"]


def test_hpa_paper_md5_mismatch_fails(site, tmp_path):
    url, s = site
    part1 = zipped(PATCH_ZIP)
    paper_site(s, part1)
    s.routes["/dataset/hpa%20dataSet_part1.zip"] = (
        200,
        part1[:100] + bytes([part1[100] ^ 0xFF]) + part1[101:],
    )
    opts = hpa_paper.HpaPaperOptions(
        container_url=f"{url}/dataset",
        blobs=("hpa dataSet_part1.zip",),
        labels_table=write_labels(tmp_path, "Gene,label\nENSG1,x\n"),
    )
    with pytest.raises(DownloadError, match="Content-MD5 mismatch"):
        hpa_paper.acquire(tmp_path / "out", opts, downloader(tmp_path))
    with pytest.raises(DownloadError, match="not in the listing: nope.zip"):
        hpa_paper.acquire(
            tmp_path / "out",
            hpa_paper.HpaPaperOptions(
                container_url=f"{url}/dataset", blobs=("nope.zip",), labels_table=opts.labels_table
            ),
            downloader(tmp_path),
        )

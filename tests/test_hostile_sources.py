"""Issue 12, network side: hostile or changing remote files, through ``hamil download`` and a local server.

Every fixture is shaped like the real samples in ``shared/real_samples`` (origins noted where used):
names from remote tables must not escape the output folder, a changed file must not be spliced onto a
stale partial download, failing genes count against ``--max-bad-fraction`` and are reported, archives
that clash give one line, and what was deleted as bad or removed upstream leaves no trace.
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from localhttp import HTML_PAGE, Handler, Script, etag_of, jpeg, send, send_ranged

from hamil.cli import main

HTML = HTML_PAGE


def download(source: str, out: Path, options: dict, *extra: str) -> int:
    """``hamil download SOURCE`` without back-off (``--retries 0``)."""
    args = ["download", source, "--out", str(out), "--options", json.dumps(options), "--retries", "0"]
    return main([*args, *extra])


def files_outside(root: Path, *inside: Path) -> list[Path]:
    """Files below ``root`` that are in none of the ``inside`` folders."""
    return [p for p in root.rglob("*") if p.is_file() and not any(p.is_relative_to(i) for i in inside)]


def error_line(err: str) -> str:
    """The one error line of a failed ``hamil download`` (progress bars aside), checked to be alone."""
    lines = [ln for ln in err.splitlines() if "hamil download: error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


# ------------------------------------------------------------------------------------------------- HPA

# Header and rows verbatim from real_samples/hpa/subcellular_location_v18_full_ImPloc.tsv (yl2019lw/ImPloc,
# v18 layout, 11 columns); the hostile rows are the NFYA row with another Gene cell.
LOC_HEADER = (
    "Gene\tGene name\tReliability\tEnhanced\tSupported\tApproved\tUncertain\t"
    "Single-cell variation intensity\tSingle-cell variation spatial\tCell cycle dependency\tGO id"
)
NFYA = "ENSG00000001167\tNFYA\tEnhanced\tNucleoplasm\t\t\t\t\t\t\tNucleoplasm (GO:0005654)"
CCNB1 = "ENSG00000134057\tCCNB1\tEnhanced\tCytosol\t\t\t\tCytosol\t\tN/A (custom data)\tCytosol (GO:0005829)"


def location_zip(rows: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("subcellular_location.tsv", "\n".join([LOC_HEADER, *rows]) + "\n")
    return buf.getvalue()


def gene_xml(gene: str, name: str, urls: list[str]) -> bytes:
    """A v18 gene XML cut down like real_samples/hpa/ENSG00000134057_v18_gene_xml_excerpt.xml (antibody
    CAB000115, ICC/IF human sub-assay, one data block); the image URLs are the caller's."""
    images = "".join(
        '<image imageType="sampleImage"><channel color="blue">nucleus</channel>'
        '<channel color="red">microtubules</channel><channel color="green">antibody</channel>'
        f"<imageUrl>{u}</imageUrl></image>"
        for u in urls
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<proteinAtlas xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" schemaVersion="2.5">
	<entry version="18" url="http://v18.proteinatlas.org/{gene}">
		<name>{name}</name>
		<identifier id="{gene}" db="Ensembl" version="88.38"/>
		<antibody id="CAB000115" releaseVersion="1.2" releaseDate="2006-03-13">
			<cellExpression source="HPA" technology="ICC/IF">
				<subAssay type="human">
					<data>
						<cellLine>A-431</cellLine>
						<location GOId="GO:0005829" singleCellVariationIntensity="true">cytosol</location>
						<assayImage>{images}</assayImage>
					</data>
				</subAssay>
			</cellExpression>
		</antibody>
	</entry>
</proteinAtlas>
""".encode()


def v18_image(folder: int, field: str) -> str:
    """A real v18 image URL shape (image_url_patterns.txt: .../images/115/672_E2_1_blue_red_green.jpg)."""
    return f"http://v18.proteinatlas.org/images/{folder}/{field}_blue_red_green.jpg"


def hpa_site(url: str, s: Script, rows: list[str]) -> dict:
    s.routes["/download/tsv/subcellular_location.tsv.zip"] = (200, location_zip(rows))
    s.routes["/ENSG00000001167.xml"] = (
        200,
        gene_xml("ENSG00000001167", "NFYA", [v18_image(115, "672_E2_1"), v18_image(115, "672_E2_2")]),
    )
    s.routes["/ENSG00000134057.xml"] = (
        200,
        gene_xml("ENSG00000134057", "CCNB1", [v18_image(30741, "686_F11_1")]),
    )
    for path in ("115/672_E2_1", "115/672_E2_2", "30741/686_F11_1", "7/1_A1_1"):
        s.routes[f"/images/{path}_blue_red_green.jpg"] = (200, jpeg())
    return {"base_url": url, "image_base_url": url}


def test_hpa_gene_ids_and_image_names_from_remote_files_cannot_escape(site, tmp_path, caplog, capsys):
    """Issue 12.1: a location-table Gene of ``../../../x`` or an absolute path is refused, not used."""
    url, s = site
    absolute = str(tmp_path / "abs_gene")
    rows = [
        NFYA,
        NFYA.replace("ENSG00000001167", "../../../escaped"),
        NFYA.replace("ENSG00000001167", absolute),
    ]
    options = hpa_site(url, s, rows)
    # what the old code fetched for them: XMLs whose images it wrote outside the output folder
    evil = gene_xml("x", "X", [v18_image(7, "1_A1_1")])
    for path in (
        "/../../../escaped.xml",
        f"/{absolute}.xml",
        f"/{absolute.lstrip('/')}.xml",  # the server may fold the leading "//"
    ):
        s.routes[path] = (200, evil)
    # and an imageUrl whose name is not <folder>/<plate>_<well>_<field>: refused with its reason
    s.routes["/ENSG00000001167.xml"] = (
        200,
        gene_xml(
            "ENSG00000001167",
            "NFYA",
            [
                v18_image(115, "672_E2_1"),
                v18_image(115, "672_E2_2"),
                "http://v18.proteinatlas.org/../evil_blue_red_green.jpg",
            ],
        ),
    )
    out = tmp_path / "a" / "b" / "out"
    assert download("hpa", out, options, "--max-bad-fraction", "0.7") == 0
    assert files_outside(tmp_path, out) == []
    assert not any("escaped" in p or "abs_gene" in p for p in s.headers)  # never even requested
    bad_genes = read_tsv(out / "rejected_genes.tsv")
    assert bad_genes["gene"].tolist() == ["../../../escaped", absolute]
    assert all("not an Ensembl gene id" in r for r in bad_genes["reason"])
    rejected = read_tsv(out / "rejected.tsv")
    assert rejected["image_id"].tolist() == [".._evil"] and "image name" in rejected["reason"].iloc[0]
    table = read_tsv(out / "images.tsv")
    assert set(table["group"]) == {"ENSG00000001167"} and len(table) == 2
    assert all((out / p).resolve().is_relative_to(out.resolve()) for p in table["path"])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("2 of 3 genes" in w and "rejected_genes.tsv" in w for w in warnings)
    # within the default budget, the hostile table stops the run with one line naming it
    capsys.readouterr()
    strict = tmp_path / "a" / "b" / "strict"
    assert download("hpa", strict, options) == 2
    err = error_line(capsys.readouterr().err)
    assert "subcellular_location.tsv.zip: 2 of 3 genes failed" in err
    assert "not an Ensembl gene id" in err and files_outside(tmp_path, out, strict) == []


def test_hpa_one_failing_gene_counts_against_the_budget_and_is_reported(site, tmp_path, caplog, capsys):
    """Issue 12.6: an HTML page instead of one gene's XML is not a silent drop."""
    url, s = site
    options = hpa_site(url, s, [NFYA, CCNB1])
    s.routes["/ENSG00000134057.xml"] = (200, HTML)
    assert download("hpa", tmp_path / "strict", options) == 2
    err = error_line(capsys.readouterr().err)
    assert "1 of 2 genes failed, first: ENSG00000134057:" in err and "expected xml, got html" in err
    assert f"full list in {tmp_path / 'strict' / 'rejected_genes.tsv'}" in err
    assert not (tmp_path / "strict" / "images.tsv").exists()
    caplog.clear()
    assert download("hpa", tmp_path / "lenient", options, "--max-bad-fraction", "0.5") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    listed = str(tmp_path / "lenient" / "rejected_genes.tsv")
    assert any("skipped 1 of 2 genes" in w and listed in w for w in warnings), warnings
    assert set(read_tsv(tmp_path / "lenient" / "images.tsv")["group"]) == {"ENSG00000001167"}


# ------------------------------------------------------------------------------------------- HPA paper

# Labels: the first rows of the authors' table, real_samples/hpa_paper/AVA_hpa_enhanced_full.csv.
LABELS = "Gene,label\nENSG00000001167,6\nENSG00000001630,11\nENSG00000002330,0\n"
# Patch names as in real_samples/hpa_paper/AVA_hpa_README_dataset_section.txt.
PATCH = "686_A3_2_blue_red_green.jpg_{k}.jpg"


def patches_zip(genes: list[str], extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for g in genes:
            for k in (1, 2):
                zf.writestr(f"hpa/{g}/{PATCH.format(k=k)}", jpeg(10 * k))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def listing(blobs: dict[str, bytes], md5: bool = True) -> bytes:
    """One List Blobs page shaped like real_samples/azure/list_blobs_recorded_md5.xml (live recording).

    ``md5=False``: no ``Content-MD5`` (the service sends it only if the uploader set it)."""
    import base64
    import hashlib

    items = "".join(
        f"<Blob><Name>{name}</Name><Properties><Creation-Time>Tue, 30 Jun 2020 12:40:12 GMT</Creation-Time>"
        f"<Last-Modified>Tue, 30 Jun 2020 12:40:12 GMT</Last-Modified><Etag>0x8D81CF2BBB1991F</Etag>"
        f"<Content-Length>{len(data)}</Content-Length><Content-Type>application/octet-stream</Content-Type>"
        "<Content-Encoding /><Content-Language /><Content-CRC64 />"
        + (
            f"<Content-MD5>{base64.b64encode(hashlib.md5(data).digest()).decode()}</Content-MD5>"
            if md5
            else ""
        )
        + "<Cache-Control /><Content-Disposition /><BlobType>BlockBlob</BlobType></Properties>"
        + "<OrMetadata /></Blob>"
        for name, data in blobs.items()
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?><EnumerationResults '
        'ServiceEndpoint="https://bioimagestore.blob.core.windows.net/" ContainerName="dataset">'
        f"<Blobs>{items}</Blobs><NextMarker /></EnumerationResults>"
    ).encode()


LIST = "/dataset?restype=container&comp=list"
PART1 = "hpa dataSet_part1.zip"


def paper_site(s: Script, blobs: dict[str, bytes], md5: bool = True) -> None:
    s.routes[LIST] = (200, listing(blobs, md5))
    for name, data in blobs.items():
        s.routes["/dataset/" + name.replace(" ", "%20")] = lambda h, n, data=data: send_ranged(h, data)


def paper_options(url: str, tmp_path: Path, blobs: tuple[str, ...] = (PART1,)) -> dict:
    labels = tmp_path / "enhanced.csv"
    labels.write_text(LABELS)
    return {"container_url": f"{url}/dataset", "blobs": list(blobs), "labels_table": str(labels)}


def test_hpa_paper_republished_archive_drops_removed_genes(site, tmp_path):
    """Issue 12.10: images.tsv reflects exactly the current archive (a gene removed upstream goes)."""
    url, s = site
    options = paper_options(url, tmp_path)
    out = tmp_path / "out"
    paper_site(s, {PART1: patches_zip(["ENSG00000001167", "ENSG00000001630"])})
    assert download("hpa_paper", out, options) == 0
    assert set(read_tsv(out / "images.tsv")["group"]) == {"ENSG00000001167", "ENSG00000001630"}
    paper_site(s, {PART1: patches_zip(["ENSG00000001167"])})  # re-published without one gene
    assert download("hpa_paper", out, options) == 0
    table = read_tsv(out / "images.tsv")
    assert set(table["group"]) == {"ENSG00000001167"} and len(table) == 2
    assert not (out / "data" / "hpa" / "ENSG00000001630" / PATCH.format(k=1)).exists()
    assert download("hpa_paper", out, options) == 0  # unchanged: nothing unpacked again, same table
    pd.testing.assert_frame_equal(read_tsv(out / "images.tsv"), table)


def test_hpa_paper_resume_after_the_archive_changed_gives_the_new_archive(site, tmp_path):
    """Issue 12.2 through the CLI: the first run is cut off, the archive is re-published (same size, no
    Content-MD5 in the listing), the second run must not splice the two versions."""
    url, s = site
    v1 = patches_zip(["ENSG00000001167", "ENSG00000001630"])
    v2 = v1.replace(b"ENSG00000001167", b"ENSG00000002330")  # same length, other local headers + directory
    assert len(v1) == len(v2) and v1 != v2
    s.routes[LIST] = (200, listing({PART1: v1}, md5=False))
    current = {"body": v1}

    def blob(h: Handler, n: int) -> None:
        if n == 0:  # announce the whole archive, send half, drop the connection
            send(h, v1[: len(v1) // 2], length=len(v1), headers={"ETag": etag_of(v1)})
            h.close_connection = True
        else:
            send_ranged(h, current["body"])

    s.routes["/dataset/hpa%20dataSet_part1.zip"] = blob
    options, out = paper_options(url, tmp_path), tmp_path / "out"
    assert download("hpa_paper", out, options) == 2
    current["body"] = v2
    s.routes[LIST] = (200, listing({PART1: v2}, md5=False))
    assert download("hpa_paper", out, options) == 0
    assert (out / "raw" / "blobs" / PART1).read_bytes() == v2
    assert s.headers["/dataset/hpa%20dataSet_part1.zip"][1]["If-Range"] == etag_of(v1)
    assert set(read_tsv(out / "images.tsv")["group"]) == {"ENSG00000001630", "ENSG00000002330"}


@pytest.mark.parametrize("order", ["file first", "folder first"])
def test_hpa_paper_zip_with_a_file_and_a_folder_of_one_name_is_one_line(site, tmp_path, capsys, order):
    """Issue 12.9: no traceback for an archive holding ``hpa/ENSG…`` both as a file and as a folder."""
    url, s = site
    clash = {"hpa/ENSG00000001167": b"a file where a folder should be"}
    archive = patches_zip(["ENSG00000001167"], clash) if order == "file first" else None
    if archive is None:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr(f"hpa/ENSG00000001167/{PATCH.format(k=1)}", jpeg())
            zf.writestr("hpa/ENSG00000001167", b"a file where a folder should be")
        archive = buf.getvalue()
    paper_site(s, {PART1: archive})
    assert download("hpa_paper", tmp_path / "out", paper_options(url, tmp_path)) == 2
    err = error_line(capsys.readouterr().err)
    assert "zip entry 'hpa/ENSG00000001167' is both a file and a folder" in err
    assert not (tmp_path / "out" / "data").exists()


def test_hpa_paper_blob_name_that_is_a_folder_of_another_is_one_line(site, tmp_path, capsys):
    """Issue 12.9: ``x.zip`` and ``x.zip/y.zip`` in one listing cannot both be files: one line."""
    url, s = site
    part = patches_zip(["ENSG00000001167"])
    paper_site(s, {"hpa_dataSet_part2.zip": part, "hpa_dataSet_part2.zip/hpa_dataSet_part3.zip": part})
    options = paper_options(url, tmp_path, blobs=())  # every .zip blob of the listing
    assert download("hpa_paper", tmp_path / "out", options) == 2
    err = error_line(capsys.readouterr().err)
    assert "blob names 'hpa_dataSet_part2.zip' and" in err and "clash" in err


# ------------------------------------------------------------------------------------------------ BDGP

# insitu_annot.csv: the one verbatim row found (real_samples/bdgp/insitu_annot_and_images_other_sources.txt:
# "a10","CG6642","FBgn0011293",1,"no staining") and the same gene with a real anatomical term of that
# file's term list ("embryonic cortex", stage 2).
ANNOT = '"a10","CG6642","FBgn0011293",1,"no staining"\n"a10","CG6642","FBgn0011293",2,"embryonic cortex"\n'


def images_table(paths: list[str]) -> bytes:
    """insitu_images.csv in the documented 10-column order (id, symbol, annotation_symbol, FBgn, cDNA_clone,
    path, stage, pov, comment, resolution; tomsing1 notebook), no header; the real path shape is
    img_dir_10/insitu10383.jpe."""
    rows = [f"CG6642,a10,a10,FBgn0011293,LD22462,{p},2,lateral,,low" for p in paths]
    return gzip.compress(("\n".join(rows) + "\n").encode("latin1"))


GOOD = ["img_dir_10/insitu10383.jpe", "img_dir_10/insitu10384.jpe", "img_dir_10/insitu10385.jpe"]


def bdgp_site(url: str, s: Script, paths: list[str]) -> dict:
    s.routes["/insitu-mysql-dump/insitu_annot.csv.gz"] = (200, gzip.compress(ANNOT.encode("latin1")))
    s.routes["/insitu-mysql-dump/insitu_images.csv.gz"] = (200, images_table(paths))
    for k, p in enumerate(paths):
        s.routes[f"/insitu_image_storage/{p}"] = (200, jpeg(k))
    return {"base_url": url, "min_interval": 0}


def test_bdgp_image_paths_from_the_table_cannot_escape(site, tmp_path, caplog):
    """Issue 12.1: absolute and ``..`` paths of insitu_images.csv are refused with their reason."""
    url, s = site
    hostile = ["../../../evil.jpe", str(tmp_path / "evil.jpe")]
    options = bdgp_site(url, s, GOOD + hostile)
    out = tmp_path / "a" / "b" / "out"
    assert download("bdgp", out, options, "--max-bad-fraction", "0.5") == 0
    assert files_outside(tmp_path, out) == []
    rejected = read_tsv(out / "rejected.tsv")
    assert rejected["image_id"].tolist() == hostile
    assert "'..'" in rejected["reason"].iloc[0] and "absolute path" in rejected["reason"].iloc[1]
    assert all("row " in r and "insitu_images.csv.gz" in r for r in rejected["reason"])
    assert len(read_tsv(out / "images.tsv")) == 3
    assert any("2 of 5 images" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_bdgp_table_deleted_as_bad_leaves_no_manifest_row(site, tmp_path, capsys):
    """Issue 12.10: an HTML page or a corrupt gzip given for a table is deleted and forgotten."""
    url, s = site
    options = bdgp_site(url, s, GOOD)
    out = tmp_path / "out"
    annot_path = str(out / "raw" / "insitu_annot.csv.gz")
    good_annot = s.routes["/insitu-mysql-dump/insitu_annot.csv.gz"]
    for bad in (HTML, gzip.compress(ANNOT.encode())[:25]):  # an error page; a truncated gzip
        s.routes["/insitu-mysql-dump/insitu_annot.csv.gz"] = (200, bad)
        assert download("bdgp", out, options) == 2
        error_line(capsys.readouterr().err)
        assert not Path(annot_path).exists()
        manifest = read_tsv(out / "manifest.tsv") if (out / "manifest.tsv").exists() else None
        assert manifest is None or annot_path not in manifest["path"].tolist()
    s.routes["/insitu-mysql-dump/insitu_annot.csv.gz"] = good_annot
    assert download("bdgp", out, options) == 0
    assert annot_path in read_tsv(out / "manifest.tsv")["path"].tolist()

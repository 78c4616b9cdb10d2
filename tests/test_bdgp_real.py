"""Issue 13, BDGP (Task II): the real table layouts, the real non-anatomical terms, single-embryo images,
and the FlyIT bag list the paper used, through ``hamil download bdgp`` against a local server.

Fixtures: ``tests/data/real/bdgp`` (origin of every value in its README.md).
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from localhttp import HTML_PAGE, Script, jpeg
from PIL import Image

from hamil.cli import main
from preprocessing.bags import select_classes
from preprocessing.errors import InputError
from preprocessing.sources import bdgp

DATA = Path(__file__).parent / "data" / "real" / "bdgp"
HTML = HTML_PAGE


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def image_paths() -> list[str]:
    rows = (DATA / "insitu_images.csv").read_bytes().decode("latin1").splitlines()
    return [p for p in (r.split(",")[5] for r in rows) if p]


def bdgp_site(url: str, s: Script) -> dict:
    """The dump tables gzipped as served, every image a tiny JPEG but one HTML error page."""
    s.routes["/insitu-mysql-dump/insitu_annot.csv.gz"] = (
        200,
        gzip.compress((DATA / "insitu_annot.csv").read_bytes()),
    )
    s.routes["/insitu-mysql-dump/insitu_images.csv.gz"] = (
        200,
        gzip.compress((DATA / "insitu_images.csv").read_bytes()),
    )
    for k, p in enumerate(image_paths()):
        s.routes[f"/insitu_image_storage/{p}"] = (200, jpeg(10 * k))
    s.routes["/insitu_image_storage/img_dir_12/insitu12001.jpe"] = (200, HTML)
    return {"base_url": url, "min_interval": 0}


def download(out: Path, options: dict) -> int:
    args = ["download", "bdgp", "--out", str(out), "--options", json.dumps(options), "--retries", "0"]
    return main([*args, "--max-bad-fraction", "0.5"])


# --------------------------------------------------------------------------------------------- parsing


def test_images_table_documented_layout_latin1_and_skip_reasons():
    annot = bdgp.parse_annotations(gzip.compress((DATA / "insitu_annot.csv").read_bytes()))
    assert "Sé1" in set(annot["symbol"])  # latin1, not a replacement character
    images = bdgp.parse_images(
        gzip.compress((DATA / "insitu_images.csv").read_bytes()), bdgp._gene_keys(annot)
    )
    assert len(images) == 15
    assert images["path"].iloc[0] == "img_dir_10/insitu10383.jpe" and images["resolution"].iloc[0] == "low"
    skip = images.set_index("path")["skip"]
    assert skip["production_images/img_dir_20/insitu20005.jpe"] == bdgp.SKIP_WHOLE_FIELD
    assert skip["img_dir_20/insitu20004.jpe"] == bdgp.SKIP_HIGH_RES
    assert skip["img_dir_30/insitu30001.jpe"] == bdgp.SKIP_UNKNOWN_GENE  # Dl: not in this annotation table
    no_path = images[images["path"] == ""]
    assert no_path["gene"].tolist() == [
        "",
        "CG8153",
    ]  # the notebook's two rows without a path (CG10383, CG8153)
    assert set(no_path["skip"]) == {bdgp.SKIP_NO_PATH}
    assert images.loc[images["path"] == "img_dir_50/insitu50001.jpe", "gene"].item() == "Sé1"
    keep_all = bdgp.BdgpOptions(exclude_path_prefixes=(), exclude_resolutions=())
    kept = bdgp.parse_images(
        gzip.compress((DATA / "insitu_images.csv").read_bytes()), bdgp._gene_keys(annot), options=keep_all
    )
    assert (kept["skip"] == "").sum() == (images["skip"] == "").sum() + 2
    forced = bdgp.parse_images(
        gzip.compress((DATA / "insitu_images.csv").read_bytes()),
        bdgp._gene_keys(annot),
        columns=(0, 6, 7, 5, 9),
    )
    assert (forced["skip"] == "").sum() == (images["skip"] == "").sum() - 1  # Sé1: only its id column tried


def test_real_non_anatomical_terms_are_dropped():
    drop, prefixes = bdgp.BdgpOptions().terms_dropped()
    real = [
        "strong ubiquitous",
        "subset",
        "rapidly degraded",
        "apically cleared",
        "pair_rule",
        "pair rule",
        "epi_combo",
        "flag_as_nonspecific",
        "need new term(localised)",
        "need new term(larval eye primordium)",
        "gap",
        "segmentally repeated",
        "segment polarity",
        "posterior",
        "no staining",
        "faint ubiquitous",
        "list_1",
    ]
    assert [t for t in real if bdgp.keep_term(t, drop, prefixes)] == []
    anatomy = ["embryonic cortex", "posterior midgut primordium", "anlage in statu nascendi", "yolk nuclei"]
    assert all(bdgp.keep_term(t, drop, prefixes) for t in anatomy)
    assert bdgp.BdgpOptions(bags_from="flyit").terms_dropped() == ((), ())
    assert bdgp.BdgpOptions(bags_from="flyit", drop_terms=("gap",)).terms_dropped() == (("gap",), ())
    with pytest.raises(InputError, match="bags_from"):
        bdgp.BdgpOptions(bags_from="flyexpress")


# ------------------------------------------------------------------------------------------ FlyIT bags


def test_shipped_flyit_bags_are_derived_from_the_flyit_tables():
    derived = bdgp.derive_flyit_bags(
        DATA / "FlyIT_standard_annotations_subset.csv", DATA / "FlyIT_standard_images_subset.csv"
    )
    shipped = bdgp.load_flyit_bags()
    part = shipped[shipped["gene"].isin(derived["gene"])][list(bdgp.FLYIT_BAGS_COLUMNS)]
    pd.testing.assert_frame_equal(part.reset_index(drop=True), derived.astype({"n_images": int}))
    # CG31919-PD has annotations but no FlyExpress image: not a FlyIT bag
    assert "CG31919-PD" not in set(derived["gene"]) and len(derived) == 32
    row = derived[(derived["gene"] == "CG10637") & (derived["stage_range"] == "4-6")].iloc[0]
    assert row["terms"].split(";")[-1] == "subset" and row["n_images"] == 7


def test_shipped_flyit_bags_give_the_papers_table_s1():
    """The paper's 6,785 BDGP bags (Table S1: 2714 + 678 + 3393) are FlyIT's bags at stages 4-16 carrying
    one of the 10 most frequent terms, kept as FlyIT has them (``ubiquitous`` among them)."""
    bags = bdgp.load_flyit_bags()
    assert len(bags) == 11569 and bags["gene"].nunique() == 3270
    bags = bags[bags["stage"].isin(bdgp.BdgpOptions().stages)]
    assert len(bags) == 9740
    labels = {
        f"{g}_s{s}": t.split(";") for g, s, t in bags[["gene", "stage", "terms"]].itertuples(index=False)
    }
    top = select_classes(labels, 10)
    assert top[:2] == ["ubiquitous", "faint ubiquitous"]
    kept = bags[[any(t in top for t in terms.split(";")) for terms in bags["terms"]]]
    assert len(kept) == 2714 + 678 + 3393
    assert kept["n_images"].sum() == 25536  # paper: 10237 + 2426 + 12872 = 25535 instances


def test_flyit_gene_keys_accept_polypeptide_names():
    keys = bdgp.flyit_gene_keys(pd.DataFrame({"gene": ["CG15786-PA", "CG1-PA", "CG1"]}))
    assert keys["CG15786"] == "CG15786-PA" and keys["CG1"] == "CG1"


# ------------------------------------------------------------------------------------------ end to end


def test_download_default_bags_end_to_end(site, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="preprocessing.sources.bdgp")
    url, s = site
    out = tmp_path / "out"
    assert download(out, bdgp_site(url, s)) == 0
    table = read_tsv(out / "images.tsv")
    assert table["group"].tolist() == ["CG10637_s2", "CG10637_s2", "CG6642_s2", "Sé1_s2"]
    labels = dict(zip(table["group"], table["labels"], strict=True))
    assert (
        labels["CG10637_s2"]
        == "mesoderm anlage in statu nascendi;procephalic ectoderm anlage in statu nascendi"
    )
    assert labels["CG6642_s2"] == labels["Sé1_s2"] == "embryonic cortex"
    for p in table["path"]:
        assert Image.open(out / p).format == "JPEG"
    rejected = read_tsv(out / "rejected.tsv")
    assert rejected["image_id"].tolist() == ["insitu12001"] and "html" in rejected["reason"].item()
    record = json.loads((out / "source.json").read_text())
    assert record["excluded"] == {
        bdgp.SKIP_NO_PATH: 2,
        bdgp.SKIP_WHOLE_FIELD: 1,
        bdgp.SKIP_HIGH_RES: 1,
        bdgp.SKIP_UNKNOWN_GENE: 3,  # Dl, CG3619, CG4000: not in insitu_annot.csv
        bdgp.SKIP_STAGE: 1,
        bdgp.SKIP_VIEW: 1,
        bdgp.SKIP_NO_LABEL: 1,  # CG10637 at 11-12: only "need new term(...)" and "apically cleared"
    }
    assert record["image_rows"] == 15 and record["images_selected"] == 5 and record["images"] == 4
    assert "flyit_bags" not in record and "strong ubiquitous" in record["drop_terms"]
    assert any("left out:" in (m := r.getMessage()) and "2 no image path" in m for r in caplog.records)


def test_download_flyit_bags_end_to_end(site, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="preprocessing.sources.bdgp")
    url, s = site
    out = tmp_path / "out"
    assert download(out, {**bdgp_site(url, s), "bags_from": "flyit"}) == 0
    assert s.count("/insitu-mysql-dump/insitu_annot.csv.gz") == 0  # terms come from FlyIT
    table = read_tsv(out / "images.tsv")
    groups = table.groupby("group")["image_id"].agg(list).to_dict()
    assert groups == {
        "CG10637_s2": ["insitu20001", "insitu20002"],
        "CG10637_s5": ["insitu20003"],
        "CG3619_s3": ["insitu30002"],  # the id column wins over the symbol (Dl)
        "Dl_s2": ["insitu30001"],
        "RH13061_s4": ["insitu40001"],  # matched by the cDNA clone column
    }
    labels = dict(zip(table["group"], table["labels"], strict=True))
    flyit = bdgp.load_flyit_bags().set_index(["gene", "stage_range"])["terms"]
    assert labels["CG10637_s2"] == flyit["CG10637", "4-6"]  # FlyIT's terms, "subset" included
    assert labels["Dl_s2"] == flyit["Dl", "4-6"] and "faint ubiquitous" in labels["Dl_s2"]
    assert labels["CG10637_s5"] == "garland cell primordium"
    assert read_tsv(out / "rejected.tsv")["image_id"].tolist() == ["insitu12001"]  # CG9786_s5: HTML
    record = json.loads((out / "source.json").read_text())
    assert record["flyit_bags"] == 9740 and record["flyit_bags_with_images"] == 6
    assert record["flyit_bags_without_images"] == 9740 - 6 and record["bags_with_images"] == 5
    assert record["drop_terms"] == [] and record["drop_prefixes"] == []
    assert record["excluded"] == {
        bdgp.SKIP_NO_PATH: 2,
        bdgp.SKIP_WHOLE_FIELD: 1,
        bdgp.SKIP_HIGH_RES: 1,
        bdgp.SKIP_UNKNOWN_GENE: 3,  # CG6642 (twice), Sé1: no FlyIT bag
        bdgp.SKIP_VIEW: 1,
    }
    unmatched = read_tsv(out / "flyit_unmatched.tsv").set_index(["gene", "stage_range"])["reason"]
    assert len(unmatched) == 9740 - 6
    assert unmatched["CG10637", "9-10"] == f"images left out: 1 {bdgp.SKIP_WHOLE_FIELD}"
    assert unmatched["CG10637", "13-16"] == f"images left out: 1 {bdgp.SKIP_HIGH_RES}"
    assert unmatched["CG8153", "4-6"] == f"images left out: 1 {bdgp.SKIP_NO_PATH}"
    assert unmatched["CG9786", "13-16"] == f"images left out: 1 {bdgp.SKIP_VIEW}"
    assert unmatched["CG10637", "7-8"] == "no BDGP image of the gene at this stage range"
    assert unmatched["AT12172", "4-6"] == "gene not found in insitu_images.csv"
    assert ("CG8153", "1-3") not in unmatched.index  # stage 1-3 not selected
    assert any("9740, 6 with BDGP images, 9734 without" in r.getMessage() for r in caplog.records)


def test_download_flyit_with_options_keeps_whole_fields_and_drops_terms(site, tmp_path):
    url, s = site
    options = {
        **bdgp_site(url, s),
        "bags_from": "flyit",
        "exclude_path_prefixes": [],
        "exclude_resolutions": [],
        "drop_terms": ["faint ubiquitous", "ubiquitous"],
    }
    out = tmp_path / "out"
    assert download(out, options) == 0
    table = read_tsv(out / "images.tsv")
    assert "CG10637_s6" in set(table["group"])  # the close-up is kept
    assert "faint ubiquitous" not in ";".join(table["labels"])
    record = json.loads((out / "source.json").read_text())
    assert record["flyit_bags_with_images"] == 7 and bdgp.SKIP_HIGH_RES not in record["excluded"]
    # the whole field (no view) is left out by the views, and CG10637 at 9-10 has only the dropped terms
    assert record["excluded"][bdgp.SKIP_VIEW] == 2 and "CG10637_s4" not in set(table["group"])
    unmatched = read_tsv(out / "flyit_unmatched.tsv").set_index(["gene", "stage_range"])["reason"]
    assert unmatched["CG10637", "9-10"] == bdgp.SKIP_NO_LABEL

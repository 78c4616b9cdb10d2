# acquire: every source ends in data/raw/<ds>/images.tsv (+ the image files).

SYNTHETIC = [ds for ds in DATASETS if ds_config(ds)["source"] == "synthetic"]
DOWNLOADED = [ds for ds in DATASETS if ds_config(ds)["source"] != "synthetic"]

localrules:
    download,


rule acquire:
    input:
        expand("data/raw/{ds}/images.tsv", ds=DATASETS),


checkpoint synth:
    output:
        images="data/raw/{ds}/images.tsv",
        boxes="data/raw/{ds}/boxes.tsv",
    wildcard_constraints:
        ds="|".join(SYNTHETIC) or "^$",
    params:
        options=lambda w: cli_options(ds_config(w.ds).get("synthetic")),
    threads: needs("synth")["threads"]
    resources:
        **job_resources("synth"),
    conda:
        "../envs/hamil.yaml"
    log:
        "logs/{ds}/synth.log",
    benchmark:
        "benchmarks/out/{ds}/synth.tsv"
    shell:
        "hamil synth --out data/raw/{wildcards.ds} --workers {threads} {params.options} > {log} 2>&1"


checkpoint download:
    input:
        folder_inputs,  # source: folder: the user's table and images (edits rerun the download)
    output:
        images="data/raw/{ds}/images.tsv",
    wildcard_constraints:
        ds="|".join(DOWNLOADED) or "^$",
    params:
        source=lambda w: ds_config(w.ds)["source"],
        options=lambda w: cli_options(
            {
                **{k: ds_config(w.ds).get(k) for k in ("table", "image_root", "read")},
                "max_bad_fraction": max_bad_fraction(w.ds),
                "options": ds_config(w.ds).get("download"),
            }
        ),
    resources:
        http=1,
    conda:
        "../envs/hamil.yaml"
    log:
        "logs/{ds}/download.log",
    benchmark:
        "benchmarks/out/{ds}/download.tsv"
    shell:
        "hamil download {params.source} --out data/raw/{wildcards.ds} {params.options} > {log} 2>&1"

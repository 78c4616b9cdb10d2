# crop: selective-search cell patches, one Zarr store + table per shard of images.tsv.


rule crop:
    input:
        lambda w: [f"data/interim/{ds}/patches/{k}.tsv" for ds in DATASETS for k in shards(ds)],


rule crop_shard:
    input:
        images="data/raw/{ds}/images.tsv",
    output:
        store=directory("data/interim/{ds}/patches/{shard}.zarr"),
        table="data/interim/{ds}/patches/{shard}.tsv",
    params:
        num_shards=lambda w: len(shards(w.ds)),
        boxes=lambda w: (
            f"--boxes data/raw/{w.ds}/boxes.tsv" if ds_config(w.ds)["source"] == "synthetic" else ""
        ),
        max_bad=lambda w: max_bad_fraction(w.ds),
        options=lambda w: cli_options(crop_options(w.ds)),
    threads: needs("crop")["threads"]
    resources:
        **job_resources("crop"),
    conda:
        "../envs/hamil.yaml"
    log:
        "logs/{ds}/crop_{shard}.log",
    benchmark:
        "benchmarks/out/{ds}/crop_{shard}.tsv"
    shell:
        "hamil crop --images {input.images} --shard {wildcards.shard} --num-shards {params.num_shards}"
        " --out-zarr {output.store} --out-tsv {output.table} {params.boxes} --workers {threads}"
        " --max-bad-fraction {params.max_bad} {params.options} > {log} 2>&1"

# bags: top-K classes, bags of at most max_bag_size patches, group-level split, one Zarr bag store.


rule bags:
    input:
        expand("data/processed/{ds}.zarr", ds=DATASETS),


rule bags_dataset:
    input:
        tables=lambda w: [f"data/interim/{w.ds}/patches/{k}.tsv" for k in shards(w.ds)],
        stores=lambda w: [f"data/interim/{w.ds}/patches/{k}.zarr" for k in shards(w.ds)],
    output:
        store=directory("data/processed/{ds}.zarr"),
        table="data/processed/{ds}/bags.tsv",
    params:
        source=lambda w: ds_config(w.ds)["source"],
        options=lambda w: " ".join(
            (
                # explicit none: `max_bag_size: null` keeps groups whole, not the CLI default
                cli_options(ds_config(w.ds).get("bags", {}), explicit_none=True),
                cli_options({"paper_counts": shipped(ds_config(w.ds).get("paper_counts"))}),
            )
        ),
    threads: needs("bags")["threads"]
    resources:
        **job_resources("bags"),
    conda:
        "../envs/hamil.yaml"
    log:
        "logs/{ds}/bags.log",
    benchmark:
        "benchmarks/out/{ds}/bags.tsv"
    shell:
        "hamil bags --tables {input.tables} --stores {input.stores} --out-store {output.store}"
        " --out-table {output.table} --source {params.source} --workers {threads} {params.options} > {log} 2>&1"

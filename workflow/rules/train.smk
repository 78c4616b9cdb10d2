# train: one job per dataset x model x seed.


rule train:
    input:
        run_dirs("results/{ds}/{model}/seed{seed}/best.pt"),


rule train_model:
    input:
        store="data/processed/{ds}.zarr",
    output:
        best="results/{ds}/{model}/seed{seed}/best.pt",
        last="results/{ds}/{model}/seed{seed}/last.pt",
        history="results/{ds}/{model}/seed{seed}/history.csv",
    params:
        out_dir=subpath(output.best, parent=True),
        launcher=train_launcher,
        options=lambda w: cli_options(
            {
                **config.get("train", {}),
                **ds_config(w.ds).get("train", {}),
                "model_options": config.get("model_options", {}).get(w.model, {}),
            },
            explicit_none=True,  # e.g. patience: null means never stop early, not the default
        ),
    threads: needs("train")["threads"]
    resources:
        **job_resources("train"),
    conda:
        "../envs/hamil.yaml"
    log:
        "logs/{ds}/train_{model}_seed{seed}.log",
    benchmark:
        "benchmarks/out/{ds}/train_{model}_seed{seed}.tsv"
    shell:
        "{params.launcher} train --store {input.store} --out-dir {params.out_dir} --model {wildcards.model}"
        " --seed {wildcards.seed} --threads {threads} {params.options} > {log} 2>&1"

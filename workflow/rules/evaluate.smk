# evaluate, figures and compare.


rule evaluate:
    input:
        run_dirs("results/{ds}/{model}/seed{seed}/metrics.json"),


rule figures:
    input:
        run_dirs("results/{ds}/{model}/seed{seed}/curves.png"),


rule compare:
    input:
        expand("results/{ds}/comparison.md", ds=DATASETS),


rule evaluate_model:
    input:
        checkpoint="results/{ds}/{model}/seed{seed}/best.pt",
        store="data/processed/{ds}.zarr",
    output:
        metrics="results/{ds}/{model}/seed{seed}/metrics.json",
        predictions="results/{ds}/{model}/seed{seed}/predictions.tsv",
        per_class="results/{ds}/{model}/seed{seed}/per_class.tsv",
        instances="results/{ds}/{model}/seed{seed}/instances.tsv",
    params:
        out_dir=subpath(output.metrics, parent=True),
        split=config.get("evaluate", {}).get("split", "test"),
        threshold=config.get("evaluate", {}).get("threshold", 0.5),
        tune_split=config.get("evaluate", {}).get("tune_split", "val"),
    threads: needs("evaluate")["threads"]
    resources:
        **job_resources("evaluate"),
    conda:
        "../envs/hamil.yaml"
    log:
        "logs/{ds}/evaluate_{model}_seed{seed}.log",
    benchmark:
        "benchmarks/out/{ds}/evaluate_{model}_seed{seed}.tsv"
    priority: 20  # before the remaining training jobs: a model's results arrive when it is trained
    shell:
        "hamil evaluate --checkpoint {input.checkpoint} --store {input.store} --out-dir {params.out_dir}"
        " --split {params.split} --threshold {params.threshold} --tune-split {params.tune_split}"
        " --threads {threads} > {log} 2>&1"


rule figures_run:
    input:
        history="results/{ds}/{model}/seed{seed}/history.csv",
        checkpoint="results/{ds}/{model}/seed{seed}/best.pt",
        predictions="results/{ds}/{model}/seed{seed}/predictions.tsv",
        store="data/processed/{ds}.zarr",
        compare=compare_checkpoints,
    output:
        curves=report(
            "results/{ds}/{model}/seed{seed}/curves.png",
            caption="../report/curves.rst",
            category="{ds}",
            subcategory="{model} seed {seed}",
        ),
        roc=report(
            "results/{ds}/{model}/seed{seed}/roc.png",
            caption="../report/roc.rst",
            category="{ds}",
            subcategory="{model} seed {seed}",
        ),
        tsne=report(
            "results/{ds}/{model}/seed{seed}/tsne.png",
            caption="../report/tsne.rst",
            category="{ds}",
            subcategory="{model} seed {seed}",
        ),
        scores=report(
            "results/{ds}/{model}/seed{seed}/instance_scores.png",
            caption="../report/instance_scores.rst",
            category="{ds}",
            subcategory="{model} seed {seed}",
        ),
        svg=multiext("results/{ds}/{model}/seed{seed}/", "curves.svg", "roc.svg", "tsne.svg", "instance_scores.svg"),
    params:
        run_dir=subpath(input.history, parent=True),
        title="{ds} {model} seed {seed}",
        split=config.get("evaluate", {}).get("split", "test"),
        compare=lambda w, input: (
            "--compare-run " + " ".join(str(Path(c).parent) for c in input.compare) if input.compare else ""
        ),
    threads: needs("figures")["threads"]
    resources:
        **job_resources("figures"),
    conda:
        "../envs/hamil.yaml"
    log:
        "logs/{ds}/figures_{model}_seed{seed}.log",
    priority: 10  # after its evaluation, still before the remaining training jobs
    benchmark:
        "benchmarks/out/{ds}/figures_{model}_seed{seed}.tsv"
    shell:
        "hamil figures --run-dir {params.run_dir} --title '{params.title}' --store {input.store}"
        " --split {params.split} --seed {wildcards.seed} --threads {threads} {params.compare} > {log} 2>&1"


rule compare_dataset:
    input:
        metrics=lambda w: expand("results/{ds}/{model}/seed{seed}/metrics.json", ds=w.ds, model=MODELS, seed=SEEDS),
    output:
        tsv=report(
            "results/{ds}/comparison.tsv",
            caption="../report/comparison.rst",
            category="{ds}",
            subcategory="comparison",
        ),
        md="results/{ds}/comparison.md",
    params:
        title=lambda w: f"{w.ds}: {config.get('evaluate', {}).get('split', 'test')} split",
        reference=lambda w: (
            f"--reference {shipped(ds_config(w.ds)['reference'])}" if ds_config(w.ds).get("reference") else ""
        ),
    threads: needs("compare")["threads"]
    resources:
        **job_resources("compare"),
    conda:
        "../envs/hamil.yaml"
    log:
        "logs/{ds}/compare.log",
    benchmark:
        "benchmarks/out/{ds}/compare.tsv"
    shell:
        "hamil compare --metrics {input.metrics} --out-tsv {output.tsv} --out-md {output.md}"
        " --title '{params.title}' {params.reference} > {log} 2>&1"

# Helpers shared by the rules: config lookups and config -> CLI option strings.

import csv
import json
import shlex
from pathlib import Path

from preprocessing.io import DEFAULT_MAX_BAD_FRACTION

DATASETS = list(config["datasets"])
MODELS = list(config["models"])
SEEDS = [int(s) for s in config["seeds"]]
# What one job of each stage needs: threads (local runs and cluster jobs alike, so that a cluster run computes
# what a local run of the same config computes), and what a cluster job asks SLURM for: memory (MB), a time
# limit (minutes), GPUs and their model. The config's `resources:` overrides these, key by key; its
# `max_threads` and `max_mem_mb` cap every job for nodes smaller than the config asks for.
JOB_NEEDS = {
    "synth": {"threads": 2, "mem_mb": 2000, "runtime": 30},
    "crop": {"threads": 2, "mem_mb": 4000, "runtime": 120},
    "bags": {"threads": 2, "mem_mb": 4000, "runtime": 60},
    "train": {"threads": 2, "mem_mb": 8000, "runtime": 720, "gpus": 0},
    "evaluate": {"threads": 2, "mem_mb": 4000, "runtime": 60},
    "figures": {"threads": 2, "mem_mb": 4000, "runtime": 60},
    "compare": {"threads": 1, "mem_mb": 1000, "runtime": 10},
}


def needs(stage: str) -> dict:
    """One stage's job needs: JOB_NEEDS, then the config's `resources.<stage>`, capped by `max_threads` and
    `max_mem_mb`."""
    values = {**JOB_NEEDS[stage], **config.get("resources", {}).get(stage, {})}
    for key, cap in (("threads", "max_threads"), ("mem_mb", "max_mem_mb")):
        if config.get(cap):
            values[key] = min(values[key], int(config[cap]))
    return values


def job_resources(stage: str) -> dict:
    """The `resources:` of a stage's rule: memory, time limit and, for training, GPUs (the SLURM plugin's
    `gpu` and `gpu_model`, sbatch --gpus=[model:]count; the local profile runs one `gpu` job at a time)."""
    values = needs(stage)
    resources = {"mem_mb": values["mem_mb"], "runtime": values["runtime"]}
    if "gpus" in values:
        resources["gpu"] = values["gpus"]
        if values["gpus"] and values.get("gpu_model"):  # the schema refuses a model without GPUs
            resources["gpu_model"] = values["gpu_model"]
    return resources


def compare_checkpoints(wildcards):
    """RAMIL's checkpoint for the same dataset and seed, shown beside HAMIL's instance scores."""
    if wildcards.model == "hamil" and "ramil" in MODELS:
        return [f"results/{wildcards.ds}/ramil/seed{wildcards.seed}/best.pt"]
    return []


def train_launcher(wildcards, resources):
    """`hamil` for one process; `torchrun` with one DDP process per GPU when a job has several."""
    gpus = int(resources.get("gpu", 0) or 0)
    if gpus > 1:
        return f"torchrun --standalone --nproc-per-node {gpus} -m hamil.cli"
    return "hamil"


wildcard_constraints:
    ds="|".join(DATASETS),
    model="|".join(MODELS),
    seed=r"\d+",
    shard=r"\d+",


def ds_config(ds):
    return config["datasets"][ds]


def shipped(path):
    """A relative path from the config (e.g. config/reference/...): in the working directory if it is
    there, else in this workflow's repository (for runs with --directory elsewhere)."""
    if path is None or Path(path).is_absolute() or Path(path).exists():
        return path
    return str(Path(workflow.basedir) / path)


def cli_options(values, explicit_none=False):
    """{'patch_size': 64, 'split_ratio': [4, 1, 5], 'augment': False} -> '--patch-size 64 --split-ratio 4 1 5 --no-augment'.

    None values are left out (the CLI default applies), or passed as `none` with `explicit_none`.
    """
    parts = []
    for key, value in (values or {}).items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, (list, tuple)):
            parts.append(f"--{name} {' '.join(shlex.quote(str(v)) for v in value)}")
        elif isinstance(value, dict):
            parts.append(f"--{name} {shlex.quote(json.dumps(value))}")
        elif value is None:
            if explicit_none:
                parts.append(f"--{name} none")
        else:
            parts.append(f"--{name} {shlex.quote(str(value))}")
    return " ".join(parts)


# The one place that holds per-source crop defaults (config files do not repeat them): sources whose images
# are the instances get no selective search, each image is resized; other sources cut cells with the crop
# stage's defaults (preprocessing.crop.CropParams). A dataset's `crop:` keys override these.
SOURCE_CROP_DEFAULTS = {
    "hpa_paper": {"instances": "whole"},  # the authors' 512x512 patches, already cropped (patch_size 512)
    "bdgp": {"instances": "whole", "whole_size": [180, 320]},  # whole embryos at the paper's 180x320
}



def crop_options(ds):
    """The crop stage's options of a dataset: its source's defaults, then its `crop` config."""
    cfg = ds_config(ds)
    return {**SOURCE_CROP_DEFAULTS.get(cfg["source"], {}), **cfg.get("crop", {})}


def max_bad_fraction(ds):
    """The dataset's `max_bad_fraction` (acquire and crop alike), else the stages' default."""
    return float(ds_config(ds).get("max_bad_fraction", DEFAULT_MAX_BAD_FRACTION))


def folder_inputs(wildcards):
    """A `source: folder` dataset's table and the image files it lists, as inputs of its download job:
    editing a label or replacing an image (a newer file) reruns the download and everything after it.

    Paths are resolved as the folder source resolves them (`~` expanded, relative to `image_root`, else to
    the table's folder). Listed files that do not exist are left out, so the download job itself reports
    them (with max_bad_fraction); one that appears later changes the set of inputs, which reruns it too.
    Other sources have no local inputs.
    """
    cfg = ds_config(wildcards.ds)
    if cfg["source"] != "folder" or not cfg.get("table"):
        return []
    table = Path(cfg["table"]).expanduser()
    root = Path(cfg["image_root"]).expanduser() if cfg.get("image_root") else table.parent
    images = []
    try:
        with open(table, newline="") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                cell = (row.get("path") or "").strip()
                path = Path(cell).expanduser() if cell else None
                if path is not None and not path.is_absolute():
                    path = root / path
                if path is not None and path.is_file():
                    images.append(str(path))
    except (OSError, UnicodeDecodeError, csv.Error):
        pass  # a missing or unreadable table: the download job says what is wrong with it
    return [str(table), *sorted(set(images))]


def shards(ds):
    """Shard indices of a dataset: `shards` from config, or enough for `fields_per_shard` fields each.

    Sizing by `fields_per_shard` reads images.tsv, so the acquire job is a checkpoint: the crop jobs of
    such a dataset appear in the DAG once it has run (a dry run stops at acquire).
    """
    cfg = ds_config(ds)
    if "fields_per_shard" not in cfg:
        return range(int(cfg.get("shards", 1)))
    acquire = checkpoints.synth if cfg["source"] == "synthetic" else checkpoints.download
    images = acquire.get(ds=ds).output.images
    with open(images) as fh:
        fields = max(sum(1 for _ in fh) - 1, 0)  # rows after the header
    return range(max(1, -(-fields // int(cfg["fields_per_shard"]))))


def run_dirs(pattern):
    return expand(pattern, ds=DATASETS, model=MODELS, seed=SEEDS)


def print_comparisons():
    """At the end of a run: what each own data set's files held and what was read of them (read.json),
    then each data set's comparison table."""
    for ds in DATASETS:
        read = Path(f"data/raw/{ds}/read.json")
        if read.is_file():
            try:
                print(f"\n{ds}: read {json.loads(read.read_text()).get('summary', '')}")
            except (OSError, ValueError):
                pass  # a report line only: the crop stage itself refuses an unreadable read.json
    for ds in DATASETS:
        md = Path(f"results/{ds}/comparison.md")
        if md.is_file():
            print(f"\n{ds}: {md}\n{md.read_text()}")


"""The Snakemake workflow: lint, schema errors, dry runs, and an end-to-end run on config/tiny.yaml."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        *args,
    ]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_lint_is_clean(tmp_path):
    proc = snakemake(tmp_path, "--lint", "--configfile", str(REPO / "config/demo.yaml"))
    assert "Congratulations" in proc.stdout + proc.stderr


def test_full_reproduction_dag_dry_run(tmp_path):
    proc = snakemake(tmp_path, "-n", "--configfile", str(REPO / "config/config.yaml"))
    out = proc.stdout + proc.stderr
    for rule in (
        "download",
        "crop_shard",
        "bags_dataset",
        "train_model",
        "evaluate_model",
        "compare_dataset",
    ):
        assert rule in out


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda c: c["train"].update(epochs="two"), "['train']['epochs']"),
        (lambda c: c["train"].update(epoch=2), "'epoch' was unexpected"),
        (lambda c: c.update(models=["hamil", "transformer"]), "'transformer' is not one of"),
        (lambda c: c["datasets"]["tiny"]["crop"].update(backend="sam"), "'sam' is not one of"),
        (lambda c: c.update(resources={"train": {"gpu_model": "a100"}}), "'gpus' is a required property"),
        (
            lambda c: c.update(resources={"train": {"gpus": 0, "gpu_model": "a100"}}),
            "0 is less than the minimum",
        ),
        (
            lambda c: c.update(train_threads=2),
            "'train_threads' was unexpected",
        ),  # now resources.train.threads
    ],
)
def test_config_errors_name_the_key(tmp_path, edit, needle):
    config = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    edit(config)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, "-n", "--configfile", str(bad), check=False)
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr


def _screening_folder(root: Path) -> Path:
    """A user's plate as a folder: 12 wells x 3 fields (PNG, and grey TIFF), wells 0, 3, 6, 9 are hits."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = root / "my_images"
    images.mkdir()
    rows = ["path\tgroup\tlabels"]
    for well in range(12):
        hit = well % 3 == 0
        for field in range(3):
            pixels = rng.integers(0, 60, (40, 56, 3), dtype=np.uint8)
            if hit:
                pixels[10:30, 15:40, 1] = 220  # a bright green blob marks a hit
            name = f"w{well:02d}_f{field}.{'png' if field else 'tif'}"
            Image.fromarray(pixels if field else pixels[:, :, 1]).save(images / name)
            rows.append(f"{name}\twell{well:02d}\t{'hit' if hit else ''}")
    (images / "plate.tsv").write_text("\n".join(rows) + "\n")
    return images / "plate.tsv"


@pytest.mark.slow
def test_end_to_end_tiny(tmp_path):
    """config/tiny.yaml (synthetic fields, cells cut) plus a user's own folder as a second data set: one
    class, negative bags kept, whole images as instances, shards sized by fields through the checkpoint."""
    config = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    del config["datasets"]["tiny"]["shards"]  # shards sized by field count: the acquire job is a checkpoint
    config["datasets"]["tiny"]["fields_per_shard"] = 9
    config["datasets"]["screen"] = {
        "source": "folder",
        "table": str(_screening_folder(tmp_path)),
        "fields_per_shard": 12,
        "crop": {"instances": "whole", "whole_size": [32, 48]},
        "bags": {"classes": ["hit"], "keep_unlabelled": True, "split_ratio": [2, 1, 1]},
    }
    configfile = tmp_path / "e2e.yaml"
    configfile.write_text(yaml.safe_dump(config))
    snakemake(tmp_path, "--cores", "2", "--configfile", str(configfile))
    # the user's folder: a binary screen with negatives, shards sized by fields (36 fields / 12 = 3 shards)
    metrics = json.loads((tmp_path / "results/screen/mean/seed0/metrics.json").read_text())
    assert {"macro_auc", "macro_f1", "micro_f1", "subset_accuracy"} <= set(metrics)
    bags = pd.read_csv(tmp_path / "data/processed/screen/bags.tsv", sep="\t", keep_default_na=False)
    assert len(bags) == 12 and (bags["labels"] == "").sum() == 8
    for ds, per_shard in (("screen", 12), ("tiny", 9)):  # a folder and a synthetic (checkpoint) source
        fields = len(pd.read_csv(tmp_path / f"data/raw/{ds}/images.tsv", sep="\t"))
        patches = tmp_path / f"data/interim/{ds}/patches"
        shards = [s for s in patches.glob("*.tsv") if ".rejected" not in s.name]
        assert len(shards) == -(-fields // per_shard) > 1, ds
    results = tmp_path / "results/tiny"
    table = pd.read_csv(results / "comparison.tsv", sep="\t")
    assert list(table["model"]) == ["hamil", "mean"]
    for model in ("hamil", "mean"):
        run = results / model / "seed0"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["model"] == model and 0 <= metrics["micro_f1"] <= 1
        for name in ("curves", "roc", "tsne", "instance_scores"):
            assert (run / f"{name}.png").read_bytes()[:4] == b"\x89PNG" and (run / f"{name}.svg").is_file()
            assert (run / f"{name}.png").stat().st_size > 5000, name
    md = (results / "comparison.md").read_text()
    assert "| hamil |" in md and "| mean |" in md
    crop_stats = json.loads((tmp_path / "data/interim/tiny/patches/0.json").read_text())
    assert crop_stats["recall"] >= 0.8
    assert (tmp_path / "logs/tiny/train_hamil_seed0.log").is_file()
    # the browsable report: every figure and the comparison table, with captions
    snakemake(tmp_path, "--report", "report.html", "--configfile", str(configfile))
    html = (tmp_path / "report.html").read_text(errors="replace")
    assert len(html) > 100_000
    for needle in ("tsne.png", "instance_scores.png", "roc.png", "curves.png", "comparison.tsv", "tSNE of"):
        assert needle in html, needle
    # nothing left to do; a single stage target and a forced rerun of one job rule are both accepted
    assert "Nothing to be done" in snakemake(tmp_path, "-n", "--configfile", str(configfile)).stdout
    proc = snakemake(tmp_path, "-n", "-R", "train_model", "--configfile", str(configfile))
    assert "train_model" in proc.stdout and "evaluate_model" in proc.stdout
    assert "hamil train --store" in proc.stdout and "torchrun" not in proc.stdout
    # a training job given several GPUs by the config (whatever this machine has) asks for them, typed, and
    # is launched as one DDP process per GPU
    gpus = tmp_path / "gpus.yaml"  # merged over the config
    gpus.write_text("resources: {train: {gpus: 2, gpu_model: a100}}\n")
    proc = snakemake(
        tmp_path,
        *("-n", "-p", "-R", "train_model", "--resources", "gpu=2"),
        *("--configfile", str(configfile), str(gpus)),
    )
    assert "torchrun --standalone --nproc-per-node 2 -m hamil.cli train --store" in proc.stdout
    block = proc.stdout.split("rule train_model:", 1)[1].split("\n\n", 1)[0]
    assert {"gpu=2", "gpu_model=a100", "runtime=720"} <= set(
        block.split("resources: ", 1)[1].split("\n")[0].split(", ")
    )
    proc = snakemake(tmp_path, "bags", "-n", "-R", "bags_dataset", "--configfile", str(configfile))
    assert "bags_dataset" in proc.stdout and "train_model" not in proc.stdout


def test_schema_sections_match_the_parameter_dataclasses():
    """Every stage option in the schema is a field of the stage's dataclass, and the other way round."""
    import dataclasses

    from hamil.config import TrainConfig
    from hamil.models import available
    from preprocessing.bags import BagParams
    from preprocessing.crop import CropParams
    from preprocessing.sources.synthetic import SynthParams

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    defs = schema["$defs"]
    for name, cls in (("synthetic", SynthParams), ("crop", CropParams), ("bags", BagParams)):
        assert set(defs[name]["properties"]) == {f.name for f in dataclasses.fields(cls)}, name
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)} - {
        "store",
        "out_dir",
        "model",
        "seed",
        "model_options",
        "threads",
    }
    assert schema["properties"]["train"] == {"$ref": "#/$defs/train"}  # shared with datasets.<ds>.train
    assert set(defs["train"]["properties"]) == train_keys
    assert schema["properties"]["models"]["items"]["enum"] == available()


def test_a_configfile_replaces_the_full_reproduction(tmp_path):
    """Run from the repository: --configfile must not be merged into config/config.yaml's datasets."""
    cmd = [sys.executable, "-m", "snakemake", "-n", "--configfile", "config/tiny.yaml"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "synth" in proc.stdout and "download" not in proc.stdout


@pytest.mark.skipif(
    importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
    reason="snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')",
)
def test_slurm_profile_dry_run(tmp_path):
    """The SLURM workflow profile (executor plugin installed) plans the full reproduction."""
    proc = snakemake(
        tmp_path,
        "--workflow-profile",
        str(REPO / "profiles/slurm"),
        "-n",
        "--configfile",
        str(REPO / "config/config.yaml"),
    )
    out = proc.stdout + proc.stderr
    assert "train_model" in out and "checkpoint download" in out


def test_the_slurm_profile_leaves_job_needs_to_the_rules():
    """Resource lists in a profile are replaced, not merged, by the README's --default-resources and
    --set-resources: the profile must hold none (and no set-threads, which would change CPU training
    results against a local run); job states come from squeue (sacct hangs without accounting)."""
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    assert not {"default-resources", "set-resources", "set-threads", "resources"} & set(profile)
    assert profile["executor"] == "slurm" and profile["slurm-status-command"] == "squeue"


@pytest.mark.skipif(
    importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
    reason="snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')",
)
@pytest.mark.parametrize(
    ("caps", "threads", "mem_mb"),
    [
        ((), 8, 16000),
        (("--config", "max_threads=2", "max_mem_mb=3000"), 2, 3000),  # the README's one flag for small nodes
        (("--max-threads", "2"), 2, 16000),  # Snakemake's own cap on threads
    ],
)
def test_cluster_jobs_ask_what_the_config_says_or_the_caps_allow(tmp_path, caps, threads, mem_mb):
    """config/config.yaml's crop needs (8 threads, 16 GB, 4 h) reach each job, with the README's command
    line adding the partition; `--config max_threads=N max_mem_mb=M` caps them for smaller nodes."""
    proc = snakemake(
        tmp_path,
        *("--workflow-profile", str(REPO / "profiles/slurm"), "-n", "--cores", "64"),
        *("--default-resources", "slurm_account=ACCOUNT", "slurm_partition=cpu"),
        *("--configfile", str(REPO / "config/config.yaml"), *caps),
    )
    block = proc.stdout.split("rule crop_shard:", 1)[1].split("\n\n", 1)[0]
    assert f"threads: {threads}\n" in block and f"--workers {threads} " in block
    resources = block.split("resources: ", 1)[1].split("\n", 1)[0].split(", ")
    assert {f"mem_mb={mem_mb}", "runtime=240", "slurm_partition=cpu", "slurm_account=ACCOUNT"} <= set(
        resources
    )


def test_edits_to_a_folder_dataset_rerun_its_download(tmp_path):
    """The folder table and the images it lists are inputs of the download job: after a run, editing a
    label or replacing an image makes Snakemake plan the download again (and what depends on it)."""
    from PIL import Image

    images = tmp_path / "mine"
    images.mkdir()
    rows = ["path\tgroup\tlabels"]
    for i in range(4):
        Image.fromarray(np.full((6, 8, 3), 40 * i, np.uint8)).save(images / f"f{i}.png")
        rows.append(f"f{i}.png\tw{i // 2}\t{'hit' if i < 2 else ''}")
    table = images / "plate.tsv"
    table.write_text("\n".join(rows) + "\n")
    config = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    config["datasets"] = {"mine": {"source": "folder", "table": str(table)}}
    configfile = tmp_path / "mine.yaml"
    configfile.write_text(yaml.safe_dump(config))
    snakemake(tmp_path, "acquire", "--cores", "1", "--configfile", str(configfile))
    assert (tmp_path / "data/raw/mine/images.tsv").is_file()

    def updated() -> str:
        """The files a dry run says the download job must rerun for ("" when nothing is to be done)."""
        out = snakemake(tmp_path, "acquire", "-n", "--configfile", str(configfile)).stdout
        if "Nothing to be done" in out:
            return ""
        assert "checkpoint download:" in out, out
        return next(line for line in out.splitlines() if "reason: Updated input files:" in line)

    assert updated() == ""
    table.write_text(table.read_text().replace("f2.png\tw1\t", "f2.png\tw1\thit"))  # a label changed
    assert updated().endswith(f"Updated input files: {table}")
    Image.fromarray(np.full((6, 8, 3), 250, np.uint8)).save(images / "f3.png")  # an image replaced
    assert str(images / "f3.png") in updated()


def _rule_blocks() -> dict[str, str]:
    """Every rule and checkpoint of the workflow: name -> its text (up to the next rule)."""
    import re

    blocks = {}
    for path in [REPO / "Snakefile", *sorted((REPO / "workflow/rules").glob("*.smk"))]:
        parts = re.split(r"^(?:rule|checkpoint) (\w+):\n", path.read_text(), flags=re.MULTILINE)
        blocks.update(dict(zip(parts[1::2], parts[2::2], strict=True)))
    return blocks


def test_every_job_rule_writes_a_benchmark_file():
    """Every rule that runs something (shell, run, script) records its time and memory in benchmarks/."""
    import re

    jobs = {
        name: text
        for name, text in _rule_blocks().items()
        if re.search(r"^    (shell|run|script|notebook|wrapper):", text, re.MULTILINE)
    }
    assert {"download", "synth", "crop_shard", "bags_dataset", "train_model", "evaluate_model"} <= set(jobs)
    assert {"figures_run", "compare_dataset"} <= set(jobs)
    missing = [name for name, text in jobs.items() if not re.search(r"^    benchmark:\n", text, re.MULTILINE)]
    assert not missing, f"rules without benchmark: {missing}"


def test_evaluation_is_scheduled_before_the_remaining_training(tmp_path):
    """A dry run shows evaluate_model and figures_run with a higher priority than train_model, so a model's
    metrics and figures come as soon as it is trained, not after every model."""
    out = snakemake(tmp_path, "-n", "--configfile", str(REPO / "config/tiny.yaml")).stdout
    priority: dict[str, set[int]] = {}
    for job in out.split("\n\n"):
        lines = job.strip().splitlines()
        rule = next(
            (line.split()[-1].rstrip(":") for line in lines if line.startswith(("rule ", "checkpoint "))),
            None,
        )
        if rule is None:
            continue
        values = [int(line.split(":")[1]) for line in lines if line.strip().startswith("priority:")]
        priority.setdefault(rule, set()).add(values[0] if values else 0)
    assert priority["train_model"] == {0}
    for rule in ("evaluate_model", "figures_run"):
        assert min(priority[rule]) > max(priority["train_model"]), rule
    for name in ("evaluate_hamil_seed0", "figures_hamil_seed0", "train_hamil_seed0", "compare"):
        assert f"benchmark: benchmarks/out/tiny/{name}.tsv" in out, name

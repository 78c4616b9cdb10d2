"""A real SLURM cluster (.ci/slurm-up: munge, slurmctld, slurmd on localhost): the README's cluster command,
as written, on config/tiny.yaml. Every job goes through sbatch, the results equal a local run's by content,
the logs lie where the README says, a cancelled job is reported with its SLURM log, and a rerun completes.

Skipped, with the reason, only where SLURM is neither running nor installable (not root, no apt-get)."""

from __future__ import annotations

import csv
import getpass
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_UP = REPO / ".ci" / "slurm-up"
TINY = ["--configfile", "config/tiny.yaml"]
JOB_RULES = 11  # config/tiny.yaml: synth, 2 crop shards, bags, 2 x (train, evaluate, figures), compare
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
        reason="snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')",
    ),
]


@pytest.fixture(scope="module")
def slurm() -> Iterator[None]:
    """A SLURM cluster that answers `srun hostname`: the machine's own, or one started by .ci/slurm-up
    (and stopped again afterwards)."""
    if subprocess.run(["bash", str(SLURM_UP), "status"], capture_output=True).returncode == 0:
        yield
        return
    if os.geteuid() != 0 and shutil.which("srun") is None:
        pytest.skip("SLURM is not running and installing it needs root (.ci/slurm-up)")
    if shutil.which("srun") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not running and this machine has no apt-get to install it (.ci/slurm-up)")
    proc = subprocess.run(["bash", str(SLURM_UP), "start"], capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:  # .ci/slurm-up: cannot be installed or started here, said why
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr
    yield
    subprocess.run(["bash", str(SLURM_UP), "stop"], capture_output=True, timeout=120)


def readme_cluster_command() -> list[str]:
    """The README's cluster command for a cluster without accounts, as the README writes it."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "README.md").read_text())
    lines = [line.strip() for line in text.splitlines() if "--slurm-no-account" in line]
    commands = [line for line in lines if line.startswith("snakemake --workflow-profile profiles/slurm")]
    assert len(commands) == 1, commands
    return shlex.split(commands[0])[1:]


def run_snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`snakemake ARGS --directory WORKDIR` from the repository (where the README's command is typed)."""
    cmd = [sys.executable, "-m", "snakemake", *args, "--directory", str(workdir)]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)


def submitted(output: str) -> dict[str, Path]:
    """SLURM job id -> its SLURM log, for every job the plugin says it submitted."""
    return {jobid: Path(log) for jobid, log in SUBMITTED.findall(output)}


def squeue_jobs(jobids: list[str]) -> dict[str, tuple[str, ...]]:
    """SLURM's own view: job id -> (state, partition, CPUs, memory, time limit); squeue keeps finished jobs
    for MinJobAge (300 s by default)."""
    out = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--format=%i|%T|%P|%C|%m|%l", "--jobs", ",".join(jobids)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.split("|")[0]: tuple(line.split("|")[1:]) for line in out.split()}


def without_timings(path: Path) -> object:
    """A result file's content, wall-clock fields left out: JSON keys and CSV/TSV columns named `seconds`,
    and in a checkpoint the history's seconds (tensors compared exactly, by their bytes)."""
    if path.suffix == ".json":
        return _drop_seconds(json.loads(path.read_text()))
    if path.name == "history.csv":
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
    if path.suffix == ".pt":
        from hamil.checkpoint import read_payload

        return _drop_seconds(_plain(read_payload(path)))
    return path.read_bytes()


def _drop_seconds(value: object) -> object:
    """``value`` without its ``seconds`` entries, at any depth."""
    if isinstance(value, dict):
        return {k: _drop_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list | tuple):
        return [_drop_seconds(v) for v in value]
    return value


def _plain(value: object) -> object:
    """Tensors as (dtype, shape, SHA-256 of their bytes): equal exactly when the tensors are."""
    import hashlib

    import torch

    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return (str(value.dtype), tuple(value.shape), hashlib.sha256(data).hexdigest())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def result_files(root: Path) -> list[Path]:
    """Every file a run writes under data/ and results/, but the figures' pixels (fonts, renderer)."""
    files = [p for d in ("data", "results") for p in (root / d).rglob("*") if p.is_file()]
    return sorted(p.relative_to(root) for p in files if p.suffix not in (".png", ".svg"))


def assert_same_results(local: Path, cluster: Path) -> None:
    """The same result files in both runs, equal by content but for wall-clock timings."""
    names = result_files(local)
    assert names == result_files(cluster)
    assert any(n.name == "best.pt" for n in names) and any(n.name == "metrics.json" for n in names)
    different = [str(n) for n in names if without_timings(local / n) != without_timings(cluster / n)]
    assert not different, different


def test_the_readme_cluster_command_runs_on_a_real_slurm(slurm, tmp_path):
    """The README's command on tiny.yaml: every job through sbatch with the needs the config gives it, the
    results of a local run, logs where the README says; then a cancelled job, and a rerun that resumes."""
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    local.mkdir(), cluster.mkdir()
    reference = subprocess.Popen(  # the same config run locally, meanwhile (the jobs mostly wait on polls)
        [sys.executable, "-m", "snakemake", "--cores", "2", *TINY, "--directory", str(local)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    command = readme_cluster_command()
    proc = run_snakemake(cluster, *command, *TINY)
    _, local_err = reference.communicate(timeout=900)
    assert reference.returncode == 0, local_err[-3000:]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]

    # every job went through sbatch: the plugin's word for it, and SLURM's (all COMPLETED, none elsewhere)
    jobs = submitted(out)
    assert len(jobs) == JOB_RULES, out[-3000:]
    seen = squeue_jobs(list(jobs))
    assert sorted(seen) == sorted(jobs) and {v[0] for v in seen.values()} == {"COMPLETED"}, seen
    # what each job asked for: the rules' needs from the config (tiny.yaml: max_mem_mb 2000, one training
    # thread; JOB_NEEDS' time limits), the partitions from the command line
    asked = {log.parent.parent.name: seen[jobid][1:] for jobid, log in jobs.items()}
    assert asked["rule_train_model"] == ("gpu", "1", "2000M", "12:00:00")
    assert asked["rule_crop_shard"] == ("cpu", "2", "2000M", "2:00:00")
    assert "localrule" not in out.replace("localrule all:", "")

    # logs where the README says: each rule's own, and SLURM's per job
    for jobid, log in jobs.items():
        assert log.is_relative_to(cluster / ".snakemake/slurm_logs") and log.name == f"{jobid}.log", log
        assert log.is_file(), log
    assert (cluster / "logs/tiny/train_hamil_seed0.log").read_text().count("epoch") >= 2
    assert_same_results(local, cluster)

    # a running training job cancelled: reported (not waited on for ever) with its SLURM log
    _cancel_a_training_job(cluster, command)
    # then the same command again completes and resumes: only what the cancelled job took with it is redone
    proc = run_snakemake(cluster, *command, *TINY)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    redone = sorted((log.parent.parent.name, log.parent.name) for log in submitted(out).values())
    assert redone == [
        ("rule_compare_dataset", "tiny"),
        ("rule_evaluate_model", "tiny_hamil_0"),
        ("rule_figures_run", "tiny_hamil_0"),
        ("rule_train_model", "tiny_hamil_0"),
    ], out[-3000:]
    assert_same_results(local, cluster)


def _cancel_a_training_job(workdir: Path, command: list[str]) -> None:
    """Rerun hamil's training for many epochs, `scancel` it once it trains, and check the report."""
    longer = workdir / "longer.yaml"  # merged over tiny.yaml (--config would pass the numbers as strings)
    longer.write_text("train: {epochs: 100000, patience: null}\n")
    target = "results/tiny/hamil/seed0/best.pt"
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        *command,
        *TINY,
        str(longer),
        "--directory",
        str(workdir),
        target,
    ]
    log = workdir / "logs/tiny/train_hamil_seed0.log"
    before = log.stat().st_mtime
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    jobid = None
    try:
        jobid = _wait_for_training(log, before, proc)
        subprocess.run(["scancel", jobid], check=True)
        out, _ = proc.communicate(timeout=300)  # the plugin polls squeue: seconds, not for ever
    finally:  # whatever failed above: no snakemake and no 100000-epoch job left behind
        if proc.poll() is None:
            proc.terminate()  # Snakemake cancels its SLURM jobs on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if jobid is not None:
            subprocess.run(["scancel", jobid], capture_output=True)
    assert proc.returncode != 0, out[-3000:]
    assert time.monotonic() - started < 300
    slurm_log = submitted(out)[jobid]
    assert f"SLURM-job '{jobid}' failed, SLURM status is: 'CANCELLED'" in out, out[-3000:]
    assert str(slurm_log) in out.split("Error in rule train_model:")[1] and slurm_log.is_file()
    assert not (workdir / target).exists()  # a cancelled job's outputs are not taken for finished ones


def _wait_for_training(log: Path, before: float, proc: subprocess.Popen) -> str:
    """The SLURM job id of the training job, once its log shows a finished epoch."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"snakemake ended before its training job was cancelled: {proc.stdout.read()}"
            )
        if log.is_file() and log.stat().st_mtime > before and "epoch 2:" in log.read_text(errors="replace"):
            running = subprocess.run(
                ["squeue", "--noheader", "--states=RUNNING", "--format=%i|%P", f"--user={getpass.getuser()}"],
                capture_output=True,
                text=True,
            ).stdout.split()
            gpu_jobs = [line.split("|")[0] for line in running if line.endswith("|gpu")]
            assert len(gpu_jobs) == 1, running  # the training job, in the partition the README names
            return gpu_jobs[0]
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"the training job did not start training within 4 minutes: {proc.stdout.read()}")

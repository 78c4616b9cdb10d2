"""Every command the README shows runs as written: Snakemake command lines in dry-run mode, ``hamil``
command lines through the argument parser (placeholders filled in). A documented command that breaks fails
here, not in a user's terminal."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hamil.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _commands(program: str) -> list[str]:
    """Command lines starting with ``program``: in code blocks (with ``\\`` continuations) and inline."""
    found = []
    for language, block in re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S):
        if language in ("", "bash", "sh"):
            found += _lines(block, program)
    indented = "\n".join(line[4:] for line in README.splitlines() if line.startswith("    "))
    found += _lines(indented, program)
    found += [m for m in re.findall(r"`([^`\n]+)`", README) if m.startswith(program + " ")]
    return list(dict.fromkeys(found))


def _lines(text: str, program: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [line.split("  #")[0].strip() for line in joined.splitlines()]
    steps = [step.strip() for line in lines for step in line.split(" && ")]  # `a && b`: both commands
    return [step for step in steps if step.startswith(program + " ")]


def _skip_reason(command: str) -> str | None:
    if "…" in command or "<" in command:
        return "a placeholder, not a command"
    if "--report" in command:
        return "needs a finished run (the end-to-end test makes one)"
    if any(name in command for name in _named_blocks()):
        return "uses the files of the own-data example (test_the_own_data_walkthrough_runs_as_written)"
    if "--sdm conda" in command:
        return "builds conda environments"
    if "profiles/slurm" in command and importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "the SLURM executor plugin is not installed"
    return None


SNAKEMAKE = _commands("snakemake")
HAMIL = [c for c in _commands("hamil") if " -" in c]  # not the mentions of a stage by name


def test_the_readme_shows_commands():
    assert len(SNAKEMAKE) >= 6 and len(HAMIL) >= 4, (SNAKEMAKE, HAMIL)


@pytest.mark.parametrize("command", SNAKEMAKE)
def test_snakemake_commands_run_as_written_in_dry_run(command):
    reason = _skip_reason(command)
    if reason:
        pytest.skip(reason)
    args = shlex.split(command)[1:]
    if "-n" not in args:
        args.append("-n")  # after the command's own arguments: exactly as typed, then dry-run
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


@pytest.mark.parametrize("command", HAMIL)
def test_hamil_commands_parse_as_written(command):
    if "…" in command or "<" in command:
        pytest.skip("a placeholder, not a command")
    parts = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split("|")[0], command)  # optional parts: first
    args = shlex.split(parts)[1:]
    if "--help" in args:
        proc = subprocess.run([sys.executable, "-m", "hamil.cli", *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return
    build_parser().parse_args(args)  # an unknown option or a missing required one exits here


def _named_blocks() -> dict[str, str]:
    """Code blocks whose first line is ``# <relative path>``: files the README asks the user to write."""
    blocks = {}
    for language, body in re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S):
        first, _, rest = body.partition("\n")
        if language not in ("yaml", "tsv"):
            continue
        if first.startswith("# ") and "/" not in first[2:].split()[0][:1]:
            blocks[first[2:].strip()] = rest
    return blocks


def test_the_own_data_walkthrough_runs_as_written(tmp_path):
    """The own-data example: its table and config written as shown (images made up to match the table),
    then its snakemake command, as written plus a dry run, plans every stage; its hamil commands parse."""
    from PIL import Image

    blocks = _named_blocks()
    assert {"my_screen/plate.tsv", "my_screen.yaml"} <= set(blocks), sorted(blocks)
    for name, text in blocks.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    for line in blocks["my_screen/plate.tsv"].splitlines()[1:]:
        image = tmp_path / "my_screen" / line.split("\t")[0]
        Image.new("RGB", (64, 48), (10, 200, 30)).save(image)
    command = next(c for c in SNAKEMAKE if "my_screen.yaml" in c)
    args = [*shlex.split(command)[1:], "-n", "-s", str(REPO / "Snakefile")]
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint download" in proc.stdout  # the rest of the DAG follows the acquire checkpoint

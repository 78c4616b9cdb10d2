"""Packaging and CLI: environment.yml agrees with pyproject.toml, every stage exists, errors are one line."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.models import resnet18

from hamil.cli import build_parser, main
from hamil.models.backbone import Backbone
from preprocessing.errors import InputError

REPO = Path(__file__).resolve().parents[1]
STAGES = ("synth", "download", "crop", "bags", "train", "evaluate", "figures", "compare", "predict")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = {_name(r) for r in project["dependencies"]}
    env = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    conda = {_name(d) for d in env if isinstance(d, str)}
    pip = {
        _name(d) for block in env if isinstance(block, dict) for d in block["pip"] if not d.startswith("-e")
    }
    assert required <= (conda | pip) - {"python", "pip"}, required - conda - pip
    # and the other way: whatever the conda environment adds is a pip extra too, so that
    # `pip install -e ".[dev]"` gives the same tools (the SLURM plugin was once only in environment.yml)
    extras = {_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    assert (conda | pip) - {"python", "pip"} <= required | extras, (conda | pip) - required - extras
    assert {"snakemake-executor-plugin-slurm", "tensorboard"} <= _dev_closure(project)
    assert any(str(d).startswith("python=3.11") for d in env)
    assert yaml.safe_load((REPO / "workflow/envs/hamil.yaml").read_text())["dependencies"][:-1] == env[:-1]


def _dev_closure(project: dict) -> set[str]:
    """Package names the ``dev`` extra installs, following self-references such as ``hamil[slurm]``."""
    extras, names, todo = project["optional-dependencies"], set(), ["dev"]
    while todo:
        for req in extras[todo.pop()]:
            if _name(req) == project["name"]:
                todo.extend(re.search(r"\[(.*)\]", req).group(1).split(","))
            else:
                names.add(_name(req))
    return names


def test_every_stage_is_a_subcommand():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(STAGES) <= set(sub.choices)


def test_console_script_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "hamil.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert all(stage in proc.stdout for stage in STAGES)


def test_preprocessing_never_imports_torch():
    modules = "preprocessing.bags, preprocessing.crop, preprocessing.store, preprocessing.sources.synthetic"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ('{"base_urll": "http://x"}', "unknown BdgpOptions option(s): base_urll; valid: "),
        ("{not json", "--options is not valid JSON"),
        ("[1, 2]", "--options must be a JSON object"),
        ('{"min_interval": "fast"}', 'BdgpOptions option min_interval: expected a number, got "fast"'),
        ('{"base_url": 5}', "BdgpOptions option base_url: expected a string, got 5"),
    ],
)
def test_download_options_are_checked(tmp_path, capsys, options, needle):
    # no retries: the error is the same after the back-off, which would only add seconds here
    assert main(["download", "bdgp", "--out", str(tmp_path), "--options", options, "--retries", "0"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_download_a_source_that_cannot_be_reached_fails_with_the_url(tmp_path, capsys):
    options = '{"base_url": "http://127.0.0.1:9", "min_interval": 0}'  # port 9: nothing listens
    # no retries: the error is the same after the back-off, which would only add seconds here
    assert main(["download", "bdgp", "--out", str(tmp_path), "--options", options, "--retries", "0"]) == 2
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9/" in err and err.count("\n") == 1


def test_crop_with_a_bad_images_table_is_one_line(tmp_path, capsys):
    table = tmp_path / "images.tsv"
    table.write_text("image_id\tpath\nA\ta.png\n")
    out = ["--out-zarr", str(tmp_path / "0.zarr"), "--out-tsv", str(tmp_path / "0.tsv")]
    assert main(["crop", "--images", str(table), *out]) == 2
    err = capsys.readouterr().err
    assert err == f"hamil crop: error: {table}: missing columns: group, labels\n"
    assert not (tmp_path / "0.zarr").exists() and not (tmp_path / "0.tsv").exists()


def test_pretrained_weights_from_a_local_file(tmp_path):
    torch.manual_seed(3)
    reference = resnet18()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    backbone = Backbone(str(tmp_path / "resnet18.pth"))
    torch.testing.assert_close(backbone.trunk[0].weight, reference.conv1.weight)
    torch.testing.assert_close(backbone.trunk[7][1].conv2.weight, reference.layer4[1].conv2.weight)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a ResNet18 state_dict"):
        Backbone(str(tmp_path / "other.pth"))
    with pytest.raises(InputError, match="weights file not found"):
        Backbone(str(tmp_path / "missing.pth"))


def test_only_input_errors_are_one_line(monkeypatch, capsys):
    """An InputError is one line and exit 2; with -v it shows its traceback; any other error (an internal
    ValueError is a bug) always propagates with its traceback."""
    from hamil import stages

    def broken(params):
        raise ValueError("internal bug")

    monkeypatch.setitem(stages.STAGES, "compare", stages.STAGES["compare"]._replace(run=broken))
    args = ["compare", "--metrics", "m.json", "--out-tsv", "c.tsv", "--out-md", "c.md"]
    with pytest.raises(ValueError, match="internal bug"):
        main(args)
    assert (
        main(["evaluate", "--checkpoint", "x.pt", "--store", "s", "--out-dir", "o", "--threshold", "2"]) == 2
    )
    assert capsys.readouterr().err == "hamil evaluate: error: invalid option(s): threshold=2.0\n"
    with pytest.raises(InputError, match="threshold=2.0"):
        main(["-v", "evaluate", "--checkpoint", "x.pt", "--store", "s", "--out-dir", "o", "--threshold", "2"])


def test_every_option_of_every_stage_has_help_and_shows_its_default():
    """The help text and default of each option come from the parameter dataclasses' field metadata."""
    import dataclasses

    from hamil.stages import STAGES

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, stage in STAGES.items():
        actions = {a.dest: a for a in sub.choices[name]._actions if a.dest != "help"}
        for cls in stage.params:
            for f in dataclasses.fields(cls):
                action = actions[f.name]
                assert action.help and len(action.help.splitlines()) == 1, (name, f.name)
                if f.default is not dataclasses.MISSING and f.default not in (None, ""):
                    assert "(default: " in action.help, (name, f.name, action.help)
    text = subprocess.run(
        [sys.executable, "-m", "hamil.cli", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "Adam learning rate (the paper: 1e-4) (default: 0.0001)" in " ".join(text.split())


def test_none_for_optional_tuples_and_empty_or_missing_lists():
    """``--whole-size none`` is the default None (not ``(None,)``); ``--cytoplasm-channels`` may be given
    empty (nuclei only); ``--classes`` needs a value (empty would silently fall back to top_k)."""
    from hamil.cli import _instance
    from preprocessing.crop import CropParams

    crop = ["crop", "--images", "x", "--out-zarr", "z", "--out-tsv", "t"]
    args = build_parser().parse_args([*crop, "--whole-size", "none", "--cytoplasm-channels"])
    params = _instance(CropParams, args)
    assert params.whole_size is None and params.cytoplasm_channels == ()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bags", "--tables", "a", "--stores", "b", "--out-store", "c",
                                   "--out-table", "d", "--classes"])  # fmt: skip
    with pytest.raises(SystemExit):
        build_parser().parse_args(["crop-preview", "--out", "p.png"])  # no field


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_subcommand_help_renders(stage, capsys):
    """argparse formats help texts with ``%``: a literal one in a help (``+-20 %``) must not crash it."""
    with pytest.raises(SystemExit) as exit_:
        main([stage, "--help"])
    assert exit_.value.code == 0
    assert f"usage: hamil {stage}" in capsys.readouterr().out


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    """SIGINT during a long stage (a training run) ends it with one line and exit status 130."""
    import signal
    import time

    from conftest import make_store

    store = make_store(tmp_path, patch=16)
    cmd = [
        sys.executable,
        "-m",
        "hamil.cli",
        "train",
        "--store",
        str(store),
        "--out-dir",
        str(tmp_path / "run"),
    ]
    cmd += ["--model", "mean", "--epochs", "1000", "--threads", "1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (tmp_path / "run" / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # training is under way once the first epoch's checkpoint is there
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and err.splitlines()[-1] == "hamil train: interrupted"

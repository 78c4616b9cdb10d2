"""Training, evaluation and figures through the CLI on a tiny bag store; checkpoint errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from hamil.checkpoint import load_checkpoint
from hamil.cli import main


@pytest.fixture
def store(small_store):
    """The session's tiny store (3 classes; read-only)."""
    return small_store


@pytest.mark.parametrize("model", ["hamil", "mean"])
def test_train_evaluate_figures(tmp_path, store, model):
    run = tmp_path / model
    args = [
        "--store",
        str(store),
        "--out-dir",
        str(run),
        "--model",
        model,
        "--epochs",
        "2",
        "--batch-bags",
        "4",
        "--max-instances",
        "5",
        "--lr",
        "1e-3",
        "--threads",
        "1",
    ]
    assert main(["train", *args]) == 0
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [1, 2] and history["train_loss"].notna().all()
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["config"].model == model and ckpt["class_names"]
    assert (
        main(["evaluate", "--checkpoint", str(run / "best.pt"), "--store", str(store), "--out-dir", str(run)])
        == 0
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"macro_auc", "macro_f1", "micro_f1"} <= set(metrics) and metrics["model"] == model
    assert metrics["tuned"]["on"] == "val" and len(metrics["tuned"]["thresholds"]) == 3
    preds = pd.read_csv(run / "predictions.tsv", sep="\t")
    assert len(preds) == metrics["bags"] and preds.filter(like="p_").shape[1] == 3
    assert main(["figures", "--run-dir", str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_is_reproducible_for_a_seed(tmp_path, store):
    def run(name):
        main(
            [
                "train",
                "--store",
                str(store),
                "--out-dir",
                str(tmp_path / name),
                "--model",
                "hamil",
                "--epochs",
                "1",
                "--batch-bags",
                "4",
                "--max-instances",
                "5",
                "--threads",
                "1",
                "--seed",
                "7",
            ]
        )
        return load_checkpoint(tmp_path / name / "last.pt")["model"]

    a, b = run("a"), run("b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_errors_are_one_line(tmp_path, store, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert (
        main(["evaluate", "--checkpoint", str(bad), "--store", str(store), "--out-dir", str(tmp_path)]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("hamil evaluate: error:") and "bad.pt" in err and "\n" not in err
    torch.save({"format": "something else"}, bad)
    assert (
        main(["evaluate", "--checkpoint", str(bad), "--store", str(store), "--out-dir", str(tmp_path)]) == 2
    )
    assert "not a HAMIL checkpoint" in capsys.readouterr().err


def test_unknown_model_and_option_are_named(tmp_path, store, capsys):
    base = ["train", "--store", str(store), "--out-dir", str(tmp_path / "r"), "--epochs", "1"]
    assert main([*base, "--model", "nope"]) == 2
    assert "valid names: attention, deepmiml, gated_attention, hamil" in capsys.readouterr().err
    assert main([*base, "--model", "mean", "--model-options", '{"depth": 2}']) == 2
    assert "has no option(s) depth" in capsys.readouterr().err


def test_schedules(tmp_path):
    from hamil.config import TrainConfig
    from hamil.train import make_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    for schedule, kind in (("constant", type(None)), ("cosine", torch.optim.lr_scheduler.CosineAnnealingLR)):
        opt = torch.optim.Adam([param], lr=1.0)
        sched = make_scheduler(TrainConfig("s", "o", epochs=4, schedule=schedule), opt)
        assert isinstance(sched, kind)
        for _ in range(4):
            opt.step()
            if sched is not None:
                sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(1.0 if schedule == "constant" else 0.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"invalid training option\(s\): schedule='linear'"):
        TrainConfig("s", "o", schedule="linear")
    with pytest.raises(ValueError, match=r"jitter=1\.5, patience=0"):
        TrainConfig("s", "o", jitter=1.5, patience=0)


def test_evaluate_writes_instance_scores_in_one_pass(tmp_path, trained_runs, monkeypatch):
    """``instances.tsv`` beside the predictions: every instance of every evaluated bag with its image and
    box from the store and the score of ``MILModel.explain``, from the same single pass as the
    probabilities (no second pass over the split; with ``--tune-split none`` no other pass at all)."""
    import numpy as np

    import hamil.evaluate as ev
    from hamil.checkpoint import model_from_checkpoint
    from hamil.data import BagDataset, make_loader
    from hamil.inference import explain_batches
    from hamil.tables import INSTANCE_COLUMNS
    from preprocessing.store import BagStore

    store_path, runs = trained_runs
    run = runs["hamil"]
    preds = pd.read_csv(run / "predictions.tsv", sep="\t", keep_default_na=False)
    inst = pd.read_csv(run / "instances.tsv", sep="\t", keep_default_na=False)
    assert list(inst.columns) == list(INSTANCE_COLUMNS)
    assert len(inst) == preds["n_instances"].sum()
    sizes = inst.groupby("bag_id", sort=False)["instance"].agg(["min", "max", "size"])
    assert list(sizes.index) == list(preds["bag_id"])
    assert (sizes["min"] == 0).all() and (sizes["max"] + 1 == sizes["size"]).all()
    store = BagStore(store_path)
    bags = store.bags_in("test")
    assert list(store.bag_id[bags]) == list(preds["bag_id"])
    for k, bag in enumerate(bags[:3]):
        source, box = store.instance_info(int(bag))
        rows = inst[inst["bag_id"] == store.bag_id[bag]]
        assert list(rows["source_image"]) == [str(s) for s in source]
        np.testing.assert_array_equal(rows[["x0", "y0", "x1", "y1"]].to_numpy(), box)
        assert (rows["group"] == store.group[bag]).all(), k
    ckpt = load_checkpoint(run / "best.pt")
    model = model_from_checkpoint(ckpt, torch.device("cpu"))
    explained = explain_batches(model, make_loader(BagDataset(store, bags), 8, False, 0), torch.device("cpu"))
    np.testing.assert_allclose(inst["score"], explained.instance_scores, atol=1e-5)
    # one pass: explain only, the probabilities and the loss come with it
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return explain_batches(*args, **kwargs)

    def refused(*args, **kwargs):
        raise AssertionError("a second pass over the data")

    monkeypatch.setattr(ev, "explain_batches", counted)
    monkeypatch.setattr(ev, "predict_batches", refused)
    out = tmp_path / "again"
    args = ["--checkpoint", str(run / "best.pt"), "--store", str(store_path), "--out-dir", str(out)]
    assert main(["evaluate", *args, "--tune-split", "none"]) == 0
    assert calls == [1]
    again = json.loads((out / "metrics.json").read_text())
    first = json.loads((run / "metrics.json").read_text())
    assert again["macro_auc"] == pytest.approx(first["macro_auc"]) and "tuned" not in again
    assert again["loss"] == pytest.approx(first["loss"], rel=1e-5)
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "instances.tsv", sep="\t"), pd.read_csv(run / "instances.tsv", sep="\t")
    )

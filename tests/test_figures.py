"""Figures of a run: every file exists as PNG and SVG, the tSNE has one point per bag of the split, the
instance-score panel shows a second model's scores, and the output is byte-identical for a seed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from hamil.cli import main
from hamil.data import BagDataset, make_loader
from hamil.figures import _explain
from hamil.inference import explain_batches
from hamil.plots import embed_2d, first_labels, plot_tsne
from preprocessing.store import BagStore

PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ("curves", "roc", "tsne", "instance_scores")


@pytest.fixture(scope="module")
def runs(trained_runs):
    """The session's store and its HAMIL and RAMIL runs, evaluated on the test split."""
    return trained_runs


def _draw(store, run, other):
    args = [
        "figures",
        "--run-dir",
        str(run),
        "--store",
        str(store),
        "--compare-run",
        str(other),
        "--seed",
        "1",
    ]
    assert main(args) == 0
    return {
        f"{name}.{fmt}": (run / f"{name}.{fmt}").read_bytes() for name in FIGURES for fmt in ("png", "svg")
    }


def test_every_figure_is_written_and_deterministic(runs):
    store, run = runs
    first = _draw(store, run["hamil"], run["ramil"])
    for name, data in first.items():
        assert len(data) > 5000, name
        assert data.startswith(PNG) if name.endswith(".png") else data.lstrip().startswith(b"<?xml"), name
    again = _draw(store, run["hamil"], run["ramil"])
    digest = {k: hashlib.sha256(v).hexdigest() for k, v in first.items()}
    assert digest == {k: hashlib.sha256(v).hexdigest() for k, v in again.items()}
    svg = first["instance_scores.svg"].decode()
    assert "HAMIL" in svg and "RAMIL" in svg  # both models' scores in the titles


def test_tsne_has_one_point_per_bag_of_the_split(runs, tmp_path):
    store_path, run = runs
    store = BagStore(store_path)
    test_bags = store.bags_in("test")
    _, kind, explained = _explain(run["hamil"] / "best.pt", store, test_bags, torch.device("cpu"), 8)
    assert kind.startswith("cosine similarity")
    assert list(explained.bags) == list(test_bags)
    n_inst, n_bags = plot_tsne(explained, store.class_names, tmp_path / "t.png", seed=0)
    assert n_bags == len(test_bags) and n_inst == int(store.bag_sizes()[test_bags].sum())


def test_explained_scores_are_cosine_similarities(runs):
    from hamil.checkpoint import load_checkpoint, model_from_checkpoint

    store_path, run = runs
    store = BagStore(store_path)
    model = model_from_checkpoint(load_checkpoint(run["hamil"] / "best.pt"), torch.device("cpu"))
    ex = explain_batches(
        model, make_loader(BagDataset(store, store.bags_in("val")), 4, False, 0), torch.device("cpu")
    )
    inst, bag = ex.instance_features, ex.bag_features[ex.instance_bag]
    cos = (inst * bag).sum(1) / (np.linalg.norm(inst, axis=1) * np.linalg.norm(bag, axis=1))
    np.testing.assert_allclose(ex.instance_scores, cos, rtol=1e-4, atol=1e-5)


def test_embedding_and_colours_on_small_inputs():
    x = np.random.default_rng(0).normal(size=(3, 5))
    assert embed_2d(x, 0).shape == (3, 2) and embed_2d(x[:1], 0).shape == (1, 2)
    np.testing.assert_array_equal(embed_2d(np.tile(x, (4, 1)), 0), embed_2d(np.tile(x, (4, 1)), 0))
    assert first_labels(np.array([[0, 1, 1], [0, 0, 0]]), ["a", "b", "c"]) == ["b", "none"]


def test_ramil_scores_beside_hamil_do_not_depend_on_the_batch(runs):
    """RAMIL's evaluation order is drawn per bag, so the few bags of the figure get the scores (and
    predictions) they have in the full evaluation."""
    store_path, run = runs
    store = BagStore(store_path)
    bags = store.bags_in("test")
    cpu = torch.device("cpu")
    _, _, full = _explain(run["ramil"] / "best.pt", store, bags, cpu, 8)
    _, _, alone = _explain(run["ramil"] / "best.pt", store, bags[[2, 0]], cpu, 1)
    for k, pos in enumerate([2, 0]):
        np.testing.assert_allclose(
            alone.instance_scores[alone.instance_bag == k],
            full.instance_scores[full.instance_bag == pos],
            rtol=1e-5,
        )
        np.testing.assert_allclose(alone.probs[k], full.probs[pos], rtol=1e-5)


def test_comparing_the_same_run_twice_is_an_error(runs, capsys):
    store, run = runs
    args = ["figures", "--run-dir", str(run["hamil"]), "--store", str(store), "--bags", "1"]
    assert main([*args, "--compare-run", str(run["ramil"]), str(run["ramil"])]) == 2
    assert "compared twice" in capsys.readouterr().err
    assert main([*args, "--bags", "0"]) == 2


def test_constant_features_embed_without_crashing():
    assert np.array_equal(embed_2d(np.zeros((6, 4)), 0), np.zeros((6, 2)))

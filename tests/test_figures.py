"""Figures of a run: every file exists as PNG and SVG, the tSNE has one point per bag of the split, the
instance-score panel shows a second model's scores, and the output is byte-identical for a seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
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


# ---- figures that tell the truth (issue 14, point 7) ------------------------------------------------------


def _copy_run(run, dest):
    """A private copy of a session run (the figures stage writes into the run folder)."""
    import shutil

    return Path(shutil.copytree(run, dest))


def _instance_table(store, run, *extra):
    args = ["figures", "--run-dir", str(run), "--store", str(store), *extra]
    assert main(args) == 0
    return pd.read_csv(run / "instance_scores.tsv", sep="\t", keep_default_na=False)


def test_instance_figure_shows_the_lowest_and_highest_of_every_bag(runs, tmp_path):
    store_path, run = runs
    run = _copy_run(run["hamil"], tmp_path / "hamil")
    store = BagStore(store_path)
    table = _instance_table(store_path, run, "--split", "train", "--bags", "5", "--instances", "2")
    bags = store.bags_in("train")
    _, _, explained = _explain(run / "best.pt", store, bags, torch.device("cpu"), 8)
    ids = [str(store.bag_id[b]) for b in explained.bags]
    assert table["bag"].nunique() == 5
    cut = 0
    for bag, shown in table.groupby("bag", sort=False):
        scores = explained.instance_scores[explained.instance_bag == ids.index(bag)]
        assert shown["bag_instances"].iloc[0] == len(scores) >= 2
        assert len(shown) == 2  # the highest and the lowest, nothing else
        assert shown["score"].max() == pytest.approx(scores.max(), abs=1e-5)
        assert shown["score"].min() == pytest.approx(scores.min(), abs=1e-5)
        assert sorted(shown["rank"]) == [1, len(scores)]
        cut += len(scores) > 2
    assert cut  # some bag had middle instances left out
    # the title says how many instances of how many are shown
    svg = (run / "instance_scores.svg").read_text()
    total = int(table.drop_duplicates("bag")["bag_instances"].sum())
    assert (
        f"<!-- {len(table)} of {total} instances shown, of 5 of {len(bags)} bags (random, seed 0) -->" in svg
    )
    assert "per bag the 1 highest and 1 lowest" in svg


def test_small_bags_are_shown_whole(runs, tmp_path):
    store_path, run = runs
    run = _copy_run(run["hamil"], tmp_path / "hamil")
    table = _instance_table(store_path, run, "--bags", "2", "--instances", "50")
    per_bag = table.groupby("bag")
    assert (per_bag.size() == per_bag["bag_instances"].first()).all()
    assert (
        per_bag["rank"].apply(sorted) == per_bag["bag_instances"].first().map(lambda n: [*range(1, n + 1)])
    ).all()


def test_bags_are_drawn_per_seed_and_listed(runs, tmp_path, caplog):
    store_path, run = runs
    run = _copy_run(run["hamil"], tmp_path / "hamil")
    chosen = {}
    for seed in (0, 1, 0):
        caplog.clear()
        with caplog.at_level("INFO"):
            table = _instance_table(store_path, run, "--split", "train", "--bags", "4", "--seed", str(seed))
        bags = list(dict.fromkeys(table["bag"]))
        logged = next(r.getMessage() for r in caplog.records if "instance scores: seed" in r.getMessage())
        assert logged.endswith(", ".join(bags)), (
            logged
        )  # the choice is printed, bag ids in the figure's order
        chosen.setdefault(seed, []).append(bags)
    assert chosen[0][0] == chosen[0][1]  # same seed, same bags
    assert set(chosen[0][0]) != set(chosen[1][0])  # another seed, other bags (16 train bags to draw from)


def test_instances_must_show_highest_and_lowest(runs, capsys):
    store, run = runs
    args = ["figures", "--run-dir", str(run["hamil"]), "--store", str(store), "--instances", "1"]
    assert main(args) == 2
    assert "instances=1" in capsys.readouterr().err


def _curves(tmp_path, monkeypatch, macro, micro, val_loss, **kw):
    """Draw curves from a synthetic history; returns (the figure's metric axes, loss axes, marked epoch)."""
    import hamil.plots as plots

    n = len(macro)
    history = pd.DataFrame(
        {
            "epoch": range(1, n + 1),
            "train_loss": np.linspace(0.7, 0.3, n),
            "val_loss": val_loss,
            "val_macro_auc": np.linspace(0.5, 0.9, n),
            "val_macro_f1": macro,
            "val_micro_f1": micro,
            "lr": 1e-3,
            "seconds": 1.0,
        }
    )
    history.to_csv(tmp_path / "history.csv", index=False)
    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, dest: drawn.update(fig=fig))
    best = plots.plot_curves(tmp_path / "history.csv", tmp_path / "curves.png", **kw)
    ax_loss, ax_metric = drawn["fig"].axes
    return ax_metric, ax_loss, best


def _vertical_lines(ax):
    return [
        line.get_xdata()[0]
        for line in ax.get_lines()
        if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2
    ]


def test_curves_mark_the_best_epoch_with_integer_ticks(tmp_path, monkeypatch):
    macro, micro = [0.2, 0.6, 0.6, 0.4], [0.3, 0.5, 0.7, 0.4]
    val_loss = [0.9, 0.5, 0.6, 0.3]
    ax_metric, ax_loss, best = _curves(tmp_path, monkeypatch, macro, micro, val_loss)
    assert best == 2  # first epoch with the best macro F1, as training keeps best.pt
    assert _vertical_lines(ax_metric) == [2] and _vertical_lines(ax_loss) == [2]
    assert "best epoch 2" in [t.get_text() for t in ax_metric.get_legend().get_texts()]
    for ax in (ax_metric, ax_loss):
        ticks = ax.get_xticks()
        assert np.array_equal(ticks, np.round(ticks)), ticks
    _, _, best = _curves(tmp_path, monkeypatch, macro, micro, val_loss, monitor="loss")
    assert best == 4
    _, _, best = _curves(tmp_path, monkeypatch, macro, micro, val_loss, best_epoch=3)  # best.pt's epoch
    assert best == 3


def test_one_class_draws_one_f1_line(tmp_path, monkeypatch):
    f1 = [0.2, 0.5, np.nan, 0.6]
    ax_metric, _, _ = _curves(tmp_path, monkeypatch, f1, f1, [0.9, 0.8, 0.7, 0.6])
    labels = [t.get_text() for t in ax_metric.get_legend().get_texts()]
    assert "macro F1 = micro F1" in labels and "micro F1" not in labels and "macro F1" not in labels
    ax_metric, _, _ = _curves(tmp_path, monkeypatch, f1, [0.3, 0.5, np.nan, 0.6], [0.9, 0.8, 0.7, 0.6])
    labels = [t.get_text() for t in ax_metric.get_legend().get_texts()]
    assert "macro F1" in labels and "micro F1" in labels


def test_figures_mark_the_epoch_of_best_pt(runs, tmp_path):
    store_path, run = runs
    run = _copy_run(run["hamil"], tmp_path / "hamil")
    assert main(["figures", "--run-dir", str(run)]) == 0
    assert "best epoch 1" in (run / "curves.svg").read_text()


def test_tsne_titles_say_what_the_points_are(runs, tmp_path):
    store_path, run = runs
    store = BagStore(store_path)
    _, _, explained = _explain(run["hamil"] / "best.pt", store, store.bags_in("test"), torch.device("cpu"), 8)
    plot_tsne(explained, store.class_names, tmp_path / "t.png", seed=0)
    svg = (tmp_path / "t.svg").read_text()
    assert "points, one per instance" in svg and "points, one per bag" in svg
    assert "instance features before aggregation" in svg and "bag features after aggregation" in svg

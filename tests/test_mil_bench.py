"""``hamil mil-bench``: feature-bag readers, their one-line errors, the CV protocol, and a learning check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hamil import mil_bench
from hamil.cli import main
from hamil.mil_bench import FeatureBags, MILNet, cross_validate, from_arrays, read_feature_bags, summarise


def synthetic_bags(
    n_bags: int = 80, instances: int = 16, features: int = 20, shift: float = 3.0, seed: int = 0
) -> FeatureBags:
    """Gaussian instances; a bag is positive iff one of its instances is shifted by ``shift`` in the first
    three features (negatives have no such instance). Finding that one instance is what max pooling does
    well; mean pooling sees it diluted ``instances`` times."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_bags) % 2  # (B,)
    x = rng.standard_normal((n_bags, instances, features))  # (B, n, D)
    for b in np.flatnonzero(labels):
        x[b, rng.integers(instances), :3] += shift
    ids = np.repeat(np.arange(n_bags), instances)  # (N,)
    return from_arrays(x.reshape(-1, features), [f"bag{i}" for i in ids], np.repeat(labels, instances))


def write_csv(bags: FeatureBags, path: Path, negative: str = "-1") -> Path:
    """The common layout: ``label,bag,f1,...`` per instance, no header."""
    lines = []
    for b, (bag, size) in enumerate(zip(bags.bag_ids, bags.bag_sizes, strict=True)):
        label = "1" if bags.labels[b] else negative
        for row in bags.features[bags.offsets[b] : bags.offsets[b] + size]:
            lines.append(",".join([label, bag, *(repr(float(v)) for v in row)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tsv(bags: FeatureBags, path: Path) -> Path:
    """A TSV with a header; columns in an unusual order (features first) and rows shuffled across bags."""
    table = pd.DataFrame(bags.features, columns=[f"x{k}" for k in range(bags.features.shape[1])])
    table["label"] = np.repeat(bags.labels, bags.bag_sizes)
    table["bag"] = np.repeat(bags.bag_ids, bags.bag_sizes)
    order = np.random.default_rng(3).permutation(len(table))
    table.iloc[order].to_csv(path, sep="\t", index=False, float_format="%.17g")
    return path


def test_csv_and_tsv_readers_agree(tmp_path):
    bags = synthetic_bags(n_bags=10, instances=4, features=5)
    from_csv = read_feature_bags(write_csv(bags, tmp_path / "set.csv"))
    from_tsv = read_feature_bags(write_tsv(bags, tmp_path / "set.tsv"))
    for got in (from_csv, from_tsv):
        assert got.features.shape == (40, 5)
        assert got.num_bags == 10
    # the TSV's rows were shuffled: compare bag by bag, instances in the order of their rows
    by_id = {bag: b for b, bag in enumerate(from_tsv.bag_ids)}
    for b, bag in enumerate(from_csv.bag_ids):
        t = by_id[bag]
        assert from_csv.labels[b] == from_tsv.labels[t] == bags.labels[b]
        rows_csv = from_csv.features[from_csv.offsets[b] : from_csv.offsets[b + 1]]
        rows_tsv = from_tsv.features[from_tsv.offsets[t] : from_tsv.offsets[t + 1]]
        np.testing.assert_array_equal(np.sort(rows_csv, axis=0), np.sort(rows_tsv, axis=0))
    np.testing.assert_array_equal(from_csv.features, bags.features)
    assert from_tsv.feature_names == tuple(f"x{k}" for k in range(5))


def test_labels_zero_one_and_minus_one_read_alike(tmp_path):
    bags = synthetic_bags(n_bags=6, instances=3, features=4)
    a = read_feature_bags(write_csv(bags, tmp_path / "a.csv", negative="-1"))
    b = read_feature_bags(write_csv(bags, tmp_path / "b.csv", negative="0.0"))
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.labels, [0, 1, 0, 1, 0, 1])


GOOD = "1,b1,0.5,1.0\n1,b1,0.1,0.2\n0,b2,0.3,0.4\n"
BAD_INPUTS = {
    "ragged": ("1,b1,0.5,1.0\n1,b1,0.1\n0,b2,0.3,0.4\n", "line 2 has 3 fields, line 1 has 4"),
    "mixed": ("1,b1,0.5,1.0\n0,b1,0.1,0.2\n0,b2,0.3,0.4\n", "bag 'b1' has mixed labels"),
    "non_numeric": ("1,b1,0.5,1.0\n1,b1,0.1,abc\n0,b2,0.3,0.4\n", "line 2: feature f2 is not a number"),
    "empty": ("\n", "empty file"),
    "one_class": ("1,b1,0.5,1.0\n1,b2,0.1,0.2\n", "all 2 bags have label 1"),
    "bad_label": ("2,b1,0.5,1.0\n0,b2,0.1,0.2\n", "line 1: label '2' is not 0/1 or -1/1"),
    "tsv_ragged": ("bag\tlabel\tf\nb1\t1\t0.5\nb2\t0\n", "line 3 has 2 fields, the header (line 1) has 3"),
    "tsv_header_only": ("bag\tlabel\tf\n", "a header but no bags"),
    "no_features": ("1,b1\n0,b2\n", "no feature columns"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line(tmp_path, capsys, case):
    text, expected = BAD_INPUTS[case]
    path = tmp_path / f"{case}.csv"
    path.write_text(text)
    assert main(["mil-bench", "--input", str(path), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and expected in err, err
    assert not (tmp_path / "out").exists()


def test_good_small_input_reads(tmp_path):
    path = tmp_path / "good.csv"
    path.write_text(GOOD)
    bags = read_feature_bags(path)
    assert bags.bag_ids == ("b1", "b2")
    np.testing.assert_array_equal(bags.bag_sizes, [2, 1])
    np.testing.assert_array_equal(bags.labels, [1, 0])


def test_unknown_model_and_too_few_bags_per_class_are_one_line(tmp_path, capsys):
    path = write_csv(synthetic_bags(n_bags=8, instances=2, features=3), tmp_path / "s.csv")
    assert (
        main(["mil-bench", "--input", str(path), "--out-dir", str(tmp_path / "o"), "--models", "nope"]) == 2
    )
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["mil-bench", "--input", str(path), "--out-dir", str(tmp_path / "o"), "--folds", "5"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "at least 5 bags per class" in err
    opts = ["--models", "hamil", "--model-options", '{"hamil": {"nope": 1}}']
    assert main(["mil-bench", "--input", str(path), "--out-dir", str(tmp_path / "o"), *opts]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "has no option(s) nope" in err


def test_scaler_is_fitted_on_training_folds_only(monkeypatch):
    bags = synthetic_bags(n_bags=20, instances=3, features=4)
    fitted = []
    original = mil_bench.fit_scaler

    def spy(b, train):
        scaler = original(b, train)
        fitted.append((np.array(train), scaler))
        return scaler

    monkeypatch.setattr(mil_bench, "fit_scaler", spy)
    cross_validate(bags, ["mean"], folds=4, repeats=2, epochs=1, lr=0.01, seed=5)
    splits = list(mil_bench.fold_splits(bags.labels, folds=4, repeats=2, seed=5))
    assert len(fitted) == len(splits) == 8
    for (train, scaler), (_, _, expected_train, test) in zip(fitted, splits, strict=True):
        np.testing.assert_array_equal(train, expected_train)
        assert not set(train) & set(test)
        rows = bags.instance_rows(train)
        np.testing.assert_allclose(scaler.mean_, bags.features[rows].mean(axis=0))
        np.testing.assert_allclose(scaler.scale_, bags.features[rows].std(axis=0))
        assert not np.allclose(scaler.mean_, bags.features.mean(axis=0))
    # the repeats use different fold seeds, and the folds are stratified
    assert not np.array_equal(splits[0][3], splits[4][3])
    for *_, test in splits:
        assert bags.labels[test].sum() in (2, 3) and len(test) == 5


def test_every_aggregator_of_table_s3_runs_on_vectors():
    torch.manual_seed(0)
    x = torch.randn(11, 7)  # (N, D)
    sizes = torch.tensor([4, 1, 6])  # (B,)
    for name in mil_bench.DEFAULT_MODELS:
        net = MILNet(7, name, **mil_bench.DEFAULT_OPTIONS.get(name, {}))
        out = net(x, sizes)  # (B,)
        assert out.shape == (3,)
        out.sum().backward()
        net.eval()
        assert torch.isfinite(net(x, sizes)).all()


def test_cross_validation_is_deterministic_for_a_seed():
    bags = synthetic_bags(n_bags=16, instances=4, features=6)
    kwargs = {"folds": 2, "repeats": 1, "epochs": 2, "lr": 0.05, "batch_bags": 2}
    a = cross_validate(bags, ["hamil", "attention"], seed=3, **kwargs)
    b = cross_validate(bags, ["attention", "hamil"], seed=3, **kwargs)  # order of models does not matter
    cols = ["model", "repeat", "fold", "accuracy", "train_loss"]
    key = ["model", "repeat", "fold"]
    pd.testing.assert_frame_equal(
        a[cols].sort_values(key).reset_index(drop=True), b[cols].sort_values(key).reset_index(drop=True)
    )
    c = cross_validate(bags, ["hamil", "attention"], seed=4, **kwargs)
    assert not np.allclose(a["train_loss"], c["train_loss"])


def test_max_pooling_finds_the_informative_instance_better_than_mean(tmp_path):
    """80 bags x 16 instances x 20 features: max pooling beats mean pooling by a clear margin
    (measured: 0.95 against 0.75 with these seeds, one thread)."""
    path = write_csv(synthetic_bags(), tmp_path / "synthetic.csv")
    out = tmp_path / "out"
    argv = ["mil-bench", "--input", str(path), "--out-dir", str(out), "--models", "mean", "max"]
    argv += ["--folds", "4", "--repeats", "1", "--epochs", "15", "--lr", "0.02", "--batch-bags", "4"]
    argv += ["--recipe", "paper"]  # measured with SGD
    assert main([*argv, "--threads", "1"]) == 0
    summary = pd.read_csv(out / "summary.tsv", sep="\t").set_index("model")
    assert summary.loc["max", "accuracy_mean"] >= 0.85
    assert summary.loc["max", "accuracy_mean"] >= summary.loc["mean", "accuracy_mean"] + 0.10
    folds = pd.read_csv(out / "folds.tsv", sep="\t")
    assert len(folds) == 8 and set(folds["model"]) == {"mean", "max"}
    assert "| max | Max | paper | 4 |" in (out / "summary.md").read_text()  # the recipe beside the result
    pd.testing.assert_frame_equal(summarise(folds), summary.reset_index())


FAST = ["--folds", "2", "--repeats", "2", "--epochs", "2", "--lr", "0.05", "--batch-bags", "4", "--jobs", "1"]


@pytest.mark.parametrize(("filename", "extra"), [("Fox.csv", []), ("bags.csv", ["--dataset", "FOX"])])
def test_published_numbers_beside_ours(tmp_path, filename, extra):
    path = write_csv(synthetic_bags(n_bags=12, instances=3, features=4), tmp_path / filename)
    out = tmp_path / "out"
    argv = ["mil-bench", "--input", str(path), "--out-dir", str(out), "--models", "hamil", "attention", "max"]
    assert main([*argv, *FAST, *extra]) == 0
    summary = pd.read_csv(out / "summary.tsv", sep="\t").set_index("model")
    # Tables S4/S5 on Fox: attention 0.615 ± 0.043, HAMIL 0.647 ± 0.105; no published max pooling
    assert summary.loc["attention", "published_mean"] == pytest.approx(0.615)
    assert summary.loc["attention", "published_sd"] == pytest.approx(0.043)
    assert summary.loc["hamil", "published_mean"] == pytest.approx(0.647)
    np.testing.assert_allclose(
        summary["published_diff"].dropna(), (summary["accuracy_mean"] - summary["published_mean"]).dropna()
    )
    assert np.isnan(summary.loc["max", "published_mean"])
    text = (out / "summary.md").read_text()
    diff = summary.loc["attention", "published_diff"]
    assert f"| 0.615 ± 0.043 | {diff:+.3f} |" in text
    assert "| mi-SVM | 0.582 |" in text and "| EM-DD | 0.609 ± 0.101 |" in text  # methods not run
    assert "| gated_attention | 0.603 ± 0.029 |" in text
    assert "| attention | 0.615" not in text  # run here: not among the published-only rows


def test_no_published_numbers_for_other_sets_and_bad_dataset_is_one_line(tmp_path, capsys):
    path = write_csv(synthetic_bags(n_bags=12, instances=3, features=4), tmp_path / "mine.csv")
    out = tmp_path / "out"
    argv = ["mil-bench", "--input", str(path), "--out-dir", str(out), "--models", "max", *FAST]
    assert main(argv) == 0
    assert "published_mean" not in pd.read_csv(out / "summary.tsv", sep="\t").columns
    assert "published" not in (out / "summary.md").read_text().lower()
    assert main([*argv, "--dataset", "musk3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown --dataset 'musk3'" in err


def test_paired_difference_to_hamil_and_seconds_per_fold(tmp_path):
    path = write_csv(synthetic_bags(n_bags=12, instances=3, features=4), tmp_path / "s.csv")
    out = tmp_path / "out"
    argv = ["mil-bench", "--input", str(path), "--out-dir", str(out), "--models", "hamil", "mean", *FAST]
    assert main(argv) == 0
    summary = pd.read_csv(out / "summary.tsv", sep="\t").set_index("model")
    assert summary.loc["hamil", "vs_hamil_mean"] == 0 and summary.loc["hamil", "vs_hamil_sd"] == 0
    folds = pd.read_csv(out / "folds.tsv", sep="\t")
    acc = folds.pivot_table(index=["repeat", "fold"], columns="model", values="accuracy")
    diff = acc["mean"] - acc["hamil"]
    assert summary.loc["mean", "vs_hamil_mean"] == pytest.approx(diff.mean())
    assert summary.loc["mean", "vs_hamil_sd"] == pytest.approx(diff.std(ddof=1))
    seconds = folds.groupby("model")["seconds"].mean()
    np.testing.assert_allclose(summary["seconds_per_fold"], seconds[summary.index])
    assert (summary["seconds_per_fold"] > 0).all()
    text = (out / "summary.md").read_text()
    assert "paired Δ vs hamil" in text and "s / fold" in text
    assert "| 0.000 ± 0.000 |" in text  # hamil against itself
    # without hamil there is no paired column
    assert "vs_hamil_mean" not in summarise(folds[folds["model"] == "mean"]).columns


def test_parallel_and_serial_folds_are_identical(tmp_path):
    bags = synthetic_bags(n_bags=12, instances=3, features=4)
    kwargs = {"folds": 2, "repeats": 2, "epochs": 2, "lr": 0.05, "batch_bags": 2, "seed": 7}
    seen = []
    serial = cross_validate(bags, ["hamil", "attention"], jobs=1, **kwargs)
    parallel = cross_validate(bags, ["hamil", "attention"], jobs=2, on_fold=seen.append, **kwargs)
    cols = ["model", "repeat", "fold", "accuracy", "train_loss", "train_bags", "test_bags"]
    pd.testing.assert_frame_equal(serial[cols], parallel[cols])
    assert len(seen) == len(parallel) == 8  # on_fold runs in this process, once per fold and model
    assert sorted((r["model"], r["repeat"], r["fold"]) for r in seen) == sorted(
        zip(parallel["model"], parallel["repeat"], parallel["fold"], strict=True)
    )


def test_recipes_load_and_validate(tmp_path, capsys):
    from hamil.recipes import InputError, get_recipe, load_recipes

    recipes = load_recipes()
    paper, ilse = recipes["paper"], recipes["ilse2018"]
    assert (paper.optimizer, paper.lr, paper.momentum, paper.weight_decay) == ("sgd", 1e-4, 0.9, 0.005)
    assert (paper.batch_bags, paper.dropout) == (1, 0.2)
    assert [paper.epochs_for(d) for d in ("fox", "MUSK1", "musk2", "elephant", "tiger", None)] == [
        100
    ] * 3 + [50] * 2 + [100]
    assert (ilse.optimizer, ilse.lr, ilse.betas, ilse.weight_decay) == ("adam", 5e-4, (0.9, 0.999), 1e-4)
    assert "main.py:77" in ilse.source and "not published" in ilse.source.lower().replace("\n", " ")
    with pytest.raises(InputError, match="unknown recipe 'nope'"):
        get_recipe("nope")
    bad = tmp_path / "recipes.yaml"
    good = "optimizer: sgd\n  lr: 0.1\n  weight_decay: 0\n  epochs: 3\n"
    good += "  batch_bags: 1\n  dropout: 0\n  source: x\n"
    for text, message in [
        ("paper:\n  " + good + "  colour: red\n", "unknown field 'colour'"),
        ("paper:\n  " + good.replace("sgd", "rmsprop"), "optimizer must be one of"),
        ("paper:\n  " + good.replace("lr: 0.1", "lr: -1"), "lr out of range"),
        ("other:\n  " + good, "default recipe 'paper' is missing"),
    ]:
        bad.write_text(text)
        with pytest.raises(InputError, match=message) as err:
            load_recipes(bad)
        assert "\n" not in str(err.value)
    out = tmp_path / "out"
    path = write_csv(synthetic_bags(), tmp_path / "synthetic.csv")
    assert main(["mil-bench", "--input", str(path), "--out-dir", str(out), "--recipe", "nope"]) != 0
    assert "unknown recipe 'nope'" in capsys.readouterr().err


def _capture_optimizers(monkeypatch) -> list:
    made = []
    real = mil_bench.make_optimizer

    def spy(net, *args, **kwargs):
        opt = real(net, *args, **kwargs)
        made.append(opt)
        return opt

    monkeypatch.setattr(mil_bench, "make_optimizer", spy)
    return made


def test_each_model_runs_its_own_recipe_and_its_values_reach_the_optimizer(monkeypatch):
    made = _capture_optimizers(monkeypatch)
    bags = synthetic_bags(n_bags=20)
    rows = cross_validate(bags, ["hamil", "attention"], folds=2, repeats=1, epochs=1, seed=0)
    assert list(rows["recipe"]) == ["paper", "ilse2018"] * 2
    sgd, adam = made[0], made[1]
    assert isinstance(sgd, torch.optim.SGD) and isinstance(adam, torch.optim.Adam)
    assert (sgd.param_groups[0]["lr"], sgd.param_groups[0]["momentum"]) == (1e-4, 0.9)
    assert sgd.param_groups[0]["weight_decay"] == 0.005
    group = adam.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (5e-4, (0.9, 0.999), 1e-4)


def test_recipe_option_forces_one_recipe_and_explicit_values_override(monkeypatch):
    made = _capture_optimizers(monkeypatch)
    bags = synthetic_bags(n_bags=20)
    rows = cross_validate(bags, ["hamil", "mean"], folds=2, repeats=1, epochs=1, recipe="ilse2018", lr=0.003)
    assert set(rows["recipe"]) == {"ilse2018"}
    assert all(isinstance(o, torch.optim.Adam) and o.param_groups[0]["lr"] == 0.003 for o in made)
    plan = mil_bench.training_plan(["hamil", "max"], dataset="tiger")
    assert plan["hamil"]["epochs"] == 50 and plan["hamil"]["recipe"] == "paper"
    assert plan["max"]["optimizer"] == "adam" and plan["max"]["recipe"] == "ilse2018"
    assert mil_bench.training_plan(["hamil"], dataset="musk1")["hamil"]["epochs"] == 100


def test_recipe_column_in_folds_summary_and_settings(tmp_path):
    import json

    path = write_csv(synthetic_bags(n_bags=20), tmp_path / "synthetic.csv")
    out = tmp_path / "out"
    argv = ["mil-bench", "--input", str(path), "--out-dir", str(out), "--models", "hamil", "attention"]
    assert main([*argv, "--folds", "2", "--repeats", "1", "--epochs", "1", "--jobs", "1"]) == 0
    folds = pd.read_csv(out / "folds.tsv", sep="\t")
    summary = pd.read_csv(out / "summary.tsv", sep="\t").set_index("model")
    assert set(zip(folds["model"], folds["recipe"], strict=True)) == {
        ("hamil", "paper"),
        ("attention", "ilse2018"),
    }
    assert summary.loc["attention", "recipe"] == "ilse2018" and summary.loc["hamil", "recipe"] == "paper"
    settings = json.loads((out / "settings.json").read_text())
    assert settings["recipe"] == {"hamil": "paper", "attention": "ilse2018"}
    assert settings["training"]["attention"]["optimizer"] == "adam"
    assert settings["training"]["hamil"]["epochs"] == 1

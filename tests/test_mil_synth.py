"""``hamil mil-synth``: the synthetic classical-MIL set behind the README's mil-bench table."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from hamil.cli import main
from hamil.mil_bench import read_feature_bags
from hamil.mil_synth import MilSynthParams, generate_mil
from preprocessing.errors import InputError


def test_written_set_reads_back_with_the_standard_mil_assumption(tmp_path):
    params = MilSynthParams(bags=40, instances_min=3, instances_max=7, features=12, informative=4, shift=4.0)
    path = tmp_path / "synthetic.csv"
    assert (
        main(
            [
                "mil-synth",
                "--out",
                str(path),
                "--bags",
                "40",
                "--instances-min",
                "3",
                "--instances-max",
                "7",
                "--features",
                "12",
                "--informative",
                "4",
                "--shift",
                "4",
            ]
        )
        == 0
    )
    bags = read_feature_bags(path)  # the reader mil-bench uses
    x, ids, labels = generate_mil(params)
    assert bags.features.shape == x.shape == (len(ids), 12)
    np.testing.assert_allclose(bags.features, x, rtol=1e-5, atol=1e-5)  # written with 6 significant digits
    assert bags.labels.sum() == 20 and len(bags.labels) == 40
    assert set(bags.bag_sizes.tolist()) <= set(range(3, 8))
    # a bag is positive exactly when it holds an instance of the target concept: with a large shift, the
    # largest mean of the informative features per bag separates the classes
    rng = np.random.default_rng(params.seed)
    centres = rng.standard_normal((params.concepts, params.features))
    score = (x[:, :4] - centres[0, :4]).mean(axis=1)  # (N,) ~ shift for target instances, ~0 otherwise
    best = np.array([score[ids == b].max() for b in range(40)])  # (B,)
    bag_labels = np.array([labels[ids == b][0] for b in range(40)])
    assert best[bag_labels == 1].min() > best[bag_labels == 0].max()


def test_same_seed_same_bytes_other_seed_other_set(tmp_path):
    def digest(seed: int, name: str) -> str:
        path = tmp_path / name
        assert main(["mil-synth", "--out", str(path), "--seed", str(seed), "--bags", "10"]) == 0
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert digest(3, "a.csv") == digest(3, "b.csv")
    assert digest(3, "a.csv") != digest(4, "c.csv")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"instances_min": 5, "instances_max": 4}, "instances_min <= instances_max"),
        ({"witnesses": 3, "instances_min": 2}, "witnesses <= instances_min"),
        ({"informative": 200, "features": 166}, "informative <= features"),
        ({"bags": 2}, "bags >= 4"),
    ],
)
def test_bad_parameters_are_one_line(options, message):
    with pytest.raises(InputError, match=message):
        MilSynthParams(**options)

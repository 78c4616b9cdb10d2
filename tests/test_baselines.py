"""Every aggregator on one interface: shapes, invariance, gradients, and each formula on a small case."""

from __future__ import annotations

import pytest
import torch

from hamil.models import available, build_model, create

C, K = 8, 3
INVARIANT = [
    "mean",
    "max",
    "sum",
    "attention",
    "gated_attention",
    "nan",
    "deepmiml",
    "si",
    "hamil",
    "hamil_a",
]


def make(name: str, **options):
    torch.manual_seed(0)
    return create(name, C, num_classes=K, **options).double()


def feats(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, C, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_every_paper_model_is_registered():
    expected = {
        "si",
        "mean",
        "max",
        "sum",
        "nan",
        "attention",
        "gated_attention",
        "deepmiml",
        "hamil",
        "hamil_a",
        "ramil",
    }
    assert set(available()) == expected


@pytest.mark.parametrize("name", sorted(set(INVARIANT) | {"ramil"}))
@pytest.mark.parametrize("sizes", [[1], [2], [50], [1, 2, 50]])
def test_shapes_and_scores(name, sizes):
    agg = make(name).train()
    out = agg(feats(sum(sizes)), torch.tensor(sizes))
    assert out.bags.shape[0] == len(sizes)
    assert out.bags.shape[1] == agg.out_channels
    if out.scores is not None:
        assert out.scores.shape == (sum(sizes),)


@pytest.mark.parametrize("name", INVARIANT)
def test_permutation_invariance(name):
    agg = make(name).eval()
    x, sizes = feats(17), torch.tensor([9, 8])
    perm = torch.cat(
        [torch.randperm(9, generator=torch.Generator().manual_seed(3)), 9 + torch.arange(8).flip(0)]
    )
    a, b = agg(x, sizes), agg(x[perm], sizes)
    torch.testing.assert_close(a.bags, b.bags, atol=1e-8, rtol=1e-8)
    if a.scores is not None:
        torch.testing.assert_close(a.scores[perm], b.scores, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", sorted(set(INVARIANT) | {"ramil"}))
def test_gradients_reach_every_parameter(name):
    model = build_model(name, K)
    torch.manual_seed(1)
    images = torch.randint(0, 256, (7, 3, 48, 48), dtype=torch.uint8)
    _, loss = model(images, torch.tensor([3, 4]), (torch.rand(2, K) < 0.5).float())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    agg_params = list(model.aggregator.parameters())
    if agg_params:
        assert any(p.grad.abs().sum() > 0 for p in agg_params)


def test_pooling_formulas():
    x, sizes = feats(5), torch.tensor([2, 3])
    torch.testing.assert_close(make("mean")(x, sizes).bags[1], x[2:].mean(0))
    torch.testing.assert_close(make("max")(x, sizes).bags[0], torch.maximum(x[0], x[1]))
    torch.testing.assert_close(make("sum")(x, sizes).bags[1], x[2] + x[3] + x[4])


@pytest.mark.parametrize("name", ["attention", "gated_attention"])
def test_attention_matches_direct_computation(name):
    agg = make(name)
    x, sizes = feats(5), torch.tensor([2, 3])
    out = agg(x, sizes)
    h = torch.relu(agg.embed[0](x.mean((2, 3))))  # (5, M)
    gate = torch.sigmoid(agg.U(h)) if name == "gated_attention" else 1.0
    e = agg.w(torch.tanh(agg.V(h)) * gate).squeeze(1)
    for bag, part in enumerate((slice(0, 2), slice(2, 5))):
        a = torch.softmax(e[part], dim=0)
        torch.testing.assert_close(out.scores[part], a)
        torch.testing.assert_close(out.bags[bag], (a[:, None] * h[part]).sum(0))
    torch.testing.assert_close(out.scores[:2].sum(), torch.tensor(1.0, dtype=torch.float64))


def test_nan_matches_direct_computation():
    agg = make("nan")
    with torch.no_grad():
        agg.q0.copy_(torch.linspace(-1, 1, C, dtype=torch.float64))
    x, sizes = feats(4), torch.tensor([4])
    f = x.mean((2, 3))
    a0 = torch.softmax(f @ agg.q0, 0)
    q1 = torch.tanh(agg.transfer((a0[:, None] * f).sum(0)))
    a1 = torch.softmax(f @ q1, 0)
    out = agg(x, sizes)
    torch.testing.assert_close(out.scores, a1)
    torch.testing.assert_close(out.bags[0], (a1[:, None, None, None] * x).sum(0))


def test_deepmiml_matches_direct_computation():
    agg = make("deepmiml", sub_concepts=2)
    x, sizes = feats(5), torch.tensor([2, 3])
    h = torch.relu(agg.embed[0](x.mean((2, 3))))
    s = agg.sub_concept(h).view(5, K, 2)
    out = agg(x, sizes)
    torch.testing.assert_close(out.bags[0], s[:2].amax(2).amax(0))
    torch.testing.assert_close(out.bags[1], s[2:].amax(2).amax(0))
    assert isinstance(build_model("deepmiml", K).head, torch.nn.Identity)


def test_single_instance_trains_per_instance_and_averages_probabilities():
    torch.manual_seed(0)
    model = build_model("si", K).eval()
    images, sizes = torch.randint(0, 256, (5, 3, 48, 48), dtype=torch.uint8), torch.tensor([2, 3])
    with torch.no_grad():
        inst = torch.sigmoid(model.head(model.backbone(images)))  # (5, K)
        bag = torch.sigmoid(model(images, sizes)[0])
    torch.testing.assert_close(bag[0], inst[:2].mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bag[1], inst[2:].mean(0), atol=1e-6, rtol=1e-5)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    with torch.no_grad():
        expected = torch.nn.functional.binary_cross_entropy_with_logits(
            model.head(model.backbone(images)), labels[[0, 0, 1, 1, 1]]
        )
        _, loss_sum = model(images, sizes, labels)  # summed over the 5 instances
        torch.testing.assert_close(loss_sum / 5, expected)

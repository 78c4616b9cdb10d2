"""HAMIL and its variants: units, batched tree execution, invariances, gradients, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hamil.models import available, build_model, create
from hamil.models.units import AggregationUnit
from hamil.tree import merge_order, random_merge_order, tree_height


def reference_tree_aggregate(features: torch.Tensor, unit: nn.Module, triplets: np.ndarray) -> torch.Tensor:
    """One bag, one merge at a time, straight from the triplets: the definition HAMIL batches."""
    nodes = {i: features[i : i + 1] for i in range(len(features))}
    for a, b, c in triplets:
        nodes[c] = unit(nodes[a], nodes[b])
    return nodes[len(features) * 2 - 2] if len(features) > 1 else nodes[0]


def test_unit_is_one_kernel_shared_by_all_channels():
    unit = AggregationUnit(depth=1, kernel_size=7, init="default")
    convs = [m for m in unit.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and tuple(convs[0].weight.shape) == (1, 2, 7, 7)
    unit.eval()
    left, right = torch.randn(3, 5, 4, 4), torch.randn(3, 5, 4, 4)
    out = unit(left, right)  # (3, 5, 4, 4)
    # reference: each channel pair separately through the same conv + bn
    for c in range(5):
        pair = torch.stack([left[:, c], right[:, c]], dim=1)  # (3, 2, 4, 4)
        torch.testing.assert_close(out[:, c], unit.layers(pair)[:, 0])


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_unit_depths_shapes_and_1d(depth):
    unit2 = AggregationUnit(depth=depth)
    assert unit2(torch.randn(4, 6, 3, 3), torch.randn(4, 6, 3, 3)).shape == (4, 6, 3, 3)
    convs = [m for m in unit2.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth and convs[0].in_channels == 2 and convs[-1].out_channels == 1
    assert sum(isinstance(m, nn.ReLU) for m in unit2.modules()) == depth - 1
    unit1 = AggregationUnit(depth=depth, dims=1, kernel_size=3)
    assert unit1(torch.randn(4, 16), torch.randn(4, 16)).shape == (4, 16)


def test_average_init_is_the_mean_before_norm():
    unit = AggregationUnit(batch_norm=False, init="average")
    left, right = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(unit(left, right), (left + right) / 2)


def _tree_model(name: str, **options) -> nn.Module:
    torch.manual_seed(0)
    return create(name, 8, **options)


def _features(sizes, seed=0, shape=(8, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(sizes), *shape, generator=g, dtype=torch.float64), torch.tensor(sizes)


@pytest.mark.parametrize("init", ["average", "default"])
def test_batched_forward_equals_bag_by_bag_reference(init):
    agg = _tree_model("hamil", init=init).double().eval()
    feats, sizes = _features([1, 2, 7, 12, 3])
    out = agg(feats, sizes).bags  # (B, C, h, w)
    start = 0
    for b, n in enumerate(sizes.tolist()):
        part = feats[start : start + n]
        tri = agg.bag_tree(part)
        torch.testing.assert_close(out[b : b + 1], reference_tree_aggregate(part, agg.unit, tri))
        torch.testing.assert_close(out[b : b + 1], agg(part, torch.tensor([n])).bags)
        start += n


def test_one_dimensional_hamil_on_feature_vectors():
    agg = _tree_model("hamil", dims=1, kernel_size=3, init="default").double().eval()
    feats, sizes = _features([4, 1, 6], shape=(16,))  # (11, 16) instance vectors
    out = agg(feats, sizes).bags  # (3, 16)
    assert out.shape == (3, 16)
    part = feats[5:11]
    torch.testing.assert_close(out[2:3], reference_tree_aggregate(part, agg.unit, agg.bag_tree(part)))


def test_unit_calls_equal_tallest_tree():
    agg = _tree_model("hamil").double().eval()
    feats, sizes = _features([5, 12, 9])
    agg(feats, sizes)
    heights, start = [], 0
    for n in sizes.tolist():
        heights.append(tree_height(merge_order(feats[start : start + n].flatten(1)), n))
        start += n
    assert agg.last_unit_calls == max(heights)
    assert agg.last_unit_calls < int(sizes.sum()) - len(sizes)  # fewer calls than merges


def test_hamil_is_permutation_invariant_and_ramil_is_not():
    feats, sizes = _features([10, 6])
    perm = torch.cat([torch.randperm(10, generator=torch.Generator().manual_seed(1)), 10 + torch.arange(6)])
    hamil = _tree_model("hamil", init="default").double().eval()
    torch.testing.assert_close(hamil(feats, sizes).bags, hamil(feats[perm], sizes).bags, atol=1e-5, rtol=0)
    hamil_a = _tree_model("hamil_a").double().eval()
    torch.testing.assert_close(
        hamil_a(feats, sizes).bags, hamil_a(feats[perm], sizes).bags, atol=1e-5, rtol=0
    )
    ramil = _tree_model("ramil", init="default").double().eval()
    assert not torch.allclose(ramil(feats, sizes).bags[0], ramil(feats[perm], sizes).bags[0], atol=1e-5)


def test_ramil_reshuffles_in_training_and_is_fixed_in_eval():
    ramil = _tree_model("ramil", init="default").double()
    feats, sizes = _features([9])
    ramil.eval()
    torch.testing.assert_close(ramil(feats, sizes).bags, ramil(feats, sizes).bags)
    ramil.train()
    outs = [ramil(feats, sizes).bags for _ in range(3)]
    assert not all(torch.allclose(outs[0], o) for o in outs[1:])


def test_random_merge_order_is_a_valid_tree():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 30):
        tri = random_merge_order(n, rng)
        assert tri.shape == (n - 1, 3) and (tri[:, 0] < tri[:, 1]).all()
        assert (tri[:, 2] == n + np.arange(n - 1)).all()
        used = np.sort(tri[:, :2].ravel())
        assert (used == np.arange(2 * n - 2)).all()  # every node but the root is merged exactly once


def test_hamil_a_is_the_tree_mean():
    agg = _tree_model("hamil_a").double()
    feats, sizes = _features([4])
    tri = agg.bag_tree(feats)
    expected = reference_tree_aggregate(feats, lambda a, b: (a + b) / 2, tri)
    torch.testing.assert_close(agg(feats, sizes).bags, expected)


@pytest.mark.parametrize("name", ["hamil", "hamil_a", "ramil", "mean"])
@pytest.mark.parametrize("sizes", [[1], [2], [1, 1, 1], [3, 1, 2], pytest.param([100], id="100")])
def test_bag_sizes_modes_and_gradients(name, sizes):
    if sizes == [100] and name not in ("hamil", "mean"):
        pytest.skip("one tree model and one pooling model cover the large bag")
    torch.manual_seed(0)
    model = build_model(name, 4)
    images = torch.randint(0, 256, (sum(sizes), 3, 48, 48), dtype=torch.uint8)  # 2x2 feature maps
    bag_sizes = torch.tensor(sizes)
    model.train()
    logits, _ = model(images, bag_sizes)
    assert logits.shape == (len(sizes), 4)
    logits.sum().backward()
    groups = {"backbone": model.backbone, "aggregator": model.aggregator, "head": model.head}
    for part, module in groups.items():
        for pname, p in module.named_parameters():
            assert p.grad is not None, f"{name}: no gradient for {part}.{pname}"
    if name in ("hamil", "ramil") and max(sizes) > 1:
        assert any(p.grad.abs().sum() > 0 for p in model.aggregator.parameters())
    model.eval()
    with torch.no_grad():
        out = model.explain(images, bag_sizes)
    assert out.logits.shape == (len(sizes), 4) and out.instance_scores.shape == (sum(sizes),)
    assert (out.instance_scores.abs() <= 1 + 1e-6).all()


def test_instance_scores_are_cosine_similarity_to_the_bag_feature():
    torch.manual_seed(0)
    model = build_model("hamil", 3).eval()
    images, sizes = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8), torch.tensor([2, 3])
    with torch.no_grad():
        out = model.explain(images, sizes)
    bag_of = [0, 0, 1, 1, 1]
    for i in range(5):
        a, b = out.instance_features[i], out.bag_features[bag_of[i]]
        assert out.instance_scores[i] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-5)


def test_tree_features_option_changes_the_tree_input():
    feats, _ = _features([12])
    flat = _tree_model("hamil", tree_features="flatten").bag_tree(feats)
    pooled = _tree_model("hamil", tree_features="pooled").bag_tree(feats)
    assert (np.sort(flat[:, :2], axis=1) == merge_order(feats.flatten(1))[:, :2]).all()
    assert (np.sort(pooled[:, :2], axis=1) == merge_order(feats.mean((2, 3)))[:, :2]).all()
    with pytest.raises(ValueError, match="tree_features"):
        _tree_model("hamil", tree_features="nope")


def test_registry_lists_models():
    assert {"hamil", "hamil_a", "ramil", "mean"} <= set(available())


@pytest.mark.parametrize("name", ["hamil", "mean"])
def test_non_square_instances(name):
    """Whole-image instances (e.g. 180x320 embryos) are not square: maps are (C, h, w) with h != w."""
    torch.manual_seed(0)
    model = build_model(name, 3).eval()
    with torch.no_grad():
        out, _ = model(torch.randint(0, 256, (5, 3, 64, 128), dtype=torch.uint8), torch.tensor([2, 3]))
    assert out.shape == (2, 3)

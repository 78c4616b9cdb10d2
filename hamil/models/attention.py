"""Learned-weight baselines: attention and gated attention (Ilse et al.), NAN, DeepMIML, single instance."""

from __future__ import annotations

import torch
from torch import nn

from hamil.models.ops import bag_index, pool, segment_softmax, weighted_sum
from hamil.models.pooling import MeanPool
from hamil.models.registry import Aggregator, AggregatorOutput, register


@register("attention", paper_name="Attention", score_kind="attention weight")
class AttentionPool(Aggregator):
    """Attention MIL pooling (Ilse, Tomczak & Welling, ICML 2018, Eq. 8) on embedded instance vectors.

    ``h_k = ReLU(W_e pool(f_k))``; ``a_k = softmax_k(w^T tanh(V h_k))`` within the bag; ``z = sum_k a_k h_k``.
    Scores are the weights ``a_k`` (they sum to 1 in each bag). ``embed_dim=None`` drops the embedding
    (``h_k = pool(f_k)``), as in Ilse et al.'s networks for the classical MIL sets.
    """

    gated = False

    def __init__(
        self, channels: int, embed_dim: int | None = 256, attention_dim: int = 128, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.out_channels = channels if embed_dim is None else embed_dim
        self.embed: nn.Module = (
            nn.Identity()
            if embed_dim is None
            else nn.Sequential(nn.Linear(channels, embed_dim), nn.ReLU(inplace=True), nn.Dropout(dropout))
        )
        self.V = nn.Linear(self.out_channels, attention_dim)
        self.U = nn.Linear(self.out_channels, attention_dim) if self.gated else None
        self.w = nn.Linear(attention_dim, 1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.V(h))  # (N, L)
        if self.U is not None:
            a = a * torch.sigmoid(self.U(h))
        return self.w(a).squeeze(1)  # (N,)

    def forward(self, features: torch.Tensor, bag_sizes: torch.Tensor) -> AggregatorOutput:
        h = self.embed(pool(features))  # (N, M)
        weights = segment_softmax(self.logits(h), bag_sizes)  # (N,)
        return AggregatorOutput(weighted_sum(h, weights, bag_sizes), weights)  # (B, M)


@register("gated_attention", paper_name="Gated attention", score_kind="attention weight")
class GatedAttentionPool(AttentionPool):
    """Gated attention MIL pooling (Ilse et al., ICML 2018, Eq. 9):
    ``a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))``; otherwise as ``attention``."""

    gated = True


@register("nan", paper_name="NAN", score_kind="attention weight")
class NeuralAggregation(Aggregator):
    """Neural Aggregation Network (Yang et al., CVPR 2017, Eqs. 1-3): two cascaded attention blocks.

    Block 1: ``e_k = q0 . f_k`` with a learned query ``q0``, ``a_k = softmax_k(e_k)``, ``r0 = sum a_k f_k``.
    Block 2: ``q1 = tanh(W r0 + b)``, ``e_k = q1 . f_k``, ``a_k = softmax_k(e_k)``, ``r1 = sum a_k f_k``.
    As in the HAMIL paper, it aggregates feature maps: the scores use the pooled maps, the weights apply to
    the whole maps, so the output is a map ``(B, C, h, w)``. Scores are the block-2 weights.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_channels = channels
        self.q0 = nn.Parameter(torch.zeros(channels))
        self.transfer = nn.Linear(channels, channels)

    def forward(self, features: torch.Tensor, bag_sizes: torch.Tensor) -> AggregatorOutput:
        f = pool(features)  # (N, C)
        a0 = segment_softmax(f @ self.q0, bag_sizes)  # (N,)
        r0 = weighted_sum(f, a0, bag_sizes)  # (B, C)
        q1 = torch.tanh(self.transfer(r0))  # (B, C)
        index = bag_index(bag_sizes.to(f.device), f.shape[0])
        a1 = segment_softmax((f * q1[index]).sum(1), bag_sizes)  # (N,)
        return AggregatorOutput(weighted_sum(features, a1, bag_sizes), a1)  # (B, C, h, w)


@register("deepmiml", paper_name="DeepMIML", score_kind="largest label score", provides_logits=True)
class DeepMIML(Aggregator):
    """DeepMIML's sub-concept layer (Feng & Zhou, AAAI 2017).

    Each instance vector ``h_i = ReLU(W_e pool(f_i))`` is scored against ``M`` sub-concepts of every label,
    ``s_i[k, m] = w_km . h_i + b_km`` (a 1x1 convolution), max-pooled over sub-concepts (instance-label
    scores) and then over the bag's instances (bag-label scores). The bag scores are the logits (no linear
    head; the sigmoid and BCE follow, as for every model here; no ReLU on ``s`` so logits can be negative).
    Scores per instance: its largest instance-label score.
    """

    def __init__(self, channels: int, num_classes: int, sub_concepts: int = 4, embed_dim: int = 256) -> None:
        super().__init__()
        self.out_channels = num_classes
        self.num_classes, self.sub_concepts = num_classes, sub_concepts
        self.embed = nn.Sequential(nn.Linear(channels, embed_dim), nn.ReLU(inplace=True))
        self.sub_concept = nn.Linear(embed_dim, num_classes * sub_concepts)

    def forward(self, features: torch.Tensor, bag_sizes: torch.Tensor) -> AggregatorOutput:
        h = self.embed(pool(features))  # (N, E)
        s = self.sub_concept(h).view(-1, self.num_classes, self.sub_concepts)  # (N, K, M)
        instance_label = s.amax(dim=2)  # (N, K)
        index = bag_index(bag_sizes.to(h.device), h.shape[0]).view(-1, 1).expand_as(instance_label)
        bags = instance_label.new_zeros((len(bag_sizes), self.num_classes))
        bags = bags.scatter_reduce(0, index, instance_label, reduce="amax", include_self=False)  # (B, K)
        return AggregatorOutput(bags, instance_label.amax(dim=1))


@register("si", paper_name="SI", score_kind="largest class probability", instance_level=True)
class SingleInstance(MeanPool):
    """Single-instance baseline: every instance is trained alone with its bag's labels; a bag's probability
    is the mean of its instances' probabilities (``MILModel`` does both, as ``instance_level`` asks). As an
    aggregator it is mean pooling, which gives the bag features for figures."""

"""ResNet18 trunk: images ``(N, 3, H, W)`` uint8 or float -> feature maps ``(N, 512, H/32, W/32)``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from preprocessing.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """ResNet18 up to ``layer4`` with input scaling and normalisation built in.

    ``pretrained``: ``None`` (random init), ``"imagenet"`` (torchvision weights, downloaded when online) or
    a path to a ``state_dict`` file of a torchvision ResNet18 (the ``fc`` entries are ignored).
    """

    out_channels = 512

    def __init__(self, pretrained: str | None = None) -> None:
        super().__init__()
        net = resnet18(weights=ResNet18_Weights.IMAGENET1K_V1 if pretrained == "imagenet" else None)
        if pretrained not in (None, "imagenet"):
            _load_local_weights(net, Path(pretrained))
        self.trunk = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean.dtype)  # (N, 3, H, W), the model's float type
        if images.dtype == torch.uint8:
            x = x / 255.0
        x = (x - self.mean) / self.std
        return self.trunk(x)  # (N, 512, H/32, W/32)


def _load_local_weights(net: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise InputError(f"{path}: pretrained weights file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise InputError(
            f"{path}: not a ResNet18 state_dict (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )

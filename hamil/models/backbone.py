"""ResNet18 trunk: images ``(N, C, H, W)`` uint8 or float -> feature maps ``(N, 512, H/32, W/32)``."""

from __future__ import annotations

import math
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
    ``in_chans``: input channels; other than 3, the first convolution's pretrained RGB weights are adapted
    as timm's ``adapt_input_conv`` does (summed for one channel, else repeated and scaled by 3 / C), and
    every channel is normalised with the mean of ImageNet's means and stds.
    """

    out_channels = 512

    def __init__(self, pretrained: str | None = None, in_chans: int = 3) -> None:
        super().__init__()
        if in_chans < 1:
            raise InputError(f"a backbone needs at least one input channel, got {in_chans}")
        net = resnet18(weights=ResNet18_Weights.IMAGENET1K_V1 if pretrained == "imagenet" else None)
        if pretrained not in (None, "imagenet"):
            _load_local_weights(net, Path(pretrained))
        if in_chans != 3:
            conv = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
            with torch.no_grad():
                conv.weight.copy_(adapt_input_conv(in_chans, net.conv1.weight))
            net.conv1 = conv
        self.trunk = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        mean = IMAGENET_MEAN if in_chans == 3 else (sum(IMAGENET_MEAN) / 3,) * in_chans
        std = IMAGENET_STD if in_chans == 3 else (sum(IMAGENET_STD) / 3,) * in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, in_chans, 1, 1), persistent=False)

    @property
    def in_chans(self) -> int:
        return int(self.mean.shape[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean.dtype)  # (N, C, H, W), the model's float type
        if images.dtype == torch.uint8:
            x = x / 255.0
        x = (x - self.mean) / self.std
        return self.trunk(x)  # (N, 512, H/32, W/32)


def adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """RGB convolution weights ``(O, 3, k, k)`` for ``in_chans`` inputs, as timm's ``adapt_input_conv``:
    one channel sums the three, more repeat them (cut to ``in_chans``) scaled by ``3 / in_chans``, so the
    response to equal inputs on every channel stays the same."""
    dtype = weight.dtype
    weight = weight.to(torch.promote_types(weight.dtype, torch.float32))  # (O, 3, k, k), half widened
    if in_chans == 1:
        weight = weight.sum(dim=1, keepdim=True)  # (O, 1, k, k)
    elif in_chans != 3:
        repeat = int(math.ceil(in_chans / 3))
        weight = weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (3 / float(in_chans))  # (O, C, k, k)
    return weight.to(dtype)


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

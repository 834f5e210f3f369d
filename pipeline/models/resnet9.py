"""ResNet-9 of the fast DAWNBench CIFAR-10 entry (Myrtle.ai, D. Page 2018).

prep conv 64 -> layer1 conv 128 + maxpool + residual(2x conv 128)
-> layer2 conv 256 + maxpool -> layer3 conv 512 + maxpool + residual(2x conv 512)
-> global max pool -> linear (no bias) -> logits x 0.125.
Every conv is 3x3 followed by BatchNorm and ReLU.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models._init import init_weights

__all__ = ["ConvBNReLU", "Residual", "ResNet9", "resnet9"]


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias) -> BatchNorm -> ReLU, optionally followed by 2x2 max pool."""

    def __init__(self, in_ch: int, out_ch: int, pool: bool = False) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        ]
        if pool:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


class Residual(nn.Module):
    """x + res2(res1(x)) with identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.res1 = ConvBNReLU(channels, channels)
        self.res2 = ConvBNReLU(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res2(self.res1(x))


class ResNet9(nn.Module):
    """DAWNBench ResNet-9, ~6.57M parameters."""

    def __init__(self, num_classes: int, logit_scale: float | None = 0.125) -> None:
        super().__init__()
        self.prep = ConvBNReLU(3, 64)
        self.layer1 = nn.Sequential(ConvBNReLU(64, 128, pool=True), Residual(128))
        self.layer2 = ConvBNReLU(128, 256, pool=True)
        self.layer3 = nn.Sequential(ConvBNReLU(256, 512, pool=True), Residual(512))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(512, num_classes, bias=False)
        # The original scales logits down so the untuned softmax starts soft.
        self.logit_scale = logit_scale
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        x = self.fc(torch.flatten(self.pool(x), 1))
        if self.logit_scale is not None:
            x = x * self.logit_scale
        return x


def resnet9(num_classes: int, logit_scale: float | None = 0.125) -> ResNet9:
    """ResNet-9 with logits scaled by ``logit_scale`` (None disables scaling)."""
    return ResNet9(num_classes, logit_scale=logit_scale)

"""Pre-activation ResNet-164 of He et al. 2016, "Identity Mappings in Deep
Residual Networks": BN-ReLU-conv ordering, bottleneck units (1x1, 3x3, 1x1),
three stages of 18 units with outputs 64/128/256 (bottleneck widths 16/32/64).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models._init import init_weights

__all__ = ["PreActBottleneck", "PreActResNet", "preact_resnet164"]


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3(stride), BN-ReLU-conv1x1 (x4 width)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu3 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        # The paper's projection units share the first activation with the
        # residual path; identity units add the raw (non-activated) input.
        identity = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        return out + identity


class PreActResNet(nn.Module):
    """Pre-activation bottleneck ResNet of depth 9n+2 for 32x32 inputs."""

    def __init__(self, n: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(64, 32, n, 2)
        self.layer3 = self._stage(128, 64, n, 2)
        # Pre-activation units end in a conv, so the net needs a final BN-ReLU.
        self.bn = nn.BatchNorm2d(256)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(256, num_classes)
        init_weights(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        out_planes = planes * PreActBottleneck.expansion
        blocks = [PreActBottleneck(in_planes, planes, stride)]
        blocks += [PreActBottleneck(out_planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def preact_resnet164(num_classes: int) -> PreActResNet:
    """Pre-activation ResNet-164 (18 bottleneck units per stage), ~1.70M parameters."""
    return PreActResNet(18, num_classes)

"""CIFAR ResNets of He et al. 2016, "Deep Residual Learning", section 4.2.

Depth 6n+2: a 3x3 stem conv with 16 channels, three stages of n basic blocks
with 16/32/64 channels (feature maps 32/16/8), global average pooling and a
linear classifier. The first block of stages 2 and 3 downsamples by stride 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models._init import init_weights

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]


class PadShortcut(nn.Module):
    """Option A shortcut: subsample spatially, zero-pad the extra channels."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads dims from the last backwards: (W, W, H, H, C_before, C_after).
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut, ReLU after the addition."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(stride, planes - in_planes)
        elif shortcut == "B":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            raise ValueError(f"unknown shortcut {shortcut!r}; allowed: A, B")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs."""

    def __init__(self, n: int, num_classes: int, shortcut: str = "A") -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"unknown shortcut {shortcut!r}; allowed: A, B")
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, n, 1, shortcut)
        self.layer2 = self._stage(16, 32, n, 2, shortcut)
        self.layer3 = self._stage(32, 64, n, 2, shortcut)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int, shortcut: str) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride, shortcut)]
        blocks += [BasicBlock(planes, planes, 1, shortcut) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(num_classes: int, shortcut: str = "A") -> CifarResNet:
    """ResNet-20 (n=3), 0.27M parameters with option A."""
    return CifarResNet(3, num_classes, shortcut)


def resnet32(num_classes: int, shortcut: str = "A") -> CifarResNet:
    """ResNet-32 (n=5), 0.46M parameters with option A."""
    return CifarResNet(5, num_classes, shortcut)


def resnet44(num_classes: int, shortcut: str = "A") -> CifarResNet:
    """ResNet-44 (n=7), 0.66M parameters with option A."""
    return CifarResNet(7, num_classes, shortcut)


def resnet56(num_classes: int, shortcut: str = "A") -> CifarResNet:
    """ResNet-56 (n=9), 0.85M parameters with option A."""
    return CifarResNet(9, num_classes, shortcut)


def resnet110(num_classes: int, shortcut: str = "A") -> CifarResNet:
    """ResNet-110 (n=18), 1.7M parameters with option A."""
    return CifarResNet(18, num_classes, shortcut)

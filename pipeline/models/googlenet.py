"""GoogLeNet (Szegedy et al. 2015, "Going Deeper with Convolutions") for 32x32.

CIFAR adaptation: the 7x7/2 stem, the stem's local-response norms and the two
early max pools are replaced by a single 3x3 conv with 192 channels, so the
inception stages run at 32x32 (3a, 3b), 16x16 (4a..4e) and 8x8 (5a, 5b).
Inception channel numbers are the paper's (Table 1). Every conv is followed by
BatchNorm and ReLU; the auxiliary classifiers and dropout are omitted.

By default the 5x5 branch is factorised into two 3x3 convs, as in the widely
used CIFAR adaptation that pruning papers report against (6.16M parameters,
1.53G MACs for 10 classes); ``factorize_5x5=False`` gives the paper's single
5x5 conv (5.87M parameters for 10 classes).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models._init import init_weights

__all__ = ["ConvBNReLU", "GoogLeNet", "Inception", "googlenet"]


class ConvBNReLU(nn.Sequential):
    """Conv (no bias, BN follows) -> BatchNorm -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class Inception(nn.Module):
    """Four parallel branches concatenated along channels."""

    def __init__(
        self,
        in_ch: int,
        n1x1: int,
        n3x3red: int,
        n3x3: int,
        n5x5red: int,
        n5x5: int,
        pool_proj: int,
        factorize_5x5: bool = True,
    ) -> None:
        super().__init__()
        self.branch1 = ConvBNReLU(in_ch, n1x1, 1)
        self.branch2 = nn.Sequential(ConvBNReLU(in_ch, n3x3red, 1), ConvBNReLU(n3x3red, n3x3, 3))
        if factorize_5x5:
            self.branch3 = nn.Sequential(
                ConvBNReLU(in_ch, n5x5red, 1),
                ConvBNReLU(n5x5red, n5x5, 3),
                ConvBNReLU(n5x5, n5x5, 3),
            )
        else:
            self.branch3 = nn.Sequential(ConvBNReLU(in_ch, n5x5red, 1), ConvBNReLU(n5x5red, n5x5, 5))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), ConvBNReLU(in_ch, pool_proj, 1))
        self.out_channels = n1x1 + n3x3 + n5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


# (in, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj), Szegedy et al. Table 1.
_CFG: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "3a": (192, 64, 96, 128, 16, 32, 32),
    "3b": (256, 128, 128, 192, 32, 96, 64),
    "4a": (480, 192, 96, 208, 16, 48, 64),
    "4b": (512, 160, 112, 224, 24, 64, 64),
    "4c": (512, 128, 128, 256, 24, 64, 64),
    "4d": (512, 112, 144, 288, 32, 64, 64),
    "4e": (528, 256, 160, 320, 32, 128, 128),
    "5a": (832, 256, 160, 320, 32, 128, 128),
    "5b": (832, 384, 192, 384, 48, 128, 128),
}


class GoogLeNet(nn.Module):
    """GoogLeNet with inception blocks 3a..5b and a global-average-pool head."""

    def __init__(self, num_classes: int, factorize_5x5: bool = True) -> None:
        super().__init__()

        def block(key: str) -> Inception:
            return Inception(*_CFG[key], factorize_5x5=factorize_5x5)

        self.stem = ConvBNReLU(3, 192, 3)
        self.inception3a = block("3a")
        self.inception3b = block("3b")
        self.maxpool3 = nn.MaxPool2d(3, stride=2, padding=1)
        self.inception4a = block("4a")
        self.inception4b = block("4b")
        self.inception4c = block("4c")
        self.inception4d = block("4d")
        self.inception4e = block("4e")
        self.maxpool4 = nn.MaxPool2d(3, stride=2, padding=1)
        self.inception5a = block("5a")
        self.inception5b = block("5b")
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1024, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4c(self.inception4b(self.inception4a(x)))
        x = self.maxpool4(self.inception4e(self.inception4d(x)))
        x = self.inception5b(self.inception5a(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def googlenet(num_classes: int, factorize_5x5: bool = True) -> GoogLeNet:
    """CIFAR GoogLeNet: 6.16M parameters for 10 classes, 6.25M for 100."""
    return GoogLeNet(num_classes, factorize_5x5=factorize_5x5)

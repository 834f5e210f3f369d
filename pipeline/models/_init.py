"""Weight initialisation shared by every model of the registry."""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module) -> None:
    """He (Kaiming) normal for convolutions, fan-out for ReLU nets (He et al. 2015); BatchNorm as identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

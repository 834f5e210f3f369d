"""What every stage that trains or evaluates sets up first."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn


def _skipped(method: str) -> dict[str, Any]:
    return {"status": "done", "method": method}


def _to_device(model: nn.Module, cfg: DictConfig, device: torch.device) -> nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model


def _merged(schedule: DictConfig, changes: dict[str, Any]) -> DictConfig:
    """The training's schedule section with a phase's own settings over it."""
    out = OmegaConf.merge(schedule, changes)
    assert isinstance(out, DictConfig)
    return out

"""What every stage that trains or evaluates sets up first: threads, device, precision, the data-parallel
group and the loaders (:func:`setup`), the model, the optimizer and its learning-rate schedule."""

from __future__ import annotations

import logging
import math
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline.data.cifar import load_cifar
from pipeline.data.loaders import DeviceLoader, dataloader_loader
from pipeline.models import build_model, convert_norm
from pipeline.stages.distributed import Dist, dist_from_env, init_distributed

log = logging.getLogger("pipeline.stages.setup")


def skipped(method: str) -> dict[str, Any]:
    return {"status": "done", "method": method}


def to_device(model: nn.Module, cfg: DictConfig, device: torch.device) -> nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model


def merged_schedule(schedule: DictConfig, changes: dict[str, Any]) -> DictConfig:
    """The training's schedule section with a phase's own settings over it."""
    out = OmegaConf.merge(schedule, changes)
    assert isinstance(out, DictConfig)
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "train.device=cuda but no CUDA device is visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})"
        )
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for train.precision, or None for fp32.

    fp16 on a CPU and bf16 on a CPU or GPU without bf16 support fall back to fp32 with a warning:
    CPU autocast in low precision is many times slower than fp32 on AVX2-only processors.
    """
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            log.warning("train.precision=bf16 but this GPU has no bf16 support; using fp32")
            warnings.warn("train.precision=bf16 but this GPU has no bf16 support; using fp32")
            return None
        return torch.float16 if precision == "fp16" else torch.bfloat16
    message = f"train.precision={precision} is a GPU setting; training in fp32 on the CPU"
    log.warning(message)
    warnings.warn(message)
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def build_optimizer(
    optim: DictConfig, params: Iterable[nn.Parameter], lr: float | None = None
) -> torch.optim.Optimizer:
    """The optimizer of ``optim`` (optim.lr unless ``lr`` is given: fine-tuning phases have their own)."""
    name, wd = optim.name, float(optim.weight_decay)
    lr = float(optim.lr) if lr is None else float(lr)
    if name in ("sgd", "nesterov"):
        return torch.optim.SGD(
            params, lr=lr, momentum=float(optim.momentum), weight_decay=wd, nesterov=name == "nesterov"
        )
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd, eps=float(optim.eps))
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=wd, eps=float(optim.eps))
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=tuple(optim.betas), eps=float(optim.eps), weight_decay=wd)
    raise ValueError(f"unknown optim.name {name!r}; allowed: sgd, nesterov, adagrad, adadelta, adam, adamw")


def lr_factor(schedule: DictConfig, t: float, total: float) -> float:
    """Multiplier of the peak lr after ``t`` of ``total`` epochs (fractions allowed: set every step)."""
    warm = float(schedule.warmup_epochs)
    if t < warm:
        return (t + 1e-12) / warm
    frac = (t - warm) / max(total - warm, 1e-12)
    floor = float(schedule.min_lr_ratio)
    name = schedule.name
    if name == "constant":
        return 1.0
    if name == "step":
        return float(schedule.gamma) ** sum(1 for m in schedule.milestones if frac >= m)
    if name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    if name == "onecycle":
        # linear ramp from 10% up to the peak over pct_start, then linear decay to min_lr_ratio
        rise = float(schedule.pct_start)
        if frac < rise:
            return 0.1 + 0.9 * frac / rise
        return max(floor, 1 - (1 - floor) * (frac - rise) / max(1 - rise, 1e-12))
    raise ValueError(f"unknown schedule.name {name!r}; allowed: constant, step, cosine, onecycle")


def set_threads(cfg: DictConfig) -> None:
    n = int(cfg.train.threads) or int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)


def make_loaders(cfg: DictConfig, device: torch.device, dist: Dist = Dist()):
    """(data, train loader, val loader, test loader) for a config; the train loader yields this rank's
    share of every global batch of ``train.batch_size`` images."""
    d = load_cifar(
        cfg.data.name,
        cfg.data.root,
        val_size=int(cfg.data.val_size),
        split_seed=int(cfg.data.split_seed),
        train_size=int(cfg.data.train_size),
    )
    common: dict[str, Any] = dict(mean=d.mean, std=d.std)
    bs, ebs = int(cfg.train.batch_size) // dist.world_size, int(cfg.train.eval_batch_size)
    # a last global batch with fewer images than ranks would leave a rank with none: drop it
    n_train = len(d.train.labels)
    drop_last = dist.enabled and 0 < n_train % (bs * dist.world_size) < dist.world_size
    shard: dict[str, Any] = dict(rank=dist.rank, world_size=dist.world_size, drop_last=drop_last)
    if cfg.data.loader == "dataloader":
        train: Any = ToDevice(
            dataloader_loader(
                d.train,
                bs,
                augment=bool(cfg.data.augment),
                shuffle=True,
                seed=int(cfg.train.seed),
                num_workers=int(cfg.train.num_workers),
                **shard,
                **common,
            ),
            device,
            bool(cfg.train.channels_last),
        )
    else:
        train = DeviceLoader(
            d.train,
            bs,
            device=device,
            augment=bool(cfg.data.augment),
            shuffle=True,
            seed=int(cfg.train.seed),
            channels_last=bool(cfg.train.channels_last),
            **shard,
            **common,
        )
    val = DeviceLoader(d.val, ebs, device=device, channels_last=bool(cfg.train.channels_last), **common)
    test = DeviceLoader(d.test, ebs, device=device, channels_last=bool(cfg.train.channels_last), **common)
    return d, train, val, test


class ToDevice:
    """Moves batches of a host-side loader (the DataLoader path) to the device."""

    def __init__(self, loader: Any, device: torch.device, channels_last: bool):
        self.loader, self.device, self.channels_last = loader, device, channels_last

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch)

    def global_batch_size(self, b: int) -> int:
        return self.loader.global_batch_size(b)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for x, y in self.loader:
            yield (
                x.to(self.device, non_blocking=True).contiguous(memory_format=fmt),
                y.to(self.device, non_blocking=True),
            )


def build_for_training(cfg: DictConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The run's model, seeded by train.seed, on ``device`` in the configured memory format."""
    torch.manual_seed(int(cfg.train.seed))
    model = convert_norm(build_model(cfg.model.name, num_classes, shortcut=cfg.model.shortcut), cfg.model.norm)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass
class Context:
    """What every stage that trains or evaluates shares: device, ranks, precision and the loaders."""

    cfg: DictConfig
    device: torch.device
    dist: Dist
    amp_dtype: torch.dtype | None
    data: Any
    train_loader: Any
    val_loader: Any
    test_loader: Any


def setup(cfg: DictConfig) -> Context:
    """Threads, device, data-parallel group and loaders of a run (every rank calls this)."""
    set_threads(cfg)
    dist = dist_from_env()
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    init_distributed(dist, device)
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    data, train_loader, val_loader, test_loader = make_loaders(cfg, device, dist)
    return Context(cfg, device, dist, amp_dtype, data, train_loader, val_loader, test_loader)

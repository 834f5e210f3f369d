"""The training stage: ``train_stage(run, cfg) -> metrics``, built from plain functions
(``train_one_epoch``, ``evaluate``) that the later stages reuse for fine-tuning and calibration.

Resumable and deterministic: a checkpoint is written atomically after every epoch, every batch order
and augmentation draw is a function of (seed, epoch), and the RNG state is saved, so a run killed at
any point and restarted ends with the same weights as one that was never interrupted (CPU, same seed).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from pipeline.models import build_model
from pipeline.rundir import RunDir, atomic_write_json

log = logging.getLogger("pipeline.train")


# --------------------------------------------------------------------------------------------------
# Devices and precision
# --------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})")
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
            warnings.warn("train.precision=bf16 but this GPU has no bf16 support; using fp32")
            return None
        return torch.float16 if precision == "fp16" else torch.bfloat16
    warnings.warn(f"train.precision={precision} is a GPU setting; training in fp32 on the CPU")
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# --------------------------------------------------------------------------------------------------
# Optimizers and schedules
# --------------------------------------------------------------------------------------------------

def build_optimizer(optim: DictConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    name, lr, wd = optim.name, float(optim.lr), float(optim.weight_decay)
    if name in ("sgd", "nesterov"):
        return torch.optim.SGD(params, lr=lr, momentum=float(optim.momentum), weight_decay=wd,
                               nesterov=name == "nesterov")
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


# --------------------------------------------------------------------------------------------------
# One epoch, evaluation
# --------------------------------------------------------------------------------------------------

@dataclass
class EpochResult:
    loss: float
    acc: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def train_one_epoch(model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, *,
                    set_lr: Callable[[int], None] | None = None, scaler: torch.amp.GradScaler | None = None,
                    amp_dtype: torch.dtype | None = None, grad_clip: float = 0.0,
                    label_smoothing: float = 0.0, log_every: int = 0) -> EpochResult:
    """One pass over ``loader``. Sums stay on the device (no per-step host sync) except every
    ``log_every`` steps, where a non-finite loss stops the epoch early (the caller sees NaN)."""
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if set_lr is not None:
            set_lr(step)
        with autocast(device, amp_dtype):
            out = model(x)
            loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        n = y.shape[0]
        loss_sum += loss.detach().double() * n
        correct += (out.detach().argmax(1) == y).sum()
        seen += n
        if log_every and (step + 1) % log_every == 0:
            running = loss_sum.item() / seen
            log.info("  step %d/%d  loss %.4f", step + 1, len(loader), running)
            if not math.isfinite(running):
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return EpochResult(loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1), seen, seconds)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, amp_dtype: torch.dtype | None = None,
             max_batches: int | None = None) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy over ``loader`` (or its first ``max_batches``)."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    top1 = torch.zeros((), device=device, dtype=torch.int64)
    top5 = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with autocast(device, amp_dtype):
            out = model(x)
        out = out.float()
        loss_sum += F.cross_entropy(out, y, reduction="sum").double()
        k = min(5, out.shape[1])
        pred = out.topk(k, dim=1).indices
        hit = pred == y[:, None]
        top1 += hit[:, 0].sum()
        top5 += hit.any(dim=1).sum()
        seen += y.shape[0]
    seen = max(seen, 1)
    return {"loss": loss_sum.item() / seen, "acc": top1.item() / seen, "top5": top5.item() / seen}


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file beside ``path``, then rename: a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint, or None when there is none. A checkpoint that exists but cannot be read is an
    error, never a silent restart from scratch."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} exists but cannot be loaded ({e}); move it away to "
                           "start this run again from scratch") from e


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

def _set_threads(cfg: DictConfig) -> None:
    n = int(cfg.train.threads) or int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)


def make_loaders(cfg: DictConfig, device: torch.device):
    """(data, train loader, val loader, test loader) for a config."""
    from pipeline import data as data_mod

    d = data_mod.load_cifar(cfg.data.name, cfg.data.root, val_size=int(cfg.data.val_size),
                            split_seed=int(cfg.data.split_seed), train_size=int(cfg.data.train_size))
    common = dict(mean=d.mean, std=d.std)
    bs, ebs = int(cfg.train.batch_size), int(cfg.train.eval_batch_size)
    if cfg.data.loader == "dataloader":
        train = data_mod.dataloader_loader(d.train, bs, augment=bool(cfg.data.augment), shuffle=True,
                                           seed=int(cfg.train.seed), num_workers=int(cfg.train.num_workers),
                                           **common)
    else:
        train = data_mod.DeviceLoader(d.train, bs, device=device, augment=bool(cfg.data.augment), shuffle=True,
                                      seed=int(cfg.train.seed), channels_last=bool(cfg.train.channels_last),
                                      **common)
    val = data_mod.DeviceLoader(d.val, ebs, device=device, channels_last=bool(cfg.train.channels_last), **common)
    test = data_mod.DeviceLoader(d.test, ebs, device=device, channels_last=bool(cfg.train.channels_last),
                                 **common)
    return d, train, val, test


class _ToDevice:
    """Moves batches of a host-side loader (the DataLoader path) to the device."""

    def __init__(self, loader: Any, device: torch.device, channels_last: bool):
        self.loader, self.device, self.channels_last = loader, device, channels_last

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for x, y in self.loader:
            yield (x.to(self.device, non_blocking=True).contiguous(memory_format=fmt),
                   y.to(self.device, non_blocking=True))


def train_stage(run: RunDir, cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume) the run's model; returns the metrics written to metrics/train.json."""
    _set_threads(cfg)
    device = resolve_device(cfg.train.device)
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    epochs = int(cfg.train.epochs)

    data, train_loader, val_loader, test_loader = make_loaders(cfg, device)
    if cfg.data.loader == "dataloader":
        train_loader = _ToDevice(train_loader, device, bool(cfg.train.channels_last))
    torch.manual_seed(int(cfg.train.seed))
    model = build_model(cfg.model.name, data.num_classes, shortcut=cfg.model.shortcut).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(cfg.optim, model.parameters())
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    ckpt_path = run.checkpoints / "last.pt"
    ckpt = load_checkpoint(ckpt_path)
    history: list[dict[str, float]] = []
    start_epoch, elapsed = 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        start_epoch, history, elapsed = int(ckpt["epoch"]), list(ckpt["history"]), float(ckpt["elapsed_s"])
        log.info("resuming from %s after epoch %d/%d", ckpt_path, start_epoch, epochs)
    else:
        log.info("training %s (%.2fM params) on %s for %d epochs, %d train / %d val / %d test images, device %s",
                 cfg.model.name, n_params / 1e6, cfg.data.name, epochs, len(data.train.labels),
                 len(data.val.labels), len(data.test.labels), device)

    step_model: nn.Module = torch.compile(model) if cfg.train.compile else model
    writer = None
    if cfg.output.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops scalars logged after the checkpoint we resumed from (a kill between the
        # two writes), so curves never hold the same epoch twice
        writer = SummaryWriter(str(run.tensorboard), purge_step=start_epoch + 1 if start_epoch else None)

    peak_lr, steps = float(cfg.optim.lr), len(train_loader)
    status, diverged_epoch = "done", None
    for epoch in range(start_epoch, epochs):
        train_loader.set_epoch(epoch)

        def set_lr(step: int, _epoch: int = epoch) -> None:
            lr = peak_lr * lr_factor(cfg.schedule, _epoch + step / max(steps, 1), epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr

        res = train_one_epoch(step_model, train_loader, optimizer, set_lr=set_lr, scaler=scaler,
                              amp_dtype=amp_dtype, grad_clip=float(cfg.optim.grad_clip),
                              label_smoothing=float(cfg.train.label_smoothing), log_every=int(cfg.output.log_every))
        elapsed += res.seconds
        if not math.isfinite(res.loss):
            status, diverged_epoch = "diverged", epoch + 1
            log.warning("epoch %d: training loss is %s; stopping this run as diverged", epoch + 1, res.loss)
            break
        val = evaluate(step_model, val_loader, amp_dtype=amp_dtype)
        row = {"epoch": epoch + 1, "train_loss": res.loss, "train_acc": res.acc, "val_loss": val["loss"],
               "val_acc": val["acc"], "lr": optimizer.param_groups[0]["lr"], "images_per_s": res.images_per_s}
        history.append(row)
        log.info("epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  %.0f img/s",
                 epoch + 1, epochs, res.loss, res.acc, val["loss"], val["acc"], res.images_per_s)
        if writer is not None:
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"):
                writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("train", "val")) else key,
                                  row[key], epoch + 1)
            writer.flush()
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "epoch": epoch + 1, "history": history, "elapsed_s": elapsed,
        })
        atomic_write_json(run.progress, {
            "epoch": epoch + 1, "epochs": epochs, "val_acc_best": max(h["val_acc"] for h in history),
            "train_loss": res.loss, "elapsed_s": elapsed, "updated": time.time()})

    if writer is not None:
        writer.close()
    last = history[-1] if history else {}
    metrics: dict[str, Any] = {
        "status": status,
        "epochs": len(history),
        "train_loss": last.get("train_loss"),
        "train_acc_best": max((h["train_acc"] for h in history), default=None),
        "val_loss": last.get("val_loss"),
        "val_acc_best": max((h["val_acc"] for h in history), default=None),
        "test_loss": None, "test_acc": None, "test_top5": None,
        "images_per_s": (sum(h["images_per_s"] for h in history) / len(history)) if history else None,
        "train_time_s": elapsed,
        "params": n_params,
        "device": str(device),
        "precision": cfg.train.precision,
    }
    if status == "diverged":
        metrics["diverged_epoch"] = diverged_epoch
        return metrics
    test = evaluate(step_model, test_loader, amp_dtype=amp_dtype)
    metrics.update(test_loss=test["loss"], test_acc=test["acc"], test_top5=test["top5"])
    log.info("test acc %.4f  top-5 %.4f", test["acc"], test["top5"])
    return metrics

"""The training stage: ``train_stage(run, cfg) -> metrics``, and the figures every stage that trains records."""

from __future__ import annotations

import logging
from typing import Any

import torch.nn as nn
from omegaconf import DictConfig

from pipeline.compress.unstructured import MagnitudePruner
from pipeline.models.files import TRAINED, arch_of, save_model
from pipeline.rundir import RunDir
from pipeline.stages.checkpoint import load_checkpoint
from pipeline.stages.loop import FitResult, Phase, evaluate_test, fit
from pipeline.stages.setup import build_for_training, setup

log = logging.getLogger("pipeline.stages.train")


def history_metrics(result: FitResult) -> dict[str, Any]:
    """The table figures of a finished loop: last losses, best accuracies, speed, time."""
    history = result.history
    last = history[-1] if history else {}
    return {
        "status": result.status,
        "epochs": len(history),
        "train_loss": last.get("train_loss"),
        "train_acc_best": max((h["train_acc"] for h in history), default=None),
        "val_loss": last.get("val_loss"),
        "val_acc_best": max((h["val_acc"] for h in history), default=None),
        "test_loss": None,
        "test_acc": None,
        "test_top5": None,
        "images_per_s": (sum(h["images_per_s"] for h in history) / len(history)) if history else None,
        "train_time_s": result.elapsed_s,
        # per-epoch rows (losses, accuracies, lr, images/s, seconds so far): collect's learning curves and
        # time to a target accuracy are read from here, so the login node never opens a checkpoint
        "history": history,
    }


def divergence_metrics(result: FitResult, prefix: str = "") -> dict[str, Any]:
    """What a stage record says about a diverged loop: the epoch (``diverged_epoch``, as collect shows
    it), the 1-based step of that epoch whose loss was first not finite, the step it stopped at, that
    loss and the last finite one before it."""
    d = result.divergence or {}
    return {
        f"{prefix}diverged_epoch": result.diverged_epoch,
        f"{prefix}diverged_step": d.get("step"),
        f"{prefix}diverged_loss": d.get("loss"),
        f"{prefix}last_finite_loss": d.get("last_finite_loss"),
        f"{prefix}stopped_at_step": d.get("stopped_at_step"),
        f"{prefix}steps_per_epoch": d.get("steps"),
        **({f"{prefix}diverged_error": d["error"]} if d.get("error") else {}),
    }


def unstructured_pruner(model: nn.Module, cfg: DictConfig, total_steps: int) -> Any:
    """The magnitude pruner of ``prune.*`` over ``total_steps`` optimizer steps."""
    p = cfg.prune
    return MagnitudePruner(
        model,
        scope=str(p.scope),
        dense_first_last=bool(p.dense_first_last),
        schedule=str(p.schedule),
        final=float(p.sparsity),
        initial=float(p.initial_sparsity),
        begin=float(p.begin),
        end=float(p.end),
        power=float(p.power),
        frequency=int(p.frequency),
        total_steps=total_steps,
    )


def train_stage(run: RunDir, cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume) the run's model; returns the metrics written to metrics/train.json and saves
    the trained model as models/trained.pt. With ``prune.during: train`` the sparsity schedule runs
    inside this loop, from scratch.

    Raises :class:`pipeline.jobs.preempt.Preempted` after saving a mid-epoch checkpoint when a stop signal
    arrives. With several ranks every rank calls this; only rank 0 writes files.
    """
    ctx = setup(cfg)
    epochs = int(cfg.train.epochs)
    model = build_for_training(cfg, ctx.data.num_classes, ctx.device)
    n_params = sum(p.numel() for p in model.parameters())
    phase = Phase("train", epochs, float(cfg.optim.lr), cfg.schedule, run.checkpoints / "last.pt", run.tensorboard)
    if cfg.prune.method == "unstructured" and cfg.prune.during == "train":
        phase.pruner = unstructured_pruner(model, cfg, epochs * len(ctx.train_loader))
        phase.sparsity_tensorboard = run.tensorboard / "sparsity"
    ckpt = load_checkpoint(phase.checkpoint, run if ctx.dist.is_main else None)
    if ckpt is None:
        log.info(
            "training %s (%.2fM params) on %s for %d epochs, %d train / %d val / %d test images, device %s, %d rank(s)",
            cfg.model.name,
            n_params / 1e6,
            cfg.data.name,
            epochs,
            len(ctx.data.train.labels),
            len(ctx.data.val.labels),
            len(ctx.data.test.labels),
            ctx.device,
            ctx.dist.world_size,
        )
    result = fit(model, ctx, phase, run, ckpt)
    metrics = history_metrics(result)
    metrics.update(
        params=n_params, device=str(ctx.device), precision=cfg.train.precision, world_size=ctx.dist.world_size
    )
    if phase.pruner is not None:
        rep = phase.pruner.report()
        metrics.update(
            sparsity=rep["sparsity"],
            sparsity_target=float(cfg.prune.sparsity),
            sparsity_layers=rep["layers"],
            sparsity_log=result.sparsity,
        )
    if result.status == "diverged":
        metrics.update(divergence_metrics(result))
        return metrics
    metrics.update(evaluate_test(model, ctx))
    log.info("test acc %.4f  top-5 %.4f", metrics["test_acc"], metrics["test_top5"])
    if ctx.dist.is_main:
        save_model(
            run.models / TRAINED,
            model,
            arch_of(cfg, ctx.data.num_classes),
            extra={"stage": "train", "test_acc": metrics["test_acc"]},
        )
    return metrics

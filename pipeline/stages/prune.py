"""The prune stage: ``prune_stage(run, cfg) -> metrics``. Prunes the trained model (unstructured magnitude or
structured channels) and fine-tunes it with the training loop (:func:`pipeline.stages.loop.fit`), so a fine-tune
is as deterministic, checkpointed, stoppable and exactly resumable as training. Saves models/pruned.pt.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.compress.unstructured import weight_sparsity
from pipeline.models import count_macs
from pipeline.models.files import (
    PRUNED,
    TRAINED,
    build_from_arch,
    load_model,
    save_model,
)
from pipeline.rundir import RunDir
from pipeline.stages.budget import prune_within_budget
from pipeline.stages.checkpoint import load_checkpoint
from pipeline.stages.loop import FitResult, Phase, evaluate_test, fit
from pipeline.stages.setup import Context, merged_schedule, setup, skipped, to_device
from pipeline.stages.train import divergence_metrics, history_metrics, unstructured_pruner

log = logging.getLogger("pipeline.stages.prune")


def _weights(model: nn.Module) -> dict[str, int]:
    """Parameters and non-zero parameters."""
    params = list(model.parameters())
    return {"params": sum(p.numel() for p in params), "nonzero_params": sum(int(p.count_nonzero()) for p in params)}


def _widths(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _size(model: nn.Module) -> dict[str, Any]:
    """Parameters, non-zero parameters, MACs and each conv's width."""
    return {**_weights(model), "macs": count_macs(model), "widths": _widths(model)}


def prune_stage(run: RunDir, cfg: DictConfig) -> dict[str, Any]:
    """Prune the trained model (``prune.method``) and fine-tune it (``prune.epochs``); saves
    models/pruned.pt. With ``prune.during: train`` the training stage already pruned: its model is
    the pruned one and this stage only records its sparsity."""
    p = cfg.prune
    if p.method == "none":
        return skipped("none")
    trained, info = load_model(run.models / TRAINED)
    if p.during == "train":
        return _pruned_in_training(run, p, trained)

    ctx = setup(cfg)
    if p.sparsity == "auto":  # the largest pruning within prune.max_drop (docs/budget-design.md)
        return prune_within_budget(run, cfg, ctx, trained, info)
    before = _size(trained)
    ckpt_path = run.checkpoints / "prune.pt"
    ckpt = load_checkpoint(ckpt_path, run if ctx.dist.is_main else None)
    torch.manual_seed(int(cfg.train.seed) + 1)  # the fine-tune's own, reproducible random stream
    model, pruner = _model_to_finetune(trained, info["arch"], ckpt, cfg, ctx)
    schedule = merged_schedule(cfg.schedule, {"name": str(p.lr_schedule), "warmup_epochs": float(p.warmup_epochs)})
    tb = run.tensorboard / "prune"
    phase = Phase("prune", int(p.epochs), float(p.lr), schedule, ckpt_path, tb, pruner, tb / "sparsity")
    result = fit(model, ctx, phase, run, ckpt)
    metrics = _finetune_metrics(result, model, pruner, before, p, info)
    if result.status == "diverged":
        metrics.update(divergence_metrics(result))
        return metrics
    metrics.update(evaluate_test(model, ctx))
    log.info(
        "pruned (%s, %.2f): %d -> %d params, %d -> %d nonzero, test acc %.4f",
        p.method,
        p.sparsity,
        before["params"],
        metrics["params"],
        before["nonzero_params"],
        metrics["nonzero_params"],
        metrics["test_acc"],
    )
    if ctx.dist.is_main:
        save_model(
            run.models / PRUNED,
            model,
            info["arch"],
            extra={"stage": "prune", "test_acc": metrics["test_acc"], "method": str(p.method)},
        )
    return metrics


def _pruned_in_training(run: RunDir, p: DictConfig, trained: nn.Module) -> dict[str, Any]:
    """The record of a model the training stage pruned (``prune.during: train``): its sparsity."""
    train = run.read_metrics("train") or {}
    return {
        "status": "done",
        "method": str(p.method),
        "during": "train",
        "model": f"models/{TRAINED}",
        "sparsity": train.get("sparsity"),
        "sparsity_target": float(p.sparsity),
        "sparsity_layers": train.get("sparsity_layers"),
        "weight_sparsity": weight_sparsity(trained)["sparsity"],
        **_weights(trained),
        "test_acc": train.get("test_acc"),
        "test_top5": train.get("test_top5"),
    }


def _model_to_finetune(
    trained: nn.Module, arch: Any, ckpt: dict[str, Any] | None, cfg: DictConfig, ctx: Context
) -> tuple[nn.Module, Any]:
    """The model the fine-tune starts from, on the device, and the unstructured pruner (None for
    structured pruning: its channels are removed here, or come back with the checkpoint's shapes)."""
    p = cfg.prune
    if p.method != "structured":
        model = to_device(trained, cfg, ctx.device)
        pruner = unstructured_pruner(model, cfg, int(p.epochs) * len(ctx.train_loader))
        if int(p.epochs) == 0:
            pruner.prune_to(float(p.sparsity))
        return model, pruner
    if ckpt is not None:  # resume: the checkpoint's shapes are the pruned architecture
        return to_device(build_from_arch(arch, ckpt["model"]), cfg, ctx.device), None
    from pipeline.compress.structured import prune_structured

    model = copy.deepcopy(trained)
    prune_structured(
        model,
        ratio=float(p.sparsity),
        importance=str(p.importance),
        round_to=int(p.round_to),
        iterative_steps=int(p.iterative_steps),
        example_input=torch.zeros(2, 3, 32, 32),
    )
    return to_device(model, cfg, ctx.device), None


def _finetune_metrics(
    result: FitResult, model: nn.Module, pruner: Any, before: dict[str, Any], p: DictConfig, info: dict[str, Any]
) -> dict[str, Any]:
    """The fine-tune's history and the pruned model's size next to the trained one's."""
    metrics: dict[str, Any] = history_metrics(result)
    after = _size(model)
    if pruner is not None:  # the pruned tensors' sparsity (the target), per layer, and over all weights
        rep = pruner.report()
        metrics.update(
            sparsity=rep["sparsity"], sparsity_layers=rep["layers"], weight_sparsity=weight_sparsity(model)["sparsity"]
        )
    else:  # channels removed: the fraction of parameters gone
        metrics.update(sparsity=1 - after["params"] / before["params"])
    metrics.update(
        method=str(p.method),
        during="finetune",
        sparsity_target=float(p.sparsity),
        params=after["params"],
        nonzero_params=after["nonzero_params"],
        macs=after["macs"],
        params_before=before["params"],
        macs_before=before["macs"],
        widths={k: [before["widths"][k], v] for k, v in after["widths"].items() if k in before["widths"]},
        trained_test_acc=info.get("extra", {}).get("test_acc"),
    )
    if result.sparsity:
        metrics["sparsity_log"] = result.sparsity
    return metrics

"""The quantize stage: ``quantize_stage(run, cfg) -> metrics`` (int8 PT2E, QAT or fp16) of the pruned model
when pruning made one, else of the trained one."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.data.loaders import DeviceLoader
from pipeline.models.files import (
    FP16,
    INT8,
    INT8_PACKAGE,
    PRUNED,
    TRAINED,
    load_model,
    save_model,
)
from pipeline.rundir import RunDir
from pipeline.stages.budget import finish_int8_budget, int8_search, qat_drop
from pipeline.stages.checkpoint import load_checkpoint
from pipeline.stages.loop import Phase, evaluate, fit
from pipeline.stages.setup import make_loaders, merged_schedule, setup, skipped, to_device
from pipeline.stages.train import divergence_metrics, history_metrics

log = logging.getLogger("pipeline.stages.quantize")


def source_model_file(run: RunDir, cfg: DictConfig) -> str:
    """The model the later stages start from: the pruned one when pruning made one, else the trained."""
    if cfg.prune.method != "none" and cfg.prune.during == "finetune":
        return PRUNED
    return TRAINED


def cpu_loaders(cfg: DictConfig):
    """(data, calibration loader, test loader) on the CPU, un-augmented: int8 is built for CPU inference."""
    cpu = torch.device("cpu")
    d, _, _, test = make_loaders(cfg, cpu)
    calib = DeviceLoader(
        d.train,
        int(cfg.train.batch_size),
        device=cpu,
        augment=False,
        shuffle=True,
        seed=int(cfg.train.seed),
        channels_last=bool(cfg.train.channels_last),
        mean=d.mean,
        std=d.std,
    )
    calib.set_epoch(0)
    return d, calib, test


def quantize_stage(run: RunDir, cfg: DictConfig) -> dict[str, Any]:
    """int8 (post-training static, PT2E), qat (quantization-aware fine-tune, then int8) or fp16, of the
    pruned model when pruning ran, else of the trained one. int8 targets CPU inference: it is built and
    evaluated on the CPU, also in a GPU job."""
    q = cfg.quant
    if q.method == "none":
        return skipped("none")
    source = source_model_file(run, cfg)
    model, info = load_model(run.models / source)
    metrics: dict[str, Any] = {
        "status": "done",
        "method": str(q.method),
        "source": f"models/{source}",
        "source_test_acc": info.get("extra", {}).get("test_acc"),
    }
    if q.method == "fp16":
        return _fp16(run, cfg, model, info["arch"], metrics)

    _, calib, test = cpu_loaders(cfg)
    example = next(iter(test))[0][:2]
    if q.method == "int8":
        gm = _post_training_int8(cfg, model, calib, example, metrics)
    else:
        gm = _quantization_aware(run, cfg, model, metrics, calib, example)
        if gm is None:
            return metrics
    finish_int8_budget(run, metrics)  # quant.max_drop: fp32_layers, and a note when over budget
    _save_and_test_int8(run, cfg, gm, example, test, metrics)
    return metrics


def _fp16(run: RunDir, cfg: DictConfig, model: nn.Module, arch: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """models/fp16.pt; tested only where there is a GPU (half precision is a GPU format)."""
    from pipeline.compress import quantize as qz

    half = copy.deepcopy(model).half()
    save_model(run.models / FP16, half, arch, extra={"stage": "quantize", "method": "fp16"})
    metrics.update(model=f"models/{FP16}", **qz.file_sizes(run.models / FP16))
    if torch.cuda.is_available():
        ctx = setup(cfg)
        on_device = to_device(half, cfg, ctx.device).eval()
        # fp16 inputs: the loaders give fp32 batches, which half weights refuse without autocast
        test = evaluate(lambda x: on_device(x.half()), ctx.test_loader)
        metrics.update(test_loss=test["loss"], test_acc=test["acc"], test_top5=test["top5"], device=str(ctx.device))
    return metrics


def _post_training_int8(
    cfg: DictConfig, model: nn.Module, calib: DeviceLoader, example: torch.Tensor, metrics: dict[str, Any]
) -> Any:
    """The int8 program of ``model`` calibrated on quant.calib_batches batches, on the CPU."""
    from pipeline.compress import quantize as qz

    batches = [x for i, (x, _) in zip(range(int(cfg.quant.calib_batches)), calib)]
    model = to_device(model, cfg, torch.device("cpu"))
    if cfg.quant.max_drop is not None:  # the costliest layers stay fp32 until within budget
        gm, metrics["budget"] = int8_search(cfg, model, batches, example)
    else:
        gm = qz.quantize_int8(model, batches, example)
    metrics["calib_batches"] = len(batches)
    return gm


def _quantization_aware(
    run: RunDir, cfg: DictConfig, model: nn.Module, metrics: dict[str, Any], calib: DeviceLoader, example: torch.Tensor
) -> Any:
    """Fine-tune ``model`` with fake quantization (a checkpointed phase of the training loop), then
    convert it to an int8 program on the CPU; None (``metrics`` saying where) when the fine-tune diverged.
    With quant.max_drop the PTQ search first chooses the layers QAT leaves in fp32."""
    from pipeline.compress import quantize as qz

    fp32: list[str] = []
    if cfg.quant.max_drop is not None:
        ptq: dict[str, Any] = {}
        _post_training_int8(cfg, model, calib, example, ptq)
        metrics["budget"], fp32 = ptq["budget"], list(ptq["budget"]["fp32_layers"])
    q, ctx = cfg.quant, setup(cfg)
    model = to_device(model, cfg, ctx.device)
    train_example = next(iter(ctx.test_loader))[0][:2]
    torch.manual_seed(int(cfg.train.seed) + 2)
    prepared = qz.prepare_qat(model, train_example, fp32_modules=fp32)
    prepared.pipeline_set_mode = lambda training: qz.set_exported_mode(prepared, training)  # type: ignore[assignment]
    ckpt_path = run.checkpoints / "qat.pt"
    schedule = merged_schedule(cfg.schedule, {"name": "cosine", "warmup_epochs": 0.0, "min_lr_ratio": 0.0})
    phase = Phase("qat", int(q.epochs), float(q.lr), schedule, ckpt_path, run.tensorboard / "qat")
    result = fit(prepared, ctx, phase, run, load_checkpoint(ckpt_path, run if ctx.dist.is_main else None))
    metrics.update({f"qat_{k}": v for k, v in history_metrics(result).items() if k != "status"})
    if result.status == "diverged":
        metrics.update(status="diverged", **divergence_metrics(result))
        return None
    gm = qz.convert_qat(prepared.to("cpu"))
    if "budget" in metrics:  # the QAT model's own drop decides done / over budget
        metrics["budget"] = qat_drop(metrics["budget"], gm, cfg)
    return gm


def _save_and_test_int8(
    run: RunDir, cfg: DictConfig, gm: Any, example: torch.Tensor, test: Any, metrics: dict[str, Any]
) -> None:
    """models/int8.pt2 (and its compiled package when measure.compile), and the saved file's test scores."""
    from pipeline.compress import quantize as qz

    path = run.models / INT8
    sizes = qz.save_int8(gm, path, example)
    int8 = qz.load_int8(path)  # evaluate what is on disk, not what is in memory
    test_scores = evaluate(int8, test)
    metrics.update(
        model=f"models/{INT8}",
        test_loss=test_scores["loss"],
        test_acc=test_scores["acc"],
        test_top5=test_scores["top5"],
        **sizes,
    )
    if cfg.measure.compile:  # the deployable, fast form of int8, compiled once; measure times it
        qz.use_inductor_cache(run.path.parent.parent)
        metrics["package"] = qz.package_int8(path, run.models / INT8_PACKAGE, example)
    log.info(
        "%s: test acc %.4f (source %s), file %d bytes",
        cfg.quant.method,
        metrics["test_acc"],
        metrics["source_test_acc"],
        sizes.get("raw", 0),
    )

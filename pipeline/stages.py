"""The stages after training: ``prune_stage``, ``quantize_stage``, ``measure_stage`` (each
``stage(run, cfg) -> metrics``, listed in :data:`pipeline.rundir.STAGES`).

They reuse the training stage's pieces (:func:`pipeline.train.setup`, :func:`pipeline.train.fit`,
:func:`pipeline.train.evaluate`, the loaders), so a fine-tune is as deterministic, checkpointed,
stoppable and exactly resumable as training. A stage whose method is ``none`` records that and costs
nothing. Every model a stage makes is written under ``<run>/models/`` (:mod:`pipeline.models.files`).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline.models.files import (
    FP16,
    INT8,
    INT8_PACKAGE,
    PRUNED,
    TRAINED,
    UnreadableModel,
    build_from_arch,
    load_model,
    save_model,
)
from pipeline.rundir import RunDir, model_file_problem
from pipeline.train import (
    Phase,
    divergence_metrics,
    evaluate,
    evaluate_test,
    fit,
    history_metrics,
    load_checkpoint,
    setup,
    unstructured_pruner,
)

log = logging.getLogger("pipeline.stages")


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


def _weights(model: nn.Module) -> dict[str, int]:
    """Parameters and non-zero parameters."""
    params = list(model.parameters())
    return {"params": sum(p.numel() for p in params), "nonzero_params": sum(int(p.count_nonzero()) for p in params)}


def _widths(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# --------------------------------------------------------------------------------------------------
# prune
# --------------------------------------------------------------------------------------------------


def prune_stage(run: RunDir, cfg: DictConfig) -> dict[str, Any]:
    """Prune the trained model (``prune.method``) and fine-tune it (``prune.epochs``); saves
    models/pruned.pt. With ``prune.during: train`` the training stage already pruned: its model is
    the pruned one and this stage only records its sparsity."""
    p = cfg.prune
    if p.method == "none":
        return _skipped("none")
    from pipeline.compress.unstructured import weight_sparsity
    from pipeline.models import count_macs

    trained, info = load_model(run.models / TRAINED)
    if p.during == "train":
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

    ctx = setup(cfg)
    arch = info["arch"]
    before: dict[str, Any] = {**_weights(trained), "macs": count_macs(trained), "widths": _widths(trained)}
    ckpt_path = run.checkpoints / "prune.pt"
    ckpt = load_checkpoint(ckpt_path, run if ctx.dist.is_main else None)
    epochs = int(p.epochs)
    torch.manual_seed(int(cfg.train.seed) + 1)  # the fine-tune's own, reproducible random stream
    pruner = None
    if p.method == "structured":
        if ckpt is not None:  # resume: the checkpoint's shapes are the pruned architecture
            model = build_from_arch(arch, ckpt["model"])
        else:
            from pipeline.compress.structured import prune_structured

            model = copy.deepcopy(trained)
            example = torch.zeros(2, 3, 32, 32)
            prune_structured(
                model,
                ratio=float(p.sparsity),
                importance=str(p.importance),
                round_to=int(p.round_to),
                iterative_steps=int(p.iterative_steps),
                example_input=example,
            )
        model = _to_device(model, cfg, ctx.device)
    else:
        model = _to_device(trained, cfg, ctx.device)
        pruner = unstructured_pruner(model, cfg, epochs * len(ctx.train_loader))
        if epochs == 0:
            pruner.prune_to(float(p.sparsity))

    schedule = _merged(cfg.schedule, {"name": str(p.lr_schedule), "warmup_epochs": float(p.warmup_epochs)})
    phase = Phase(
        "prune",
        epochs,
        float(p.lr),
        schedule,
        ckpt_path,
        run.tensorboard / "prune",
        pruner,
        run.tensorboard / "prune" / "sparsity",
    )
    result = fit(model, ctx, phase, run, ckpt)
    metrics: dict[str, Any] = history_metrics(result)
    after: dict[str, Any] = {**_weights(model), "macs": count_macs(model), "widths": _widths(model)}
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
    if result.status == "diverged":
        metrics.update(divergence_metrics(result))
        return metrics
    metrics.update(evaluate_test(model, ctx))
    log.info(
        "pruned (%s, %.2f): %d -> %d params, %d -> %d nonzero, test acc %.4f",
        p.method,
        p.sparsity,
        before["params"],
        after["params"],
        before["nonzero_params"],
        after["nonzero_params"],
        metrics["test_acc"],
    )
    if ctx.dist.is_main:
        save_model(
            run.models / PRUNED,
            model,
            arch,
            extra={"stage": "prune", "test_acc": metrics["test_acc"], "method": str(p.method)},
        )
    return metrics


# --------------------------------------------------------------------------------------------------
# quantize
# --------------------------------------------------------------------------------------------------


def source_model_file(run: RunDir, cfg: DictConfig) -> str:
    """The model the later stages start from: the pruned one when pruning made one, else the trained."""
    if cfg.prune.method != "none" and cfg.prune.during == "finetune":
        return PRUNED
    return TRAINED


def _cpu_loaders(cfg: DictConfig):
    """(data, calibration loader, test loader) on the CPU, un-augmented: int8 is built for CPU inference."""
    from pipeline.data.loaders import DeviceLoader
    from pipeline.train import make_loaders

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
        return _skipped("none")
    from pipeline.compress import quantize as qz

    source = source_model_file(run, cfg)
    model, info = load_model(run.models / source)
    arch = info["arch"]
    metrics: dict[str, Any] = {
        "status": "done",
        "method": str(q.method),
        "source": f"models/{source}",
        "source_test_acc": info.get("extra", {}).get("test_acc"),
    }
    if q.method == "fp16":
        half = copy.deepcopy(model).half()
        save_model(run.models / FP16, half, arch, extra={"stage": "quantize", "method": "fp16"})
        metrics.update(model=f"models/{FP16}", **qz.file_sizes(run.models / FP16))
        if torch.cuda.is_available():
            ctx = setup(cfg)
            on_device = _to_device(half, cfg, ctx.device).eval()
            # fp16 inputs: the loaders give fp32 batches, which half weights refuse without autocast
            test = evaluate(lambda x: on_device(x.half()), ctx.test_loader)
            metrics.update(test_loss=test["loss"], test_acc=test["acc"], test_top5=test["top5"], device=str(ctx.device))
        return metrics

    d, calib, test = _cpu_loaders(cfg)
    example = next(iter(test))[0][:2]
    if q.method == "int8":
        batches = [x for i, (x, _) in zip(range(int(q.calib_batches)), calib)]
        model = _to_device(model, cfg, torch.device("cpu"))
        gm = qz.quantize_int8(model, batches, example)
        metrics["calib_batches"] = len(batches)
    else:  # qat
        ctx = setup(cfg)
        model = _to_device(model, cfg, ctx.device)
        train_example = next(iter(ctx.test_loader))[0][:2]
        torch.manual_seed(int(cfg.train.seed) + 2)
        prepared = qz.prepare_qat(model, train_example)
        prepared.pipeline_set_mode = lambda training: qz.set_exported_mode(prepared, training)  # type: ignore[assignment]
        ckpt_path = run.checkpoints / "qat.pt"
        schedule = _merged(cfg.schedule, {"name": "cosine", "warmup_epochs": 0.0, "min_lr_ratio": 0.0})
        phase = Phase("qat", int(q.epochs), float(q.lr), schedule, ckpt_path, run.tensorboard / "qat")
        result = fit(prepared, ctx, phase, run, load_checkpoint(ckpt_path, run if ctx.dist.is_main else None))
        metrics.update({f"qat_{k}": v for k, v in history_metrics(result).items() if k != "status"})
        if result.status == "diverged":
            return {**metrics, "status": "diverged", **divergence_metrics(result)}
        gm = qz.convert_qat(prepared.to("cpu"))
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
        q.method,
        metrics["test_acc"],
        metrics["source_test_acc"],
        sizes.get("raw", 0),
    )
    return metrics


# --------------------------------------------------------------------------------------------------
# measure
# --------------------------------------------------------------------------------------------------


def measure_stage(run: RunDir, cfg: DictConfig) -> dict[str, Any]:
    """Every model of the run measured side by side in this one process (timing alternates between
    them, :func:`pipeline.compress.measure.measure_artifacts`): test top-1/top-5, parameters and
    non-zero parameters, MACs, file size raw and gzip, peak inference memory, latency at batch 1,
    throughput, profiler CPU/CUDA time. CPU rows always (int8 is a CPU model); in a GPU job also CUDA
    rows of the fp32, pruned and fp16 models."""
    m = cfg.measure
    if not m.enabled:
        return _skipped("none")
    from pipeline.compress.measure import INT8_FLAGS, Artifact, cpu_flags, measure_artifacts
    from pipeline.train import _set_threads

    _check_models(run, cfg)
    _set_threads(cfg)
    threads = int(m.threads) or torch.get_num_threads()
    channels_last = bool(cfg.train.channels_last)
    compiled = bool(m.compile)
    files = [("trained", run.models / TRAINED), ("pruned", run.models / PRUNED)]
    artifacts: list[Artifact] = []
    for name, path in files:
        if path.is_file():
            # fp32 as a user runs it: eager (the 'faster' factors compare with this)
            artifacts.append(Artifact.from_model_file(name, path, channels_last=channels_last))
    int8_path = run.models / INT8
    if int8_path.is_file():
        source, _ = load_model(run.models / source_model_file(run, cfg))
        artifacts.append(_int8_artifact(run, int8_path, source, channels_last))
    if torch.cuda.is_available() and cfg.train.device != "cpu":
        for name, path in [*files, ("fp16", run.models / FP16)]:
            if path.is_file():
                artifacts.append(
                    Artifact.from_model_file(f"{name}-cuda", path, device="cuda", channels_last=channels_last)
                )
    _, _, test = _cpu_loaders(cfg)
    entries = measure_artifacts(
        artifacts,
        test,
        threads=threads,
        latency_repeats=int(m.latency_repeats),
        throughput_batch=int(m.throughput_batch),
        throughput_repeats=int(m.throughput_repeats),
        warmup=int(m.warmup),
        memory=bool(m.memory),
    )
    for e in entries:
        log.info(
            "measure %-12s top-1 %.4f  %s bytes  %.3f ms/img (batch 1)  %s img/s (batch %d)",
            e["name"],
            e.get("test_top1") or 0,
            e.get("file_bytes"),
            e.get("latency_b1_ms") or float("nan"),
            f"{e['throughput_img_s']:.0f}" if e.get("throughput_img_s") else "-",
            int(m.throughput_batch),
        )
    flags = cpu_flags()
    return {
        "status": "done",
        "threads": threads,
        "compiled": compiled,
        "cpu": _cpu_name(),
        "cpu_flags": flags,
        "cpu_int8": any(flags[f] for f in INT8_FLAGS),  # VNNI or AMX: int8 kernels faster than fp32
        "models": entries,
    }


def _int8_artifact(run: RunDir, program: Any, source: nn.Module, channels_last: bool) -> Any:
    """The int8 model as users run it: the AOTInductor package the quantize stage compiled and recorded
    (loaded only if its sha256 is the recorded one). Without one, its accuracy and size but no timing: the
    program run eagerly dequantizes, runs fp32 kernels and quantizes again (slower than fp32)."""
    from pipeline.compress.measure import Artifact

    package = (run.read_metrics("quantize") or {}).get("package") or {}
    if package.get("file") == INT8_PACKAGE and package.get("sha256"):
        return Artifact.from_package(
            "int8",
            run.models / INT8_PACKAGE,
            sha256=str(package["sha256"]),
            program=program,
            source=source,
            channels_last=channels_last,
        )
    why = f"its compile failed ({package['error']})" if package.get("error") else "measure.compile is false"
    untimed = f"int8 not timed: no compiled package ({why}); run eagerly it says nothing about int8 speed"
    return Artifact.from_pt2("int8", program, source=source, channels_last=channels_last, untimed=untimed)


def _check_models(run: RunDir, cfg: DictConfig) -> None:
    """Every model file the earlier stages made, checked whole before anything is measured: one that is
    missing, truncated or garbled raises :class:`UnreadableModel` naming it (the job then marks the stage
    that wrote it failed, so ``--rerun failed`` makes it again), not an error from inside a measurement."""
    names = [TRAINED, source_model_file(run, cfg)]
    names += {"int8": [INT8], "qat": [INT8], "fp16": [FP16]}.get(str(cfg.quant.method), [])
    for name in dict.fromkeys(names):
        path = run.models / name
        if name.endswith(".pt"):
            load_model(path)
        elif (problem := model_file_problem(path, whole=True)) is not None:
            raise UnreadableModel(path, problem)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"

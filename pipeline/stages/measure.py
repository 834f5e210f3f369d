"""The measure stage: ``measure_stage(run, cfg) -> metrics``, every model of the run measured side by side
(:func:`pipeline.compress.measure.measure_artifacts`)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.compress.measure import INT8_FLAGS, Artifact, cpu_flags, measure_artifacts
from pipeline.jobs.procs import cpu_name
from pipeline.models.files import (
    FP16,
    INT8,
    INT8_PACKAGE,
    PRUNED,
    TRAINED,
    UnreadableModel,
    load_model,
)
from pipeline.rundir import RunDir, model_file_problem
from pipeline.stages.budget import int8_fp32_layers
from pipeline.stages.quantize import cpu_loaders, source_model_file
from pipeline.stages.setup import set_threads, skipped

log = logging.getLogger("pipeline.stages.measure")


def measure_stage(run: RunDir, cfg: DictConfig) -> dict[str, Any]:
    """Every model of the run measured side by side in this one process (timing alternates between
    them, :func:`pipeline.compress.measure.measure_artifacts`): test top-1/top-5, parameters and
    non-zero parameters, MACs, file size raw and gzip, peak inference memory, latency at batch 1,
    throughput, profiler CPU/CUDA time. CPU rows always (int8 is a CPU model); in a GPU job also CUDA
    rows of the fp32, pruned and fp16 models."""
    m = cfg.measure
    if not m.enabled:
        return skipped("none")
    _check_models(run, cfg)
    set_threads(cfg)
    threads = int(m.threads) or torch.get_num_threads()
    artifacts = _artifacts(run, cfg)
    _, _, test = cpu_loaders(cfg)
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
    int8_fp32_layers(run, entries)
    flags = cpu_flags()
    return {
        "status": "done",
        "threads": threads,
        "compiled": bool(m.compile),
        "cpu": cpu_name(),
        "cpu_flags": flags,
        "cpu_int8": any(flags[f] for f in INT8_FLAGS),  # VNNI or AMX: int8 kernels faster than fp32
        "models": entries,
    }


def _artifacts(run: RunDir, cfg: DictConfig) -> list[Artifact]:
    """The run's models to measure: fp32 trained and pruned, int8 on the CPU; in a GPU job also the
    fp32, pruned and fp16 models on CUDA."""
    channels_last = bool(cfg.train.channels_last)
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
    return artifacts


def _int8_artifact(run: RunDir, program: Any, source: nn.Module, channels_last: bool) -> Any:
    """The int8 model as users run it: the AOTInductor package the quantize stage compiled and recorded
    (loaded only if its sha256 is the recorded one). Without one, its accuracy and size but no timing: the
    program run eagerly dequantizes, runs fp32 kernels and quantizes again (slower than fp32)."""
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

"""Compression targets on the CPU, every figure against fp32 eager measured in the same run.

    .venv/bin/python bench/compress.py [--quick] [--threads 2] [--only 1,2,3,4,5] [--out results.json]

Trains ResNet-20 (option A and option B shortcuts) briefly on the project's synthetic CIFAR-shaped data
(``write_synthetic`` into a temporary folder; SGD, cosine, batch 128, channels_last, through
``train_one_epoch``) so that accuracies mean something, then measures five targets:

1. int8 ResNet-20-A, batch 256: ``quantize_int8`` (16 un-augmented training batches of calibration) then
   ``compile_int8``; throughput against fp32 eager (the faster of NCHW and channels_last) and against fp32
   compiled by the same ``compile_int8`` (inductor + freezing); top-1 drop on the test split.
2. structured 50% ResNet-20-B (``prune_structured``, l2, round_to=8), fine-tuned: throughput against the
   unpruned fp32 eager model, top-1 drop, and pruned + int8 compiled against unpruned fp32 eager.
3. int8 + 70% unstructured sparsity (``MagnitudePruner.prune_to`` on the trained ResNet-20-A, fine-tuned
   with the masks held, then ``quantize_int8`` and ``save_int8``): gzip size of the self-contained .pt2
   against the raw size of the fp32 model file written by ``save_model``, with the file's breakdown.
4. pruning while training: per-step time of ResNet-20 training (batch 128, channels_last) with a
   ``MagnitudePruner(frequency=100)`` stepping after every optimizer step against the same training
   without, in interleaved blocks of steps.
5. int8's two compiled forms as the pipeline's jobs get them, each in fresh processes (``--form-child``):
   inductor in the job (``compile_int8`` at batch 1 and 256: every process compiles; run twice, cold and
   warm inductor cache) against the AOTInductor package the quantize stage builds once (``package_int8``,
   cold and warm cache), then loaded with no compile. Each process times its int8 form against the fp32
   model run eagerly (NCHW), alternating; compile, load and first-call seconds are reported.

Timings alternate between the compared models (A, B, C, A, B, C, ...) and are reported as medians; ratios
are medians of the per-round ratios (each round's models ran back to back). The machine may be shared: for
every round the CPU time other processes used is read from /proc/stat, and the figures come from the quiet
rounds (others < 0.15 cores) when there are enough of them (more rounds are run, within a time budget, to
find them), else from all rounds, which the target line then says. The all-rounds medians are printed too.
The script exits 0 whether the targets pass or not; it ends with one line per condition,
``target <name>: <measured> (goal <goal>) PASS|FAIL``, and one per target.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from omegaconf import OmegaConf

import pipeline
from pipeline.models.files import save_model
from pipeline.compress.quantize import (
    compile_int8,
    file_sizes,
    load_int8,
    package_int8,
    quantize_int8,
    save_int8,
)
from pipeline.compress.structured import prune_structured
from pipeline.compress.unstructured import MagnitudePruner
from pipeline.data.loaders import DeviceLoader
from pipeline.data.cifar import Split, load_cifar
from pipeline.data.synthetic import write_synthetic
from pipeline.models import build_model
from pipeline.stages.setup import build_optimizer
from pipeline.stages.loop import evaluate, train_one_epoch

warnings.filterwarnings("ignore", message=".*To copy construct from a tensor.*")
warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")

INFER_BATCH = 256
TRAIN_BATCH = 128

# Sizes of the two modes. The test split is cut to a multiple of the inference batch, so a compiled model
# never sees a second batch size (a new shape would recompile inside the accuracy loop).
MODES = {
    "full": dict(
        train_per_class=500,
        test_per_class=256,
        val_size=500,
        epochs=4,
        finetune_epochs=4,
        finetune_lr=0.05,
        sparse_finetune_epochs=1,
        calib_batches=16,
        rounds=15,
        max_rounds=40,
        min_quiet=8,
        budget_s=120,
        step_block=20,
        step_rounds=8,
        step_max_rounds=16,
        step_min_quiet=5,
        step_budget_s=300,
    ),
    "quick": dict(
        train_per_class=64,
        test_per_class=52,
        val_size=64,
        epochs=1,
        finetune_epochs=1,
        finetune_lr=0.05,
        sparse_finetune_epochs=1,
        calib_batches=4,
        rounds=3,
        max_rounds=3,
        min_quiet=3,
        budget_s=0,
        step_block=4,
        step_rounds=2,
        step_max_rounds=2,
        step_min_quiet=2,
        step_budget_s=0,
    ),
}

# --------------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------------


def cpu_info() -> dict[str, Any]:
    """CPU model, family/model numbers and the SIMD features that matter for int8 kernels."""
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "flags": set()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and "model_name" not in info:
                    info["model_name"] = value
                elif key == "cpu family" and "family" not in info:
                    info["family"] = int(value)
                elif key == "model" and "cpu_model" not in info:
                    info["cpu_model"] = int(value)
                elif key == "flags" and not info["flags"]:
                    info["flags"] = set(value.split())
    except OSError:
        pass
    flags = info.pop("flags")
    info["model"] = info.pop("model_name", info["model"])
    info["hypervisor"] = "hypervisor" in flags
    info["avx2"] = "avx2" in flags
    info["avx512"] = sorted(f for f in flags if f.startswith("avx512"))
    info["vnni"] = sorted(f for f in flags if "vnni" in f)
    info["amx"] = sorted(f for f in flags if f.startswith("amx"))
    info["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    info["onednn_isa"] = onednn_isa()
    return info


def onednn_isa() -> str:
    """The instruction set oneDNN dispatches to, from its verbose banner in a child process."""
    code = (
        "import torch; c = torch.nn.Conv2d(16, 16, 3, padding=1).eval()\n"
        "with torch.no_grad(): c(torch.randn(2, 16, 8, 8))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            check=False,
            env={**os.environ, "ONEDNN_VERBOSE": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in out.splitlines():
        if ",isa:" in line:
            return line.split(",isa:", 1)[1].strip()
    return "unknown"


def cpu_line(info: dict[str, Any]) -> str:
    fam = f"family {info.get('family')} model {info.get('cpu_model')}"
    return (
        f"CPU: {info['model']} ({fam}{', under a hypervisor' if info['hypervisor'] else ''}), "
        f"{os.cpu_count()} logical CPUs; avx2 {'yes' if info['avx2'] else 'no'}, "
        f"avx512 {' '.join(info['avx512']) or 'no'}, vnni {' '.join(info['vnni']) or 'no'}, "
        f"amx {' '.join(info['amx']) or 'no'}; torch kernels {info['torch_capability']}, "
        f"oneDNN isa {info['onednn_isa']}"
    )


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------

# A round counts as quiet when the other processes on the machine used less than this many cores during
# it (from /proc/stat minus this process's own CPU time). The machine is shared with other workers'
# tests: 2 OpenMP threads on 2 cores with another busy process slow fp32 eager 4-5x but compiled models
# far less, so contended rounds distort ratios, not only absolute times.
QUIET_CORES = 0.15
HZ = os.sysconf("SC_CLK_TCK")


def cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, CPU ticks of this process and its reaped children)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            s = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return 0, 0
    busy = sum(v) - v[3] - v[4]  # user nice system irq softirq steal (idle and iowait left out)
    return busy, int(s[11]) + int(s[12]) + int(s[13]) + int(s[14])


class Rounds:
    """Per-round timings of several contenders plus the other processes' CPU use in each round."""

    def __init__(self, names: list[str]) -> None:
        self.times: dict[str, list[float]] = {n: [] for n in names}
        self.other: list[float] = []  # cores used by other processes, per round
        self._mark: tuple[int, int, float] | None = None

    def begin(self) -> None:
        self._mark = (*cpu_ticks(), time.monotonic())

    def end(self) -> None:
        busy0, own0, t0 = self._mark  # type: ignore[misc]
        busy1, own1 = cpu_ticks()
        dt = max(time.monotonic() - t0, 1e-9)
        self.other.append(max(0.0, ((busy1 - busy0) - (own1 - own0)) / HZ / dt))

    @property
    def quiet(self) -> list[int]:
        return [i for i, o in enumerate(self.other) if o < QUIET_CORES]

    def used(self, min_quiet: int = 3) -> tuple[list[int], str]:
        """Rounds the figures come from: the quiet ones if there are at least ``min_quiet``, else all."""
        q = self.quiet
        if len(q) >= min_quiet:
            return q, f"{len(q)} quiet rounds of {len(self.other)}"
        return list(range(len(self.other))), f"all {len(self.other)} rounds ({len(q)} quiet: too few)"

    def pick(self, name: str, idx: list[int]) -> list[float]:
        return [self.times[name][i] for i in idx]

    def enough(self, rounds: int, max_rounds: int, min_quiet: int, started: float, budget_s: float) -> bool:
        n = len(self.other)
        if n < rounds:
            return False
        return n >= max_rounds or len(self.quiet) >= min_quiet or time.perf_counter() - started > budget_s


def interleaved(fns: dict[str, Callable[[], Any]], cfg: dict[str, Any], warmup: int = 2) -> Rounds:
    """Seconds per call of each function, the functions taking turns within every round. Runs
    ``rounds`` rounds, then more (up to ``max_rounds``, within ``budget_s``) until ``min_quiet`` were quiet."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    r = Rounds(list(fns))
    started = time.perf_counter()
    while not r.enough(cfg["rounds"], cfg["max_rounds"], cfg["min_quiet"], started, cfg["budget_s"]):
        gc.collect()
        r.begin()
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            r.times[name].append(time.perf_counter() - start)
        r.end()
    return r


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(slow: list[float], fast: list[float]) -> float:
    """Median over rounds of slow/fast (each round's two timings were taken back to back)."""
    return median([s / f for s, f in zip(slow, fast)])


def eager(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def call() -> Any:
        with torch.no_grad():
            return model(x)

    return call


def timing_rows(r: Rounds, idx: list[int], base: str, batch: int) -> list[dict[str, Any]]:
    rows = []
    for name, ts in r.times.items():
        sel = r.pick(name, idx)
        rows.append(
            {
                "model": name,
                "median_ms_all": median(ts) * 1e3,
                "median_ms": median(sel) * 1e3,
                "min_ms": min(ts) * 1e3,
                "images_per_s": batch / median(sel),
                "vs_base": paired_ratio(r.pick(base, idx), sel),
                "vs_base_all": paired_ratio(r.times[base], ts),
            }
        )
    return rows


def print_timings(title: str, rows: list[dict[str, Any]], r: Rounds, used: str) -> None:
    print(f"\n{title}")
    print(
        f"  rounds: {len(r.other)}; other processes' CPU use per round (cores): "
        + " ".join(f"{o:.2f}" for o in r.other)
    )
    print(f"  figures from {used}")
    print(
        f"  {'model':<42} {'median ms':>9} {'images/s':>9} {'vs baseline':>11}   "
        f"{'all rounds: median ms':>21} {'vs baseline':>11} {'min ms':>7}"
    )
    for row in rows:
        print(
            f"  {row['model']:<42} {row['median_ms']:>9.1f} {row['images_per_s']:>9,.0f} {row['vs_base']:>10.2f}x"
            f"   {row['median_ms_all']:>21.1f} {row['vs_base_all']:>10.2f}x {row['min_ms']:>7.1f}"
        )


# --------------------------------------------------------------------------------------------------
# Data, training
# --------------------------------------------------------------------------------------------------


def sgd(params, lr: float):
    return build_optimizer(
        OmegaConf.create({"name": "nesterov", "lr": lr, "momentum": 0.9, "weight_decay": 5e-4}), params
    )


def train(
    model: torch.nn.Module, data, epochs: int, lr: float, seed: int, after_step: Callable[[int], Any] | None = None
) -> list[dict[str, float]]:
    """SGD (Nesterov) with a per-step cosine schedule, batch 128, augmented, channels_last."""
    model.to(memory_format=torch.channels_last)
    loader = DeviceLoader(
        data.train,
        TRAIN_BATCH,
        mean=data.mean,
        std=data.std,
        augment=True,
        shuffle=True,
        seed=seed,
        drop_last=True,
        channels_last=True,
    )
    opt = sgd(model.parameters(), lr)
    steps = len(loader)
    total = epochs * steps
    history = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)

        def set_lr(step: int, _epoch: int = epoch) -> None:
            t = (_epoch * steps + step) / total
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t))

        hook = None
        if after_step is not None:

            def hook(step: int, _epoch: int = epoch) -> None:
                after_step(_epoch * steps + step)

        res = train_one_epoch(model, loader, opt, set_lr=set_lr, after_step=hook)
        history.append(
            {
                "epoch": epoch + 1,
                "loss": res.loss,
                "acc": res.acc,
                "images_per_s": res.images_per_s,
                "seconds": res.seconds,
            }
        )
        print(
            f"    epoch {epoch + 1}/{epochs}: loss {res.loss:.3f} train acc {res.acc:.3f} "
            f"({res.images_per_s:.0f} img/s)",
            flush=True,
        )
    return history


def nchw(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()


def chlast(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last).eval()


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


class Bench:
    """What the targets share: data, loaders, calibration batches, trained models, results."""

    def __init__(self, args: argparse.Namespace, cfg: dict[str, Any], tmp: Path) -> None:
        self.args, self.cfg, self.tmp = args, cfg, tmp
        self.results: dict[str, Any] = {}
        self.targets: list[tuple[str, float, str, bool, str, str]] = []  # name, value, goal, pass, unit, note
        write_synthetic(
            tmp, train_per_class=cfg["train_per_class"], test_per_class=cfg["test_per_class"], seed=args.seed
        )
        data = load_cifar("synthetic", tmp, val_size=cfg["val_size"])
        n_test = len(data.test) // INFER_BATCH * INFER_BATCH
        data.test = Split(data.test.images[:n_test], data.test.labels[:n_test])
        self.data = data
        print(
            f"\ndata: synthetic, {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images, "
            f"{data.num_classes} classes"
        )
        self.test_loader = DeviceLoader(data.test, INFER_BATCH, mean=data.mean, std=data.std)
        calib_loader = DeviceLoader(data.train, TRAIN_BATCH, mean=data.mean, std=data.std)  # un-augmented
        self.calib = [x for _, (x, _y) in zip(range(cfg["calib_batches"]), calib_loader)]
        self.x256 = next(
            iter(
                DeviceLoader(
                    Split(data.test.images[:INFER_BATCH], data.test.labels[:INFER_BATCH]),
                    INFER_BATCH,
                    mean=data.mean,
                    std=data.std,
                )
            )
        )[0]
        self.x256_cl = self.x256.contiguous(memory_format=torch.channels_last)
        self.example = self.x256[:8]
        print(f"calibration: {len(self.calib)} un-augmented training batches of {TRAIN_BATCH}")
        self._models: dict[str, torch.nn.Module] = {}
        self._int8_a: torch.nn.Module | None = None

    def target(self, name: str, value: float, goal: str, ok: bool, unit: str, note: str = "") -> None:
        self.targets.append((name, value, goal, ok, unit, note))

    def model(self, shortcut: str) -> torch.nn.Module:
        """ResNet-20 with this shortcut, trained once (eval mode; weights channels_last)."""
        if shortcut not in self._models:
            torch.manual_seed(self.args.seed)
            m = build_model("resnet20", self.data.num_classes, shortcut=shortcut)
            print(
                f"\ntraining ResNet-20-{shortcut} ({sum(p.numel() for p in m.parameters()):,} params), "
                f"{self.cfg['epochs']} epochs, batch {TRAIN_BATCH}, SGD nesterov lr 0.1 cosine",
                flush=True,
            )
            self.results[f"train_{shortcut}"] = train(m, self.data, self.cfg["epochs"], 0.1, self.args.seed)
            self._models[shortcut] = m.eval()
        return self._models[shortcut]

    def int8_a(self) -> torch.nn.Module:
        if self._int8_a is None:
            self._int8_a = quantize_int8(nchw(self.model("A")), self.calib, self.example)
        return self._int8_a

    def acc(self, fn) -> float:
        return evaluate(fn, self.test_loader)["acc"]


def bench_int8(b: Bench) -> None:
    print(f"\n== 1. int8 ResNet-20-A, batch {INFER_BATCH} (load {loadavg()})", flush=True)
    x, x_cl = b.x256, b.x256_cl
    fp32, fp32_cl = nchw(b.model("A")), chlast(b.model("A"))
    int8 = b.int8_a()
    int8_fn, int8_info = compile_int8(int8, x)
    fp32c_fn, fp32c_info = compile_int8(nchw(b.model("A")), x)
    print(f"  compile int8: {int8_info}\n  compile fp32: {fp32c_info}")
    acc = {
        "fp32 eager": b.acc(fp32),
        "fp32 compiled": b.acc(fp32c_fn),
        "int8 compiled": b.acc(int8_fn),
        "int8 eager": b.acc(int8),
    }
    print("  test top-1: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    names = (
        "fp32 eager NCHW",
        "fp32 eager channels_last",
        "fp32 compiled (compile_int8)",
        "int8 compiled (compile_int8)",
    )
    r = interleaved(
        dict(zip(names, (eager(fp32, x), eager(fp32_cl, x_cl), lambda: fp32c_fn(x), lambda: int8_fn(x)))), b.cfg
    )
    idx, used = r.used()
    base = min(names[:2], key=lambda k: median(r.pick(k, idx)))  # the faster fp32 eager layout
    rows = timing_rows(r, idx, base, INFER_BATCH)
    print_timings(
        f"  ResNet-20-A inference, batch {INFER_BATCH}, interleaved (baseline: {base}, the faster fp32 eager layout)",
        rows,
        r,
        used,
    )
    vs_eager = paired_ratio(r.pick(base, idx), r.pick(names[3], idx))
    vs_comp = paired_ratio(r.pick(names[2], idx), r.pick(names[3], idx))
    drop = (acc["fp32 eager"] - acc["int8 compiled"]) * 100
    b.target("int8_vs_fp32_eager", vs_eager, ">=3x", vs_eager >= 3, "x", used)
    b.target("int8_vs_fp32_compiled", vs_comp, ">=2x", vs_comp >= 2, "x", used)
    b.target("int8_top1_drop", drop, "<=0.5 pt", drop <= 0.5, " pt")
    b.results["int8"] = {
        "accuracy": acc,
        "timings": rows,
        "raw_s": r.times,
        "other_cores": r.other,
        "used": used,
        "eager_baseline": base,
        "compile_int8": int8_info,
        "compile_fp32": fp32c_info,
        "int8_vs_fp32_eager": vs_eager,
        "int8_vs_fp32_compiled": vs_comp,
        "top1_drop_pt": drop,
        "load": loadavg(),
    }


def bench_structured(b: Bench) -> None:
    print(f"\n== 2. structured 50% ResNet-20-B (load {loadavg()})", flush=True)
    x, x_cl = b.x256, b.x256_cl
    base_m = b.model("B")
    pruned = copy.deepcopy(base_m).eval()
    report = prune_structured(pruned, ratio=0.5, importance="l2", round_to=8, example_input=b.example)
    widths = sorted({w[1] for w in report["widths"].values()})
    print(
        f"  params {report['params_before']:,} -> {report['params_after']:,}, MACs/image "
        f"{report['macs_before'] / 1e6:.1f}M -> {report['macs_after'] / 1e6:.1f}M, widths now {widths}"
    )
    acc = {"fp32 unpruned": b.acc(nchw(base_m)), "pruned, before fine-tune": b.acc(nchw(pruned))}
    epochs, lr = b.cfg["finetune_epochs"], b.cfg["finetune_lr"]
    print(f"  fine-tuning the pruned model {epochs} epochs, lr {lr} cosine", flush=True)
    b.results["finetune_structured"] = train(pruned, b.data, epochs, lr, b.args.seed + 1)
    pruned.eval()
    pruned_nchw, pruned_cl = nchw(pruned), chlast(pruned)
    acc["pruned, fine-tuned"] = b.acc(pruned_nchw)
    int8 = quantize_int8(pruned_nchw, b.calib, b.example)
    int8_fn, int8_info = compile_int8(int8, x)
    print(f"  compile pruned int8: {int8_info}")
    acc["pruned + int8 compiled"] = b.acc(int8_fn)
    print("  test top-1: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    names = (
        "unpruned fp32 eager NCHW",
        "unpruned fp32 eager channels_last",
        "pruned fp32 eager NCHW",
        "pruned fp32 eager channels_last",
        "pruned + int8 compiled (compile_int8)",
    )
    fns = (
        eager(nchw(base_m), x),
        eager(chlast(base_m), x_cl),
        eager(pruned_nchw, x),
        eager(pruned_cl, x_cl),
        lambda: int8_fn(x),
    )
    r = interleaved(dict(zip(names, fns)), b.cfg)
    idx, used = r.used()
    base = min(names[:2], key=lambda k: median(r.pick(k, idx)))
    pruned_name = min(names[2:4], key=lambda k: median(r.pick(k, idx)))
    rows = timing_rows(r, idx, base, INFER_BATCH)
    print_timings(
        f"  ResNet-20-B inference, batch {INFER_BATCH}, interleaved (baseline: {base}; pruned: the faster layout)",
        rows,
        r,
        used,
    )
    speed = paired_ratio(r.pick(base, idx), r.pick(pruned_name, idx))
    speed_int8 = paired_ratio(r.pick(base, idx), r.pick(names[4], idx))
    drop = (acc["fp32 unpruned"] - acc["pruned, fine-tuned"]) * 100
    b.target("structured50_vs_fp32_eager", speed, ">=2x", speed >= 2, "x", used)
    b.target("structured50_top1_drop", drop, "<=1 pt", drop <= 1, " pt")
    b.target("structured50_int8_vs_fp32_eager", speed_int8, ">=8x", speed_int8 >= 8, "x", used)
    b.results["structured"] = {
        "report": {k: v for k, v in report.items() if k != "widths"},
        "widths": report["widths"],
        "accuracy": acc,
        "timings": rows,
        "raw_s": r.times,
        "other_cores": r.other,
        "used": used,
        "eager_baseline": base,
        "pruned_eager": pruned_name,
        "compile_int8": int8_info,
        "speedup": speed,
        "int8_speedup": speed_int8,
        "top1_drop_pt": drop,
        "load": loadavg(),
    }


def pt2_breakdown(path: Path) -> dict[str, dict[str, int]]:
    """Bytes of the .pt2 zip members by kind, and gzip (level 9) of each kind's bytes together."""
    import gzip

    groups: dict[str, list[bytes]] = {}
    with zipfile.ZipFile(path) as z:
        for item in z.infolist():
            name = item.filename
            if name.endswith(".json") and "/models/" in name:
                kind = "graph (models/*.json: nodes, activation scales, shapes)"
            elif name.endswith(".json"):
                kind = "tensor metadata (data/*/*_config.json)"
            elif "/data/weights/" in name:
                kind = "weight tensors (int8, scales, zero points, fp32 biases)"
            elif "/data/constants/" in name:
                kind = "constant tensors"
            elif "/data/sample_inputs/" in name:
                kind = "sample inputs (stripped)"
            else:
                kind = "other (version, byteorder, serialization id)"
            groups.setdefault(kind, []).append(z.read(item))
        stored = sum(i.compress_size for i in z.infolist())
    out = {
        k: {"bytes": sum(len(x) for x in v), "files": len(v), "gzip": len(gzip.compress(b"".join(v), 9))}
        for k, v in groups.items()
    }
    out["zip headers and alignment padding"] = {"bytes": path.stat().st_size - stored, "files": 0, "gzip": 0}
    return out


def bench_size(b: Bench) -> None:
    print(f"\n== 3. int8 + 70% unstructured sparsity, .pt2 file (load {loadavg()})", flush=True)
    tmp, data, x = b.tmp, b.data, b.x256
    arch = {"name": "resnet20", "num_classes": data.num_classes, "shortcut": "A", "norm": "batch"}
    fp32_file = tmp / "fp32.pt"
    save_model(fp32_file, b.model("A"), arch)
    fp32_size = file_sizes(fp32_file)
    sparse = copy.deepcopy(b.model("A"))
    epochs = b.cfg["sparse_finetune_epochs"]
    pruner = MagnitudePruner(
        sparse,
        final=0.7,
        scope="global",
        dense_first_last=True,
        schedule="constant",
        frequency=100,
        total_steps=epochs * (len(data.train) // TRAIN_BATCH),
    )
    pruner.prune_to(0.7)
    acc = {"fp32 dense": b.acc(nchw(b.model("A"))), "70% one-shot": b.acc(nchw(sparse))}
    print(
        f"  fine-tuning {epochs} epoch(s) with the masks held (pruner.step after every step), lr 0.02 cosine",
        flush=True,
    )
    b.results["finetune_sparse"] = train(sparse, data, epochs, 0.02, b.args.seed + 2, after_step=pruner.step)
    sparse_nchw = nchw(sparse)
    rep = pruner.report()
    acc["70% fine-tuned"] = b.acc(sparse_nchw)
    int8 = quantize_int8(sparse_nchw, b.calib, b.example)
    acc["70% + int8 (eager)"] = b.acc(int8)
    print("  test top-1: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    sparse_file = tmp / "int8_sparse70.pt2"
    sizes = save_int8(int8, sparse_file, b.example)
    dense_int8 = save_int8(b.int8_a(), tmp / "int8_dense.pt2", b.example)
    sparse_fp32_file = tmp / "fp32_sparse70.pt"
    save_model(sparse_fp32_file, sparse, arch)
    sparse_fp32 = file_sizes(sparse_fp32_file)
    t0 = time.perf_counter()
    loaded = load_int8(sparse_file)
    load_s = time.perf_counter() - t0
    with torch.no_grad():
        same = (loaded(x) - int8(x)).abs().max().item()
    int8_zero = sum(int((t == 0).sum()) for t in loaded.state_dict().values() if t.dtype == torch.int8)
    int8_total = sum(t.numel() for t in loaded.state_dict().values() if t.dtype == torch.int8)
    breakdown = pt2_breakdown(sparse_file)
    ratio = fp32_size["raw"] / sizes["gzip"]
    ratio_tensors = fp32_size["raw"] / sizes["tensors_gzip"]
    print(
        f"  sparsity of the pruned layers {rep['sparsity']:.4f} (first conv and classifier dense); int8 weights "
        f"in the file: {int8_zero:,} of {int8_total:,} zero ({int8_zero / max(int8_total, 1):.3f})"
    )
    print(f"  load_int8 of the file: {load_s:.1f} s, outputs vs the in-memory int8 module: max |diff| {same:.2e}")
    print(f"  {'file':<46} {'raw B':>10} {'gzip B':>10} {'fp32 file raw / gzip':>21}")
    for label, sz in (
        ("fp32 model file (save_model), dense", fp32_size),
        ("fp32 model file, 70% sparse", sparse_fp32),
        ("int8 .pt2 (save_int8), dense", dense_int8),
        ("int8 .pt2 (save_int8), 70% sparse", sizes),
        ("  its tensors alone (save_int8 'tensors')", {"raw": sizes["tensors"], "gzip": sizes["tensors_gzip"]}),
    ):
        print(f"  {label:<46} {sz['raw']:>10,} {sz['gzip']:>10,} {fp32_size['raw'] / sz['gzip']:>20.2f}x")
    print("  what the 70%-sparse int8 .pt2 holds:")
    for kind, v in breakdown.items():
        print(f"    {kind:<58} {v['bytes']:>9,} B in {v['files']:>3} member(s), gzip {v['gzip']:>8,} B")
    b.target("int8_sparse70_pt2_gzip_vs_fp32_file", ratio, ">=6x", ratio >= 6, "x")
    b.results["size"] = {
        "fp32_file": fp32_size,
        "fp32_sparse_file": sparse_fp32,
        "int8_dense_pt2": dense_int8,
        "int8_sparse_pt2": sizes,
        "ratio_gzip": ratio,
        "ratio_tensors_gzip": ratio_tensors,
        "breakdown": breakdown,
        "sparsity": rep["sparsity"],
        "int8_zero_fraction": int8_zero / max(int8_total, 1),
        "accuracy": acc,
        "loaded_max_abs_diff": same,
        "load_s": load_s,
    }


def bench_prune_training(b: Bench) -> None:
    cfg, data = b.cfg, b.data
    block = cfg["step_block"]
    print(
        f"\n== 4. pruning while training: ResNet-20-A, batch {TRAIN_BATCH}, channels_last, interleaved blocks of "
        f"{block} steps (load {loadavg()})",
        flush=True,
    )
    idx = torch.arange(block * TRAIN_BATCH) % len(data.train)  # exactly `block` batches per pass
    sub = Split(data.train.images[idx], data.train.labels[idx])
    runs: dict[str, dict[str, Any]] = {}
    # The schedule spans every block the pruned model may run (warm-up included), so mask updates come
    # at its steps 0, 100, 200, ... as in a real run.
    total_steps = (cfg["step_max_rounds"] + 1) * block
    for name in ("plain", "pruner"):
        torch.manual_seed(b.args.seed)
        m = build_model("resnet20", data.num_classes, shortcut="A").to(memory_format=torch.channels_last)
        loader = DeviceLoader(
            sub,
            TRAIN_BATCH,
            mean=data.mean,
            std=data.std,
            augment=True,
            shuffle=True,
            seed=b.args.seed,
            drop_last=True,
            channels_last=True,
        )
        run: dict[str, Any] = {"model": m, "loader": loader, "opt": sgd(m.parameters(), 0.05), "step": 0, "updates": []}
        if name == "pruner":
            run["pruner"] = MagnitudePruner(
                m,
                final=0.7,
                scope="global",
                dense_first_last=True,
                schedule="polynomial",
                frequency=100,
                total_steps=total_steps,
            )
        runs[name] = run

    def train_block(run: dict[str, Any], epoch: int) -> float:
        pruner = run.get("pruner")
        offset = run["step"]
        after = (lambda s: pruner.step(offset + s)) if pruner is not None else None
        before = pruner.updates if pruner is not None else 0
        run["loader"].set_epoch(epoch)
        res = train_one_epoch(run["model"], run["loader"], run["opt"], after_step=after)
        run["step"] += res.steps
        run["updates"].append((pruner.updates - before) if pruner is not None else 0)
        return res.seconds / res.steps

    for run in runs.values():  # warm-up block
        train_block(run, 0)
    r = Rounds(list(runs))
    started = time.perf_counter()
    epoch = 1
    while not r.enough(
        cfg["step_rounds"], cfg["step_max_rounds"], cfg["step_min_quiet"], started, cfg["step_budget_s"]
    ):
        # Blocks are long (seconds) and the machine drifts: the order alternates (A B, B A, ...) so that
        # neither contender is always the second one.
        order = list(runs) if epoch % 2 else list(runs)[::-1]
        r.begin()
        for name in order:
            r.times[name].append(train_block(runs[name], epoch))
        r.end()
        epoch += 1
    pruner = runs["pruner"]["pruner"]
    updates = runs["pruner"]["updates"][1:]
    # One mask update timed on its own: the global stable sort over the pruned weights plus the masks.
    update_s = []
    for _ in range(5):
        start = time.perf_counter()
        pruner.prune_to(pruner.target)
        update_s.append(time.perf_counter() - start)
    upd = median(update_s)
    idx_used, used = r.used(min_quiet=2)
    # Rounds whose pruner block held no mask update measure the per-step cost of applying the masks; the
    # updates (one per 100 steps) are added back, amortized, from the timing above.
    clean = [i for i in idx_used if updates[i] == 0] or idx_used
    masked = paired_ratio(r.pick("pruner", clean), r.pick("plain", clean))
    plain_step = median(r.pick("plain", idx_used))
    amortized = masked + upd / 100 / plain_step
    total_ratio = sum(r.pick("pruner", idx_used)) / sum(r.pick("plain", idx_used))
    print(
        f"  rounds: {len(r.other)}; other processes' CPU use per round (cores): "
        + " ".join(f"{o:.2f}" for o in r.other)
    )
    print(f"  figures from {used}")
    print(
        "  per step, ms (plain / with pruner) by round: "
        + " ".join(f"{a * 1e3:.0f}/{p * 1e3:.0f}" for a, p in zip(r.times["plain"], r.times["pruner"]))
    )
    print(
        f"  median per step: plain {plain_step * 1e3:.1f} ms, with pruner "
        f"{median(r.pick('pruner', idx_used)) * 1e3:.1f} ms; paired ratio over rounds without a mask update "
        f"({len(clean)}): {masked:.3f}"
    )
    print(
        f"  one mask update, timed alone: {upd * 1e3:.1f} ms = {upd / 100 * 1e3:.2f} ms per step at frequency "
        f"100 ({upd / 100 / plain_step * 100:.2f}% of a plain step)"
    )
    print(
        f"  mask updates inside the measured blocks: {sum(updates)} in {len(updates) * block} steps; sparsity "
        f"now {pruner.report()['sparsity']:.3f}; total-time ratio over the used rounds (updates included) "
        f"{total_ratio:.3f}"
    )
    overhead = (amortized - 1) * 100
    b.target("prune_while_training_step_overhead", overhead, "<=5%", overhead <= 5, "%", used)
    b.results["prune_training"] = {
        "s_per_step": r.times,
        "other_cores": r.other,
        "used": used,
        "updates": updates,
        "update_s": update_s,
        "masked_ratio": masked,
        "amortized_ratio": amortized,
        "total_ratio": total_ratio,
        "load": loadavg(),
    }


# --------------------------------------------------------------------------------------------------
# 5. int8 compiled in the job, or packaged once
# --------------------------------------------------------------------------------------------------

FORMS = (  # (label, child mode, cache folder): run in this order, so the second of a pair finds a warm cache
    ("compiled in the job, cold cache", "jit", "cache-jit"),
    ("compiled in the job, warm cache", "jit", "cache-jit"),
    ("package built, cold cache", "build", "cache-package"),
    ("package built, warm cache", "build", "cache-package"),
    ("package loaded (no compile)", "package", "cache-load"),
)


def form_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One fresh process of target 5: build or load the int8 form, then time it against fp32 eager."""
    import torch._inductor  # imported before any clock starts, in every mode alike
    from torch._dynamo.utils import counters

    from pipeline.models.files import load_int8_package, load_model

    torch.set_num_threads(spec["threads"])
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = spec["cache"]
    x1, xb = torch.randn(1, 3, 32, 32), torch.randn(INFER_BATCH, 3, 32, 32)
    fp32 = load_model(Path(spec["fp32"]))[0]
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    if spec["mode"] == "build":
        out["package"] = package_int8(Path(spec["program"]), Path(spec["package"]), x1)
        out["build_s"] = time.perf_counter() - t0
        return out
    if spec["mode"] == "jit":
        fn, info = compile_int8(load_int8(Path(spec["program"])), x1)
        out["compile_b1_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        fn(xb)
        out["compile_batch_s"] = time.perf_counter() - t1
        out["compiled"] = info["compiled"]
    else:
        run = load_int8_package(Path(spec["package"]), spec["sha256"])
        out["load_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        run(x1)
        out["first_b1_s"] = time.perf_counter() - t1
        fn = run
    out["ready_s"] = time.perf_counter() - t0
    out["inductor_counters"] = sum(counters["inductor"].values())
    r = interleaved(
        {
            "fp32 b1": eager(fp32, x1),
            "int8 b1": lambda: fn(x1),
            "fp32 b256": eager(fp32, xb),
            "int8 b256": lambda: fn(xb),
        },
        spec["cfg"],
    )
    idx, out["used"] = r.used(spec["cfg"]["min_quiet"])
    out["ms"] = {k: median(r.pick(k, idx)) * 1e3 for k in r.times}
    out["int8_vs_fp32_b1"] = paired_ratio(r.pick("fp32 b1", idx), r.pick("int8 b1", idx))
    out["int8_vs_fp32_b256"] = paired_ratio(r.pick("fp32 b256", idx), r.pick("int8 b256", idx))
    return out


def run_form_child(spec: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    r = subprocess.run(
        [sys.executable, __file__, "--form-child", json.dumps(spec)], capture_output=True, text=True, timeout=1800
    )
    if r.returncode != 0:
        raise RuntimeError(f"--form-child {spec['mode']} exited {r.returncode}: {r.stderr[-2000:]}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    got["process_s"] = time.perf_counter() - started
    return got


def bench_int8_forms(b: Bench) -> None:
    print(f"\n== 5. int8 ResNet-20-A compiled in the job or packaged once, fresh processes (load {loadavg()})")
    folder = b.tmp / "forms"
    folder.mkdir()
    program, fp32 = folder / "int8.pt2", folder / "fp32.pt"
    save_int8(b.int8_a(), program, b.example)
    arch = {"name": "resnet20", "num_classes": b.data.num_classes, "shortcut": "A", "norm": "batch"}
    save_model(fp32, nchw(b.model("A")), arch)
    spec = {"program": str(program), "fp32": str(fp32), "threads": torch.get_num_threads(), "cfg": b.cfg}
    results: dict[str, Any] = {}
    package = folder / "int8.so.pt2"
    for label, mode, cache in FORMS:
        child = {**spec, "mode": mode, "cache": str(folder / cache), "package": str(package)}
        if mode == "package":  # the last build's: AOTInductor packages are not byte-for-byte reproducible
            child["sha256"] = results["package built, warm cache"]["package"]["sha256"]
        results[label] = got = run_form_child(child)
        shown = {k: v for k, v in got.items() if k not in ("package", "used")}
        print(f"  {label}: " + json.dumps(shown, default=lambda v: round(v, 3) if isinstance(v, float) else v))
    jit, pkg = results["compiled in the job, warm cache"], results["package loaded (no compile)"]
    b.target(
        "int8_package_compiles_nothing_when_loaded", pkg["inductor_counters"], "0", pkg["inductor_counters"] == 0, ""
    )
    ratio = pkg["int8_vs_fp32_b256"]
    b.target("int8_package_vs_fp32_eager_b256", ratio, ">=3x", ratio >= 3, "x", pkg["used"])
    print(
        f"  ready to run: {jit['ready_s']:.1f} s compiled in the job (warm cache) against {pkg['ready_s']:.2f} s "
        f"for the package; int8 vs fp32 eager at batch 1 / {INFER_BATCH}: in the job "
        f"{jit['int8_vs_fp32_b1']:.2f}x / {jit['int8_vs_fp32_b256']:.2f}x, package "
        f"{pkg['int8_vs_fp32_b1']:.2f}x / {pkg['int8_vs_fp32_b256']:.2f}x"
    )
    b.results["int8_forms"] = results


TARGETS = {
    "1": ("1_int8_resnet20", bench_int8, 3),
    "2": ("2_structured50", bench_structured, 3),
    "3": ("3_int8_sparse70_size", bench_size, 1),
    "4": ("4_prune_while_training", bench_prune_training, 1),
    "5": ("5_int8_compiled_forms", bench_int8_forms, 2),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke version (fewer images, epochs, repeats)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="1,2,3,4,5", help="comma-separated targets to run (default: all five)")
    ap.add_argument("--rounds", type=int, default=None, help="minimum timing rounds per comparison")
    ap.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs after structured pruning")
    ap.add_argument("--out", type=Path, default=None, help="write every figure to this JSON file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--form-child", default=None, help=argparse.SUPPRESS)  # target 5's fresh processes
    args = ap.parse_args()
    if args.form_child:
        print(json.dumps(form_child(json.loads(args.form_child))))
        return 0
    only = [t.strip() for t in args.only.split(",") if t.strip()]
    if not only or any(t not in TARGETS for t in only):
        ap.error(f"--only takes targets among {', '.join(TARGETS)}")
    mode = "quick" if args.quick else "full"
    cfg = dict(MODES[mode])
    if args.rounds:
        cfg["rounds"] = args.rounds
        cfg["max_rounds"] = max(cfg["max_rounds"], args.rounds)
    if args.finetune_epochs:
        cfg["finetune_epochs"] = args.finetune_epochs
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    import torchao

    info = cpu_info()
    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"command: {command}")
    print(cpu_line(info))
    print(
        f"torch {torch.__version__}, torchao {torchao.__version__}, python {platform.python_version()}, "
        f"threads {torch.get_num_threads()}, mode {mode}, pipeline from {Path(pipeline.__file__).parent}"
    )
    print(
        f"load average at start: {loadavg()}; a timing round is quiet when other processes used "
        f"< {QUIET_CORES} cores in it"
    )
    sections: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        t0 = time.perf_counter()
        b = Bench(args, cfg, Path(tmp))
        b.results.update(
            {
                "command": command,
                "cpu": info,
                "torch": torch.__version__,
                "torchao": torchao.__version__,
                "threads": torch.get_num_threads(),
                "mode": mode,
                "config": cfg,
                "load_start": loadavg(),
            }
        )
        sections["data"] = time.perf_counter() - t0
        for key in only:
            t0 = time.perf_counter()
            TARGETS[key][1](b)
            sections[TARGETS[key][0]] = time.perf_counter() - t0
            gc.collect()

    total = time.perf_counter() - t_start
    b.results.update(
        {
            "sections_s": sections,
            "total_s": total,
            "load_end": loadavg(),
            "targets": [
                {"name": n, "value": v, "goal": g, "pass": ok, "timings_from": note}
                for n, v, g, ok, _, note in b.targets
            ],
        }
    )
    print(
        "\nsections (training included where first needed): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in sections.items())
        + f"; total {total:.0f} s"
    )
    print(f"load average at end: {loadavg()}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(b.results, indent=1, default=str))
        print(f"wrote {args.out}")
    print()
    for name, value, goal, ok, unit, note in b.targets:
        shown = f"{value:+.1f}%" if unit == "%" else f"{value:.2f}{unit}"
        busy = "  [machine busy: timings from " + note + "]" if note.startswith("all") else ""
        print(f"target {name}: {shown} (goal {goal}) {'PASS' if ok else 'FAIL'}{busy}")
    pos = 0
    for key in only:
        name, _, n = TARGETS[key]
        ts = b.targets[pos : pos + n]
        pos += n
        print(f"target {name}: {'PASS' if all(t[3] for t in ts) else 'FAIL'} ({sum(t[3] for t in ts)}/{n} conditions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

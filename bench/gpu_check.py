"""Every CUDA path of the project in one command, one `gpu <path>: <figure> PASS|FAIL|SKIP` line each.

    python bench/gpu_check.py [--json gpu.json] [--paths 1,2,3,4,5,6]     # on one GPU, a few minutes
    python bench/gpu_check.py --cpu-dry-run [--json dry.json]             # the same code on the CPU, tiny sizes
    srun --gres=gpu:1 --time=10 python bench/gpu_check.py --json gpu.json # a cluster's GPU node

Paths (README "GPUs"): 1 fp32 / fp16 (autocast + GradScaler) / bf16 training of ResNet-20; 2 channels_last and
torch.compile (the compiled step against eager, and the speed of each); 3 the DeviceLoader against the
torchvision DataLoader baseline; 4 study 4's recipe (sweeps/fast.yaml: ResNet-9, batch 512, fp16, one-cycle),
one epoch, beside one epoch of airbench94 on the same data; 5 `pipeline.run` train -> structured prune ->
int8 (CPU) and fp16 (GPU) -> measure with its CUDA rows, then `pipeline.collect`; 6 DDP with two ranks (NCCL
on two GPUs; gloo on CUDA tensors with one GPU, NCCL then unproven).

Everything runs through the project's own code (train_one_epoch, DeviceLoader, the models, pipeline.run,
pipeline.collect) on CIFAR-shaped synthetic data that it writes with pipeline.data's writer in the cifar10
layout, in a temporary folder. Every figure goes to --json (written after each path, so a killed run keeps what
it measured); the BENCHMARKS.md rows are printed at the end; the exit code is 1 if any path failed.

``--cpu-dry-run`` runs each path on the CPU with tiny sizes, so a test keeps this script from rotting: fp16 and
bf16 fall back to fp32 as the project does on a CPU (the line says so), torch.compile uses the aot_eager backend
(inductor's CPU compile is tested elsewhere in the suite, and takes half a minute here), airbench is skipped
(it hard-wires CUDA) and DDP uses GroupNorm (SyncBatchNorm needs GPUs).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# What the lent GPU machine lacks and `make gpu-wheels` carries: (module, needed by)
PACKAGES = (
    ("omegaconf", "every path (pipeline.config)"),
    ("torchao", "path 5 (int8)"),
    ("torch_pruning", "path 5 (structured pruning)"),
    ("airbench", "path 4 (airbench94 beside the fast recipe; skipped without it)"),
    ("submitit", "not this script (sweeps on a cluster)"),
)
CLASSES = 10


@dataclass(frozen=True)
class Sizes:
    """How much work each path does: a few minutes on one GPU, or seconds on a CPU (the dry run)."""

    train_per_class: int  # synthetic cifar10 train images per class (5,000 = the real 50,000)
    test_per_class: int
    batch: int  # paths 1-3
    warm_steps: int  # untimed steps first (cudnn's algorithm choice, allocator warm-up)
    steps: int  # timed steps (path 1: the loss must fall from the warm-up steps to these)
    lr: float  # path 1: peak learning rate (SGD, Nesterov momentum 0.9)
    compile_steps: int  # path 2: timed steps per variant
    variant_warm_steps: int  # path 2: untimed steps per variant first (the compile happens here)
    compile_backend: str
    loader_workers: int  # path 3: DataLoader worker processes of the baseline
    fast_batch: int  # path 4 (fast.yaml says 512)
    fast_train_size: int  # path 4: 0 = all 49,000 (fast.yaml keeps 1,000 of 50,000 for validation)
    run_train_size: int  # path 5: images the tiny pipeline.run trains on
    run_measure: tuple[str, ...]  # path 5: measure.* overrides
    ddp_train_size: int  # path 6
    ddp_norm: str  # path 6: batch (SyncBatchNorm on GPUs) or group (CPU: per-rank statistics otherwise)


GPU_SIZES = Sizes(
    train_per_class=5000,
    test_per_class=100,
    batch=128,
    warm_steps=30,
    steps=270,
    lr=0.05,
    compile_steps=50,
    variant_warm_steps=10,
    compile_backend="inductor",
    loader_workers=min(8, os.cpu_count() or 2),
    fast_batch=512,
    fast_train_size=0,
    run_train_size=2000,
    run_measure=("measure.latency_repeats=20", "measure.throughput_batch=256", "measure.throughput_repeats=5"),
    ddp_train_size=512,
    ddp_norm="batch",
)
DRY_SIZES = Sizes(
    train_per_class=100,
    test_per_class=10,
    batch=32,
    warm_steps=4,
    steps=8,
    lr=0.05,
    compile_steps=2,
    variant_warm_steps=1,
    compile_backend="aot_eager",
    loader_workers=2,
    fast_batch=32,
    fast_train_size=64,
    run_train_size=64,
    run_measure=(
        "measure.compile=false",
        "measure.memory=false",
        "measure.latency_repeats=2",
        "measure.throughput_batch=16",
        "measure.throughput_repeats=1",
        "measure.warmup=1",
    ),
    ddp_train_size=100,
    ddp_norm="group",
)


@dataclass
class Result:
    """One line of output: ``gpu <name>: <figure> <status>`` (+ why, when it did not pass)."""

    name: str
    figure: str = ""
    status: str = "PASS"  # PASS | FAIL | SKIP
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def fail(self, reason: str) -> Result:
        self.status, self.reason = "FAIL", reason
        return self

    def line(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"gpu {self.name}: {self.figure or '-'} {self.status}{why}  [{self.seconds:.0f} s]"


@dataclass
class Check:
    """What every path shares: the device, the sizes, the data on disk and its loaded splits."""

    device: torch.device
    sizes: Sizes
    dry: bool
    work: Path
    data_root: Path
    data: Any = None  # pipeline.data.CifarData (train: 49,000 images after fast.yaml's validation split)


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision_note(precision: str, device: torch.device) -> str:
    """What the project does with train.precision on this device (its own rule, pipeline.stages.setup)."""
    from pipeline.stages.setup import autocast_dtype

    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said once already, by the path that trains
        dtype = autocast_dtype(precision, device)
    if precision != "fp32" and dtype is None:
        return f"{precision} fell back to fp32 on {device.type}"
    return ""


def config(*overrides: str):
    """The project's config: schema defaults, configs/base.yaml, then ``overrides``."""
    from pipeline.config import load_config

    return load_config([REPO / "configs" / "base.yaml"], list(overrides))


def count_steps(n: int) -> Callable[[], bool]:
    """A ``should_stop`` for train_one_epoch that ends the epoch after ``n`` steps."""
    calls = [0]

    def stop() -> bool:
        calls[0] += 1
        return calls[0] >= n

    return stop


def train_steps(model, loader, optimizer, n: int, *, epoch: int = 0, amp_dtype=None, scaler=None, **kw):
    """``n`` steps of pipeline.stages.loop.train_one_epoch from the start of ``epoch`` (its EpochResult)."""
    from pipeline.stages.loop import train_one_epoch

    loader.set_epoch(epoch)
    return train_one_epoch(
        model, loader, optimizer, amp_dtype=amp_dtype, scaler=scaler, should_stop=count_steps(n), **kw
    )


def device_loader(check: Check, batch: int, *, channels_last: bool = True):
    """The project's DeviceLoader over the training split, augmented and shuffled as in training."""
    from pipeline.data.loaders import DeviceLoader

    d = check.data
    return DeviceLoader(
        d.train,
        batch,
        device=check.device,
        mean=d.mean,
        std=d.std,
        augment=True,
        shuffle=True,
        drop_last=True,
        channels_last=channels_last,
    )


def fresh_model(cfg, device: torch.device):
    from pipeline.stages.setup import build_for_training, build_optimizer

    model = build_for_training(cfg, CLASSES, device)
    return model, build_optimizer(cfg.optim, model.parameters())


def metrics(run, stage: str) -> dict[str, Any]:
    """A run folder's record of ``stage`` ({} when there is none)."""
    return run.read_metrics(stage) or {}


def rate(res) -> float:
    return res.images / max(res.seconds, 1e-9)


# --------------------------------------------------------------------------------------------------
# Path 1: fp32, fp16 (autocast + GradScaler), bf16
# --------------------------------------------------------------------------------------------------


def path_precision(check: Check, precision: str) -> Result:
    from pipeline.stages.setup import autocast_dtype

    s = check.sizes
    r = Result(f"train-{precision}")
    cfg = config("model.name=resnet20", f"train.precision={precision}", f"optim.lr={s.lr}")
    amp = autocast_dtype(precision, check.device)
    model, opt = fresh_model(cfg, check.device)
    scaler = torch.amp.GradScaler(check.device.type) if amp == torch.float16 else None
    loader = device_loader(check, s.batch)
    first = train_steps(model, loader, opt, s.warm_steps, amp_dtype=amp, scaler=scaler)
    rest = train_steps(model, loader, opt, s.steps, epoch=1, amp_dtype=amp, scaler=scaler)
    scale = scaler.get_scale() if scaler is not None else None
    r.figures = {
        "images_per_s": rate(rest),
        "loss_first_steps": first.loss,
        "loss_later_steps": rest.loss,
        "steps": first.steps + rest.steps,
        "batch": s.batch,
        "autocast_dtype": str(amp).removeprefix("torch.") if amp is not None else None,
        "grad_scaler_scale": scale,
    }
    note = precision_note(precision, check.device)
    r.figure = (
        f"{rate(rest):,.0f} img/s, loss {first.loss:.3f} -> {rest.loss:.3f} over {first.steps + rest.steps} steps"
        + (f", GradScaler scale {scale:g}" if scale is not None else "")
        + (f" ({note})" if note else "")
    )
    if first.diverged or rest.diverged or not math.isfinite(rest.loss):
        return r.fail(f"loss not finite: {rest.diverged or first.diverged}")
    if not rest.loss < first.loss:
        return r.fail("the loss did not fall")
    if precision == "fp16" and amp is not None and not (scale is not None and math.isfinite(scale) and scale > 0):
        return r.fail(f"GradScaler scale is {scale}")
    return r


# --------------------------------------------------------------------------------------------------
# Path 2: channels_last and torch.compile
# --------------------------------------------------------------------------------------------------


def _one_step_outputs(model, x, y) -> tuple[float, torch.Tensor]:
    """Loss and flat gradient of one training-mode forward and backward (no optimizer step)."""
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    return float(loss), torch.cat([p.grad.detach().float().flatten() for p in params])


def _compiled_matches_eager(check: Check, backend: str) -> dict[str, float]:
    """One step of the same model eager and compiled, channels_last, on the same batch."""
    import copy

    cfg = config("model.name=resnet20", "train.channels_last=true")
    model, _ = fresh_model(cfg, check.device)
    twin = copy.deepcopy(model)
    loader = device_loader(check, check.sizes.batch)
    loader.set_epoch(0)
    x, y = next(iter(loader))
    loss_e, grad_e = _one_step_outputs(model, x, y)
    loss_c, grad_c = _one_step_outputs(torch.compile(twin, backend=backend), x, y)
    return {
        "loss_eager": loss_e,
        "loss_compiled": loss_c,
        "loss_rel_diff": abs(loss_c - loss_e) / max(abs(loss_e), 1e-12),
        "grad_rel_diff": float((grad_c - grad_e).norm() / grad_e.norm().clamp_min(1e-12)),
    }


def _variant_rate(check: Check, channels_last: bool, backend: str | None) -> tuple[float, float]:
    """(images/s, seconds of the warm-up steps, compile included) of ResNet-20 training."""
    s = check.sizes
    cfg = config("model.name=resnet20", f"train.channels_last={str(channels_last).lower()}")
    model, opt = fresh_model(cfg, check.device)
    step_model = torch.compile(model, backend=backend) if backend else model
    loader = device_loader(check, s.batch, channels_last=channels_last)
    t = time.perf_counter()
    train_steps(step_model, loader, opt, s.variant_warm_steps)
    warm = time.perf_counter() - t
    return rate(train_steps(step_model, loader, opt, s.compile_steps, epoch=1)), warm


def path_compile(check: Check) -> Result:
    backend = check.sizes.compile_backend
    r = Result("channels_last+compile")
    match = _compiled_matches_eager(check, backend)
    nchw, _ = _variant_rate(check, False, None)
    nhwc, _ = _variant_rate(check, True, None)
    compiled, compile_s = _variant_rate(check, True, backend)
    r.figures = {
        **match,
        "backend": backend,
        "eager_nchw_images_per_s": nchw,
        "eager_channels_last_images_per_s": nhwc,
        "compiled_channels_last_images_per_s": compiled,
        "compile_warmup_s": compile_s,
    }
    r.figure = (
        f"img/s eager NCHW {nchw:,.0f}, channels_last {nhwc:,.0f}, compiled ({backend}) {compiled:,.0f} "
        f"(first steps {compile_s:.0f} s); compiled vs eager loss {match['loss_rel_diff']:.1e}, "
        f"grad {match['grad_rel_diff']:.1e}"
    )
    # TF32 convolutions and fused kernels reorder float sums: a loss within 1e-3, gradients within 2%
    if not (match["loss_rel_diff"] < 1e-3 and match["grad_rel_diff"] < 2e-2):
        return r.fail("the compiled step does not match eager")
    return r


# --------------------------------------------------------------------------------------------------
# Path 3: DeviceLoader against the torchvision DataLoader
# --------------------------------------------------------------------------------------------------


def path_loader(check: Check) -> Result:
    from bench.loader import time_epoch
    from pipeline.data.loaders import DeviceLoader, dataloader_loader
    from pipeline.stages.setup import ToDevice

    d, s, dev = check.data, check.sizes, check.device
    batch = s.fast_batch
    kw: dict[str, Any] = dict(mean=d.mean, std=d.std, augment=True, shuffle=True, seed=0)
    r = Result("loader")
    ours = DeviceLoader(d.train, batch, device=dev, channels_last=True, **kw)
    n_ours, t_ours = time_epoch(ours, 3, str(dev))
    base = ToDevice(dataloader_loader(d.train, batch, num_workers=s.loader_workers, **kw), dev, True)
    n_base, t_base = time_epoch(base, 3, str(dev))
    x, _ = next(iter(ours))
    r.figures = {
        "device_loader_images_per_s": n_ours / t_ours,
        "dataloader_images_per_s": n_base / t_base,
        "speedup": (n_ours / t_ours) / (n_base / t_base),
        "images": n_ours,
        "batch": batch,
        "dataloader_workers": s.loader_workers,
    }
    r.figure = (
        f"DeviceLoader {n_ours / t_ours:,.0f} img/s vs DataLoader ({s.loader_workers} workers, copied to "
        f"{dev.type}) {n_base / t_base:,.0f} img/s: {r.figures['speedup']:.1f}x, {n_ours:,} images, batch {batch}"
    )
    if x.device.type != dev.type or tuple(x.shape[1:]) != (3, 32, 32):
        return r.fail(f"batches are {tuple(x.shape)} on {x.device}")
    if check.dry:  # CPU timings on a shared machine prove nothing: reported, not judged
        r.figure += " (speed not judged in a dry run)"
    elif r.figures["speedup"] < 1:
        return r.fail("the DeviceLoader is slower than the DataLoader")
    return r


# --------------------------------------------------------------------------------------------------
# Path 4: study 4's recipe, one epoch, and airbench94 beside it
# --------------------------------------------------------------------------------------------------


def fast_overrides(check: Check) -> list[str]:
    """sweeps/fast.yaml's `set:` block as overrides, on this check's data and device."""
    from omegaconf import OmegaConf

    sweep = OmegaConf.load(REPO / "sweeps" / "fast.yaml")
    out = [f"{k}={v}" for k, v in OmegaConf.to_container(sweep.set).items()]  # type: ignore[union-attr]
    out += [f"data.root={check.data_root}", f"train.device={check.device.type}"]
    if check.dry:
        s = check.sizes
        out += [f"train.batch_size={s.fast_batch}", f"data.train_size={s.fast_train_size}", "data.val_size=100"]
    return out


def path_fast(check: Check) -> Result:
    from pipeline.stages.loop import evaluate
    from pipeline.stages.setup import lr_factor, setup

    cfg = config(*fast_overrides(check))
    ctx = setup(cfg)
    model, opt = fresh_model(cfg, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type) if ctx.amp_dtype == torch.float16 else None
    steps, epochs, peak = len(ctx.train_loader), int(cfg.train.epochs), float(cfg.optim.lr)

    def set_lr(step: int) -> None:  # the recipe's one-cycle schedule, epoch 1 of 24
        for g in opt.param_groups:
            g["lr"] = peak * lr_factor(cfg.schedule, step / steps, epochs)

    kw = dict(amp_dtype=ctx.amp_dtype, scaler=scaler, label_smoothing=float(cfg.train.label_smoothing))
    train_steps(model, ctx.train_loader, opt, min(10, max(1, steps // 4)), set_lr=set_lr, **kw)  # warm-up
    sync(ctx.device)
    res = train_steps(model, ctx.train_loader, opt, steps, set_lr=set_lr, **kw)
    test = evaluate(model, ctx.test_loader, amp_dtype=ctx.amp_dtype)
    r = Result("fast-recipe")
    r.figures = {
        "epoch_s": res.seconds,
        "images": res.images,
        "images_per_s": rate(res),
        "batch": int(cfg.train.batch_size),
        "epochs_in_recipe": epochs,
        "train_loss": res.loss,
        "test_acc_after_1_epoch": test["acc"],
        "grad_scaler_scale": scaler.get_scale() if scaler is not None else None,
    }
    note = precision_note(str(cfg.train.precision), ctx.device)
    r.figure = (
        f"{res.seconds:.2f} s/epoch ({res.images:,} images, batch {int(cfg.train.batch_size)}, "
        f"{rate(res):,.0f} img/s; {epochs} epochs ~ {epochs * res.seconds:.0f} s), test acc after 1 epoch "
        f"{test['acc']:.3f}" + (f" ({note})" if note else "")
    )
    if res.diverged or not math.isfinite(res.loss) or res.steps != steps:
        return r.fail(f"epoch ended at step {res.steps}/{steps}, loss {res.loss}")
    return r


def _airbench_data(check: Check) -> Path:
    """airbench's own format (NHWC uint8 train.pt / test.pt in ./cifar10) of the same synthetic files."""
    from pipeline.data.cifar import load_cifar

    d = load_cifar("cifar10", check.data_root, val_size=0)  # all 50,000: airbench trains on every image
    folder = check.work / "airbench" / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    classes = list(d.class_names)
    for name, split in (("train.pt", d.train), ("test.pt", d.test)):
        images = split.images.permute(0, 2, 3, 1).contiguous()
        torch.save({"images": images, "labels": split.labels, "classes": classes}, folder / name)
    return folder


def path_airbench(check: Check, fast: Result | None) -> Result:
    r = Result("airbench94")
    if check.device.type != "cuda":
        r.status, r.reason = "SKIP", "airbench hard-wires CUDA"
        return r
    if importlib.util.find_spec("airbench") is None:
        r.status, r.reason = "SKIP", "airbench is not installed (make gpu-wheels carries it)"
        return r
    folder = _airbench_data(check)
    benchmark = torch.backends.cudnn.benchmark
    old_cwd = os.getcwd()
    try:
        import airbench  # sets cudnn.benchmark globally at import: restored below

        os.chdir(folder.parent)  # its train() reads the test split from ./cifar10/test.pt
        hyp = airbench.lib_airbench94.hyp
        batch = hyp["opt"]["batch_size"]
        loader = airbench.CifarLoader(str(folder), train=True, batch_size=batch, aug=hyp["aug"], altflip=True)
        airbench.train94(loader, epochs=0.1, verbose=False)  # warm-up (cudnn's autotuning)
        sync(check.device)
        t = time.perf_counter()
        airbench.train94(loader, epochs=1, verbose=False)
        sync(check.device)
        seconds = time.perf_counter() - t
    finally:
        os.chdir(old_cwd)
        torch.backends.cudnn.benchmark = benchmark
    epochs = hyp["opt"]["train_epochs"]
    r.figures = {"epoch_s": seconds, "images": len(loader.labels), "epochs_to_94": epochs}
    ours = fast.figures.get("epoch_s") if fast is not None and fast.status == "PASS" else None
    r.figure = f"{seconds:.2f} s/epoch ({len(loader.labels):,} images; {epochs} epochs ~ {epochs * seconds:.0f} s)"
    if ours:
        r.figures["fast_recipe_over_airbench"] = ours / seconds
        r.figure += f"; the fast recipe's epoch takes {ours / seconds:.1f}x as long"
    return r


# --------------------------------------------------------------------------------------------------
# Path 5: pipeline.run end to end, then pipeline.collect
# --------------------------------------------------------------------------------------------------


def _run_overrides(check: Check, quant: str) -> list[str]:
    s = check.sizes
    # the int8 run measures eagerly: int8's compiled CPU speed is bench/compress.py's, not a CUDA path
    eager = ["measure.compile=false", "measure.memory=false"] if quant == "int8" else []
    return [
        f"data.root={check.data_root}",
        "data.val_size=100",
        f"data.train_size={s.run_train_size}",
        "model.name=resnet20",
        "train.epochs=1",
        "train.batch_size=64",
        f"train.device={check.device.type}",
        "train.precision=fp16",
        "prune.method=structured",
        "prune.sparsity=0.5",
        "prune.epochs=1",
        f"quant.method={quant}",
        "quant.calib_batches=2",
        *s.run_measure,
        *eager,
    ]


def _run_pipeline(check: Check, out: Path, quant: str) -> Any:
    """``python -m pipeline.run configs/base.yaml ...`` in this process; the run folder."""
    from pipeline.rundir import list_runs
    from pipeline.run import main as run_main

    code = run_main([str(REPO / "configs" / "base.yaml"), *_run_overrides(check, quant), "--out", str(out)])
    (run,) = list_runs(out)
    if code != 0:
        failed = run.failed_stage()
        why = (metrics(run, failed).get("error") or "") if failed else ""
        raise RuntimeError(f"pipeline.run (quant.method={quant}) exited {code}; stage {failed}: {why}"[:400])
    return run


def _collect(out: Path) -> str:
    """``python -m pipeline.collect OUT --no-plots --format markdown``; the tables it wrote (results.md)."""
    from pipeline.collect import main as collect_main

    with contextlib.redirect_stdout(io.StringIO()):
        code = collect_main([str(out), "--no-plots", "--format", "markdown"])
    if code != 0:
        raise RuntimeError(f"pipeline.collect exited {code}")
    return (out / "results.md").read_text()


def _measure_figures(run) -> dict[str, dict[str, Any]]:
    keys = ("device", "latency_b1_ms", "self_cuda_ms_per_batch", "peak_memory_batch_bytes", "test_top1", "compile")
    return {e["name"]: {k: e.get(k) for k in keys} for e in metrics(run, "measure").get("models", [])}


def _cuda_text(measured: dict[str, dict[str, Any]]) -> str:
    return "".join(
        f", {k} {v['self_cuda_ms_per_batch'] or 0:.2f} CUDA ms/batch {(v['peak_memory_batch_bytes'] or 0) / 2**20:.1f} MiB"
        for k, v in sorted(measured.items())
        if k.endswith("-cuda")
    )


def path_pipeline_fp16(check: Check) -> Result:
    """train -> structured prune -> fp16 -> measure on the GPU: the CUDA rows, then collect's tables."""
    out = check.work / "pipeline-fp16"
    run = _run_pipeline(check, out, "fp16")
    table = _collect(out)
    train, q16, measured = metrics(run, "train"), metrics(run, "quantize"), _measure_figures(run)
    r = Result("pipeline-fp16")
    r.figures = {
        "train_device": train.get("device"),
        "train_images_per_s": train.get("images_per_s"),
        "fp16_test_acc": q16.get("test_acc"),
        "fp16_device": q16.get("device"),
        "measure": measured,
    }
    acc = q16.get("test_acc")
    r.figure = f"train on {train.get('device')}, fp16 acc {'-' if acc is None else f'{acc:.3f}'}" + _cuda_text(measured)
    if "| base |" not in table or "| structured 50% |" not in table:
        return r.fail("collect's models table lacks the base or the pruned row")
    if check.device.type != "cuda":
        r.figure += " (dry run: no CUDA rows; fp16 is neither evaluated nor timed on a CPU)"
        return r
    return _cuda_verdict(r, table, measured, q16)


def _cuda_verdict(r: Result, table: str, measured: dict, q16: dict) -> Result:
    rows = {k: v for k, v in measured.items() if k.endswith("-cuda")}
    if set(rows) != {"trained-cuda", "pruned-cuda", "fp16-cuda"}:
        return r.fail(f"CUDA rows measured: {sorted(rows)}")
    for name, e in rows.items():
        if not (e["self_cuda_ms_per_batch"] and e["peak_memory_batch_bytes"]):
            return r.fail(f"{name}: no CUDA time or max_memory_allocated")
        if e["compile"] and not e["compile"].get("compiled"):
            return r.fail(f"{name}: compile fell back to eager: {e['compile'].get('fallback_reason')}")
    if q16.get("test_acc") is None or not str(q16.get("device", "")).startswith("cuda"):
        return r.fail("the fp16 model was not evaluated on the GPU")
    if "CUDA ms/batch" not in table or "+ fp16 |" not in table or "GPU time" not in table:
        return r.fail("collect's tables lack the CUDA ms/batch column, the GPU time column or the fp16 row")
    return r


def path_pipeline_int8(check: Check) -> Result:
    """The same run with int8: built, calibrated and evaluated on the CPU inside a GPU job."""
    out = check.work / "pipeline-int8"
    run = _run_pipeline(check, out, "int8")
    table = _collect(out)
    q8, measured = metrics(run, "quantize"), _measure_figures(run)
    r = Result("pipeline-int8")
    r.figures = {"int8_test_acc": q8.get("test_acc"), "source_test_acc": q8.get("source_test_acc"), "measure": measured}
    r.figure = (
        f"int8 acc {q8.get('test_acc') or 0:.3f} (pruned source {q8.get('source_test_acc') or 0:.3f}), "
        f"{q8.get('raw', 0):,} bytes; int8 measured on {measured.get('int8', {}).get('device')}" + _cuda_text(measured)
    )
    if q8.get("test_acc") is None or measured.get("int8", {}).get("device") != "cpu":
        return r.fail("int8 was not evaluated and measured on the CPU")
    if "+ int8 |" not in table:
        return r.fail("collect's models table lacks the int8 row")
    if check.device.type == "cuda" and not {"trained-cuda", "pruned-cuda"} <= set(measured):
        return r.fail(f"CUDA rows measured beside int8: {sorted(k for k in measured if k.endswith('-cuda'))}")
    return r


# --------------------------------------------------------------------------------------------------
# Path 6: DDP, two ranks
# --------------------------------------------------------------------------------------------------


def _ddp_backend(check: Check) -> str:
    """nccl when there are two GPUs; gloo otherwise (on one GPU: two ranks share it, CUDA tensors)."""
    if check.device.type == "cuda" and torch.cuda.device_count() >= 2:
        return "nccl"
    return "gloo"


def _ddp_overrides(check: Check) -> list[str]:
    return [
        f"data.root={check.data_root}",
        "data.val_size=100",
        f"data.train_size={check.sizes.ddp_train_size}",
        "model.name=resnet20",
        f"model.norm={check.sizes.ddp_norm}",
        "train.epochs=1",
        "train.batch_size=50",
        "optim.lr=0.02",
        f"train.device={check.device.type}",
        "measure.enabled=false",
    ]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _start_ranks(run_dir: Path, backend: str, world: int = 2) -> list[subprocess.Popen]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--ddp-rank", str(run_dir), "--ddp-backend", backend],
            env={**env, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r)}
            | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]


def ddp_rank_main(run_dir: str, backend: str) -> int:
    """One rank (RANK, WORLD_SIZE, MASTER_* from the environment): the training stage of ``run_dir``.
    With gloo the group is made here, before the pipeline's own setup (which would pick NCCL on CUDA and
    fails with two ranks on one GPU); with NCCL the pipeline makes it."""
    if backend == "gloo":
        torch.distributed.init_process_group(
            "gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"])
        )
    from pipeline.stages.runner import execute

    status = execute(run_dir)
    return 0 if status == "done" else 1


def _weight_update_gap(check: Check, a, b, cfg) -> float:
    """|update_a - update_b| / |update_b|: the two runs' weight changes from the same seeded start."""
    from pipeline.stages.setup import build_for_training

    start = build_for_training(cfg, CLASSES, torch.device("cpu")).state_dict()
    wa = torch.load(a.checkpoints / "last.pt", map_location="cpu", weights_only=True)["model"]
    wb = torch.load(b.checkpoints / "last.pt", map_location="cpu", weights_only=True)["model"]
    keys = [k for k in wb if wb[k].is_floating_point() and "running" not in k]
    num = sum(((wa[k] - start[k]) - (wb[k] - start[k])).double().pow(2).sum() for k in keys)
    den = sum((wb[k] - start[k]).double().pow(2).sum() for k in keys)
    return float((num / den).sqrt())


def path_ddp(check: Check) -> Result:
    from pipeline.stages.runner import execute
    from pipeline.run import prepare_single

    base, args, backend = REPO / "configs" / "base.yaml", _ddp_overrides(check), _ddp_backend(check)
    ddp = prepare_single(base, args, check.work / "ddp")
    single = prepare_single(base, args, check.work / "ddp-single")
    procs = _start_ranks(ddp.path, backend)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    r = Result("ddp")
    if any(p.returncode for p in procs):
        tail = " | ".join(o.strip().splitlines()[-1] if o.strip() else "" for o in outs)
        return r.fail(f"rank exit codes {[p.returncode for p in procs]}: {tail}"[:400])
    execute(single.path)
    m2, m1 = metrics(ddp, "train"), metrics(single, "train")
    gap = _weight_update_gap(check, ddp, single, config(*args))
    r.figures = {
        "backend": backend,
        "world_size": m2.get("world_size"),
        "gpus": torch.cuda.device_count() if check.device.type == "cuda" else 0,
        "train_loss_ddp": m2.get("train_loss"),
        "train_loss_single": m1.get("train_loss"),
        "weight_update_rel_gap": gap,
        "norm": check.sizes.ddp_norm,
    }
    sync_bn = "SyncBatchNorm" if check.sizes.ddp_norm == "batch" and check.device.type == "cuda" else "GroupNorm"
    where = "2 ranks on 1 GPU, CUDA tensors" if backend == "gloo" and check.device.type == "cuda" else "2 ranks"
    r.figure = (
        f"{backend}, {where}, {sync_bn}: loss {m2.get('train_loss', 0):.4f} vs one process "
        f"{m1.get('train_loss', 0):.4f}, weight updates differ by {gap:.1e}"
    )
    if check.device.type == "cuda" and backend != "nccl":
        r.figure += "; NCCL unproven (needs 2 GPUs)"
    if m2.get("world_size") != 2 or gap > 0.05:
        return r.fail("two ranks did not train like one process with the same global batch")
    return r


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    missing = [f"{m} ({why})" for m, why in PACKAGES if importlib.util.find_spec(m) is None]
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu_count": os.cpu_count(),
        "missing_packages": missing,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def prepare_data(check: Check) -> None:
    """The synthetic cifar10-layout files (the real on-disk format), then the splits paths 1-3 use."""
    from pipeline.data.cifar import load_cifar
    from pipeline.data.synthetic import write_synthetic

    s = check.sizes
    write_synthetic(
        check.data_root, layout="cifar10", train_per_class=s.train_per_class, test_per_class=s.test_per_class
    )
    check.data = load_cifar("cifar10", check.data_root, val_size=s.train_per_class * CLASSES // 50)


def run_paths(check: Check, selected: set[int], report: Callable[[Result], None]) -> None:
    """Each selected path in turn; an exception fails that path (its reason and traceback kept), not the rest."""
    done: dict[str, Result] = {}
    plan: list[tuple[int, str, Callable[[], Result]]] = [
        *[(1, f"train-{p}", lambda p=p: path_precision(check, p)) for p in ("fp32", "fp16", "bf16")],
        (2, "channels_last+compile", lambda: path_compile(check)),
        (3, "loader", lambda: path_loader(check)),
        (4, "fast-recipe", lambda: path_fast(check)),
        (4, "airbench94", lambda: path_airbench(check, done.get("fast-recipe"))),
        (5, "pipeline-fp16", lambda: path_pipeline_fp16(check)),
        (5, "pipeline-int8", lambda: path_pipeline_int8(check)),
        (6, "ddp", lambda: path_ddp(check)),
    ]
    for number, name, fn in plan:
        if number not in selected:
            continue
        t = time.perf_counter()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - one broken path must not hide the others
            res = Result(name, status="FAIL", reason=_short(e))
            res.figures["traceback"] = traceback.format_exc()[-4000:]
            print("".join(traceback.format_exc().splitlines(keepends=True)[-12:]), file=sys.stderr, flush=True)
        res.seconds = time.perf_counter() - t
        done[res.name] = res
        report(res)


def _short(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def benchmark_rows(env: dict[str, Any], results: list[Result], dry: bool) -> str:
    where = env["gpu"] or f"CPU dry run ({env['cpu_count']} cores)"
    head = (
        f"GPU check ({'--cpu-dry-run, ' if dry else ''}{where}, torch {env['torch']}, CUDA {env['cuda']}, "
        f"{env['date'][:10]}; `python bench/gpu_check.py`)\n\n| path | figure | result |\n|---|---|---|\n"
    )
    rows = [
        f"| {r.name} | {r.figure.replace('|', '/')} | {r.status}{': ' + r.reason if r.reason else ''} |"
        for r in results
    ]
    return head + "\n".join(rows) + "\n"


def write_json(path: Path | None, env: dict[str, Any], results: list[Result], dry: bool) -> None:
    if path is None:
        return
    from pipeline.rundir import atomic_write_json

    atomic_write_json(path, {"environment": env, "dry_run": dry, "paths": {r.name: asdict(r) for r in results}})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-dry-run", action="store_true", help="every path on the CPU with tiny sizes (no GPU needed)")
    p.add_argument("--json", type=Path, help="write every figure to this JSON file (after each path)")
    p.add_argument("--paths", default="1,2,3,4,5,6", help="comma-separated path numbers to run (default: all)")
    p.add_argument("--workdir", type=Path, help="keep the data and run folders here (default: a temporary folder)")
    p.add_argument("--ddp-rank", metavar="RUN_DIR", help=argparse.SUPPRESS)  # internal: one rank of path 6
    p.add_argument("--ddp-backend", default="gloo", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.selected = {int(x) for x in args.paths.split(",") if x.strip()}
    except ValueError:
        p.error(f"--paths: '{args.paths}' is not a comma-separated list of numbers 1-6")
    if not args.selected <= {1, 2, 3, 4, 5, 6}:
        p.error(f"--paths: {sorted(args.selected - {1, 2, 3, 4, 5, 6})} not among the paths 1-6")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ddp_rank:
        return ddp_rank_main(args.ddp_rank, args.ddp_backend)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("error: no CUDA device is visible; use --cpu-dry-run to run every path on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.cpu_dry_run else torch.device("cuda", torch.cuda.current_device())
    env = environment(device)
    print(
        f"gpu check: torch {env['torch']}, CUDA {env['cuda']}, {env['gpu'] or 'no GPU (CPU dry run)'}, "
        f"{env['gpus']} GPU(s), Python {env['python']}"
        + (f"; missing: {', '.join(env['missing_packages'])}" if env["missing_packages"] else ""),
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="gpu_check-")) if args.workdir is None else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    check = Check(device, DRY_SIZES if args.cpu_dry_run else GPU_SIZES, args.cpu_dry_run, work, work / "data")
    results: list[Result] = []

    def report(res: Result) -> None:
        results.append(res)
        print(res.line(), flush=True)
        write_json(args.json, env, results, check.dry)

    try:
        t = time.perf_counter()
        prepare_data(check)
        print(
            f"gpu data: {len(check.data.train):,} train / {len(check.data.test):,} test images ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
        run_paths(check, args.selected, report)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + benchmark_rows(env, results, check.dry), flush=True)
    failed = [r.name for r in results if r.status == "FAIL"]
    print(
        f"gpu check: {len(results) - len(failed)} of {len(results)} passed or skipped"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput of the pipeline's training step against a bare PyTorch loop, in one run.

For each model: images/s of ``pipeline.stages.loop.train_one_epoch`` fed by ``pipeline.data.loaders.DeviceLoader``
(the real path: shuffling, pad-4 crop and flip, normalisation done per batch on the device, lr set
every step, loss and accuracy summed on the device) against a bare loop over batches prepared in
advance (forward, cross-entropy, zero_grad, backward, SGD step: the floor). Same model, data, batch,
memory format and threads. Then, for ResNet-20, eager vs channels_last vs torch.compile. With a CUDA
device, the same on it, plus one epoch of the `fast` recipe (ResNet-9, batch 512, fp16) on 50k images.

    .venv/bin/python bench/train_step.py [--models resnet20,resnet44] [--steps 8] [--batch 128]

Ends with `target train_step_<model>: <ratio>x (goal >=0.95x) PASS|FAIL` lines.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from pipeline.config import load_config
from pipeline.data.loaders import DeviceLoader
from pipeline.data.cifar import Split
from pipeline.models import build_model
from pipeline.stages.setup import build_optimizer
from pipeline.stages.loop import train_one_epoch

CPU_MODELS = "resnet20,resnet44,preact_resnet164,resnet9,googlenet"
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def synthetic_split(n: int, classes: int, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(
        torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
        torch.randint(0, classes, (n,), generator=g),
    )


def fresh(name: str, classes: int, device: torch.device, channels_last: bool, compile_: bool = False):
    torch.manual_seed(0)
    model = build_model(name, classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg = load_config([], ["optim.name=nesterov", "optim.lr=0.01"])
    opt = build_optimizer(cfg.optim, model.parameters())
    return model, (torch.compile(model) if compile_ else model), opt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pipeline_rate(
    name, classes, split, batch, steps, warmup, device, channels_last, compile_=False, amp_dtype=None
) -> float:
    model, step_model, opt = fresh(name, classes, device, channels_last, compile_)
    loader = DeviceLoader(
        split,
        batch,
        device=device,
        mean=MEAN,
        std=STD,
        augment=True,
        shuffle=True,
        channels_last=channels_last,
        drop_last=True,
    )
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    def set_lr(step: int) -> None:
        for g in opt.param_groups:
            g["lr"] = 0.01 * (1 - step / (2 * len(loader)))

    loader.set_epoch(0, len(loader) - warmup)  # warm-up: the last `warmup` batches
    train_one_epoch(step_model, loader, opt, set_lr=set_lr, scaler=scaler, amp_dtype=amp_dtype)
    loader.set_epoch(1, len(loader) - steps)
    sync(device)
    res = train_one_epoch(step_model, loader, opt, set_lr=set_lr, scaler=scaler, amp_dtype=amp_dtype)
    return res.images / res.seconds


def bare_rate(name, classes, split, batch, steps, warmup, device, channels_last, compile_=False) -> float:
    model, step_model, opt = fresh(name, classes, device, channels_last, compile_)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    batches = []
    for i in range(max(steps, warmup)):
        x = split.images[i * batch : (i + 1) * batch].to(device).float().div_(255)
        batches.append((x.contiguous(memory_format=fmt), split.labels[i * batch : (i + 1) * batch].to(device)))
    model.train()

    def run(n: int) -> None:
        for x, y in batches[:n]:
            loss = F.cross_entropy(step_model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    run(warmup)
    sync(device)
    t = time.perf_counter()
    run(steps)
    sync(device)
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None, help=f"comma-separated (default on CPU: {CPU_MODELS})")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many measurements per cell")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    args = ap.parse_args()
    con = Console()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    targets = []
    for device in devices:
        models = (args.models or (CPU_MODELS if device.type == "cpu" else CPU_MODELS)).split(",")
        n = (max(args.steps, args.warmup) + args.warmup + args.steps + 1) * args.batch
        split = synthetic_split(n, 10)
        table = Table(
            title=f"training images/s, batch {args.batch}, {device}, {torch.get_num_threads()} threads, "
            f"channels_last, fp32, best of {args.repeats}"
        )
        for col in ("model", "bare loop", "pipeline", "pipeline / bare"):
            table.add_column(col, justify="right" if col != "model" else "left")
        for name in models:
            classes = 10
            bare = max(
                bare_rate(name, classes, split, args.batch, args.steps, args.warmup, device, True)
                for _ in range(args.repeats)
            )
            ours = max(
                pipeline_rate(name, classes, split, args.batch, args.steps, args.warmup, device, True)
                for _ in range(args.repeats)
            )
            table.add_row(name, f"{bare:,.0f}", f"{ours:,.0f}", f"{ours / bare:.3f}x")
            targets.append((f"train_step_{name}_{device.type}", ours / bare))
        con.print(table)

        fmt_table = Table(title=f"ResNet-20 training images/s by memory format and compilation ({device})")
        for col in ("variant", "pipeline images/s"):
            fmt_table.add_column(col)
        variants = [("eager, NCHW", False, False), ("eager, channels_last", True, False)]
        if not args.no_compile:
            variants.append(("torch.compile, channels_last", True, True))
        for label, cl, comp in variants:
            rate = max(
                pipeline_rate(
                    "resnet20", 10, split, args.batch, args.steps, args.warmup + (3 if comp else 0), device, cl, comp
                )
                for _ in range(args.repeats)
            )
            fmt_table.add_row(label, f"{rate:,.0f}")
        con.print(fmt_table)

        if device.type == "cuda":
            big = synthetic_split(50_000, 10)
            steps = 50_000 // 512
            t = time.perf_counter()
            rate = pipeline_rate("resnet9", 10, big, 512, steps, 5, device, True, amp_dtype=torch.float16)
            con.print(
                f"fast recipe (ResNet-9, batch 512, fp16, channels_last) on {device}: "
                f"{rate:,.0f} images/s, one 50k-image epoch {50_000 / rate:.2f} s "
                f"(measured incl. warm-up {time.perf_counter() - t:.1f} s)"
            )
    for name, ratio in targets:
        con.print(f"target {name}: {ratio:.3f}x (goal >=0.95x) {'PASS' if ratio >= 0.95 else 'FAIL'}", highlight=False)


if __name__ == "__main__":
    main()

"""Augmented images/s: DeviceLoader (batched, on one uint8 tensor) vs the torchvision DataLoader baseline.

    .venv/bin/python bench/loader.py [--images 50000] [--batch 128] [--workers 2] [--impls]

Both loaders do the same work per image (pad-4 random crop, horizontal flip, float conversion, normalisation)
on in-memory synthetic CIFAR-shaped uint8 images, and each is timed over one full shuffled epoch after a
warm-up. DeviceLoader runs on the CPU (and on CUDA when available); the speedup target compares the two on
the CPU. ``--impls`` adds a table of the batched crop/flip variants that were tried for DeviceLoader.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.data.loaders import DeviceLoader, dataloader_loader
from pipeline.data.cifar import Split  # noqa: E402

GOAL = 10.0
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_epoch(loader, warmup: int, device: str = "cpu") -> tuple[int, float]:
    """(images, seconds) of one full epoch (epoch 1) after ``warmup`` batches of epoch 0."""
    loader.set_epoch(0)
    for i, _ in enumerate(loader):
        if i + 1 >= warmup:
            break
    _sync(device)
    loader.set_epoch(1)
    n, t = 0, time.perf_counter()
    for x, y in loader:
        n += len(y)
    _sync(device)
    return n, time.perf_counter() - t


# The batched crop/flip variants tried for DeviceLoader (each returns normalised float batches).
def _variants(images: torch.Tensor, batch: int, seed: int = 0) -> dict[str, Callable[[int, int], torch.Tensor]]:
    n = images.shape[0]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    dy, dx = torch.randint(0, 9, (2, n), generator=g)
    flip = torch.randint(0, 2, (n,), generator=g, dtype=torch.bool)
    padded = F.pad(images, (4, 4, 4, 4))
    scale = 1 / (255 * torch.tensor(STD).view(1, 3, 1, 1))
    shift = -torch.tensor(MEAN).view(1, 3, 1, 1) * scale * 255
    ar = torch.arange(32)
    windows = padded.as_strided((n, 9, 9, 3, 32, 32), (4800, 40, 1, 1600, 40, 1))

    def norm(x: torch.Tensor) -> torch.Tensor:
        return x.float().mul_(scale).add_(shift)

    def flip_u8(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return x + (x.flip(3) - x) * flip[lo:hi].view(-1, 1, 1, 1).to(torch.uint8)

    def strided_arith(lo: int, hi: int) -> torch.Tensor:  # what DeviceLoader does
        return norm(flip_u8(windows[perm[lo:hi], dy[lo:hi], dx[lo:hi]], lo, hi))

    def strided_where(lo: int, hi: int) -> torch.Tensor:
        x = windows[perm[lo:hi], dy[lo:hi], dx[lo:hi]]
        return norm(torch.where(flip[lo:hi].view(-1, 1, 1, 1), x.flip(3), x))

    def strided_float_where(lo: int, hi: int) -> torch.Tensor:  # flip after the float conversion
        x = norm(windows[perm[lo:hi], dy[lo:hi], dx[lo:hi]])
        return torch.where(flip[lo:hi].view(-1, 1, 1, 1), x.flip(3), x)

    def pad_per_batch(lo: int, hi: int) -> torch.Tensor:  # no padded copy of the data set
        b = hi - lo
        xb = F.pad(images[perm[lo:hi]], (4, 4, 4, 4))
        x = xb.as_strided((b, 9, 9, 3, 32, 32), (4800, 40, 1, 1600, 40, 1))[torch.arange(b), dy[lo:hi], dx[lo:hi]]
        return norm(flip_u8(x, lo, hi))

    both = torch.stack([padded, padded.flip(3)])  # 2x the memory of `padded`
    windows2 = both.as_strided((2, n, 9, 9, 3, 32, 32), (n * 4800, 4800, 40, 1, 1600, 40, 1))

    mirrored_dx = torch.where(flip, 8 - dx, dx)  # flip(crop at dx) == crop of the flipped image at 8 - dx

    def preflipped_copy(lo: int, hi: int) -> torch.Tensor:  # the flip becomes one more index
        return norm(windows2[flip[lo:hi].long(), perm[lo:hi], dy[lo:hi], mirrored_dx[lo:hi]])

    def flat_index(lo: int, hi: int) -> torch.Tensor:  # one gather with a per-pixel index (flip folded in)
        rows = dy[lo:hi, None] + ar
        cols = torch.where(flip[lo:hi, None], 31 - ar, ar) + dx[lo:hi, None]
        flat = (
            (perm[lo:hi] * 4800).view(-1, 1, 1, 1)
            + (torch.arange(3) * 1600).view(1, 3, 1, 1)
            + (rows * 40).view(-1, 1, 32, 1)
            + cols.view(-1, 1, 1, 32)
        )
        return norm(padded.view(-1)[flat])

    def two_gathers(lo: int, hi: int) -> torch.Tensor:  # rows, then columns (flip folded in), torch.gather
        b = hi - lo
        xb = padded[perm[lo:hi]]
        xr = xb.gather(2, (dy[lo:hi, None] + ar).view(b, 1, 32, 1).expand(b, 3, 32, 40))
        cols = torch.where(flip[lo:hi, None], 31 - ar, ar) + dx[lo:hi, None]
        return norm(xr.gather(3, cols.view(b, 1, 1, 32).expand(b, 3, 32, 32)))

    def offset_groups(lo: int, hi: int) -> torch.Tensor:  # one slice per distinct (dy, dx) in the batch
        xb = padded[perm[lo:hi]]
        out = torch.empty((hi - lo, 3, 32, 32), dtype=torch.uint8)
        key = dy[lo:hi] * 9 + dx[lo:hi]
        for k in torch.unique(key).tolist():
            m = (key == k).nonzero().squeeze(1)
            out[m] = xb[m, :, k // 9 : k // 9 + 32, k % 9 : k % 9 + 32]
        return norm(flip_u8(out, lo, hi))

    return {
        "strided windows + uint8 arithmetic flip (DeviceLoader)": strided_arith,
        "strided windows + torch.where flip": strided_where,
        "strided windows + flip after float conversion": strided_float_where,
        "pad per batch + strided windows": pad_per_batch,
        "pre-flipped second copy (2x memory)": preflipped_copy,
        "flat per-pixel index": flat_index,
        "two torch.gather": two_gathers,
        "per-offset grouping": offset_groups,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--warmup", type=int, default=20, help="batches before each timed epoch")
    p.add_argument("--impls", action="store_true", help="also time the crop/flip variants tried")
    p.add_argument("--impl-images", type=int, default=10_000, help="images per variant with --impls")
    args = p.parse_args(argv)
    console = Console()

    g = torch.Generator().manual_seed(0)
    split = Split(
        torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (args.images,), generator=g),
    )
    kw = dict(mean=MEAN, std=STD, augment=True, shuffle=True, seed=0)
    rows: list[tuple[str, str, int, float]] = []
    baseline = dataloader_loader(split, args.batch, num_workers=args.workers, **kw)
    rows.append((f"DataLoader + torchvision v2, {args.workers} workers", "cpu", *time_epoch(baseline, args.warmup)))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        loader = DeviceLoader(split, args.batch, device=dev, **kw)
        rows.append(("DeviceLoader", dev, *time_epoch(loader, args.warmup, dev)))

    base_rate = rows[0][2] / rows[0][3]
    t = Table(
        title=f"Augmented loading, {args.images:,} images, batch {args.batch}, {torch.get_num_threads()} torch threads"
    )
    for col in ("loader", "device", "images", "seconds", "images/s", "vs DataLoader"):
        t.add_column(col, justify="left" if col in ("loader", "device") else "right")
    for name, dev, n, s in rows:
        t.add_row(
            name,
            dev + (f" ({torch.cuda.get_device_name()})" if dev == "cuda" else ""),
            f"{n:,}",
            f"{s:.2f}",
            f"{n / s:,.0f}",
            f"{n / s / base_rate:.1f}x",
        )
    console.print(t)

    if args.impls:
        m = min(args.impl_images, args.images)
        ti = Table(title=f"Batched crop+flip variants on the CPU ({m:,} images, batch {args.batch})")
        ti.add_column("variant")
        ti.add_column("images/s", justify="right")
        for name, fn in _variants(split.images, args.batch).items():
            for lo in range(0, min(m, args.warmup * args.batch), args.batch):
                fn(lo, lo + args.batch)
            start = time.perf_counter()
            for lo in range(0, m, args.batch):
                fn(lo, min(lo + args.batch, m))
            ti.add_row(name, f"{m / (time.perf_counter() - start):,.0f}")
        console.print(ti)

    cpu = next(n / s for name, dev, n, s in rows if name == "DeviceLoader" and dev == "cpu")
    speedup = cpu / base_rate
    print(f"target loader_speedup: {speedup:.1f}x (goal >={GOAL:g}x) {'PASS' if speedup >= GOAL else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

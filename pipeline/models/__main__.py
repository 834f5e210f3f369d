"""Print a table of every registered model's size and cost.

python -m pipeline.models [--classes N] [--batch B] [--exact]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from pipeline.models import MODEL_NAMES, activation_memory_bytes, build_model, count_macs

if TYPE_CHECKING:
    from torch import nn

MIB = 2**20
# Saved activations are affine in batch size (per-sample tensors plus a few
# per-channel BN statistics), so two tiny measurements determine any batch.
_PROBE_BATCHES = (1, 2)


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(int(value))


def estimate_activation_bytes(model: nn.Module, batch_size: int, *, exact: bool = False) -> int:
    """Activation bytes at ``batch_size``: measured directly if small or ``exact``,
    else extrapolated linearly from batches 1 and 2."""
    if exact or batch_size <= _PROBE_BATCHES[-1]:
        return activation_memory_bytes(model, batch_size)
    b1, b2 = _PROBE_BATCHES
    m1 = activation_memory_bytes(model, b1)
    m2 = activation_memory_bytes(model, b2)
    per_sample = (m2 - m1) // (b2 - b1)
    return m1 + per_sample * (batch_size - b1)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pipeline.models``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.models", description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10, help="number of output classes (default 10)")
    parser.add_argument("--batch", type=int, default=128, help="batch size for activation memory (default 128)")
    parser.add_argument(
        "--exact",
        action="store_true",
        help="measure activation memory at --batch directly instead of extrapolating from batches 1 and 2",
    )
    args = parser.parse_args(argv)
    if args.classes < 1 or args.batch < 1:
        parser.error("--classes and --batch must be positive")

    import torch

    torch.manual_seed(0)
    extrapolated = not args.exact and args.batch > _PROBE_BATCHES[-1]
    how = "extrapolated linearly from batches 1 and 2" if extrapolated else "measured"
    table = Table(
        title=f"pipeline.models: {args.classes} classes, 3x32x32 input",
        caption=(
            "MACs: Conv2d+Linear multiply-accumulates per image. param MiB: fp32 weights. "
            f"act MiB: tensors saved for backward in one training forward at batch {args.batch}, "
            f"CPU fp32, {how}."
        ),
    )
    table.add_column("model", no_wrap=True, min_width=len(max(MODEL_NAMES, key=len)))
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("exact", justify="right", no_wrap=True)
    table.add_column("MACs/img", justify="right", no_wrap=True)
    table.add_column("param MiB", justify="right", no_wrap=True)
    table.add_column(f"act MiB @{args.batch}", justify="right", no_wrap=True)

    console = Console()
    with console.status("measuring models..."):
        for name in MODEL_NAMES:
            model = build_model(name, args.classes)
            n_params = sum(p.numel() for p in model.parameters())
            macs = count_macs(model)
            act = estimate_activation_bytes(model, args.batch, exact=args.exact)
            table.add_row(
                name,
                f"{n_params / 1e6:.2f}M",
                f"{n_params:,}",
                _si(macs),
                f"{n_params * 4 / MIB:.2f}",
                f"{act / MIB:,.1f}",
            )
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m pipeline.data``: download, write or describe a CIFAR data set.

Usage::

    python -m pipeline.data download cifar10 --root DIR
    python -m pipeline.data synthetic --root DIR [--layout synthetic|cifar10|cifar100] [--classes N] ...
    python -m pipeline.data info NAME --root DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from pipeline.data.cifar import DATASETS, LAYOUT_FOLDERS, download, load_cifar
from pipeline.data.synthetic import write_synthetic


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="download real CIFAR files with torchvision (login node, internet)")
    d.add_argument("name", choices=("cifar10", "cifar100"))
    d.add_argument("--root", required=True, help="data folder (the layout's sub-folder is created in it)")
    s = sub.add_parser("synthetic", help="write a synthetic data set in the CIFAR file format")
    s.add_argument("--root", required=True)
    s.add_argument("--layout", choices=tuple(LAYOUT_FOLDERS), default="synthetic")
    s.add_argument("--classes", type=int, default=None, help="default 10 (100 for --layout cifar100)")
    s.add_argument("--train-per-class", type=int, default=500)
    s.add_argument("--test-per-class", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--exist-ok", action="store_true", help="reuse a complete existing data set of this shape")
    i = sub.add_parser("info", help="print sizes, classes and mean/std of a data set")
    i.add_argument("name", choices=DATASETS)
    i.add_argument("--root", required=True)
    i.add_argument("--val-size", type=int, default=0)
    i.add_argument("--split-seed", type=int, default=0)
    i.add_argument("--train-size", type=int, default=0)
    return p


def _print_info(console, name: str, root: str | Path, val_size: int, split_seed: int, train_size: int) -> None:
    from rich.table import Table

    d = load_cifar(name, root, val_size=val_size, split_seed=split_seed, train_size=train_size)
    t = Table(title=f"{name} in {Path(root).expanduser() / LAYOUT_FOLDERS[name]}")
    t.add_column("split")
    t.add_column("images", justify="right")
    for split_name in ("train", "val", "test"):
        t.add_row(split_name, str(len(getattr(d, split_name))))
    console.print(t)
    shown = ", ".join(d.class_names[:10]) + (", ..." if d.num_classes > 10 else "")
    console.print(f"classes: {d.num_classes} ({shown})")
    console.print("mean (train split, [0,1]): " + ", ".join(f"{m:.4f}" for m in d.mean))
    console.print("std  (train split, [0,1]): " + ", ".join(f"{s:.4f}" for s in d.std))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 for bad input)."""
    from rich.console import Console
    from rich.markup import escape  # error text holds paths: "[...]" in one is not markup

    args = _parser().parse_args(argv)
    # soft_wrap: long paths stay on one line (copy-pastable)
    out, err = Console(soft_wrap=True, highlight=False), Console(stderr=True, soft_wrap=True, highlight=False)
    try:
        if args.command == "download":
            folder = download(args.name, args.root)
            out.print(f"[green]downloaded[/] {args.name} to {folder}")
            _print_info(out, args.name, args.root, 0, 0, 0)
        elif args.command == "synthetic":
            classes = args.classes if args.classes is not None else (100 if args.layout == "cifar100" else 10)
            existed = (Path(args.root).expanduser() / LAYOUT_FOLDERS[args.layout]).exists()
            folder = write_synthetic(
                args.root,
                layout=args.layout,
                num_classes=classes,
                train_per_class=args.train_per_class,
                test_per_class=args.test_per_class,
                seed=args.seed,
                exist_ok=args.exist_ok,
            )
            verb = "kept existing" if existed else "wrote"
            out.print(
                f"{verb} {folder}: {classes} classes, {classes * args.train_per_class} train + "
                f"{classes * args.test_per_class} test images (seed {args.seed})"
            )
            for f in sorted(folder.iterdir()):
                out.print(f"  {f.name}  {f.stat().st_size:,} bytes")
        else:
            _print_info(out, args.name, args.root, args.val_size, args.split_seed, args.train_size)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}")
        return 2
    except OSError as e:  # e.g. no network for download
        err.print(f"[bold red]error:[/] {escape(str(e))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

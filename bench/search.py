"""Grid vs random vs TPE + ASHA on the synthetic data set, the same budget of trials, each through the
real commands (``pipeline.sweep --cluster local``, real training of a ResNet-20): a space of learning
rate and weight decay. Reports for each: the best validation accuracy, the epochs trained in all, and the
best accuracy against cumulative epochs. Then the storage overhead per trial with 8 workers on the
journal file (bench/search_storage.py's measure).

    .venv/bin/python bench/search.py [--trials 9] [--epochs 9] [--train-per-class 50] [--parallel 2]
        [--out DIR]

The grid takes the square root of the trials per axis (log-spaced over the same ranges). Targets: TPE
+ ASHA within 0.5 point of the grid's best accuracy with at most half its epochs; storage < 50 ms per
trial. With few images, accuracies are noisy: read them as what this budget found on this data set.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
LR, WD = (1.0e-3, 0.5), (1.0e-5, 1.0e-2)


def log_points(low: float, high: float, n: int) -> list[float]:
    if n == 1:
        return [math.sqrt(low * high)]
    return [float(f"{low * (high / low) ** (i / (n - 1)):.3g}") for i in range(n)]


def sweep_text(name: str, method: str, trials: int, workers: int) -> str:
    head = f"name: {name}\nbase: [{REPO / 'configs/base.yaml'}]\nset: {{model.name: resnet20, schedule.name: cosine}}\n"
    if method == "grid":
        side = max(1, round(math.sqrt(trials)))
        return head + f"grid:\n  optim.lr: {log_points(*LR, side)}\n  optim.weight_decay: {log_points(*WD, side)}\n"
    early = "{method: asha, min_epochs: 1, reduction: 3}" if method == "tpe" else "{method: none}"
    return head + (
        f"search:\n  method: {method}\n  trials: {trials}\n  workers: {workers}\n"
        "  objective: {val_acc_best: max}\n"
        f"  params:\n    optim.lr: {{low: {LR[0]:.1e}, high: {LR[1]:.1e}, log: true}}\n"
        f"    optim.weight_decay: {{low: {WD[0]:.1e}, high: {WD[1]:.1e}, log: true}}\n"
        f"  early_stop: {early}\n  seed: 0\n"
    )


def run_method(method: str, args: argparse.Namespace, out: Path, data: Path) -> dict[str, Any]:
    spec = out / f"{method}.yaml"
    spec.write_text(sweep_text(method, method, args.trials, args.parallel))
    overrides = [
        f"data.root={data}",
        "data.name=synthetic",
        f"data.val_size={args.val_size}",
        f"train.epochs={args.epochs}",
        "train.device=cpu",
        "train.threads=1",
        "train.batch_size=64",
        "output.log_every=100000",
        "quant.method=none",
        "measure.enabled=false",
    ]
    cmd = [sys.executable, "-m", "pipeline.sweep", str(spec), "--cluster", "local", "--parallel", str(args.parallel)]
    start = time.perf_counter()
    subprocess.run([*cmd, "--wait", "--out", str(out / "runs"), *overrides], check=True, cwd=REPO, capture_output=True)
    wall = time.perf_counter() - start
    return summarise(out / "runs" / method, wall)


def summarise(sweep_dir: Path, wall: float) -> dict[str, Any]:
    """Best val acc, epochs in all, and (cumulative epochs, best so far) in the order runs ended."""
    runs = []
    for m in sweep_dir.glob("*/metrics/train.json"):
        record = json.loads(m.read_text())
        runs.append((m.stat().st_mtime, int(record.get("epochs") or 0), float(record.get("val_acc_best") or 0.0)))
    runs.sort()
    curve, epochs, best = [], 0, 0.0
    for _, n, acc in runs:
        epochs, best = epochs + n, max(best, acc)
        curve.append((epochs, best))
    return {"runs": len(runs), "best": best, "epochs": epochs, "curve": curve, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=9)
    p.add_argument("--epochs", type=int, default=9)
    p.add_argument("--train-per-class", type=int, default=50)
    p.add_argument("--val-size", type=int, default=100)
    p.add_argument("--parallel", type=int, default=2, help="local jobs (grid) and workers (searches) at once")
    p.add_argument("--out", type=Path, default=None, help="keep the sweeps here (default: a temporary folder)")
    p.add_argument("--methods", default="grid,random,tpe")
    p.add_argument("--grid-best", type=float, help="the grid's best val acc from an earlier run (0-1)")
    p.add_argument("--grid-epochs", type=int, help="the grid's epochs in all from an earlier run")
    p.add_argument("--no-storage", action="store_true", help="skip the storage overhead measurement")
    args = p.parse_args()
    from pipeline.data.synthetic import write_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        data = out / "data"
        write_synthetic(data, train_per_class=args.train_per_class, test_per_class=10, seed=0)
        print(
            f"{args.trials} trials of ResNet-20 x {args.epochs} epochs, {args.train_per_class * 10 - args.val_size} "
            f"train / {args.val_size} val synthetic images, {args.parallel} at once"
        )
        results = {}
        for method in args.methods.split(","):
            results[method] = r = run_method(method, args, out, data)
            curve = ", ".join(f"{e}:{100 * b:.1f}" for e, b in r["curve"])
            print(
                f"{method:>7}: best val acc {100 * r['best']:.1f}%, {r['epochs']} epochs in all over {r['runs']} "
                f"runs, {r['wall_s']:.0f} s; best vs cumulative epochs {curve}",
                flush=True,
            )
    if args.grid_best is not None:  # the grid's figures from an earlier run of this script (--methods)
        results["grid"] = {"best": args.grid_best, "epochs": args.grid_epochs}
    if {"grid", "tpe"} <= set(results):
        g, t = results["grid"], results["tpe"]
        ok = t["best"] >= g["best"] - 0.005 and t["epochs"] <= g["epochs"] / 2
        print(
            f"TPE + ASHA vs grid: {100 * (t['best'] - g['best']):+.1f} points, {t['epochs'] / max(g['epochs'], 1):.2f}x "
            f"the epochs: {'PASS' if ok else 'FAIL'} (target: within 0.5 point with at most half the epochs)"
        )
    if not args.no_storage:
        import search_storage

        ns = argparse.Namespace(workers=8, trials=64, epochs=30, epoch_ms=0.0, early="asha", dir=None)
        f = search_storage.measure(ns)["protocol"]
        verdict = "PASS" if f["mean_ms"] < 50 else "FAIL"
        print(
            f"storage, 8 workers on the journal file, 64 trials: {f['mean_ms']:.1f} ms per trial (ask + reports + "
            f"tell; worst worker {f['max_ms']:.1f}): {verdict} (target < 50 ms)"
        )


if __name__ == "__main__":
    main()

"""Train once, compress many: a 1 training x 4 compression sweep with sharing against the same sweep with
``share.train=false``, in one run.

    .venv/bin/python bench/share.py [--epochs 2] [--train-size 2000] [--repeats 1] [--keep DIR]

Each sweep is submitted through the local executor (``--cluster local --wait``, one slot) on a synthetic
CIFAR-shaped data set written into a temporary folder: ResNet-20 (option B) trained ``--epochs`` epochs,
then unpruned, 50% and 70% unstructured and 50% structured pruning, each fine-tuned one epoch, no
quantization, no measure stage. With ``--repeats 2`` the order alternates (shared first, then unshared
first) so that load on a shared machine falls on both alike. Prints the CPU, the training epochs each sweep
ran (from the training records it wrote, every shared one once), the wall times and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]

SWEEP = """\
name: bench-share
set:
  data.name: synthetic
  data.root: {root}
  data.val_size: 200
  data.train_size: {train_size}
  train.epochs: {epochs}
  train.device: cpu
  train.batch_size: 128
  output.log_every: 1000
  output.tensorboard: false
  model.name: resnet20
  model.shortcut: B
  prune.epochs: 1
  prune.frequency: 1
  quant.method: none
  measure.enabled: false
variants:
  - {{prune.method: none}}
  - {{prune.method: unstructured, prune.sparsity: 0.5}}
  - {{prune.method: unstructured, prune.sparsity: 0.7}}
  - {{prune.method: structured, prune.sparsity: 0.5}}
"""


def cpu() -> str:
    """The CPU model and the vector flags that matter for these kernels."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_vnni", "amx_int8"]
    return f"{model}, {os.cpu_count()} logical CPUs, flags: {' '.join(f for f in wanted if f in flags) or 'none'}"


def training_epochs(out: Path) -> tuple[int, int]:
    """(trainings, epochs trained) under ``out``: every training record once (a shared one lives in the
    store and is linked from its runs; links are not counted again)."""
    records = [p for p in out.rglob("metrics/train.json") if not p.is_symlink() and "archive" not in p.parts]
    epochs = sum(int(json.loads(p.read_text()).get("epochs") or 0) for p in records)
    return len(records), epochs


def run_sweep(path: Path, out: Path, shared: bool) -> float:
    args = [sys.executable, "-m", "pipeline.sweep", str(path), "--cluster", "local", "--wait", "--out", str(out)]
    if not shared:
        args.append("share.train=false")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    try:
        r = subprocess.run(args, cwd=path.parent, env=env, capture_output=True, text=True)
    except BaseException:
        # local jobs run in their own session (they outlive a Ctrl-C by design): stop them too
        cancel = [sys.executable, "-m", "pipeline.status", str(out / "bench-share"), "--cancel"]
        subprocess.run(cancel, env=env, capture_output=True, timeout=60)
        raise
    wall = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit(f"sweep failed ({'shared' if shared else 'unshared'}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return wall


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=1, help="pairs of sweeps; the order alternates")
    p.add_argument("--keep", type=Path, default=None, help="write here instead of a temporary folder")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # kill or timeout(1): stop the sweep's jobs as Ctrl-C does
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background (SIGINT ignored there)
    from pipeline.data.synthetic import write_synthetic

    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    root = Path(tmp.name) if tmp is not None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    write_synthetic(data, train_per_class=(args.train_size + 200) // 10 + 1, test_per_class=50, seed=0)
    spec = root / "bench-share.yaml"
    spec.write_text(SWEEP.format(root=data, train_size=args.train_size, epochs=args.epochs))
    print(f"CPU: {cpu()}")
    print(f"torch threads: default; ResNet-20, {args.train_size} training images, {args.epochs} epoch(s)")
    walls: dict[bool, list[float]] = {True: [], False: []}
    counts: dict[bool, tuple[int, int]] = {}
    for i in range(args.repeats):
        for shared in (True, False) if i % 2 == 0 else (False, True):
            out = root / f"runs-{'shared' if shared else 'unshared'}-{i}"
            walls[shared].append(run_sweep(spec, out, shared))
            counts[shared] = training_epochs(out)
            print(
                f"  {'shared  ' if shared else 'unshared'} repeat {i}: {walls[shared][-1]:6.1f} s, "
                f"{counts[shared][0]} training(s), {counts[shared][1]} training epoch(s)"
            )
    best = {k: min(v) for k, v in walls.items()}
    print(
        f"1 x 4 compression sweep: shared {best[True]:.1f} s ({counts[True][1]} training epochs), "
        f"unshared {best[False]:.1f} s ({counts[False][1]} training epochs): "
        f"{best[False] / best[True]:.2f}x the wall time, {counts[False][1] / max(1, counts[True][1]):.1f}x the epochs"
    )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        sys.exit(f"interrupted ({e}); the sweep's local jobs were cancelled")

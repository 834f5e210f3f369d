"""Seconds to submit a 1,000-run sweep to Slurm: ``python -m pipeline.sweep`` vs plain submitit ``map_array``.

    .venv/bin/python bench/submit.py [--repeats 3] [--before DIR] [--keep]

Both are timed from outside, as subprocesses, from process start to exit. The pipeline expands a
10 x 10 x 10 grid (optim.lr x optim.weight_decay x train.seed) of tiny ResNet-20 runs, writes 1,000 run
folders and the manifest and submits them as job arrays (``--cluster slurm --out <tmp>``); the floor is
submitit's ``map_array`` of 1,000 trivial calls (``abs``) to the same partition. Every job is cancelled
with ``scancel`` right after each measurement, so the cluster is busy for seconds only. ``--before DIR``
also times a checkout of the code from before an optimisation (e.g. ``git archive <rev> | tar -x -C DIR``),
from the same sweep, in the same run. Needs the local Slurm cluster (``tests/slurm/start.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline import slurm_cli  # noqa: E402

GOAL_S = 3.0
N_AXIS = 10  # 10 x 10 x 10 = 1,000 runs
PARTITION = "debug"

SWEEP = """\
name: bench1000
base: [{root}/configs/base.yaml]
cluster: {root}/configs/cluster/local.yaml
set:
  data.name: synthetic
  data.val_size: 100
  data.train_size: 200
  model.name: resnet20
  train.epochs: 1
  train.batch_size: 32
grid:
  optim.lr: {lrs}
  optim.weight_decay: {wds}
  train.seed: {seeds}
"""

FLOOR = """\
import sys, submitit
ex = submitit.SlurmExecutor(folder=sys.argv[1])
ex.update_parameters(partition=sys.argv[2], time=30, cpus_per_task=1, mem="1GB", array_parallelism=8)
jobs = ex.map_array(abs, range(int(sys.argv[3])))
print(jobs[0].job_id.split("_")[0])
"""


def write_sweep(folder: Path, root: Path) -> Path:
    path = folder / f"sweep-{abs(hash(str(root)))}.yaml"
    lrs = [round(0.01 * (i + 1), 4) for i in range(N_AXIS)]
    wds = [round(1e-5 * i, 8) for i in range(N_AXIS)]
    path.write_text(SWEEP.format(root=root, lrs=lrs, wds=wds, seeds=list(range(N_AXIS))))
    return path


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return elapsed, r


def cancel_and_drain(job_ids: set[str], timeout_s: float = 30.0) -> None:
    """scancel the arrays, then wait until squeue no longer lists them (so the next timing starts calm)."""
    if not job_ids:
        return
    slurm_cli.cancel(job_ids)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        out = subprocess.run(
            ["squeue", "-h", "-j", ",".join(sorted(job_ids)), "-o", "%i"], capture_output=True, text=True
        ).stdout
        if not out.strip():
            return
        time.sleep(0.5)


def run_pipeline(root: Path, sweep: Path, tmp: Path, extra: list[str]) -> tuple[float, int, set[str]]:
    """(seconds, run folders written, array job ids) of one ``python -m pipeline.sweep``."""
    out = Path(tempfile.mkdtemp(dir=tmp, prefix="out-"))
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "pipeline.sweep", str(sweep), "--cluster", "slurm", "--out", str(out), *extra]
    seconds, _ = timed(cmd, root, env)
    sweep_dir = out / "bench1000"
    folders = sum(1 for p in sweep_dir.glob("*/config.yaml"))
    path = sweep_dir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    arrays = {str(e["job_id"]).split("_")[0] for e in manifest.get("runs", {}).values()}
    if "--no-submit" not in extra and len(manifest.get("runs", {})) != folders:
        raise SystemExit(f"manifest lists {len(manifest.get('runs', {}))} runs, {folders} folders were written")
    return seconds, folders, arrays


def run_floor(tmp: Path, n: int) -> tuple[float, set[str]]:
    folder = Path(tempfile.mkdtemp(dir=tmp, prefix="floor-"))
    cmd = [sys.executable, "-c", FLOOR, str(folder / "%j"), PARTITION, str(n)]
    seconds, r = timed(cmd, tmp, dict(os.environ))
    return seconds, {r.stdout.strip()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timings of each command (median reported)")
    p.add_argument("--before", type=Path, default=None, help="a checkout of the code before the optimisation")
    p.add_argument("--before-repeats", type=int, default=1, help="timings of the --before code")
    args = p.parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=120)  # logs: keep the table's rows whole
    if subprocess.run(["scontrol", "ping"], capture_output=True).returncode != 0:
        raise SystemExit("the local Slurm cluster is not up: bash tests/slurm/start.sh")
    n = N_AXIS**3
    times: dict[str, list[float]] = {"floor": [], "pipeline": [], "no-submit": [], "before": []}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-submit-") as td:
        tmp = Path(td)
        sweep = write_sweep(tmp, REPO)
        for rep in range(args.repeats):  # interleaved, so load from other users hits both alike
            s, ids = run_floor(tmp, n)
            cancel_and_drain(ids)
            times["floor"].append(s)
            notes["floor"] = f"{len(ids)} array"
            s, folders, ids = run_pipeline(REPO, sweep, tmp, [])
            cancel_and_drain(ids)
            if folders != n:
                raise SystemExit(f"expected {n} run folders, found {folders}")
            times["pipeline"].append(s)
            notes["pipeline"] = f"{folders} folders, {len(ids)} array(s)"
            s, folders, _ = run_pipeline(REPO, sweep, tmp, ["--no-submit"])
            times["no-submit"].append(s)
            notes["no-submit"] = f"{folders} folders"
            console.print(
                f"repeat {rep + 1}/{args.repeats}: floor {times['floor'][-1]:.2f}s, pipeline "
                f"{times['pipeline'][-1]:.2f}s, --no-submit {times['no-submit'][-1]:.2f}s"
            )
        if args.before is not None:
            before = args.before.resolve()
            bsweep = write_sweep(tmp, before)
            for _ in range(args.before_repeats):
                s, folders, ids = run_pipeline(before, bsweep, tmp, [])
                cancel_and_drain(ids)
                times["before"].append(s)
                notes["before"] = f"{folders} folders, {len(ids)} array(s)"
                console.print(f"before ({before}): {s:.2f}s")

    labels = {
        "floor": ("submitit map_array (floor)", f"{n:,} x abs()"),
        "pipeline": ("pipeline.sweep", f"{n:,} runs: expand, write, submit"),
        "no-submit": ("pipeline.sweep --no-submit", "expand + write only"),
        "before": ("pipeline.sweep, before", str(args.before)),
    }
    floor = statistics.median(times["floor"])
    t = Table(title=f"Submitting {n:,} runs to local Slurm: seconds from process start to exit")
    for col in ("command", "what", "n", "median s", "min s", "vs floor", "result"):
        t.add_column(col, justify="right" if col in ("n", "median s", "min s", "vs floor") else "left")
    for key, ts in times.items():
        if not ts:
            continue
        med = statistics.median(ts)
        t.add_row(*labels[key], str(len(ts)), f"{med:.2f}", f"{min(ts):.2f}", f"{med / floor:.1f}x", notes[key])
    console.print(t)
    med = statistics.median(times["pipeline"])
    print(f"target submit_1000_runs: {med:.2f}s (goal <={GOAL_S:g}s) {'PASS' if med <= GOAL_S else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

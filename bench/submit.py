"""Seconds to submit sweeps of 1,000 and 10,000 runs to Slurm: ``python -m pipeline.sweep`` vs plain submitit ``map_array``.

    .venv/bin/python bench/submit.py [--repeats 3] [--sizes 1000 10000] [--before DIR] [--before-sizes 1000]

All are timed from outside, as subprocesses, from process start to exit. The pipeline expands a
10 x 10 x (n / 100) grid (optim.lr x optim.weight_decay x train.seed) of tiny ResNet-20 runs, with
sharing on (the default): each run is the first of its training key, so it claims a shared store and
links it, the most work sharing asks of a submission. It writes the run folders and the manifest and
submits them as job arrays (``--cluster slurm --out <tmp>``); the floor is submitit's ``map_array`` of
n trivial calls (``abs``) to the same partition, in arrays of at most MaxArraySize tasks as the pipeline
cuts them. Sizes and commands alternate in each repeat, so load from other users hits them alike. Every
job is cancelled with ``scancel`` right after each measurement, so the cluster is busy for seconds
only. ``--before DIR`` also times a checkout of the code from before an optimisation (e.g. ``git
archive <rev> | tar -x -C DIR``), from the same sweep, in the same run. Needs the local Slurm cluster
(``tests/slurm/start.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from pipeline.submit import launch
from pipeline.jobs import slurm as slurm_cli  # noqa: E402

GOALS_S = {1_000: 3.0, 10_000: 10.0}  # runs -> seconds, from process start to exit
N_AXIS = 10  # optim.lr x optim.weight_decay: 10 x 10; train.seed: n / 100 values
PARTITION = "debug"

SWEEP = """\
name: bench{n}
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
n, size = int(sys.argv[3]), int(sys.argv[4])
arrays = [ex.map_array(abs, range(min(size, n - i))) for i in range(0, n, size)]
print(" ".join(jobs[0].job_id.split("_")[0] for jobs in arrays))
"""


def write_sweep(folder: Path, root: Path, n: int) -> Path:
    path = folder / f"sweep-{n}-{abs(hash(str(root)))}.yaml"
    lrs = [round(0.01 * (i + 1), 4) for i in range(N_AXIS)]
    wds = [round(1e-5 * i, 8) for i in range(N_AXIS)]
    seeds = list(range(n // N_AXIS**2))
    path.write_text(SWEEP.format(n=n, root=root, lrs=lrs, wds=wds, seeds=seeds))
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


def run_pipeline(root: Path, sweep: Path, n: int, tmp: Path, extra: list[str]) -> tuple[float, int, set[str]]:
    """(seconds, run folders written, array job ids) of one ``python -m pipeline.sweep``. Its arrays are
    cancelled, then its output folder is removed (10,000 runs are 30,000 files)."""
    out = Path(tempfile.mkdtemp(dir=tmp, prefix="out-"))
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "pipeline.sweep", str(sweep), "--cluster", "slurm", "--out", str(out), *extra]
    ids: set[str] = set()
    try:
        seconds, _ = timed(cmd, root, env)
        folders, ids = _written(out / f"bench{n}", extra)
        return seconds, folders, ids
    finally:
        cancel_and_drain(ids or _queued(out / f"bench{n}"))
        remove(out)


def _queued(sweep_dir: Path) -> set[str]:
    """The arrays a failed or miscounted submission recorded, to cancel them all the same."""
    try:
        runs = json.loads((sweep_dir / "manifest.json").read_text()).get("runs", {})
    except (OSError, ValueError):
        return set()
    return {str(e.get("job_id", "")).split("_")[0] for e in runs.values() if isinstance(e, dict)} - {""}


def _written(sweep_dir: Path, extra: list[str]) -> tuple[int, set[str]]:
    folders = sum(1 for p in sweep_dir.glob("*/config.yaml"))
    path = sweep_dir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    arrays = {str(e["job_id"]).split("_")[0] for e in manifest.get("runs", {}).values()}
    if "--no-submit" not in extra and len(manifest.get("runs", {})) != folders:
        raise SystemExit(f"manifest lists {len(manifest.get('runs', {}))} runs, {folders} folders were written")
    return folders, arrays


def run_floor(tmp: Path, n: int) -> tuple[float, set[str]]:
    folder = Path(tempfile.mkdtemp(dir=tmp, prefix="floor-"))
    cmd = [sys.executable, "-c", FLOOR, str(folder / "%j"), PARTITION, str(n), str(launch.max_array_size())]
    try:
        seconds, r = timed(cmd, tmp, dict(os.environ))
        cancel_and_drain(set(r.stdout.split()))
    finally:
        remove(folder)
    return seconds, set(r.stdout.split())


def cpu_line() -> str:
    """The CPU model, its core count and the vector flags that matter here (from /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, {' '.join(shown) or 'no AVX2'}"


def remove(folder: Path) -> None:
    """Remove a measurement's files and write the removal back (os.sync) before the next timing starts,
    so that the next one does not pay for this one's 30,000 deletions."""
    shutil.rmtree(folder, ignore_errors=True)
    os.sync()


LABELS = {
    "floor": ("submitit map_array (floor)", "{n:,} x abs()"),
    "pipeline": ("pipeline.sweep", "{n:,} runs: expand, write, submit"),
    "no-submit": ("pipeline.sweep --no-submit", "expand + write only"),
    "before": ("pipeline.sweep, before", "{before}"),
}


def measure_size(n: int, tmp: Path, sweep: Path, times: dict[str, list[float]], notes: dict[str, str]) -> None:
    """One repeat at ``n`` runs: the floor, the pipeline, then --no-submit."""
    s, ids = run_floor(tmp, n)
    times["floor"].append(s)
    notes["floor"] = f"{len(ids)} array(s)"
    s, folders, ids = run_pipeline(REPO, sweep, n, tmp, [])
    if folders != n:
        raise SystemExit(f"expected {n} run folders, found {folders}")
    times["pipeline"].append(s)
    notes["pipeline"] = f"{folders} folders, {len(ids)} array(s)"
    s, folders, _ = run_pipeline(REPO, sweep, n, tmp, ["--no-submit"])
    times["no-submit"].append(s)
    notes["no-submit"] = f"{folders} folders"


def table(n: int, times: dict[str, list[float]], notes: dict[str, str], before: Path | None) -> Table:
    floor = statistics.median(times["floor"])
    t = Table(title=f"Submitting {n:,} runs to local Slurm: seconds from process start to exit")
    for col in ("command", "what", "n", "median s", "min s", "vs floor", "result"):
        t.add_column(col, justify="right" if col in ("n", "median s", "min s", "vs floor") else "left")
    for key, ts in times.items():
        if ts:
            med = statistics.median(ts)
            command, what = LABELS[key]
            row = (command, what.format(n=n, before=before), str(len(ts)), f"{med:.2f}", f"{min(ts):.2f}")
            t.add_row(*row, f"{med / floor:.1f}x", notes[key])
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timings of each command and size (median reported)")
    p.add_argument("--sizes", type=int, nargs="+", default=sorted(GOALS_S), help="runs per sweep (multiples of 100)")
    p.add_argument("--before", type=Path, default=None, help="a checkout of the code before the optimisation")
    p.add_argument("--before-repeats", type=int, default=1, help="timings of the --before code")
    p.add_argument("--before-sizes", type=int, nargs="+", default=[1_000], help="sizes timed with --before")
    args = p.parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=120)  # logs: keep the table's rows whole
    if subprocess.run(["scontrol", "ping"], capture_output=True).returncode != 0:
        raise SystemExit("the local Slurm cluster is not up: bash tests/slurm/start.sh")
    if any(n % N_AXIS**2 or n <= 0 for n in args.sizes):
        raise SystemExit(f"--sizes must be positive multiples of {N_AXIS**2}")
    if args.before is not None and not set(args.before_sizes) <= set(args.sizes):
        raise SystemExit("--before-sizes must be among --sizes (the code before is timed in the same repeats)")
    times = {n: {k: [] for k in LABELS} for n in args.sizes}
    notes: dict[int, dict[str, str]] = {n: {} for n in args.sizes}
    with tempfile.TemporaryDirectory(prefix="bench-submit-") as td:
        tmp = Path(td)
        sweeps = {n: write_sweep(tmp, REPO, n) for n in args.sizes}
        before = args.before.resolve() if args.before is not None else None
        bsweeps = {n: write_sweep(tmp, before, n) for n in args.before_sizes} if before is not None else {}
        for rep in range(args.repeats):  # interleaved, so load from other users hits all alike
            for n in args.sizes:
                measure_size(n, tmp, sweeps[n], times[n], notes[n])
                tn = times[n]
                console.print(
                    f"repeat {rep + 1}/{args.repeats}, {n:,} runs: floor {tn['floor'][-1]:.2f}s, pipeline "
                    f"{tn['pipeline'][-1]:.2f}s, --no-submit {tn['no-submit'][-1]:.2f}s"
                )
                if n in bsweeps and rep < args.before_repeats:  # the code before, in the same repeat
                    s, folders, ids = run_pipeline(before, bsweeps[n], n, tmp, [])
                    times[n]["before"].append(s)
                    notes[n]["before"] = f"{folders} folders, {len(ids)} array(s)"
                    console.print(f"  before ({before}), {n:,} runs: {s:.2f}s")
        console.print(f"CPU: {cpu_line()}; load average at the end: {os.getloadavg()[0]:.1f}")
    for n in sorted(times):
        if times[n]["floor"]:
            console.print(table(n, times[n], notes[n], args.before))
    for n in sorted(times):
        if times[n]["pipeline"] and n in GOALS_S:
            med, goal = statistics.median(times[n]["pipeline"]), GOALS_S[n]
            floor = statistics.median(times[n]["floor"])
            verdict = "PASS" if med <= goal else "FAIL"
            print(f"target submit_{n}_runs: {med:.2f}s (goal <={goal:g}s; floor {floor:.2f}s) {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Storage overhead per search trial: worker processes (default 8) on one journal file, each running
the real worker loop (pipeline.search.worker.run_worker) with a trial that does no work but sleep
``--epoch-ms`` per epoch and report every epoch: claim (lock, ask, sampling the issue's four
parameters, run id), the reports (the study gets the epochs ASHA judges), tell.

    .venv/bin/python bench/search_storage.py [--workers 8] [--trials 64] [--epochs 30] [--epoch-ms 0]
        [--repeats 3] [--early asha|median|none] [--dir DIR]

Per trial: the workers' wall time less the trials' sleeping, i.e. everything the storage and the
protocol cost, summed over the workers and divided by the trials (the worst worker's own figure too);
also the CPU time, the time spent waiting for locks and the journal appends per trial.
``--epoch-ms 0`` is the worst case, every worker writing at once; with real trials (minutes) writers
rarely meet. Each mode runs ``--repeats`` times, alternating; medians. Also run: the same protocol with
Optuna's own lock class (the baseline of pipeline.search.lock), and the same trials through bare Optuna (ask, report every epoch, tell; no
claim lock, no worker files) and the time of one append + fsync on the file system used, which bounds
every journal write. Reuse: :func:`measure` returns the figures (bench/search.py may call it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]

SEARCH: dict[str, Any] = {
    "method": "tpe",
    "objective": {"val_acc_best": "max"},
    "params": {
        "optim.lr": {"low": 1.0e-3, "high": 0.5, "log": True},
        "optim.weight_decay": {"low": 1.0e-5, "high": 1.0e-3, "log": True},
        "optim.name": ["sgd", "nesterov", "adam"],
        "train.batch_size": [64, 128, 256],
    },
    "seed": 0,
}


def spec_for(trials: int, workers: int, early: str) -> Any:
    from pipeline.search.spec import parse_search

    doc = {**SEARCH, "trials": trials, "workers": workers, "early_stop": {"method": early}}
    if early in ("asha", "hyperband"):
        doc["early_stop"].update(min_epochs=3, reduction=3)
    elif early == "median":
        doc["early_stop"].update(min_epochs=3)
    return parse_search(doc, "bench/search_storage.py")


def epoch_value(params: dict[str, Any], epoch: int) -> float:
    quality = 0.9 - 0.05 * (math.log10(float(params["optim.lr"])) + 1.5) ** 2
    return quality * (1 - 0.7**epoch)


class SleepRunner:
    """No run folders: every run id is new, so only the protocol and the storage are measured."""

    def __init__(self, epochs: int, epoch_s: float):
        self.epochs, self.epoch_s, self.slept = epochs, epoch_s, 0.0

    def resolve(self, params: dict[str, Any]) -> str:
        return json.dumps(params, sort_keys=True)[:200]

    def existing(self, run_id: str) -> Any:
        return None

    def shared(self, run_id: str, params: dict[str, Any]) -> list[str]:
        return []  # no shared stores: no trial waits for another

    def run(self, a: Any) -> Any:
        from pipeline.search.figures import Outcome

        best = 0.0
        for epoch in range(1, self.epochs + 1):
            if self.epoch_s:
                t = time.perf_counter()
                time.sleep(self.epoch_s)
                self.slept += time.perf_counter() - t
            best = max(best, epoch_value(a.params, epoch))
            if a.reporter.report(epoch, best):
                return Outcome.stopped(epoch)
        return Outcome.done([best])


class LockTimer:
    """Time spent waiting for journal and claim locks in this process (Optuna's symlink lock)."""

    waited = 0.0

    @classmethod
    def install(cls) -> None:
        from optuna.storages.journal import JournalFileSymlinkLock

        from pipeline.search.lock import PromptSymlinkLock

        for lock_class in (JournalFileSymlinkLock, PromptSymlinkLock):
            cls._time(lock_class)

    @classmethod
    def _time(cls, lock_class: Any) -> None:
        acquire = lock_class.acquire

        def timed(self: Any) -> bool:
            start = time.perf_counter()
            try:
                return acquire(self)
            finally:
                cls.waited += time.perf_counter() - start

        lock_class.acquire = timed


def child_protocol(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.search.worker import run_worker

    if args.child == "optuna-lock":  # the baseline: Optuna's own symlink lock (waits double up to 1 s)
        from optuna.storages.journal import JournalFileSymlinkLock

        import pipeline.search.lock

        pipeline.search.lock.PromptSymlinkLock = JournalFileSymlinkLock  # type: ignore[misc]
    LockTimer.install()

    spec = spec_for(args.trials, args.workers, args.early)
    runner = SleepRunner(args.epochs, args.epoch_ms / 1000)
    start, cpu = time.perf_counter(), time.process_time()
    summary = run_worker(spec, Path(args.dir), args.worker, runner)  # type: ignore[arg-type]
    wall = time.perf_counter() - start
    return {
        "trials": len(summary.trials),
        "overhead_s": wall - runner.slept,
        "cpu_s": time.process_time() - cpu,
        "lock_s": LockTimer.waited,
    }


def child_bare(args: argparse.Namespace) -> dict[str, Any]:
    """Plain Optuna on the same journal: ask the space, report every epoch, tell, until the study has
    ``trials`` (counted without a lock, so a few more may be asked)."""
    import optuna

    from pipeline.search.study import distributions, make_pruner, make_sampler, open_storage

    LockTimer.install()
    spec = spec_for(args.trials, args.workers, args.early)
    storage = open_storage(spec, Path(args.dir))
    study = optuna.create_study(
        study_name="bare",
        storage=storage,
        direction="maximize",
        sampler=make_sampler(spec, args.worker),
        pruner=make_pruner(spec.early_stop),
        load_if_exists=True,
    )
    space, done, slept = distributions(spec), 0, 0.0
    start, cpu = time.perf_counter(), time.process_time()
    while len(study.get_trials(deepcopy=False)) < args.trials:
        trial, state, best = study.ask(space), None, 0.0
        for epoch in range(1, args.epochs + 1):
            if args.epoch_ms:
                t = time.perf_counter()
                time.sleep(args.epoch_ms / 1000)
                slept += time.perf_counter() - t
            best = max(best, epoch_value(trial.params, epoch))
            trial.report(best, epoch)
            if trial.should_prune():
                state = optuna.trial.TrialState.PRUNED
                break
        study.tell(trial, None if state else best, state=state)
        done += 1
    return {
        "trials": done,
        "overhead_s": time.perf_counter() - start - slept,
        "cpu_s": time.process_time() - cpu,
        "lock_s": LockTimer.waited,
    }


def fsync_ms(folder: Path, n: int = 50) -> float:
    path = folder / ".fsync_probe"
    start = time.perf_counter()
    for _ in range(n):
        with open(path, "ab") as f:
            f.write(b"x" * 200)
            f.flush()
            os.fsync(f.fileno())
    path.unlink()
    return (time.perf_counter() - start) / n * 1000


def run_workers(mode: str, args: argparse.Namespace, folder: Path) -> dict[str, float]:
    """Start ``args.workers`` processes in ``mode``; per-trial overhead (ms): mean of the workers'."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    common = ["--trials", str(args.trials), "--epochs", str(args.epochs), "--epoch-ms", str(args.epoch_ms)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", mode, "--worker", str(w), "--dir", str(folder)]
            + common
            + ["--workers", str(args.workers), "--early", args.early],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in range(args.workers)
    ]
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a {mode} worker exited {p.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    per_trial = [r["overhead_s"] / r["trials"] * 1000 for r in results if r["trials"]]
    trials = sum(r["trials"] for r in results)
    journal = folder / "search" / "journal.log"
    return {
        "trials": trials,
        "mean_ms": sum(r["overhead_s"] for r in results) / trials * 1000,
        "max_ms": max(per_trial),
        "cpu_ms": sum(r["cpu_s"] for r in results) / trials * 1000,
        "lock_ms": sum(r["lock_s"] for r in results) / trials * 1000,
        "appends": len(journal.read_bytes().splitlines()) / trials,
    }


MODES = {
    "protocol": "protocol",
    "optuna-lock": "protocol, Optuna's lock",
    "bare": "bare Optuna",
}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Each mode ``args.repeats`` times, the modes alternating; the median repeat (by wall) of each."""
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        fsync = fsync_ms(folder)
        for r in range(args.repeats):
            order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
            for mode in order:
                runs[mode].append(run_workers(mode, args, folder / f"{mode}-{r}"))
    medians = {mode: sorted(rs, key=lambda f: f["mean_ms"])[len(rs) // 2] for mode, rs in runs.items()}
    return {"fsync_ms": fsync, **medians, "all": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--trials", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--epoch-ms", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--early", default="asha", choices=("asha", "median", "hyperband", "none"))
    p.add_argument("--dir", default=None, help="where the journal files go (default: the system's temp folder)")
    p.add_argument("--child", choices=tuple(MODES), help=argparse.SUPPRESS)
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = (child_bare if args.child == "bare" else child_protocol)(args)
        print(json.dumps(result), flush=True)
        return
    from pipeline.jobs.procs import cpu_name

    load = os.getloadavg()[0]
    figures = measure(args)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(
        f"{args.workers} workers, {args.trials} trials, {args.epochs} epochs, {args.epoch_ms:g} ms per epoch, "
        f"early stop {args.early}; one append + fsync {figures['fsync_ms']:.2f} ms; median of {args.repeats}"
    )
    for mode, label in MODES.items():
        f = figures[mode]
        spread = ", ".join(f"{x['mean_ms']:.1f}" for x in figures["all"][mode])
        print(
            f"{label:>24}: per trial: wall overhead {f['mean_ms']:.1f} ms (repeats {spread}; worst worker "
            f"{f['max_ms']:.1f}), CPU {f['cpu_ms']:.1f} ms, waiting for locks {f['lock_ms']:.1f} ms, "
            f"{f['appends']:.1f} journal appends"
        )
    f = figures["protocol"]
    floor = f["cpu_ms"] + f["appends"] * figures["fsync_ms"]
    print(f"protocol on an idle machine (CPU + appends x fsync): {floor:.1f} ms per trial")
    verdict = "PASS" if f["mean_ms"] < 50 else "FAIL"
    print(f"target search_storage_per_trial: {f['mean_ms']:.1f} ms (goal < 50 ms, protocol, wall) {verdict}")


if __name__ == "__main__":
    main()

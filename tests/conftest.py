"""Shared fixtures: the repository root, a subprocess runner for the CLIs, and a tiny synthetic
CIFAR-format data set written by the project's own generator (no downloads)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The measure stage as tests run it: eager models, few repeats (timing figures are never asserted on)
MEASURE_FAST = {
    "measure.compile": False,
    "measure.latency_repeats": 3,
    "measure.throughput_batch": 16,
    "measure.throughput_repeats": 2,
    "measure.warmup": 1,
    "measure.memory": False,
}


def as_overrides(settings: Mapping[str, object]) -> list[str]:
    """``key=value`` command-line overrides of dotted settings (booleans as YAML writes them)."""
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()]


MEASURE_FAST_ARGS = as_overrides(MEASURE_FAST)

# A tiny run: ResNet-20 on the synthetic data (600 train images: 500 to train, 100 to validate), one
# epoch, one thread, the fast measure settings. Files change what their faults need through ``changes``.
TINY_RUN: dict[str, object] = {
    "model.name": "resnet20",
    "data.name": "synthetic",
    "data.val_size": 100,
    "train.threads": 1,
    "train.batch_size": 50,
    "train.epochs": 1,
    "output.log_every": 1000,
    **MEASURE_FAST,
}


def tiny_settings(root: Path | str | None = None, changes: Mapping[str, object] | None = None) -> dict[str, object]:
    """The settings of a tiny run (TINY_RUN) on the data in ``root`` (when given), with ``changes`` on top;
    a change to None removes that setting (the config's default applies)."""
    settings = {**TINY_RUN, **({"data.root": str(root)} if root is not None else {}), **(changes or {})}
    return {k: v for k, v in settings.items() if v is not None}


def tiny_args(root: Path | str | None, *extra: str, changes: Mapping[str, object] | None = None) -> list[str]:
    """``pipeline.run`` arguments of a tiny run: configs/base.yaml, tiny_settings as overrides, then ``extra``
    (later overrides win)."""
    return [str(REPO / "configs/base.yaml"), *as_overrides(tiny_settings(root, changes)), *extra]


def finished(status: str, **extra: object) -> dict[str, object]:
    """A training record as a finished job writes it (train.json), in ``status``; ``extra`` on top."""
    return {
        "status": status,
        "epochs": 3,
        "train_loss": 0.123456,
        "train_acc_best": 0.9512,
        "val_loss": 0.5,
        "val_acc_best": 0.8812,
        "test_acc": 0.8731,
        "test_top5": 0.99,
        **extra,
    }


# Files whose tests take longest, handed out first when the suite runs in several processes (make test:
# pytest-xdist, one file per process), so that no long file starts last and runs alone at the end.
SLOW_FILES_FIRST = (
    "test_study_sweeps.py",
    "test_end_to_end.py",
    "test_share_sweep.py",
    "test_slurm_requeue.py",
    "test_training_faults.py",
    "test_stages.py",
    "test_quantize.py",
    "test_share_slurm.py",
    "test_train.py",
    "test_submit_faults.py",
    "test_localjobs.py",
    "test_measure.py",
)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # one of several test processes on the machine's cores
        # one thread per torch process (here and in the jobs it starts): two test processes with as
        # many threads as cores each would oversubscribe the cores, and OpenMP's spinning makes that slow
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600, check: bool = False
) -> subprocess.CompletedProcess:
    """``python -m <args>`` in a subprocess with this interpreter; output captured as text."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **(env or {})}
    r = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and r.returncode != 0:
        raise AssertionError(f"{args} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def run_ranks(
    argv: list[str], cwd: Path, world_size: int = 2, timeout: float = 600
) -> list[subprocess.CompletedProcess]:
    """``python argv`` as every rank of a gloo job on this machine (RANK, WORLD_SIZE, MASTER_* set the
    way torchrun and srun do), output and exit code per rank. A rank left waiting in a collective the
    others never join shows as a timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [
        subprocess.Popen(
            [sys.executable, *argv],
            cwd=cwd,
            env={
                **os.environ,
                "PYTHONPATH": str(REPO),
                "RANK": str(r),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(r),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world_size)
    ]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
        return [subprocess.CompletedProcess(p.args, p.returncode, out) for p, out in zip(procs, outs)]
    finally:
        for p in procs:
            p.kill()


def kill_9_when(args: list[str], out: Path, cwd: Path, when, *, after_s: float = 0.3, timeout: float = 600) -> dict:
    """Start ``python -m pipeline.run *args --out out`` and SIGKILL it ``after_s`` seconds after its
    progress.json first satisfies ``when(progress)``; returns its progress record when killed. Fails the test when
    the run ends (or ``timeout`` passes) before that point."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", *args, "--out", str(out)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline, seen = time.monotonic() + timeout, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            progress = _progress(out)
            if progress and when(progress):
                time.sleep(after_s)
                seen = _progress(out) or progress  # where it is when killed
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert seen is not None, "the run ended before it could be killed"
    return seen


def _progress(out: Path) -> dict:
    """The progress record of the one run under ``out`` ({} when there is none yet, or it is mid-replace)."""
    import json

    files = list(out.glob("*/progress.json"))
    try:
        return json.loads(files[0].read_text()) if files else {}
    except (OSError, ValueError):
        return {}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """10 classes x 60 train / 20 test images in the synthetic layout (CIFAR-10 file format)."""
    from pipeline.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("data")
    write_synthetic(root, train_per_class=60, test_per_class=20, seed=0)
    return root


def write(path: Path, text: str) -> Path:
    """Write a text file, making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def tree_snapshot(path: Path) -> dict[str, float]:
    """Every file under ``path`` with its modification time (to prove nothing was written)."""
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------------
# The local Slurm cluster (tests/slurm/start.sh) for tests marked ``slurm``
# --------------------------------------------------------------------------------------------------

_NODE_OK_STATES = ("idle", "mix", "mixed", "alloc", "allocated", "comp", "completing")


def _slurm_answers() -> tuple[bool, str]:
    """(controller answers and every node is usable, what was seen)."""
    seen = []
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        seen.append(f"scontrol ping -> rc {ping.returncode}: {ping.stdout.strip()} {ping.stderr.strip()}")
        if ping.returncode != 0 or " is UP" not in ping.stdout:
            return False, "\n".join(seen)
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
        seen.append(f"sinfo -N -> rc {nodes.returncode}: {nodes.stdout.strip()} {nodes.stderr.strip()}")
    except (OSError, subprocess.TimeoutExpired) as e:
        seen.append(f"{type(e).__name__}: {e}")
        return False, "\n".join(seen)
    states = [line.split()[-1] for line in nodes.stdout.splitlines() if line.strip()]
    ok = nodes.returncode == 0 and bool(states) and all(s in _NODE_OK_STATES for s in states)
    return ok, "\n".join(seen)


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The local Slurm cluster, up: started once with tests/slurm/start.sh when the controller does not
    answer or the node is not usable. A cluster that cannot be started FAILS the test (never skips)."""
    ok, seen = _slurm_answers()
    if ok:
        return
    try:
        r = subprocess.run(["bash", str(REPO / "tests/slurm/start.sh")], capture_output=True, text=True, timeout=600)
        output = f"exit code {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    except (OSError, subprocess.TimeoutExpired) as e:
        r, output = None, f"{type(e).__name__}: {e}"
    ok_after, seen_after = _slurm_answers()
    if r is None or r.returncode != 0 or not ok_after:
        pytest.fail(
            f"the local Slurm cluster is not usable and tests/slurm/start.sh did not bring it up.\n"
            f"before: {seen}\nafter: {seen_after}\nstart.sh: {output}",
            pytrace=False,
        )


def write_done(run, train_metrics: dict) -> None:
    """Record a finished run by hand: the training's metrics, and every later stage as method none."""
    from pipeline.rundir import STAGES

    run.write_metrics("train", train_metrics)
    for stage in list(STAGES)[1:]:
        run.write_metrics(stage, {"status": "done", "method": "none"})

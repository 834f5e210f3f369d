"""Runs started without the sweep's launcher, on the local Slurm cluster (no mocks): tasks of a plain
``sbatch sbatch/array.sh`` array and a ``python -m pipeline.run`` started by hand. No manifest names
their jobs; status and collect read them from the run folders (owner.json while a job runs, ending.json
once a signal stopped it) and ask Slurm about them."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.rundir import RunDir
from tests.conftest import REPO, run_cli
from tests.test_slurm import (
    ENV,
    cancel_all,
    sacct,
    sbatch,
    squeue,
    status,
    status_row,
    sweep,
    wait_until,
    write_sweep,
)

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def owned(run: RunDir) -> bool:
    """A job holds the run folder and has finished an epoch (it is training, not starting up)."""
    return (run.path / "owner.json").is_file() and run.progress.is_file()


@pytest.mark.slow
def test_plain_array_tasks_and_a_hand_run_are_shown_running_then_cancelled(tmp_path, synthetic_root):
    out = tmp_path / "runs"
    sweep_dir = out / "plain"
    # long enough to be caught running (each epoch about a second); nothing here waits for the end
    spec = write_sweep(
        tmp_path / "plain.yaml", "plain", synthetic_root, lrs=[0.1, 0.05, 0.02], extra={"train.epochs": 500}
    )
    w = sweep(str(spec), "--no-submit", "--out", str(out))
    assert w.returncode == 0, w.stdout + w.stderr
    runs = [RunDir(Path(line)) for line in (sweep_dir / "array_runs.txt").read_text().split()]
    array_id = sbatch("--array=0-1", "--mem=1G", str(REPO / "sbatch/array.sh"), str(sweep_dir), cwd=tmp_path, env={})
    tasks = [f"{array_id}_{i}" for i in range(2)]
    by_hand = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", str(runs[2].path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            "all three runs to train",
            lambda: (all(owned(r) for r in runs), f"squeue {squeue(*tasks)}; {[owned(r) for r in runs]}"),
        )
        live = status(sweep_dir).stdout
        for run, job in zip(runs, [*tasks, f"pid {by_hand.pid}"]):
            row = status_row(live, run.id)
            assert " running " in row and job in row and "stopped" not in row, live
        assert "3 runs: 0 pending, 3 running" in live, live

        subprocess.run(["scancel", tasks[0]], check=True, timeout=30)
        wait_until(
            "the cancelled task's end",
            lambda: (
                sacct(tasks[0]).get(tasks[0]) == "CANCELLED" and tasks[0] not in squeue(*tasks),
                str(sacct(*tasks)),
            ),
        )
        assert tasks[0] in (runs[0].path / "ending.json").read_text()  # the job named itself on SIGTERM
        after = status(sweep_dir).stdout
        me = pwd.getpwuid(os.getuid()).pw_name
        row = status_row(after, runs[0].id)
        assert f"cancelled (cancelled by {me}" in row and tasks[0] in row, after
        for run, job in zip(runs[1:], [tasks[1], f"pid {by_hand.pid}"]):
            assert " running " in status_row(after, run.id) and job in status_row(after, run.id), after

        c = run_cli("pipeline.collect", str(sweep_dir), "--format", "markdown", "--no-plots", cwd=tmp_path, env=ENV)
        assert c.returncode == 0, c.stderr
        lines = {run.id: next(ln for ln in c.stdout.splitlines() if ln.startswith(f"- `{run.id}`")) for run in runs}
        assert f"**cancelled**: cancelled by {me}" in lines[runs[0].id], c.stdout
        assert all("**running**" in lines[run.id] for run in runs[1:]), c.stdout
    finally:
        cancel_all(tasks)
        by_hand.send_signal(signal.SIGTERM)
        try:
            by_hand.wait(timeout=120)
        except subprocess.TimeoutExpired:
            by_hand.kill()
            by_hand.wait()

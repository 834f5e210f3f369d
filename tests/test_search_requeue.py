"""A search's worker requeued on the local Slurm cluster, for real: the trial it held is resumed from its
checkpoint by the requeued worker (same trial number, same run folder), ends bitwise like the same trial
trained without interruption (CPU), and the study ends with exactly ``trials`` trials.

Two interruptions in one worker: ``scontrol requeue`` (SIGTERM, as a preemption) during trial 0, and
SIGUSR2 (what Slurm sends before the time limit; the job requeues itself) during trial 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.rundir import RunDir
from tests.conftest import REPO, run_cli
from tests.test_search_sweep import TINY, study_states
from tests.test_slurm import ENV, cancel_all, jobs_ended, logs_tail, wait_until
from tests.test_slurm_requeue import COMPARED, restarts

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

# random sampling with one worker: the same seed gives the same two configs on Slurm and locally
SEARCH = """\
name: {name}
base: [{base}]
cluster: local
set:
  model.name: resnet20
  data.train_size: 400
  data.val_size: 100
  train.batch_size: 20
  train.epochs: 8
  slurm.time_min: 30
  slurm.max_requeues: 5
search:
  method: random
  trials: 2
  workers: 1
  objective: {{val_acc_best: max}}
  params: {{optim.lr: {{low: 0.01, high: 0.1, log: true}}}}
  seed: 3
"""


def sweep_args(tmp_path: Path, name: str, root: Path) -> list[str]:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(SEARCH.format(name=name, base=REPO / "configs/base.yaml"))
    overrides = [t for t in TINY if not t.startswith(("data.train_size", "data.val_size"))]
    # each in its own --out: a sweep reuses the trainings stored under its --out (train once)
    return [str(spec), "--out", str(tmp_path / name), f"data.root={root}", *overrides]


def reference(tmp_path: Path, root: Path) -> subprocess.Popen:
    """The same search, uninterrupted, by the local executor (started in parallel)."""
    argv = [sys.executable, "-m", "pipeline.sweep", *sweep_args(tmp_path, "ref", root), "--cluster", "local", "--wait"]
    env = {**os.environ, **ENV, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def trial_runs(sweep_dir: Path) -> dict[int, Path]:
    """trial number -> its run folder (from meta.json)."""
    out = {}
    for meta in sweep_dir.glob("*/meta.json"):
        out[json.loads(meta.read_text())["search"]["trial"]] = meta.parent
    return out


def training_started(sweep_dir: Path, trial: int) -> bool:
    run = trial_runs(sweep_dir).get(trial)
    return run is not None and (run / "progress.json").exists()


def assert_same_training(run: Path, ref: Path) -> None:
    assert run.name == ref.name  # same sampled config, same run id
    m = json.loads((run / "metrics/train.json").read_text())
    r = json.loads((ref / "metrics/train.json").read_text())
    assert m["status"] == r["status"] == "done", (m, r)
    for key in COMPARED:
        assert m[key] == r[key], (key, m[key], r[key])
    trained_in = [RunDir(p).shared_store("train") or p for p in (run, ref)]  # (train once: a shared store)
    a = torch.load(trained_in[0] / "checkpoints/last.pt", weights_only=False)["model"]
    b = torch.load(trained_in[1] / "checkpoints/last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_requeued_worker_resumes_its_trial_bitwise_and_the_study_ends_with_trials(tmp_path, synthetic_root):
    r = run_cli("pipeline.sweep", *sweep_args(tmp_path, "req", synthetic_root), "--cluster", "slurm", env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    sweep_dir = tmp_path / "req/req"
    job = json.loads((sweep_dir / "search/jobs.json").read_text())["search"]["0"]["job"]
    ref = reference(tmp_path, synthetic_root)
    try:
        wait_until("trial 0's first epoch", lambda: (training_started(sweep_dir, 0), logs_tail(sweep_dir)), 300, 0.5)
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=30)
        wait_until("trial 1's first epoch", lambda: (training_started(sweep_dir, 1), logs_tail(sweep_dir)), 600, 0.5)
        subprocess.run(["scancel", "--signal=USR2", job], check=True, capture_output=True, timeout=30)
        wait_until("the worker to end", lambda: jobs_ended([job]), 600, 2)
        out = ref.communicate(timeout=900)[0]
        assert ref.returncode == 0, out
    finally:
        cancel_all([job])
        ref.kill()
    assert restarts(job) >= 2, logs_tail(sweep_dir)

    states = study_states(sweep_dir)
    assert states == {"COMPLETE": 2}, (states, logs_tail(sweep_dir))
    runs, refs = trial_runs(sweep_dir), trial_runs(tmp_path / "ref/ref")
    assert sorted(runs) == sorted(refs) == [0, 1]
    for trial, signal_name in ((0, "SIGTERM"), (1, "SIGUSR2")):
        store = RunDir(runs[trial]).shared_store("train")  # a shared training logs into its store
        log = "".join((p / "run.log").read_text() for p in (runs[trial], *([store] if store else [])))
        assert f"received {signal_name}" in log and "resuming from" in log, log
        assert_same_training(runs[trial], refs[trial])
    worker_log = "\n".join(p.read_text() for p in sweep_dir.glob("logs/*/*_log.out"))
    assert "trial 0 (resumed)" in worker_log and "trial 1 (resumed)" in worker_log, worker_log
    st = run_cli("pipeline.status", str(sweep_dir), cwd=tmp_path)
    assert "0 to go (of 2)" in st.stdout and "0 running" in st.stdout, st.stdout

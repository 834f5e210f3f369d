"""Train once, compress many on the real local Slurm cluster (tests/slurm/, no mocks): a 1 training x 3
compression sweep goes out as the owner's array and one follower array whose tasks carry
``afterok:<owner job>_<task>``; exactly one training runs and every compression starts after it; a
failed training gets the followers cancelled by Slurm (``--kill-on-invalid-dep=yes``), status and
collect show them as blocked by the owner, and ``--rerun failed`` after the fix finishes them all."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from pipeline.jobs import slurm as slurm_cli
from pipeline.rundir import RunDir, list_runs, read_json
from tests.conftest import REPO, run_cli
from tests.test_slurm import (
    ACTIVE,
    ENV,
    TINY,
    cancel_all,
    jobs_ended,
    logs_tail,
    manifest,
    sacct,
    status,
    sweep,
    wait_until,
)

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

TRAINING_STARTED = "INFO training resnet20"  # logged once when a training starts from scratch


COMPRESSIONS = ("{prune.method: none}", "{prune.method: unstructured}", "{prune.method: structured}")


def write_sweep(
    path: Path, name: str, data_root: Path, seeds: int = 1, variants: tuple[str, ...] = COMPRESSIONS
) -> Path:
    settings = {
        **TINY,
        "data.root": str(data_root),
        "model.shortcut": "B",
        "prune.epochs": 1,
        "prune.frequency": 1,
        "prune.sparsity": 0.5,
        "measure.enabled": False,
        "quant.calib_batches": 1,
    }
    lines = [f"name: {name}", f"base: [{REPO / 'configs/base.yaml'}]", "cluster: local", "set:"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in settings.items()]
    if seeds > 1:  # one training per seed: the owners are tasks of one array
        lines += ["grid:", f"  train.seed: {list(range(seeds))}"]
    lines += ["variants:", *(f"  - {v}" for v in variants)]
    path.write_text("\n".join(lines) + "\n")
    return path


def roles(sweep_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(run id -> job id, follower run id -> its owner's run id), from the manifest and the runs' links
    into the store (whose trainer.json names the owner)."""
    jobs = {rid: e["job_id"] for rid, e in manifest(sweep_dir)["runs"].items()}
    owner_of = {rid: RunDir(sweep_dir / rid).training_owner()["run_id"] for rid in jobs}
    return jobs, {rid: o for rid, o in owner_of.items() if o != rid}


def task_states(job_ids: list[str]) -> dict[str, str]:
    """Job or array task -> its state; sacct lists tasks that never started (cancelled while pending)
    only inside one record of the whole array ("108_[0-1%2]"), which slurm_cli.job_states resolves."""
    return slurm_cli.job_states(job_ids)


def tasks_ended(job_ids: list[str]) -> tuple[bool, str]:
    states = task_states(job_ids)
    return all(states.get(j, "") not in ("", *ACTIVE) for j in job_ids), str(states)


def trainings_started(out: Path) -> int:
    return sum(p.read_text().count(TRAINING_STARTED) for p in out.glob(".shared/train/*/run.log"))


def dependencies(job_ids: list[str]) -> dict[str, str]:
    """Array task -> its dependency as squeue shows it (%E), for the tasks still queued."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    r = subprocess.run(
        ["squeue", "-h", "-r", "-j", ",".join(bases), "-o", "%i|%E|%r"], capture_output=True, text=True, timeout=30
    )
    return {i: f"{dep}|{reason}" for i, dep, reason in (ln.strip().split("|", 2) for ln in r.stdout.splitlines() if ln)}


def sacct_times(*job_ids: str) -> dict[str, tuple[float, float]]:
    bases = sorted({j.split("_")[0] for j in job_ids})
    r = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", ",".join(bases), "-o", "JobID,Start,End"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    out = {}
    for line in r.stdout.splitlines():
        jid, start, end = line.strip().split("|")
        if "T" in start and "T" in end:
            out[jid] = (datetime.fromisoformat(start).timestamp(), datetime.fromisoformat(end).timestamp())
    return out


def log_time(run: RunDir, text: str) -> float:
    for line in run.log.read_text().splitlines():
        if text in line:
            return datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S").timestamp()
    raise AssertionError(f"{text!r} not in {run.log}")


@pytest.mark.slow
def test_followers_wait_for_their_owners_task_and_each_training_runs_once(tmp_path, synthetic_root):
    # two seeds x (unpruned, unstructured, structured): two trainings, whose owners are tasks of one array
    spec = write_sweep(tmp_path / "sweep.yaml", "share-slurm", synthetic_root, seeds=2)
    out = tmp_path / "runs"
    sweep_dir = out / "share-slurm"
    r = sweep(str(spec), "--cluster", "slurm", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6 of 6 runs submitted to slurm (2 training(s))" in r.stdout, r.stdout
    jobs, owner_of = roles(sweep_dir)
    owners = sorted(set(owner_of.values()))
    try:
        assert len(owners) == 2 and len(owner_of) == 4
        assert len({jobs[o].split("_")[0] for o in owners}) == 1 and all("_" in jobs[o] for o in owners)
        # one follower array per owner, apart from the owners' array
        assert len({jobs[f].split("_")[0] for f in owner_of} | {jobs[owners[0]].split("_")[0]}) == 3
        # right after submission the owners' tasks are still starting Python: each follower waits on its
        # own owner's task (not on the whole array)
        deps = dependencies([jobs[f] for f in owner_of])
        for f, o in owner_of.items():
            assert deps.get(jobs[f], "").startswith(f"afterok:{jobs[o]}(unfulfilled)|"), deps

        def all_done() -> tuple[bool, str]:
            ended, seen = jobs_ended(list(jobs.values()))
            done = all(RunDir(sweep_dir / rid).status() == "done" for rid in jobs)
            return ended and done, seen + "\n" + logs_tail(sweep_dir)

        wait_until("the owners and their followers to finish", all_done, timeout=400)
    finally:
        cancel_all(list(jobs.values()))
    assert set(sacct(*jobs.values()).values()) == {"COMPLETED"}
    stores = list((out / ".shared" / "train").iterdir())
    assert len(stores) == 2 and trainings_started(out) == 2  # one training per key
    for store in stores:
        assert (store / "run.log").read_text().count(TRAINING_STARTED) == 1
    times = sacct_times(*jobs.values())
    for f, o in owner_of.items():
        run = RunDir(sweep_dir / f)
        assert TRAINING_STARTED not in run.log.read_text()  # it did not train in its own folder
        store = run.shared_store()
        assert store is not None and read_json(store / "trainer.json")["run_id"] == o
        trained_at = (store / "metrics" / "train.json").stat().st_mtime
        assert log_time(run, "stage prune") >= int(trained_at)
        assert times[jobs[f]][0] >= times[jobs[o]][1]  # Slurm started it once its owner's task had ended
    s = status(sweep_dir)
    assert "6 done" in s.stdout, s.stdout


def test_failed_training_blocks_followers_until_rerun_failed(tmp_path, synthetic_root):
    root = tmp_path / "data"  # missing at first: the training fails loading it
    spec = write_sweep(tmp_path / "sweep.yaml", "share-blocked", root)
    out = tmp_path / "runs"
    sweep_dir = out / "share-blocked"
    r = sweep(str(spec), "--cluster", "slurm", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    jobs, owner_of = roles(sweep_dir)
    followers = sorted(owner_of)
    (owner,) = set(owner_of.values())
    try:

        def ended() -> tuple[bool, str]:
            done, seen = tasks_ended(list(jobs.values()))
            return done, seen + "\n" + logs_tail(sweep_dir)

        wait_until("the owner to fail and its followers to be cancelled", ended)
    finally:
        cancel_all(list(jobs.values()))
    states = task_states(list(jobs.values()))
    assert states[jobs[owner]] == "FAILED", states
    for f in followers:  # Slurm cancels them: the dependency can never be satisfied
        assert states[jobs[f]] == "CANCELLED", states
        assert not (sweep_dir / f / "run.log").exists()  # never started
    # (sacct's Reason for those tasks is "Dependency" or, depending on when the controller evaluated the
    # dependency before cancelling, "None": not asserted; CANCELLED without a run.log says it)

    s = status(sweep_dir)
    assert "2 blocked" in s.stdout and "1 failed" in s.stdout, s.stdout
    assert s.stdout.count(f"blocked by {owner}") == 2 and "cancelled" not in s.stdout, s.stdout
    c = run_cli("pipeline.collect", str(sweep_dir), cwd=REPO, env=ENV)
    assert c.returncode == 0, c.stdout + c.stderr
    assert c.stdout.count(f"blocked by {owner}") == 2, c.stdout

    again = sweep(str(spec), "--cluster", "slurm", "--out", str(out), "--dry-run")
    assert again.stdout.count("skip-blocked") == 2 and "skip-failed" in again.stdout, again.stdout
    shutil.copytree(synthetic_root, root)  # the fix
    r = sweep(str(spec), "--cluster", "slurm", "--out", str(out), "--rerun", "failed")
    assert r.returncode == 0 and "3 of 3 runs submitted" in r.stdout, r.stdout + r.stderr
    new_jobs = {rid: e["job_id"] for rid, e in manifest(sweep_dir)["runs"].items()}
    assert not set(new_jobs.values()) & set(jobs.values())
    try:

        def all_done() -> tuple[bool, str]:
            ended, seen = jobs_ended(list(new_jobs.values()))
            done = all(RunDir(sweep_dir / rid).status() == "done" for rid in new_jobs)
            return ended and done, seen + "\n" + logs_tail(sweep_dir)

        wait_until("the rerun to finish every run", all_done, timeout=300)
    finally:
        cancel_all(list(new_jobs.values()))
    assert [run.status() for run in list_runs(sweep_dir)] == ["done"] * 3
    assert trainings_started(out) == 1  # the failed attempt stopped loading the data, before training
    (store,) = list((out / ".shared" / "train").iterdir())
    assert list((store / "archive").glob("*/metrics/train.json"))  # the failure kept aside


@pytest.mark.slow
def test_a_shared_pruning_waits_for_its_owner_which_waits_for_the_training(tmp_path, synthetic_root):
    """unpruned + int8 trains; unstructured + int8 prunes after that training; unstructured + fp16 waits
    for that pruning: three arrays chained by afterok, one training, one pruning."""
    quant = (
        "{prune.method: none, quant.method: int8}",
        "{prune.method: unstructured, quant.method: int8}",
        "{prune.method: unstructured, quant.method: fp16}",
    )
    spec = write_sweep(tmp_path / "sweep.yaml", "share-prune", synthetic_root, variants=quant)
    out = tmp_path / "runs"
    sweep_dir = out / "share-prune"
    r = sweep(str(spec), "--cluster", "slurm", "--out", str(out))
    assert r.returncode == 0 and "3 of 3 runs submitted to slurm (1 training(s))" in r.stdout, r.stdout + r.stderr
    jobs, owner_of = roles(sweep_dir)
    (trainer,) = set(owner_of.values())
    (pruner,) = [
        rid for rid in jobs if rid != trainer and RunDir(sweep_dir / rid).training_owner("prune")["run_id"] == rid
    ]
    (last,) = set(jobs) - {trainer, pruner}
    assert RunDir(sweep_dir / last).training_owner("prune")["run_id"] == pruner
    try:
        deps = dependencies([jobs[pruner], jobs[last]])
        assert deps[jobs[pruner]].startswith(f"afterok:{jobs[trainer]}(unfulfilled)|"), deps
        assert deps[jobs[last]].startswith(f"afterok:{jobs[pruner]}(unfulfilled)|"), deps

        def all_done() -> tuple[bool, str]:
            ended, seen = tasks_ended(list(jobs.values()))
            done = all(RunDir(sweep_dir / rid).status() == "done" for rid in jobs)
            return ended and done, seen + "\n" + logs_tail(sweep_dir)

        wait_until("the three chained jobs to finish", all_done, timeout=400)
    finally:
        cancel_all(list(jobs.values()))
    assert set(task_states(list(jobs.values())).values()) == {"COMPLETED"}
    assert trainings_started(out) == 1
    (store,) = list((out / ".shared" / "prune").iterdir())
    assert (store / "run.log").read_text().count("INFO pruned (unstructured") == 1
    for rid in jobs:
        assert "INFO pruned (" not in (sweep_dir / rid / "run.log").read_text()
    times = sacct_times(*jobs.values())
    assert times[jobs[pruner]][0] >= times[jobs[trainer]][1] and times[jobs[last]][0] >= times[jobs[pruner]][1]

"""Time limits, requeue and data-parallel jobs on the local Slurm cluster (no mocks).

(a) A run whose time limit is shorter than its training is signalled (SIGUSR2 before the limit), saves a
    mid-epoch checkpoint, requeues itself and finishes; (b) ``scontrol requeue`` in the middle of training
    (SIGTERM) does the same; in both the final metrics and weights equal those of an uninterrupted run
    with the same seed. (d) A 2-task gloo DDP run through Slurm completes with world size 2.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pipeline.rundir import RunDir, list_runs
from tests.conftest import REPO, as_overrides, tiny_settings
from tests.test_slurm import ENV, cancel_all, jobs_ended, logs_tail, manifest, sacct, sweep, wait_until, write_sweep

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

# about a minute of training on one CPU thread: longer than the ~40 s after which a job with a 1-minute
# limit is signalled, so that run is interrupted at least once; the same config (hence run id) for all
LONG = {
    "data.val_size": 100,
    "data.train_size": 400,
    "train.epochs": 25,
    "train.batch_size": 20,
    "optim.lr": 0.05,
    "measure.enabled": False,
}
COMPARED = ("train_loss", "train_acc_best", "val_loss", "val_acc_best", "test_acc", "test_top5")


def reference_run(tmp_path, synthetic_root) -> subprocess.Popen:
    """The same training, uninterrupted, in this machine's foreground (started in parallel)."""
    args = as_overrides(tiny_settings(synthetic_root, {**LONG, "train.device": "cpu", "output.tensorboard": False}))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.run",
            str(REPO / "configs/base.yaml"),
            *args,
            "--out",
            str(tmp_path / "reference"),
        ],
        cwd=tmp_path,
        env={**os.environ, **ENV, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def assert_same_result(run: RunDir, ref: RunDir) -> None:
    assert run.id == ref.id  # the slurm section is not part of a run's identity
    m, r = run.read_metrics("train"), ref.read_metrics("train")
    for key in COMPARED:
        assert m[key] == r[key], (key, m[key], r[key])
    a = torch.load(run.checkpoints / "last.pt", weights_only=False)["model"]
    b = torch.load(ref.checkpoints / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def submit_one(tmp_path, synthetic_root, name: str, extra: dict) -> tuple[RunDir, str]:
    # each run trains itself: sweeps in one --out otherwise share a training (pipeline.share), and the
    # second would wait for the first's through a Slurm dependency instead of being signalled/requeued
    extra = {"share.train": False, **extra}
    spec = write_sweep(tmp_path / f"{name}.yaml", name, synthetic_root, extra={**LONG, **extra})
    r = sweep(str(spec), "--cluster", "slurm", "--out", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = list_runs(tmp_path / "runs" / name)
    return run, manifest(tmp_path / "runs" / name)["runs"][run.id]["job_id"]


def wait_done(run: RunDir, job: str, timeout: float = 420) -> None:
    def check():
        m = run.read_metrics("train")
        return (m is not None and jobs_ended([job])[0]), f"metrics {m}; sacct {sacct(job)}"

    try:
        wait_until(f"run {run.id} (job {job}) to finish", check, timeout=timeout, every=2)
    except BaseException:
        cancel_all([job])
        print(logs_tail(run.path.parent))
        raise


def restarts(job: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    for word in out.split():
        if word.startswith("Restarts="):
            return int(word.split("=")[1])
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-D", "-j", job.split("_")[0], "-o", "JobID,State"], capture_output=True, text=True
    ).stdout
    return sum(1 for line in out.splitlines() if "REQUEUED" in line or "PREEMPTED" in line)


@pytest.mark.slow
def test_time_limit_signal_requeue_and_scontrol_requeue_end_like_an_unbroken_run(tmp_path, synthetic_root):
    ref_proc = reference_run(tmp_path, synthetic_root)
    # (a) a 1-minute limit: signalled about 40 s in (FACTS.md), long before the training ends
    timed, timed_job = submit_one(
        tmp_path, synthetic_root, "timelimit", {"slurm.time_min": 1, "slurm.max_requeues": 10}
    )
    # (b) a generous limit, requeued by hand once the first epoch is done
    requeued, requeued_job = submit_one(tmp_path, synthetic_root, "requeue", {"slurm.time_min": 30})
    wait_until(
        "the first epoch of the requeue run",
        lambda: (requeued.progress.exists(), sacct(requeued_job)),
        timeout=300,
        every=0.5,
    )
    subprocess.run(["scontrol", "requeue", requeued_job], check=True, capture_output=True, timeout=30)

    out = ref_proc.communicate(timeout=600)[0]
    assert ref_proc.returncode == 0, out
    (ref,) = list_runs(tmp_path / "reference")

    wait_done(requeued, requeued_job)
    log = requeued.log.read_text()
    assert "received SIGTERM" in log and "checkpoint saved" in log and "resuming from" in log, log
    assert requeued.read_metrics("train")["status"] == "done"
    assert_same_result(requeued, ref)

    wait_done(timed, timed_job, timeout=900)
    log = timed.log.read_text()
    assert "received SIGUSR2" in log and "requeued" in log and "resuming from" in log, log
    assert timed.read_metrics("train")["status"] == "done"
    assert restarts(timed_job) >= 1
    assert_same_result(timed, ref)


def test_two_task_gloo_ddp_job_completes(tmp_path, synthetic_root):
    spec = write_sweep(
        tmp_path / "ddp.yaml",
        "ddp",
        synthetic_root,
        extra={"slurm.tasks_per_node": 2, "slurm.cpus_per_task": 1, "train.batch_size": 50, "model.norm": "group"},
    )
    r = sweep(str(spec), "--cluster", "slurm", "--out", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = list_runs(tmp_path / "runs/ddp")
    job = manifest(tmp_path / "runs/ddp")["runs"][run.id]["job_id"]
    wait_done(run, job, timeout=300)
    m = run.read_metrics("train")
    assert m["status"] == "done" and m["world_size"] == 2, m
    logs = "\n".join(p.read_text() for p in (tmp_path / "runs/ddp/logs").rglob("*_log.out"))
    assert "rank 1 of 2 joined (gloo)" in logs and "rank 0 of 2 joined (gloo)" in logs
    assert sacct(job).get(job) == "COMPLETED"


@pytest.mark.slow
def test_plain_sbatch_script_checkpoints_and_requeues_on_sigusr2(tmp_path, synthetic_root):
    """sbatch/min_project.sh asks for SIGUSR2 to its batch process before the limit; sending it by hand
    (scancel --signal=USR2 --batch) must save a checkpoint, requeue the job and end in a finished run."""
    # signalled by hand after the first epoch: no need to outlast a time limit
    settings = tiny_settings(synthetic_root, {**LONG, "train.device": "cpu", "train.epochs": 6})
    env = {**os.environ, **ENV, "PIPELINE_OUT": str(tmp_path / "runs")}
    r = subprocess.run(
        [
            "sbatch",
            "--parsable",
            str(REPO / "sbatch/min_project.sh"),
            str(REPO / "configs/base.yaml"),
            *as_overrides(settings),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    try:
        wait_until(
            "the first epoch",
            lambda: (bool(list((tmp_path / "runs").glob("*/progress.json"))), sacct(job)),
            timeout=300,
            every=0.5,
        )
        subprocess.run(["scancel", "--signal=USR2", "--batch", job], check=True, timeout=30)
        (run,) = list_runs(tmp_path / "runs")
        wait_done(run, job, timeout=600)
    finally:
        cancel_all([job])
    log = run.log.read_text()
    assert "received SIGUSR2" in log and f"job {job} requeued" in log and "resuming from" in log, log
    assert run.read_metrics("train")["status"] == "done" and restarts(job) >= 1

"""Submission under trouble, for real: two submitters of one sweep, a submitter killed with ``kill -9``
midway, sbatch refusing one array of several, a Slurm controller that does not answer.

Jobs that get queued here run ``sleep`` as their setup line and are cancelled at the end: the tests look
at what was queued and recorded, not at training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.rundir import list_runs
from tests.conftest import REPO, run_cli
from tests.test_slurm import cancel_all, manifest, sacct, sweep, wait_until, write_sweep

IDLE = {"slurm.setup": ["sleep 120"]}  # queued jobs hold a slot and use no CPU until cancelled


def queued_of(name: str) -> set[str]:
    """Job and task ids squeue lists under the sweep's job name (pipeline-<name>)."""
    out = subprocess.run(
        ["squeue", "-h", "-r", "-n", f"pipeline-{name}", "-o", "%i"], capture_output=True, text=True, timeout=30
    ).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def submitted_runs(m: dict) -> list[str]:
    """Every run id of every accepted submission in the manifest's history (repeats kept)."""
    return [rid for h in m["history"] for rid in h.get("job_ids", {})]


def hold_lock(sweep_dir: Path) -> subprocess.Popen:
    """A real second process holding the sweep's submission lock (as a submitter would) until killed."""
    code = (
        "import sys, time\n"
        "from pipeline.submit.lock import SubmitLock\n"
        "SubmitLock(sys.argv[1]).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(sweep_dir)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_live_lock_refuses_a_second_submitter_and_a_killed_holders_lock_is_taken_over(tmp_path, synthetic_root):
    spec = write_sweep(tmp_path / "sweep.yaml", "locked", synthetic_root, lrs=[0.1, 0.05])
    out = tmp_path / "runs"
    sweep_dir = out / "locked"
    holder = hold_lock(sweep_dir)
    try:
        r = run_cli("pipeline.sweep", str(spec), "--out", str(out), "--no-submit")
        assert r.returncode == 2, r.stdout + r.stderr
        assert "another submission of this sweep is running" in r.stderr, r.stderr
        assert f"pid {holder.pid}" in r.stderr and "since 20" in r.stderr, r.stderr
        assert not list(sweep_dir.glob("*/config.yaml"))  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (sweep_dir / ".submit.lock").exists()  # kill -9 left it behind
    r = run_cli("pipeline.sweep", str(spec), "--out", str(out), "--no-submit")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "took over the stale submission lock" in r.stdout, r.stdout
    assert f"pid {holder.pid} on this host, no longer runs" in r.stdout, r.stdout
    assert len(list(sweep_dir.glob("*/config.yaml"))) == 2
    assert not (sweep_dir / ".submit.lock").exists()  # released at the end


def test_lock_of_a_live_process_with_a_recycled_pid_or_another_host(tmp_path):
    """Staleness rules on real processes: our own pid with a wrong start time is stale (the pid was
    recycled); another host's lock is stale only without a heartbeat for STALE_AFTER_S."""
    import socket

    from pipeline.submit.lock import STALE_AFTER_S, process_start, stale_reason

    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid())}
    assert stale_reason(me, time.time()) is None
    assert "now another process" in (stale_reason({**me, "start": "x:1"}, time.time()) or "")
    # a PID alone (a lock not written by this version), the PID a live process: not shown to be held
    assert "without its start time" in (stale_reason({**me, "start": None}, time.time()) or "")
    assert "without its start time" in (stale_reason({"host": me["host"], "pid": os.getpid()}, time.time()) or "")
    other = {"host": "elsewhere", "pid": 1, "start": "y:1"}
    assert stale_reason(other, time.time() - 10) is None
    assert "no heartbeat" in (stale_reason(other, time.time() - STALE_AFTER_S - 1) or "")
    zombie = subprocess.Popen(["true"])  # exits at once; not waited for: a zombie
    wait_until("the child to become a zombie", lambda: (process_start(zombie.pid) is None, ""), 10, 0.05)
    assert "no longer runs" in (stale_reason({**me, "pid": zombie.pid, "start": "z"}, time.time()) or "")
    zombie.wait()


def many_arrays_sweep(tmp_path: Path, synthetic_root: Path, name: str, n: int) -> Path:
    """n runs, each its own array (a different slurm.time_min each: scheduling settings split arrays
    but not run ids)."""
    spec = write_sweep(tmp_path / "sweep.yaml", name, synthetic_root, extra=IDLE)
    lrs = [round(0.1 - 0.01 * i, 3) for i in range(n)]
    text = spec.read_text() + f"zip:\n  optim.lr: {json.dumps(lrs)}\n  slurm.time_min: {list(range(30, 30 + n))}\n"
    spec.write_text(text)
    return spec


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_submitter_killed_between_arrays_leaves_an_exact_manifest_and_the_rerun_submits_the_rest(
    tmp_path, synthetic_root
):
    n = 6
    spec = many_arrays_sweep(tmp_path, synthetic_root, "killed-submit", n)
    out = tmp_path / "runs"
    sweep_dir = out / "killed-submit"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline.sweep", str(spec), "--cluster", "slurm", "--out", str(out)]
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            try:
                if json.loads((sweep_dir / "manifest.json").read_text())["history"]:
                    break
            except (FileNotFoundError, ValueError, KeyError):
                pass
            time.sleep(0.005)
        assert p.poll() is None, "the submitter ended before it could be killed midway"
        p.send_signal(signal.SIGKILL)
        p.wait()
        m = manifest(sweep_dir)
        queued = queued_of("killed-submit")
        recorded = {e["job_id"] for e in m["runs"].values()}
        # what the killed command recorded is queued; an array it queued but had no time to record
        # is named by its token ("submitting") and is found by the rerun
        assert recorded <= queued and 1 <= len(recorded) < n, (m, queued)
        assert len(queued - recorded) <= 1 and (not queued - recorded or m.get("submitting")), (m, queued)
        assert (sweep_dir / ".submit.lock").exists()

        r = sweep(str(spec), "--cluster", "slurm", "--out", str(out))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "took over the stale submission lock" in r.stdout, r.stdout
        m2 = manifest(sweep_dir)
        runs = submitted_runs(m2)
        assert sorted(runs) == sorted(set(runs)) and len(runs) == n, m2  # every run submitted exactly once
        assert not m2.get("submitting"), m2
        # The kill can fall after sbatch queued an array (and the manifest recorded it) but before
        # submitit moved the job's pickle into logs/<job>/: that job fails at its start (sacct FAILED, no
        # log folder), its runs never started, and the next submission gives them a new job.
        lost = {e["job_id"] for e in m2["runs"].values()} - queued_of("killed-submit")
        if lost:
            assert not any((sweep_dir / "logs" / j).exists() for j in lost), lost
            wait_until("sacct to record the lost jobs", lambda: (set(sacct(*lost).values()) == {"FAILED"}, lost))
            before = {rid: e["job_id"] for rid, e in m2["runs"].items()}
            again = sweep(str(spec), "--cluster", "slurm", "--out", str(out))
            assert again.returncode == 0, again.stdout + again.stderr
            m2 = manifest(sweep_dir)
            after = {rid: e["job_id"] for rid, e in m2["runs"].items()}
            for rid, job in before.items():  # only the lost jobs' runs got a new job
                assert (after[rid] != job) == (job in lost), (rid, job, after[rid], lost)
        assert {e["job_id"] for e in m2["runs"].values()} == queued_of("killed-submit"), m2
    finally:
        if p.poll() is None:
            p.kill()
        cancel_all(sorted(queued_of("killed-submit")))


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_two_submitters_at_once_submit_each_run_once(tmp_path, synthetic_root):
    n = 4
    spec = many_arrays_sweep(tmp_path, synthetic_root, "twice", n)
    out = tmp_path / "runs"
    sweep_dir = out / "twice"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"}
    cmd = [sys.executable, "-m", "pipeline.sweep", str(spec), "--cluster", "slurm", "--out", str(out)]
    try:
        procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
        results = [(p.wait(120), *p.communicate()) for p in procs]
        for rc, so, se in results:
            assert rc == 0 or (rc == 2 and "another submission of this sweep is running" in se), (rc, so, se)
        runs = submitted_runs(manifest(sweep_dir))
        assert sorted(runs) == sorted(set(runs)) and len(runs) == n, manifest(sweep_dir)
        assert len(queued_of("twice")) == n
    finally:
        cancel_all(sorted(queued_of("twice")))


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_sbatch_refusing_one_array_submits_the_others_once_and_the_fixed_rerun_only_it(tmp_path, synthetic_root):
    spec = write_sweep(tmp_path / "sweep.yaml", "refused", synthetic_root, extra=IDLE)
    spec.write_text(spec.read_text() + 'zip:\n  optim.lr: [0.1, 0.05]\n  slurm.partition: ["debug", "nosuchpart"]\n')
    out = tmp_path / "runs"
    sweep_dir = out / "refused"
    args = [str(spec), "--cluster", "slurm", "--out", str(out)]
    try:
        r = sweep(*args)
        assert r.returncode == 2, r.stdout + r.stderr
        m = manifest(sweep_dir)
        ((good, entry),) = m["runs"].items()
        bad = next(p.name for p in sweep_dir.iterdir() if (p / "config.yaml").exists() and p.name != good)
        assert f"not submitted: 1 run(s) ({bad})" in r.stderr and "invalid partition" in r.stderr.lower(), r.stderr
        assert "1 of 2 runs submitted" in r.stdout, r.stdout
        assert [h["rejected"] for h in m["history"] if "rejected" in h] == [[bad]], m
        assert queued_of("refused") == {entry["job_id"]}

        again = sweep(*args)  # the cause not fixed: refused again, the good array left alone
        assert again.returncode == 2 and "skip-active" in again.stdout, again.stdout + again.stderr
        assert submitted_runs(manifest(sweep_dir)) == [good]

        fixed = sweep(*args, "slurm.partition=debug")  # scheduling settings are not part of a run's id
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert "1 of 2 runs submitted" in fixed.stdout, fixed.stdout
        assert sorted(submitted_runs(manifest(sweep_dir))) == sorted([good, bad])
        assert len(queued_of("refused")) == 2
    finally:
        cancel_all(sorted(queued_of("refused")))


def unreachable_slurm_conf(tmp_path: Path) -> Path:
    """A copy of the cluster's config naming a port no controller listens on: real Slurm clients that
    get no answer (the cluster itself keeps running for everyone else)."""
    conf = tmp_path / "slurm-etc"
    conf.mkdir()
    for f in Path("/etc/slurm").glob("*.conf"):
        (conf / f.name).write_text(f.read_text())
    with (conf / "slurm.conf").open("a") as f:
        f.write("\nSlurmctldPort=6999\n")
    return conf / "slurm.conf"


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_controller_not_answering_exits_3_before_writing_and_auto_does_not_fall_back_to_local(tmp_path, synthetic_root):
    spec = write_sweep(tmp_path / "sweep.yaml", "nocontroller", synthetic_root, lrs=[0.1, 0.05])
    out = tmp_path / "runs"
    sweep_dir = out / "nocontroller"
    env = {"SLURM_CONF": str(unreachable_slurm_conf(tmp_path))}
    r = run_cli("pipeline.sweep", str(spec), "--cluster", "slurm", "--out", str(out), env=env)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "Slurm controller does not answer" in r.stderr and "nothing was submitted" in r.stderr, r.stderr
    assert not list(sweep_dir.glob("*/config.yaml")) and not (sweep_dir / "manifest.json").exists()

    # a sweep already on Slurm: auto must not move it to the local executor while the controller is down
    from pipeline.jobs.manifest import record_submitted

    record_submitted(sweep_dir, "slurm", {"0000000000": "999999"})
    r = run_cli("pipeline.sweep", str(spec), "--out", str(out), env=env)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "manifest names Slurm jobs" in r.stderr, r.stderr
    assert not list(sweep_dir.glob("*/config.yaml"))


# --------------------------------------------------------------------------------------------------
# each ending named (pipeline.jobs.endings.classify, shared by status and collect)
# --------------------------------------------------------------------------------------------------


def started_run(tmp_path: Path, name: str = "r1"):
    """A run folder that started training (config, progress) and has no result."""
    from pipeline.rundir import RunDir, atomic_write_json

    run = RunDir(tmp_path / name)
    (run.path).mkdir(parents=True)
    run.config.write_text("{}\n")
    atomic_write_json(run.progress, {"epoch": 1, "epochs": 5})
    return run


# sacct -P -X -o State as Slurm 22.05 prints it for these endings (OOM, node failure and preemption
# cannot be provoked on the local cluster: no cgroup memory enforcement, one node, no preemption)
RECORDED_SACCT = {
    "OUT_OF_MEMORY": ("out-of-memory", "slurm.mem_gb"),
    "NODE_FAIL": ("node-failure", "node failed"),
    "PREEMPTED": ("preempted", "preempted"),
    "TIMEOUT": ("time-limit", "time limit"),
    "CANCELLED by 0": ("cancelled", "cancelled by root (uid 0)"),
    "CANCELLED": ("cancelled", "cancelled"),
    "FAILED": ("failed", "before writing a record"),
    "RUNNING": ("running", ""),
    "PENDING": ("pending", ""),
}


@pytest.mark.parametrize("sacct_state", sorted(RECORDED_SACCT))
def test_classify_names_each_scheduler_ending(tmp_path, sacct_state):
    from pipeline.jobs.endings import classify

    state, fragment = RECORDED_SACCT[sacct_state]
    e = classify(started_run(tmp_path), sacct_state)
    assert e.state == state and fragment in e.reason, e


def test_classify_from_the_run_folder_when_the_scheduler_cannot_tell(tmp_path):
    from tests.conftest import write_done

    from pipeline.jobs.endings import classify, write_ending

    run = started_run(tmp_path)
    assert classify(run, "").state == "stopped"
    assert classify(started_run(tmp_path, "never"), "", submitted=True).state == "stopped"
    write_ending(run, "time-limit", "time limit near and slurm.max_requeues=0 requeues used: not requeued")
    assert classify(run, "").state == "time-limit"  # sacct gone (or COMPLETED: the job exited itself)
    assert classify(run, "COMPLETED").state == "time-limit"
    assert classify(run, "CANCELLED by 0").state == "cancelled"  # the scheduler's word wins
    run.write_metrics("train", {"status": "failed", "error": "FileNotFoundError: /data"})
    e = classify(run, "OUT_OF_MEMORY")
    assert e.state == "out-of-memory" and "FileNotFoundError" in e.reason, e
    assert classify(run, "").reason == "FileNotFoundError: /data"
    write_done(run, {"status": "done"})
    assert classify(run, "CANCELLED by 0").state == "done"  # finished is finished
    pending = tmp_path / "p"
    pending.mkdir()
    (pending / "config.yaml").write_text("{}\n")
    from pipeline.rundir import RunDir

    assert classify(RunDir(pending), "", submitted=False).state == "pending"


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_scancel_shows_cancelled_and_a_time_limit_without_requeues_shows_time_limit(tmp_path, synthetic_root):
    from tests.test_slurm import jobs_ended, logs_tail, status, status_row

    # two arrays: a 1-minute limit with no requeue left, and a 30-minute one that is cancelled
    spec = write_sweep(
        tmp_path / "sweep.yaml",
        "endings",
        synthetic_root,
        extra={"train.epochs": 2000, "slurm.max_requeues": 0, "data.train_size": 100},
    )
    spec.write_text(spec.read_text() + "zip:\n  optim.lr: [0.1, 0.05]\n  slurm.time_min: [1, 30]\n")
    out = tmp_path / "runs"
    sweep_dir = out / "endings"
    r = sweep(str(spec), "--cluster", "slurm", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    m = manifest(sweep_dir)
    ids = [e["job_id"] for e in m["runs"].values()]
    try:
        limited, cancelled = (
            next(rid for rid in m["runs"] if (sweep_dir / rid / "config.yaml").read_text().count(f"time_min: {t}\n"))
            for t in (1, 30)
        )
        cjob = m["runs"][cancelled]["job_id"]
        wait_until("the job to train", lambda: ((sweep_dir / cancelled / "progress.json").exists(), ""), 120)
        subprocess.run(["scancel", cjob], check=True, timeout=30)

        def ended() -> tuple[bool, str]:
            done, seen = jobs_ended(ids)
            return done, seen + "\n" + logs_tail(sweep_dir)

        wait_until("both jobs to end", ended, 240, 2)

        def named() -> tuple[bool, str]:
            st = status(sweep_dir).stdout
            return (" cancelled (cancelled by root" in status_row(st, cancelled)) and (
                " time-limit (" in status_row(st, limited)
            ), st

        st = wait_until("status to name both endings", named, 60, 2)
        assert "max_requeues=0" in status_row(st, limited), st
        c = run_cli("pipeline.collect", str(sweep_dir), env={"COLUMNS": "300"})
        assert c.returncode == 0, c.stdout + c.stderr
        text = c.stdout + (sweep_dir / "results.md").read_text()
        assert "cancelled" in text and "time limit" in text, text
    finally:
        cancel_all(ids)


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_an_array_queued_but_not_recorded_is_found_by_its_token(tmp_path, synthetic_root):
    """The instant between sbatch's answer and the manifest write, made deterministic: the manifest
    holds a token for a run and a real job carries that token as its comment (queued by sbatch here,
    as the killed submitter's sbatch would have); the next submission records it and does not queue
    the run again."""
    from pipeline.jobs.manifest import comment_of, record_submitting

    spec = write_sweep(tmp_path / "sweep.yaml", "token", synthetic_root, extra=IDLE)
    out = tmp_path / "runs"
    sweep_dir = out / "token"
    assert run_cli("pipeline.sweep", str(spec), "--out", str(out), "--no-submit").returncode == 0
    (rid,) = [p.name for p in sweep_dir.glob("*/config.yaml") for p in [p.parent]]
    record_submitting(sweep_dir, "slurm", "feedc0ffee", [rid])
    job = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-J",
            "pipeline-token",
            f"--comment={comment_of('feedc0ffee')}",
            "--wrap",
            "sleep 120",
        ],
        cwd=tmp_path,  # its slurm-<id>.out goes there, not into the repository
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    try:
        r = sweep(str(spec), "--cluster", "slurm", "--out", str(out))
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"recorded jobs {job} queued by an interrupted submission" in r.stdout, r.stdout
        assert "0 of 1 runs submitted" in r.stdout and "skip-active" in r.stdout, r.stdout
        m = manifest(sweep_dir)
        assert m["runs"][rid]["job_id"] == job and not m["submitting"], m
    finally:
        cancel_all(sorted(queued_of("token") | {job}))


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_wait_also_waits_for_a_run_an_earlier_submission_queued(tmp_path, synthetic_root):
    """``--wait`` on a resubmission whose run is still queued or running from the first submission
    (skip-active) returns once that job has ended, with the run done."""
    spec = write_sweep(tmp_path / "sweep.yaml", "waitslurm", synthetic_root)
    out = tmp_path / "runs"
    sweep_dir = out / "waitslurm"
    try:
        first = sweep(str(spec), "--cluster", "slurm", "--out", str(out))
        assert first.returncode == 0, first.stdout + first.stderr
        again = sweep(str(spec), "--cluster", "slurm", "--out", str(out), "--wait", timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "skip-active" in again.stdout and "waiting for the runs to finish" in again.stdout, again.stdout
        (run,) = list_runs(sweep_dir)
        assert run.status() == "done", again.stdout  # returned when the job had ended, not at once
        assert f"{run.id}: done" in again.stdout, again.stdout
    finally:
        if (sweep_dir / "manifest.json").exists():
            cancel_all([e["job_id"] for e in manifest(sweep_dir)["runs"].values()])

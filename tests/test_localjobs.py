"""Local jobs and run folders under faults, with real processes (no mocks): a local job is recognised by
more than its PID (zombies, reused PIDs), killing the job id a user sees stops the whole job, one run
folder never has two jobs training in it, and a run folder deleted under a running job stays deleted.

Each training job is tiny (ResNet-20 on ~150 synthetic images, one thread)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.jobs import alive as launch
from pipeline.submit import plan as sweep
from pipeline.jobs import owner
from pipeline.jobs.procs import ProcessIdentity
from pipeline.rundir import RunDir, list_runs
from tests.conftest import REPO, as_overrides, run_cli, tiny_settings

# no train.epochs: each test says how long its run trains
TINY = as_overrides(tiny_settings(changes={"data.val_size": 50, "data.train_size": 150, "train.epochs": None}))
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)  train loss")


def wait_for(what: str, check, timeout: float = 120.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        seen = check()
        if seen:
            return seen
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def write_spec(tmp_path: Path, name: str, data_root: Path) -> Path:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(f"name: {name}\nbase: [{REPO / 'configs/base.yaml'}]\nset: {{data.root: {data_root}}}\n")
    return spec


def submit_local(*args: str, cwd: Path) -> str:
    """``python -m pipeline.sweep ARGS`` for a local sweep that does not wait; returns its output. Not
    through pipes: the local jobs it starts inherit its stdout, so reading a pipe to its end would
    wait for the jobs too."""
    log = cwd / f"sweep-{time.monotonic_ns()}.out"
    with open(log, "w") as f:
        r = subprocess.run(
            [sys.executable, "-m", "pipeline.sweep", *args],
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    text = log.read_text()
    assert r.returncode == 0, text
    return text


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
                out.append(int(entry))
    return out


def training_log(run: RunDir) -> Path:
    """The log holding the training's lines: train.log links to a shared training's (pipeline.share)."""
    shared = run.path / "train.log"
    return shared if shared.exists() else run.log


def epoch_lines(run: RunDir) -> list[int]:
    return [int(m.group(1)) for m in EPOCH_LINE.finditer(training_log(run).read_text())]


# --------------------------------------------------------------------------------------------------
# identity: zombies, reused PIDs, cancel
# --------------------------------------------------------------------------------------------------


def test_zombie_counts_as_dead():
    child = subprocess.Popen(["true"])  # never waited for until the end: a zombie once it exits
    try:
        wait_for("the child to become a zombie", lambda: Path(f"/proc/{child.pid}/stat").read_text().split()[2] == "Z")
        os.kill(child.pid, 0)  # what the PID-only check looked at: a zombie still answers it
        ident = ProcessIdentity.of(child.pid)
        assert ident is not None and not ident.is_alive()
        assert not launch.job_is_active("local", str(child.pid))  # an old manifest entry: PID only
        assert not launch.job_is_active("local", str(child.pid), {**ident.record()})
    finally:
        child.wait()


def test_a_reused_pid_is_not_the_job_and_cancel_leaves_that_process_alone(tmp_path, synthetic_root):
    spec = write_spec(tmp_path, "reused", synthetic_root)
    out = tmp_path / "runs"
    r = run_cli("pipeline.sweep", str(spec), "--no-submit", "--out", str(out), *TINY, cwd=tmp_path, check=True)
    sweep_dir = out / "reused"
    (run,) = list_runs(sweep_dir)
    # a process that took over the job's old PID (SIGINT at its default: a background test runner may
    # have it ignored, and this stands for a job controller, which stops on it)
    unrelated = subprocess.Popen(["sleep", "120"], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        real = ProcessIdentity.of(unrelated.pid)
        assert real is not None and real.started is not None
        entry = {"cluster": "local", "job_id": str(unrelated.pid), **real.record()}
        entry["started"] = real.started - 1  # the job's own start time: another process
        del entry["pid"]
        manifest = {"runs": {run.id: entry}, "history": []}
        (sweep_dir / "manifest.json").write_text(json.dumps(manifest))
        assert sweep.active_run_ids(sweep_dir) == set()
        st = run_cli("pipeline.status", str(sweep_dir), env={"COLUMNS": "300"}, cwd=tmp_path, check=True)
        row = next(line for line in st.stdout.splitlines() if run.id in line)
        assert "running" not in row and "RUNNING" not in row, st.stdout
        c = run_cli("pipeline.status", str(sweep_dir), "--cancel", cwd=tmp_path, check=True)
        time.sleep(0.5)
        assert unrelated.poll() is None, c.stdout  # not signalled
        assert "cancelled 0 job(s)" in c.stdout, c.stdout

        # the same entry with the right start time is that process: active, and --cancel signals it
        entry["started"] = real.started
        (sweep_dir / "manifest.json").write_text(json.dumps({"runs": {run.id: entry}, "history": []}))
        assert sweep.active_run_ids(sweep_dir) == {run.id}
        run_cli("pipeline.status", str(sweep_dir), "--cancel", cwd=tmp_path, check=True)
        assert unrelated.wait(timeout=10) == -signal.SIGINT
    finally:
        if unrelated.poll() is None:
            unrelated.kill()
            unrelated.wait()
    assert r.returncode == 0


# --------------------------------------------------------------------------------------------------
# the run folder's owner record
# --------------------------------------------------------------------------------------------------


def _run_folder(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "runs" / "s" / "abc")
    run.path.mkdir(parents=True)
    run.config.write_text("{}\n")
    return run


def test_a_live_owner_refuses_a_second_job_and_a_dead_one_is_taken_over(tmp_path):
    run = _run_folder(tmp_path)
    other = subprocess.Popen(["sleep", "120"])  # a live job on this machine
    try:
        ident = ProcessIdentity.of(other.pid)
        assert ident is not None
        record = {**ident.record(), "job": "4242", "since": time.time()}
        (run.path / owner.OWNER_FILE).write_text(json.dumps(record))
        with pytest.raises(owner.RunBusy, match=f"in use by another job \\(job 4242, pid {other.pid} on "):
            owner.acquire(run, watch=False)
        assert json.loads((run.path / owner.OWNER_FILE).read_text()) == record  # left as it was
    finally:
        other.kill()
        other.wait()
    # now dead (and its PID may be reused by anyone: the start time tells them apart)
    own = owner.acquire(run, watch=False)
    try:
        now = json.loads((run.path / owner.OWNER_FILE).read_text())
        assert now["pid"] == os.getpid() and now["started"] == ProcessIdentity.of(os.getpid()).started
        assert owner.live_owner(run) == now
    finally:
        own.release()
    assert not (run.path / owner.OWNER_FILE).exists()
    assert sorted(p.name for p in run.path.iterdir()) == ["config.yaml"]  # no temporaries left


def test_a_job_that_recorded_its_end_does_not_hold_its_run_and_a_resubmission_waits_for_it_to_exit(tmp_path):
    """The window between a job writing "failed" and giving its folder back: not skip-active, and the
    sweep waits for the folder to be given back before submitting into it (else the new job finds it
    busy)."""
    run = _run_folder(tmp_path)
    other = subprocess.Popen(["sleep", "120"])  # the exiting job, on this machine
    try:
        ident = ProcessIdentity.of(other.pid)
        assert ident is not None
        (run.path / owner.OWNER_FILE).write_text(json.dumps({**ident.record(), "job": "", "since": time.time()}))
        assert sweep.active_run_ids(run.path.parent) == {run.id}  # running, nothing recorded: held
        run.write_metrics("train", {"status": "failed", "error": "boom"})
        assert sweep.active_run_ids(run.path.parent) == set()
        assert sweep.wait_for_exiting_jobs(run.path.parent, [run.id], timeout_s=0.3) == [run.id]
        threading.Timer(0.5, other.kill).start()
        started = time.monotonic()
        assert sweep.wait_for_exiting_jobs(run.path.parent, [run.id], timeout_s=30) == []
        assert 0.4 < time.monotonic() - started < 29
    finally:
        other.kill()
        other.wait()


def test_an_unreadable_owner_record_is_taken_over(tmp_path):
    run = _run_folder(tmp_path)
    record = run.path / owner.OWNER_FILE
    record.write_bytes(b"\x00\xff not json")
    assert owner.live_owner(run) is None  # unreadable: an owner with no PID, which is dead
    own = owner.acquire(run, watch=False)
    try:
        mine = json.loads(record.read_text())  # this process's record replaced the unreadable one
        assert mine["pid"] == os.getpid() and mine == own.record
        assert owner.live_owner(run) == own.record
        assert sorted(p.name for p in run.path.glob(f".{owner.OWNER_FILE}.*")) == []  # no leftovers
    finally:
        own.release()
    assert not record.exists()


def test_a_second_job_on_a_busy_run_folder_refuses_and_writes_nothing(tmp_path, synthetic_root):
    out = tmp_path / "runs"
    args = ["pipeline.run", str(REPO / "configs/base.yaml"), f"data.root={synthetic_root}", *TINY]
    first = subprocess.Popen(
        [sys.executable, "-m", *args, "train.epochs=40", "--out", str(out)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        run = wait_for("the first job to start training", lambda: _training_run(out))
        second = run_cli("pipeline.run", str(run.path), cwd=tmp_path, timeout=300)
        assert second.returncode != 0
        assert f"run folder {run.path} is in use by another job" in second.stderr, second.stdout + second.stderr
        assert f"pid {first.pid} on " in second.stderr
        assert run.read_metrics("train") is None  # no failed record for the first job's run
        assert first.poll() is None  # the first job goes on
    finally:
        first.kill()
        first.wait()


def _training_run(out: Path) -> RunDir | None:
    for run in list_runs(out):
        if run.log.exists() and epoch_lines(run) and (run.path / owner.OWNER_FILE).exists():
            return run
    return None


# --------------------------------------------------------------------------------------------------
# local jobs for real: kill the job id, rerun after a crash
# --------------------------------------------------------------------------------------------------


def test_killing_the_shown_job_id_stops_the_whole_job_and_a_rerun_trains_once(tmp_path, synthetic_root):
    spec = write_spec(tmp_path, "killed", synthetic_root)
    out = tmp_path / "runs"
    sweep_args = [str(spec), "--cluster", "local", "--out", str(out), *TINY, "train.epochs=12"]
    submitted = submit_local(*sweep_args, cwd=tmp_path)
    sweep_dir = out / "killed"
    (run,) = list_runs(sweep_dir)
    entry = json.loads((sweep_dir / "manifest.json").read_text())["runs"][run.id]
    job = int(entry["job_id"])
    assert entry["job_id"] in submitted and entry["started"] == ProcessIdentity.of(job).started
    wait_for("the first epoch", lambda: training_log(run).exists() and epoch_lines(run))
    (task,) = [ProcessIdentity.of(pid) for pid in children(job)]  # submitit's controller -> the training
    os.kill(job, signal.SIGKILL)  # what the controller cannot forward
    wait_for("the training to stop with its controller", lambda: not task.is_alive(), timeout=60)
    assert "stopping at the next step" in training_log(run).read_text()  # stopped cleanly, with a checkpoint
    done_before = epoch_lines(run)
    assert done_before and max(done_before) < 12

    again = run_cli("pipeline.sweep", *sweep_args, "--wait", cwd=tmp_path, check=True)
    assert "skip-active" not in again.stdout and "resume" in again.stdout, again.stdout
    assert run.read_metrics("train")["status"] == "done"
    assert epoch_lines(run) == list(range(1, 13))  # each epoch trained and logged once, in order
    # (a shared training's event files are in its store, linked from tb/train)
    folders = [run.tensorboard, *(d.resolve() for d in run.tensorboard.iterdir() if d.is_symlink())]
    events = sorted(e for d in folders for e in d.rglob("*tfevents*"))
    assert len(events) == 2, events  # one writer per attempt, never two at once


def test_a_rerun_right_after_a_crash_is_not_skip_active(tmp_path, synthetic_root):
    missing = tmp_path / "not-yet"
    spec = write_spec(tmp_path, "crash", missing)
    out = tmp_path / "runs"
    sweep_args = [str(spec), "--cluster", "local", "--out", str(out), *TINY, "train.epochs=1"]
    submit_local(*sweep_args, cwd=tmp_path)
    (run,) = list_runs(out / "crash")
    wait_for("the run to fail", lambda: (run.read_metrics("train") or {}).get("status") == "failed", every=0.02)
    assert sweep.active_run_ids(out / "crash") == set()  # at once, while the job may still be exiting
    missing.symlink_to(synthetic_root)
    again = run_cli("pipeline.sweep", *sweep_args, "--rerun", "failed", "--wait", cwd=tmp_path, check=True)
    assert "skip-active" not in again.stdout and "rerun" in again.stdout, again.stdout
    assert run.read_metrics("train")["status"] == "done"


# --------------------------------------------------------------------------------------------------
# a run folder deleted under a running job
# --------------------------------------------------------------------------------------------------


def test_a_run_folder_deleted_under_a_running_job_stays_deleted(tmp_path, synthetic_root):
    out = tmp_path / "runs"
    args = ["pipeline.run", str(REPO / "configs/base.yaml"), f"data.root={synthetic_root}", *TINY]
    job = subprocess.Popen(
        [sys.executable, "-m", *args, "train.epochs=40", "--out", str(out)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_WATCH_S": "0.5"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run = wait_for("the job to start training", lambda: _training_run(out))
        for _ in range(3):  # `rm -rf`, as a user does it (the job may be removing or writing files meanwhile)
            subprocess.run(["rm", "-rf", str(run.path)], capture_output=True)
            if not run.path.exists():
                break
        stdout, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode != 0
    message = f"run folder {run.path} was deleted or replaced while this job was running"
    assert message in stderr, stdout + stderr
    assert message in stdout  # the job's log (the scheduler's output file)
    assert not run.path.exists() and list(out.iterdir()) == []


def test_a_local_sweep_returns_at_once_and_its_jobs_leave_the_terminal(tmp_path, synthetic_root):
    """The sweep's stdout is a pipe read to its end (``sweep ... | tee``): it must reach EOF when the sweep
    exits, not when its jobs end, and the jobs must not share the sweep's session (Ctrl-C, logout)."""
    spec = write_spec(tmp_path, "detached", synthetic_root)
    out = tmp_path / "runs"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.sweep", str(spec), "--cluster", "local", "--out", str(out)]
        + [*TINY, "train.epochs=200"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=240,  # before the fix: blocked here until the 200 epochs were over
        # started as `nohup ... &` or a script's background job starts it: SIGINT ignored, which its job
        # controller must not inherit (status --cancel below sends it SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    took = time.monotonic() - t0
    sweep_dir = out / "detached"
    (run,) = list_runs(sweep_dir)
    job = int(json.loads((sweep_dir / "manifest.json").read_text())["runs"][run.id]["job_id"])
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        ident = ProcessIdentity.of(job)
        assert ident is not None and ident.is_alive(), f"the job ended before the sweep returned ({took:.0f} s)"
        assert os.getsid(job) == job != os.getsid(0)  # a session of its own, no controlling terminal
        wait_for("the first epoch", lambda: training_log(run).exists() and epoch_lines(run))
        assert run.read_metrics("train") is None  # still training after the sweep returned
    finally:
        run_cli("pipeline.status", str(sweep_dir), "--cancel", cwd=tmp_path, check=True)
    wait_for("the job to stop", lambda: (i := ProcessIdentity.of(job)) is None or not i.is_alive(), timeout=60)


# --------------------------------------------------------------------------------------------------
# records with a PID only (an earlier version's, or written by hand)
# --------------------------------------------------------------------------------------------------


def stranger() -> subprocess.Popen:
    """A process that is nobody's job, with SIGINT at its default (a background test runner may have it
    ignored): signalled, it would die."""
    return subprocess.Popen(["sleep", "120"], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_a_pid_only_job_record_is_not_signalled_nor_skipped(tmp_path, synthetic_root):
    """A manifest entry with a PID only, and that PID a live stranger now: status --cancel leaves it alone,
    status does not show the run running and a resubmission submits the run (not skip-active)."""
    spec = write_spec(tmp_path, "pidonly", synthetic_root)
    out = tmp_path / "runs"
    sweep_args = [str(spec), "--out", str(out), *TINY, "train.epochs=1"]
    run_cli("pipeline.sweep", *sweep_args, "--no-submit", cwd=tmp_path, check=True)
    sweep_dir = out / "pidonly"
    (run,) = list_runs(sweep_dir)
    other = stranger()
    try:
        entry = {"cluster": "local", "job_id": str(other.pid)}
        (sweep_dir / "manifest.json").write_text(json.dumps({"runs": {run.id: entry}, "history": []}))
        st = run_cli("pipeline.status", str(sweep_dir), env={"COLUMNS": "300"}, cwd=tmp_path, check=True)
        row = next(line for line in st.stdout.splitlines() if run.id in line)
        assert "running" not in row and "RUNNING" not in row, st.stdout
        c = run_cli("pipeline.status", str(sweep_dir), "--cancel", cwd=tmp_path, check=True)
        time.sleep(0.5)
        assert other.poll() is None, c.stdout  # not signalled
        assert "cancelled 0 job(s)" in c.stdout, c.stdout
        assert sweep.active_run_ids(sweep_dir) == set()
        again = run_cli("pipeline.sweep", *sweep_args, "--cluster", "local", "--wait", cwd=tmp_path, check=True)
        assert "skip-active" not in again.stdout and "resume" in again.stdout, again.stdout
        assert run.read_metrics("train")["status"] == "done"
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_pid_only_record_of_this_sweeps_job_controller_still_counts(tmp_path):
    """An entry an earlier version wrote for a job that still runs: its process's command line is a
    submitit controller of this very sweep, so the run is active (and would be cancelled); the same PID
    record under another sweep is not."""
    sweep_dir = tmp_path / "runs" / "old"
    folder = sweep_dir / "logs" / "%j"
    code = "import time; time.sleep(120)"
    controller = subprocess.Popen([sys.executable, "-c", code, "-m", "submitit.local._local", str(folder.absolute())])
    try:
        entry = {"cluster": "local", "job_id": str(controller.pid)}
        wait_for(
            "the command line", lambda: "submitit.local._local" in Path(f"/proc/{controller.pid}/cmdline").read_text()
        )
        assert launch.job_is_active("local", str(controller.pid), entry, sweep_dir)
        assert not launch.job_is_active("local", str(controller.pid), entry, tmp_path / "runs" / "other")
        assert not launch.job_is_active("local", str(controller.pid), entry)  # no sweep to check it against
    finally:
        controller.kill()
        controller.wait()


def test_pid_only_owner_records_name_no_process(tmp_path):
    """owner.json and a shared stage's trainer.json holding only a PID, now a stranger's: the run folder is
    free and the shared training has no live owner."""
    from pipeline import share

    run = _run_folder(tmp_path)
    other = stranger()
    try:
        (run.path / owner.OWNER_FILE).write_text(json.dumps({"pid": other.pid, "job": "", "since": time.time()}))
        assert owner.live_owner(run) is None
        store = tmp_path / "runs" / ".shared" / "train" / "k"
        store.mkdir(parents=True)
        record = {"run": str(run.path), "run_id": run.id, "cluster": "local", "job_id": str(other.pid), "entry": {}}
        (store / "trainer.json").write_text(json.dumps({**record, "since": time.time()}))
        assert not share.owner_active(share.read_owner(store))
        # what a job writes about itself now carries its identity
        share.write_owner(store, run, "local", str(os.getpid()))
        assert share.read_owner(store)["entry"]["started"] == ProcessIdentity.of(os.getpid()).started
        assert share.owner_active(share.read_owner(store))
    finally:
        other.kill()
        other.wait()
    assert other.returncode == -signal.SIGKILL  # killed here, by nothing else


# --------------------------------------------------------------------------------------------------
# --wait and runs an earlier submission runs
# --------------------------------------------------------------------------------------------------


def test_wait_waits_for_runs_an_earlier_submission_still_runs(tmp_path, synthetic_root):
    spec = write_spec(tmp_path, "waitall", synthetic_root)
    out = tmp_path / "runs"
    sweep_args = [str(spec), "--cluster", "local", "--out", str(out), *TINY, "train.epochs=4"]
    submit_local(*sweep_args, cwd=tmp_path)
    (run,) = list_runs(out / "waitall")
    assert sweep.active_run_ids(out / "waitall") == {run.id}  # its job is starting (a few seconds: imports)
    again = submit_local(*sweep_args, "--wait", cwd=tmp_path)
    assert "skip-active" in again and "waiting for the runs to finish" in again, again
    # returned once the run had finished, not at once
    assert run.status() == "done" and sweep.active_run_ids(out / "waitall") == set(), again
    assert f"{run.id}: done" in again, again


def test_a_folder_being_removed_is_named_as_deleted_whichever_file_went_first(tmp_path):
    """`rm -rf` removes a run folder's files before the folder: a check in between finds the folder but not
    its config.yaml, and must name the run folder as deleted, as when the folder is already gone (CI once
    showed the other wording)."""
    run = RunDir(tmp_path / "abc")
    run.path.mkdir()
    run.config.write_text("x: 1\n")
    held = owner.acquire(run, watch=False)
    try:
        run.config.unlink()  # the folder itself is still there
        with pytest.raises(owner.RunFolderVanished) as e:
            held.check()
        assert f"run folder {run.path} was deleted or replaced while this job was running" in str(e.value)
    finally:
        held.release()

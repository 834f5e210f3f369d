"""The Slurm path for real, against the local cluster of tests/slurm/ (no mocks): sweep -> submitit job
array -> training jobs -> run folders -> status / collect; throttled arrays, pending jobs, cancelling,
failed jobs, resubmission rules, and the plain sbatch scripts.

Every job is tiny (ResNet-20, one epoch on ~150 synthetic images, one thread): most of a job's time is
Python and torch starting up. Waits are bounded polls, never fixed sleeps.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import REPO, run_cli, tiny_settings

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

DEADLINE_S = 180  # longest wait for jobs to end
ENV = {"PIPELINE_PYTHON": sys.executable, "COLUMNS": "400"}  # plain sbatch scripts' python; wide tables
TINY = tiny_settings(changes={"data.val_size": 50, "data.train_size": 150, "output.tensorboard": False})
ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "CONFIGURING", "COMPLETING")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def wait_until(
    what: str, check: Callable[[], tuple[bool, str]], timeout: float = DEADLINE_S, every: float = 1.0
) -> str:
    """Poll ``check`` (-> (done, what it saw)) until done or the deadline; fail with the last view."""
    deadline = time.monotonic() + timeout
    while True:
        done, seen = check()
        if done:
            return seen
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last seen:\n{seen}")
        time.sleep(every)


def _cmd(*args: str) -> str:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    return r.stdout


def sacct(*job_ids: str) -> dict[str, str]:
    """JobID -> State (first word) of the jobs and array tasks of these ids, straight from sacct."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    out = _cmd("sacct", "-n", "-P", "-X", "-j", ",".join(bases), "-o", "JobID,State")
    return {
        jid: (state.split() or [""])[0]
        for jid, _, state in (line.strip().partition("|") for line in out.splitlines() if line.strip())
    }


def squeue(*job_ids: str) -> dict[str, str]:
    """JobID -> State of the queued or running jobs and array tasks of these ids, straight from squeue."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    out = _cmd("squeue", "-h", "-r", "-j", ",".join(bases), "-o", "%i|%T")
    return {jid: state for jid, _, state in (line.strip().partition("|") for line in out.splitlines() if line.strip())}


def jobs_ended(job_ids: list[str]) -> tuple[bool, str]:
    """Every job is out of the queue and sacct records an end state for it."""
    queued, acct = squeue(*job_ids), sacct(*job_ids)
    ended = all(j not in queued and acct.get(j, "") not in ("", *ACTIVE) for j in job_ids)
    return ended, f"squeue: {queued}\nsacct: {acct}"


def write_sweep(
    path: Path, name: str, data_root: Path, *, lrs: list[float] | None = None, extra: dict | None = None
) -> Path:
    """A sweep file using configs/base.yaml and the cluster profile configs/cluster/local.yaml."""
    settings = {**TINY, "data.root": str(data_root), **(extra or {})}
    lines = [f"name: {name}", f"base: [{REPO / 'configs/base.yaml'}]", "cluster: local", "set:"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in settings.items()]
    if lrs:
        lines += ["grid:", f"  optim.lr: {json.dumps(lrs)}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def sweep(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # From the repository root, as a user would (so `cluster: local` finds configs/cluster/local.yaml);
    # every path given is absolute.
    return run_cli("pipeline.sweep", *args, cwd=REPO, env=ENV, timeout=timeout)


def status(sweep_dir: Path, *args: str) -> subprocess.CompletedProcess:
    r = run_cli("pipeline.status", str(sweep_dir), *args, cwd=REPO, env=ENV, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def summary_counts(status_stdout: str) -> dict[str, int]:
    """The counts of status's summary line ('3 runs: 0 pending, 1 running, 2 done, 0 failed')."""
    line = next((ln for ln in status_stdout.splitlines() if re.match(r"^\d+ runs: ", ln)), None)
    assert line is not None, status_stdout
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (pending|running|done|diverged|failed|stopped)", line)}
    counts["runs"] = int(line.split()[0])
    return {k: counts.get(k, 0) for k in ("runs", "pending", "running", "done", "diverged", "failed", "stopped")}


def status_row(status_stdout: str, run_id: str) -> str:
    rows = [ln for ln in status_stdout.splitlines() if run_id in ln]
    assert len(rows) == 1, status_stdout
    return rows[0]


def manifest(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "manifest.json").read_text())


def train_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "metrics/train.json").read_text()).get("status")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def logs_tail(sweep_dir: Path) -> str:
    """The end of every submitit log and run.log of a sweep (for failure messages)."""
    out = []
    for f in sorted([*sweep_dir.glob("logs/*/*_log.out"), *sweep_dir.glob("*/run.log")]):
        out.append(f"----- {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(out)


def cancel_all(job_ids: list[str]) -> None:
    """Leave nothing of a test queued, whatever happened."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    if bases:
        subprocess.run(["scancel", *bases], capture_output=True, timeout=30)


# --------------------------------------------------------------------------------------------------
# one finished three-run sweep, shared by the tests that only read it
# --------------------------------------------------------------------------------------------------


@dataclass
class Finished:
    spec: Path
    out: Path
    sweep_dir: Path
    submit: subprocess.CompletedProcess
    submit_s: float
    done_at_return: int
    manifest: dict
    known_at_submit: dict[str, str]  # job id -> state, from squeue or sacct right after submission
    final_states: dict[str, str]  # job id -> sacct state at the end


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synthetic_root) -> Finished:
    tmp = tmp_path_factory.mktemp("slurm_sweep")
    spec = write_sweep(tmp / "sweep.yaml", "slurm-main", synthetic_root, lrs=[0.1, 0.05, 0.02])
    out = tmp / "runs"
    sweep_dir = out / "slurm-main"
    t0 = time.monotonic()
    r = sweep(str(spec), "--cluster", "slurm", "--out", str(out))
    submit_s = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    done_at_return = sum(train_status(p) == "done" for p in sweep_dir.iterdir() if p.is_dir())
    m = manifest(sweep_dir)
    ids = [e["job_id"] for e in m["runs"].values()]
    try:
        # squeue knows a job from submission until shortly after it ends; sacct from (a few seconds
        # after) submission on: together they must know every task at once.
        def known() -> tuple[bool, str]:
            both = {**sacct(*ids), **squeue(*ids)}
            return all(j in both for j in ids), json.dumps(both)

        known_at_submit = json.loads(wait_until("squeue/sacct to know the submitted tasks", known, 30, 0.5))

        def all_done() -> tuple[bool, str]:
            ended, seen = jobs_ended(ids)
            runs_done = all(train_status(sweep_dir / rid) == "done" for rid in m["runs"])
            return ended and runs_done, seen + "\n" + logs_tail(sweep_dir)

        wait_until("the three array tasks to finish", all_done)
    finally:
        cancel_all(ids)
    return Finished(spec, out, sweep_dir, r, submit_s, done_at_return, m, known_at_submit, sacct(*ids))


def test_sweep_submits_one_job_array_and_exits_without_waiting(finished):
    r, m = finished.submit, finished.manifest
    assert "3 of 3 runs submitted to slurm" in r.stdout, r.stdout
    # it returned as soon as the array was queued: well before any run could have trained
    assert finished.submit_s < 30, finished.submit_s
    assert finished.done_at_return == 0
    run_ids = sorted(p.name for p in finished.sweep_dir.iterdir() if (p / "config.yaml").exists())
    assert sorted(m["runs"]) == run_ids and len(run_ids) == 3
    parts = {}
    for rid, entry in m["runs"].items():
        assert entry["cluster"] == "slurm", entry
        match = re.fullmatch(r"(\d+)_(\d+)", entry["job_id"])
        assert match, f"{rid}: job id {entry['job_id']!r} is not <array>_<task>"
        parts[rid] = match.groups()
        assert entry["job_id"] in r.stdout  # printed in the submission table
    assert len({array for array, _ in parts.values()}) == 1, parts  # one array for the three runs
    assert sorted(int(task) for _, task in parts.values()) == [0, 1, 2]
    assert len(m["history"]) == 1
    # the scheduler knew every task right after submission, and each ended COMPLETED
    assert set(finished.known_at_submit) >= {e["job_id"] for e in m["runs"].values()}
    assert all(finished.final_states[e["job_id"]] == "COMPLETED" for e in m["runs"].values()), finished.final_states


def test_finished_sweep_has_results_table_and_submitit_logs(finished):
    sweep_dir = finished.sweep_dir
    for rid, entry in finished.manifest["runs"].items():
        metrics = json.loads((sweep_dir / rid / "metrics/train.json").read_text())
        assert metrics["status"] == "done" and metrics["epochs"] == 1 and metrics["test_acc"] is not None
        # submitit's log of this array task, named by job and task id, under <sweep>/logs/
        jid = entry["job_id"]
        log = sweep_dir / "logs" / jid / f"{jid}_0_log.out"
        assert log.is_file(), sorted(str(p.relative_to(sweep_dir)) for p in (sweep_dir / "logs").rglob("*"))
        text = log.read_text()
        assert f"job_id={jid}" in text and f"run {rid}: stage train" in text and "epoch 1/1" in text, text

    c = run_cli("pipeline.collect", str(sweep_dir), cwd=REPO, env=ENV)
    assert c.returncode == 0, c.stdout + c.stderr
    rows = [ln for ln in c.stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| run ")]
    assert len(rows) == 3 and all(ln.endswith("| done |") for ln in rows), c.stdout
    assert {ln.split("|")[1].strip() for ln in rows} == set(finished.manifest["runs"])
    assert (sweep_dir / "results.md").exists() and (sweep_dir / "results.csv").exists()


def test_status_of_a_finished_sweep(finished):
    s = status(finished.sweep_dir)
    assert summary_counts(s.stdout) == {
        "runs": 3,
        "pending": 0,
        "running": 0,
        "done": 3,
        "diverged": 0,
        "failed": 0,
        "stopped": 0,
    }, s.stdout
    for rid, entry in finished.manifest["runs"].items():
        row = status_row(s.stdout, rid)
        assert " done" in row and entry["job_id"] in row, row


def test_resubmitting_a_finished_sweep_submits_nothing_and_auto_picks_slurm(finished):
    dry = sweep(str(finished.spec), "--cluster", "auto", "--out", str(finished.out), "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "#SBATCH --array=0-2%" in dry.stdout and "#SBATCH --partition=debug" in dry.stdout, dry.stdout

    again = sweep(str(finished.spec), "--cluster", "auto", "--out", str(finished.out))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 of 3 runs submitted to slurm" in again.stdout, again.stdout
    assert again.stdout.count("skip-done") == 3, again.stdout
    assert manifest(finished.sweep_dir) == finished.manifest  # nothing new recorded


@pytest.mark.parametrize("module", ["pipeline.status", "pipeline.collect"])
def test_login_node_commands_do_not_import_torch(finished, module):
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{module!r}, {str(finished.sweep_dir)!r}]\n"
        "rc = 0\n"
        "try:\n"
        f"    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    rc = e.code or 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'torchao', 'torch_pruning'))\n"
        "print('RC', rc)\n"
        "print('HEAVY', ','.join(heavy))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), **ENV}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "RC 0" in r.stdout, r.stdout + r.stderr
    assert "3 done" in r.stdout or "| done |" in r.stdout  # it really ran on the Slurm sweep
    heavy = r.stdout.split("HEAVY", 1)[1].strip()
    assert heavy == "", f"{module} imported {heavy[:300]}"


# --------------------------------------------------------------------------------------------------
# throttled arrays, queued jobs, skip-active, cancelling
# --------------------------------------------------------------------------------------------------


def test_throttled_array_pending_status_skip_active_and_cancel(tmp_path, synthetic_root):
    spec = write_sweep(
        tmp_path / "sweep.yaml", "slurm-throttle", synthetic_root, lrs=[0.1, 0.05, 0.02], extra={"train.epochs": 2}
    )
    out = tmp_path / "runs"
    sweep_dir = out / "slurm-throttle"
    args = [str(spec), "--cluster", "slurm", "--out", str(out), "slurm.array_parallelism=1"]

    dry = sweep(*args, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "#SBATCH --array=0-2%1" in dry.stdout, dry.stdout
    assert not out.exists()  # a dry run writes nothing

    r = sweep(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    m = manifest(sweep_dir)
    ids = sorted(e["job_id"] for e in m["runs"].values())
    array_id = ids[0].split("_")[0]
    try:
        # Keep the tasks that have not started queued (a user hold), however fast the machine is.
        subprocess.run(["scontrol", "hold", array_id], capture_output=True, text=True, timeout=30)
        show = _cmd("scontrol", "show", "job", array_id)
        assert "ArrayTaskThrottle=1" in show, show

        s = status(sweep_dir)
        counts = summary_counts(s.stdout)
        assert counts["runs"] == 3 and counts["pending"] >= 2, s.stdout
        assert counts["pending"] + counts["running"] + counts["done"] == 3, s.stdout
        queued = squeue(*ids)  # asked after status: a task pending now was pending then (held)
        assert sum(state == "PENDING" for state in queued.values()) >= 2, queued
        for rid, entry in m["runs"].items():
            row = status_row(s.stdout, rid)
            jid = entry["job_id"]
            if queued.get(jid) == "PENDING":
                # pending, with the submitit log the task will write (the name test 1 saw on disk)
                assert " pending" in row and jid in row, row
                assert str(sweep_dir / "logs" / jid / f"{jid}_0_log.out") in row, row
            elif queued.get(jid) == "RUNNING":
                assert " running" in row or " pending" in row, row

        # the same sweep again: nothing queued or running is submitted twice
        again = sweep(*args)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "0 of 3 runs submitted" in again.stdout, again.stdout
        assert again.stdout.count("skip-active") >= 2, again.stdout
        assert manifest(sweep_dir) == m

        c = status(sweep_dir, "--cancel")
        assert re.search(r"cancelled [1-9]\d* job\(s\)", c.stdout), c.stdout

        def nothing_live() -> tuple[bool, str]:
            st = run_cli("pipeline.status", str(sweep_dir), cwd=REPO, env=ENV, timeout=120).stdout
            counts = summary_counts(st)
            return counts["pending"] == 0 and counts["running"] == 0 and not squeue(*ids), st

        after = wait_until("the cancelled jobs to leave the queue and status", nothing_live, 90)
        assert summary_counts(after)["runs"] == 3

        # once sacct has recorded the cancellation, every unfinished run carries the scheduler's word,
        # the tasks that never started included (sacct lists those only as one "<array>_[1-2%1]" record)
        def cancelled_shown() -> tuple[bool, str]:
            st = run_cli("pipeline.status", str(sweep_dir), cwd=REPO, env=ENV, timeout=120).stdout
            rows = [status_row(st, rid) for rid in m["runs"]]
            return all(" done" in row or " cancelled (cancelled by root" in row for row in rows), st

        wait_until("status to show the cancelled tasks", cancelled_shown, 60)
    finally:
        cancel_all(ids)


# --------------------------------------------------------------------------------------------------
# a failing job
# --------------------------------------------------------------------------------------------------


def test_failed_job_shows_as_failed_and_is_not_resubmitted(tmp_path):
    missing = tmp_path / "no-data-here"
    spec = write_sweep(tmp_path / "sweep.yaml", "slurm-broken", missing)
    out = tmp_path / "runs"
    sweep_dir = out / "slurm-broken"
    r = sweep(str(spec), "--cluster", "slurm", "--out", str(out))
    assert r.returncode == 0 and "1 of 1 runs submitted to slurm" in r.stdout, r.stdout + r.stderr
    ((rid, entry),) = manifest(sweep_dir)["runs"].items()
    jid = entry["job_id"]
    run_log = sweep_dir / rid / "run.log"
    try:

        def failed() -> tuple[bool, str]:
            ended, seen = jobs_ended([jid])
            return ended and train_status(sweep_dir / rid) == "failed", seen + "\n" + logs_tail(sweep_dir)

        wait_until("the job to fail", failed)
    finally:
        cancel_all([jid])
    assert sacct(jid)[jid] == "FAILED"  # the scheduler agrees: the job exited with an error
    metrics = json.loads((sweep_dir / rid / "metrics/train.json").read_text())
    assert "FileNotFoundError" in metrics["error"] and metrics["log"] == str(run_log)

    s = status(sweep_dir)
    assert summary_counts(s.stdout)["failed"] == 1, s.stdout
    row = status_row(s.stdout, rid)
    assert " failed" in row and str(run_log) in row, row

    c = run_cli("pipeline.collect", str(sweep_dir), cwd=REPO, env=ENV)
    assert c.returncode == 0, c.stdout + c.stderr
    assert f"failed (log {run_log})" in c.stdout, c.stdout

    again = sweep(str(spec), "--cluster", "slurm", "--out", str(out))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "skip-failed" in again.stdout and "0 of 1 runs submitted" in again.stdout, again.stdout
    assert manifest(sweep_dir)["runs"][rid]["job_id"] == jid


# --------------------------------------------------------------------------------------------------
# the plain sbatch scripts
# --------------------------------------------------------------------------------------------------


def sbatch(*args: str, cwd: Path, env: dict[str, str]) -> str:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **ENV, **env}
    r = subprocess.run(
        ["sbatch", "--parsable", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip().split(";")[0]


def test_min_project_script_trains_one_run(tmp_path, synthetic_root):
    out = tmp_path / "out"
    overrides = [f"{k}={v}" for k, v in {**TINY, "data.root": synthetic_root}.items()]
    jid = sbatch(
        str(REPO / "sbatch/min_project.sh"),
        str(REPO / "configs/base.yaml"),
        *overrides,
        cwd=tmp_path,
        env={"PIPELINE_OUT": str(out)},
    )
    try:
        wait_until(f"min_project job {jid} to end", lambda: jobs_ended([jid]))
    finally:
        cancel_all([jid])
    job_out = tmp_path / f"min_project_{jid}.out"  # written in the submit directory
    text = job_out.read_text() if job_out.exists() else f"(missing; {sorted(os.listdir(tmp_path))})"
    assert sacct(jid)[jid] == "COMPLETED", text
    (run_dir,) = [p for p in out.iterdir() if (p / "config.yaml").exists()]
    assert train_status(run_dir) == "done", text
    for line in (
        f"job {jid} on ",
        f"run {run_dir.name}: stage train",
        "epoch 1/1",
        "test acc",
        f"run {run_dir.name}: done",
    ):
        assert line in text, text
    # the script's own request stood: the rtx8000 partition with one (fake) GPU
    acct = _cmd("sacct", "-n", "-P", "-X", "-j", jid, "-o", "Partition,AllocTRES")
    assert acct.startswith("rtx8000|") and "gres/gpu=1" in acct, acct


def test_array_script_runs_every_run_folder(tmp_path, synthetic_root):
    out = tmp_path / "runs"
    sweep_dir = out / "slurm-plain"
    # an earlier version of the sweep file left a run folder behind: the array must not run it
    old = write_sweep(tmp_path / "old.yaml", "slurm-plain", synthetic_root, lrs=[0.3])
    assert sweep(str(old), "--no-submit", "--out", str(out)).returncode == 0
    (stale,) = [p for p in sweep_dir.iterdir() if (p / "config.yaml").exists()]
    spec = write_sweep(tmp_path / "sweep.yaml", "slurm-plain", synthetic_root, lrs=[0.1, 0.05, 0.02])
    w = sweep(str(spec), "--no-submit", "--out", str(out))
    assert w.returncode == 0, w.stdout + w.stderr
    assert f"sbatch --array=0-2 sbatch/array.sh {sweep_dir}" in w.stdout, w.stdout
    assert not (sweep_dir / "manifest.json").exists()  # nothing was submitted
    run_ids = [Path(line).name for line in (sweep_dir / "array_runs.txt").read_text().split()]
    assert len(run_ids) == 3 and stale.name not in run_ids

    # as a user submits it: no PIPELINE_PYTHON, nothing activated; the submit folder's .venv is found
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    bare = {"PATH": _bare_path(), "PIPELINE_PYTHON": "", "VIRTUAL_ENV": "", "CONDA_PREFIX": ""}
    array_id = sbatch("--array=0-2", str(REPO / "sbatch/array.sh"), str(sweep_dir), cwd=tmp_path, env=bare)
    ids = [f"{array_id}_{i}" for i in range(3)]
    try:

        def all_done() -> tuple[bool, str]:
            ended, seen = jobs_ended(ids)
            return ended and all(train_status(sweep_dir / rid) == "done" for rid in run_ids), seen + "\n" + "\n".join(
                p.read_text() for p in sorted(tmp_path.glob("pipeline-array_*.out"))
            )

        wait_until("the plain array's tasks to finish", all_done)
    finally:
        cancel_all(ids)
    states = sacct(*ids)
    assert all(states[j] == "COMPLETED" for j in ids), states
    assert train_status(stale) is None  # never run
    # task i ran line i+1 of array_runs.txt
    for i, rid in enumerate(run_ids):
        text = (tmp_path / f"pipeline-array_{array_id}_{i}.out").read_text()
        assert f"task {array_id}_{i} on " in text and f"run {rid}: done" in text, text


def test_job_states_of_array_tasks_that_never_started(tmp_path):
    """squeue lists every task of a queued array; once they leave the queue, sacct keeps tasks that never
    started only inside one record of the whole array ("<id>_[0-2]"): slurm_cli must read both."""
    from pipeline.jobs import slurm as slurm_cli

    array_id = sbatch(
        "--hold", "--array=0-2", "--wrap", "true", "-o", str(tmp_path / "t_%A_%a.out"), cwd=tmp_path, env={}
    )
    ids = [f"{array_id}_{i}" for i in range(3)]
    try:
        states = slurm_cli.job_states(ids)
        assert states == {j: "PENDING" for j in ids}, states
        assert slurm_cli.cancel([array_id])

        def recorded() -> tuple[bool, str]:
            states = slurm_cli.job_states(ids)
            return not squeue(*ids) and states == {
                j: "CANCELLED" for j in ids
            }, f"{states}\nsacct: {_cmd('sacct', '-n', '-P', '-X', '-j', array_id, '-o', 'JobID,State')}"

        wait_until("sacct to record the cancelled array", recorded, 60)
    finally:
        cancel_all(ids)


def _bare_path() -> str:
    """A PATH with Slurm's tools and the system's, without this project's environment."""
    import shutil

    dirs = {str(Path(shutil.which(tool)).parent) for tool in ("sbatch", "scontrol", "hostname")}
    venv_bin = str(Path(sys.executable).parent)
    return ":".join(d for d in [*sorted(dirs), "/usr/bin", "/bin"] if d != venv_bin)


def test_min_project_script_finds_the_environment_without_it_on_path(tmp_path, synthetic_root):
    """As the README shows it: no PIPELINE_PYTHON, nothing activated; the environment is the submit
    folder's .venv (here a link to the one running the tests)."""
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    out = tmp_path / "out"
    overrides = [f"{k}={v}" for k, v in {**TINY, "data.root": synthetic_root, "optim.lr": 0.02}.items()]
    env = {"PATH": _bare_path(), "PIPELINE_PYTHON": "", "PIPELINE_OUT": str(out), "VIRTUAL_ENV": "", "CONDA_PREFIX": ""}
    jid = sbatch(
        str(REPO / "sbatch/min_project.sh"), str(REPO / "configs/base.yaml"), *overrides, cwd=tmp_path, env=env
    )
    try:
        wait_until(f"min_project job {jid} to end", lambda: jobs_ended([jid]))
    finally:
        cancel_all([jid])
    text = (tmp_path / f"min_project_{jid}.out").read_text()
    assert sacct(jid)[jid] == "COMPLETED", text
    assert "ModuleNotFoundError" not in text
    (run_dir,) = [p for p in out.iterdir() if (p / "config.yaml").exists()]
    assert train_status(run_dir) == "done", text


def test_min_project_script_without_an_environment_says_what_to_set(tmp_path):
    """A copy of the script outside any repository, submitted from a folder without .venv, with a PATH
    whose python3 lacks the project: one line saying what to set, exit code 2, no traceback."""
    script = tmp_path / "min_project.sh"
    script.write_text((REPO / "sbatch/min_project.sh").read_text())
    env = {"PATH": _bare_path(), "PIPELINE_PYTHON": "", "PYTHONPATH": "", "VIRTUAL_ENV": "", "CONDA_PREFIX": ""}
    jid = sbatch(str(script), cwd=tmp_path, env=env)
    try:
        wait_until(f"min_project job {jid} to end", lambda: jobs_ended([jid]))
    finally:
        cancel_all([jid])
    text = (tmp_path / f"min_project_{jid}.out").read_text()
    assert sacct(jid)[jid] == "FAILED", text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "set PIPELINE_PYTHON=" in lines[0], text
    assert "Traceback" not in text and "ModuleNotFoundError" not in text

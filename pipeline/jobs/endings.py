"""Where a run stands, or how it ended, as one word and a reason: the classification that ``status`` and
``collect`` share. Torch-free; Slurm is asked through :mod:`pipeline.jobs.slurm` only.

The words (:data:`STATES`):

    pending        not started (queued, or never submitted)
    running        its job runs
    done           every stage finished
    diverged       training stopped on a NaN or infinite loss
    failed         a stage raised (its record names the error), or the job failed without a record
    blocked        the shared training it waits for failed in another run (pipeline.share): the reason
                   names that run; submitting with --rerun failed redoes that training, then this run
    stopped        started, not finished, no job alive and nothing says why: submit again to resume
    cancelled      scancel (sacct: CANCELLED, CANCELLED by <uid>)
    time-limit     the time limit was reached and no requeue was left (sacct TIMEOUT, DEADLINE, or the
                   job's own record after slurm.max_requeues requeues)
    out-of-memory  sacct OUT_OF_MEMORY
    node-failure   sacct NODE_FAIL or BOOT_FAIL
    preempted      sacct PREEMPTED (and not requeued)

What the run folder says about a finished run (done, diverged) wins over the scheduler; otherwise a
scheduler ending (sacct) wins, with the stage's error added to the reason when there is one; without
one (no accounting, the job long forgotten), the record the job wrote when it stopped
(``<run>/ending.json``, :func:`write_ending`) tells.
"""

from __future__ import annotations

import pwd
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.jobs import slurm as slurm_cli
from pipeline.rundir import RunDir, atomic_write_json, read_mapping

STATES = (
    "pending",
    "running",
    "done",
    "diverged",
    "failed",
    "blocked",
    "stopped",
    "cancelled",
    "time-limit",
    "out-of-memory",
    "node-failure",
    "preempted",
)
# The words that mean the run ended without finishing and no job of it is alive.
ENDED = ("failed", "blocked", "stopped", "cancelled", "time-limit", "out-of-memory", "node-failure", "preempted")

ENDING_FILE = "ending.json"

# sacct's first word -> (state, what to say); ACTIVE_STATES are handled apart.
_SCHEDULER_ENDINGS: dict[str, tuple[str, str]] = {
    "OUT_OF_MEMORY": ("out-of-memory", "the job ran out of memory (sacct OUT_OF_MEMORY): raise slurm.mem_gb"),
    "NODE_FAIL": ("node-failure", "its node failed (sacct NODE_FAIL): submit the sweep again to resume"),
    "BOOT_FAIL": ("node-failure", "its node failed to boot (sacct BOOT_FAIL): submit the sweep again to resume"),
    "TIMEOUT": ("time-limit", "killed at its time limit (sacct TIMEOUT): raise slurm.time_min or submit again"),
    "DEADLINE": ("time-limit", "killed at its deadline (sacct DEADLINE)"),
    "PREEMPTED": ("preempted", "preempted and not requeued (sacct PREEMPTED): submit the sweep again to resume"),
    "CANCELLED": ("cancelled", "cancelled"),
}


@dataclass(frozen=True)
class Ending:
    """``state``: one word of :data:`STATES`; ``reason``: why, for a person ("" when the word says all)."""

    state: str
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.state} ({self.reason})" if self.reason else self.state


def classify(run: RunDir, job_state: str = "", submitted: bool = True) -> Ending:
    """How ``run`` stands, from its folder and its last job's scheduler state.

    ``job_state`` is the state as squeue or sacct prints it ("RUNNING", "CANCELLED by 1000", "TIMEOUT";
    "" when the scheduler does not know the job or was not asked); ``submitted`` is False when no job
    was ever recorded for the run (so a run with no trace of starting is pending, not stopped)."""
    files = run.status()
    if files == "done":
        return Ending("done")
    if files == "diverged":
        epoch = (run.read_metrics("train") or {}).get("diverged_epoch")
        return Ending("diverged", f"epoch {epoch}" if epoch else "")
    if files == "blocked":  # before the scheduler's word: its job was cancelled because of it, or waits
        owner, why = run.blocked_by() or ("another run", "")
        return Ending("blocked", f"blocked by {owner}: its training failed ({why})")
    word, _, detail = job_state.strip().partition(" ")
    if word in slurm_cli.ACTIVE_STATES:
        if word in ("RUNNING", "COMPLETING"):
            return Ending("running")
        return Ending("pending", "" if word == "PENDING" else word.lower())
    failure = _failure(run) if files == "failed" else ""
    if word in _SCHEDULER_ENDINGS:
        state, reason = _SCHEDULER_ENDINGS[word]
        if word == "CANCELLED":
            reason = _cancelled_by(detail)
        return Ending(state, f"{reason}; {failure}" if failure else reason)
    if files == "failed":
        return Ending("failed", failure)
    record = read_ending(run)
    if word == "FAILED" and (record or {}).get("state") != "failed":
        return Ending("failed", "the job failed before writing a record (sacct FAILED): see its log")
    if record is not None:
        return Ending(str(record.get("state", "stopped")), str(record.get("reason", "")))
    if files == "pending" and not submitted:
        return Ending("pending")
    return Ending("stopped", "started, not finished, no job alive: submit the sweep again to resume")


def _failure(run: RunDir) -> str:
    stage = run.failed_stage()
    m = (run.read_metrics(stage) if stage else None) or {}
    where = f"{stage} stage: " if stage and stage != "train" else ""
    return f"{where}{m.get('error', 'no reason recorded')}"


def _cancelled_by(detail: str) -> str:
    """'by 1000' -> 'cancelled by alice (uid 1000)'."""
    _, _, uid = detail.partition("by ")
    if not uid.strip().isdigit():
        return "cancelled"
    try:
        name = pwd.getpwuid(int(uid)).pw_name
    except KeyError:
        return f"cancelled by uid {uid.strip()}"
    return f"cancelled by {name} (uid {uid.strip()})"


def read_ending(run: RunDir) -> dict[str, Any] | None:
    """The record the run's last job wrote when a signal stopped it, if any."""
    record = read_mapping(run.path / ENDING_FILE)[0]
    return record if record is not None and record.get("state") in STATES else None


def write_ending(run: RunDir, state: str, reason: str, **extra: Any) -> None:
    """Inside a job, when it stops early: what ended it, for ``status`` and ``collect`` when the
    scheduler cannot tell (cleared by :func:`clear_ending` when the run starts again)."""
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}; allowed: {', '.join(STATES)}")
    atomic_write_json(run.path / ENDING_FILE, {"state": state, "reason": reason, "time": time.time(), **extra})


def clear_ending(run: RunDir) -> None:
    (run.path / ENDING_FILE).unlink(missing_ok=True)


@dataclass(frozen=True)
class RunJob:
    """The job a run's state is read from, and what the scheduler says of it."""

    cluster: str  # slurm | local | "" (a process started by hand, or no job known)
    job_id: str  # "" when no job is known; "pid N" for a process started by hand
    state: str  # squeue's or sacct's words ("RUNNING", "CANCELLED by 1000"), "RUNNING" for a live process, or ""
    source: str = ""  # where it was found: manifest.json, owner.json or ending.json


def run_jobs(sweep_dir: Path, runs: Sequence[RunDir]) -> tuple[dict[str, RunJob], str]:
    """(run id -> the job that tells how the run stands, what is wrong with manifest.json or ""), whatever
    submitted the job (the sweep, a plain ``sbatch sbatch/array.sh``, ``python -m pipeline.run`` by hand):

    1. a live owner (owner.json: its very process on this machine, else a fresh heartbeat; Slurm's word
       for its job wins when Slurm has one): the run runs now;
    2. the manifest's job while the scheduler has it queued or running;
    3. the Slurm job named in ending.json (how the last job that ran the run stopped), else the one in a
       dead owner.json (the last job that started it, killed before it could say more), if sacct knows it;
    4. the manifest's job, ended.

    Slurm is asked once (squeue, then sacct) for every job named."""
    from pipeline.jobs.alive import job_is_active
    from pipeline.jobs.manifest import checked_manifest
    from pipeline.jobs.owner import OWNER_FILE, owner_alive, read_owner

    manifest, problem = checked_manifest(sweep_dir)
    owners = {run.id: read_owner(run) or ({}, 0.0) for run in runs}
    named = {run.id: _named_jobs(owners[run.id][0], read_ending(run)) for run in runs}
    asked = [e["job_id"] for e in manifest["runs"].values() if e["cluster"] == "slurm"]
    asked += [job for jobs in named.values() for job, _ in jobs]
    sched = slurm_cli.job_states(asked, full=True) if asked else {}
    out = {}
    for run in runs:
        record, age = owners[run.id]
        slurm_job = next((job for job, source in named[run.id] if source == OWNER_FILE), "")
        if owner_alive(record, age) and _active(sched.get(slurm_job, "RUNNING")):
            job = str(record.get("job") or f"pid {record.get('pid')}")
            out[run.id] = RunJob(str(record.get("cluster") or ""), job, "RUNNING", OWNER_FILE)
            continue
        entry = manifest["runs"].get(run.id)
        ended = None
        if entry is not None:
            cluster, job = entry["cluster"], entry["job_id"]
            active = job_is_active("local", job, entry, sweep_dir) if cluster == "local" else False
            state = "RUNNING" if active else sched.get(job, "") if cluster == "slurm" else ""
            ended = RunJob(cluster, job, state, "manifest.json")
            if _active(state):
                out[run.id] = ended
                continue
        found = next(
            (RunJob("slurm", job, sched[job], source) for job, source in named[run.id] if sched.get(job)), None
        )
        out[run.id] = found or ended or RunJob("", "", "")
    return out, problem


def _named_jobs(owner: dict[str, Any], ending: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The Slurm jobs a run folder names, latest first: (job id, file) from ending.json and owner.json."""
    from pipeline.jobs.owner import OWNER_FILE

    jobs = [(str((ending or {}).get("job_id") or ""), ENDING_FILE)]
    jobs.append((str(owner.get("job") or "") if owner.get("cluster") == "slurm" else "", OWNER_FILE))
    return [(job, source) for job, source in jobs if job]


def _active(state: str) -> bool:
    return state.split(" ", 1)[0] in slurm_cli.ACTIVE_STATES

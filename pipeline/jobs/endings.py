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
from typing import Any

from pipeline.jobs import slurm as slurm_cli
from pipeline.rundir import STOPPED_EARLY, RunDir, atomic_write_json, read_mapping

STATES = (
    "pending",
    "running",
    "done",
    "diverged",
    STOPPED_EARLY,
    "failed",
    "blocked",
    "stopped",
    "cancelled",
    "time-limit",
    "out-of-memory",
    "node-failure",
    "preempted",
)
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
    settled = _settled_by_files(run, files)
    if settled is not None:
        return settled
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


def _settled_by_files(run: RunDir, files: str) -> Ending | None:
    """The endings the run's own files decide, whatever the scheduler says (None: ask the scheduler)."""
    if files == "done":
        return Ending("done")
    if files == "diverged":
        epoch = (run.read_metrics("train") or {}).get("diverged_epoch")
        return Ending("diverged", f"epoch {epoch}" if epoch else "")
    if files == STOPPED_EARLY:  # a search stopped its training: finished, not failed
        epochs = (run.read_metrics("train") or {}).get("epochs")
        return Ending(STOPPED_EARLY, f"by the search after epoch {epochs}" if epochs else "by the search")
    if files == "blocked":  # before the scheduler's word: its job was cancelled because of it, or waits
        owner, why = run.blocked_by() or ("another run", "")
        return Ending("blocked", f"blocked by {owner}: its training failed ({why})")
    return None


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

"""Every run that is not done, with its reason, in words a reader acts on.

The state comes from :func:`classify` (the scheduler's view joined with the run folder); the reason from
the run's records, progress and logs. States: diverged, failed, timed out, requeued too often,
cancelled, out of memory, blocked, running, stopped, pending.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.console import hms
from pipeline.jobs.manifest import checked_manifest
from pipeline.jobs.states import job_log, sweep_problems, sweep_states
from pipeline.report.records import Record
from pipeline.rundir import STOPPED_EARLY, survey

# What a log says when the job ended for a reason the run folder cannot record itself (the tail of
# run.log or submitit's job log is searched, last match wins)
LOG_SIGNS: list[tuple[str, str]] = [
    ("requeues used: not requeued", "requeued too often"),
    ("DUE TO TIME LIMIT", "timed out"),
    ("CUDA out of memory", "out of memory"),
    ("OutOfMemoryError", "out of memory"),
    ("oom-kill", "out of memory"),
    ("Out Of Memory", "out of memory"),
    ("CANCELLED AT", "cancelled"),
]
JOB_STATES = {
    "TIMEOUT": "timed out",
    "CANCELLED": "cancelled",
    "OUT_OF_MEMORY": "out of memory",
    "DEADLINE": "timed out",
}
LOG_TAIL_BYTES = 64 * 1024
# pipeline.jobs.endings' state words -> this report's words
NAMED_ENDINGS = {
    "cancelled": "cancelled",
    "time-limit": "time limit",
    "out-of-memory": "out of memory",
    "node-failure": "node failure",
    "preempted": "preempted",
}


@dataclass(frozen=True)
class Failure:
    record: Record
    state: str
    reason: str
    log: str  # the file to read next ("" when there is none)


@dataclass(frozen=True)
class Classified:
    """A run's state word (pending | running | done | diverged | failed | stopped | blocked), the
    scheduler's word for its job ("" without one), and a reason when the classifier gives one."""

    state: str
    job_state: str = ""
    job_log: str = ""
    reason: str = ""
    job_id: str = ""


def classify(sweep_dir: Path, records: Sequence[Record]) -> tuple[dict[str, Classified], list[str]]:
    """(each run's state by id, what is wrong with the sweep's own files), from
    :func:`pipeline.jobs.states.sweep_states` (squeue/sacct, the local executor's processes, the jobs the run
    folders name); runs it does not know keep the state their files give. A scheduler that cannot be
    asked is no reason to fail: the files' word stands."""
    out = {r.id: Classified(r.status) for r in records}
    if all(r.status == "done" for r in records):  # final from the files: no scheduler to ask
        return out, sweep_problems(survey(sweep_dir)[1], checked_manifest(sweep_dir)[1])
    try:
        states, problems = sweep_states(sweep_dir)
        for s in states:
            log = job_log(sweep_dir, s.job_id) if s.job_id else None
            out[s.run.id] = Classified(
                s.state, s.job_state, str(log) if log and log.is_file() else "", reason=s.reason, job_id=s.job_id
            )
    except Exception as e:  # noqa: BLE001 - a broken manifest or scheduler must not hide the tables
        for r in records:
            out[r.id] = Classified(r.status, reason=f"scheduler state unknown ({type(e).__name__}: {e})")
        problems = []
    return out, problems


def _tail(path: Path | str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - LOG_TAIL_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _log_sign(*paths: Path | str) -> str:
    found = ""
    for path in paths:
        text = _tail(path) if path else ""
        best = -1
        for needle, word in LOG_SIGNS:
            i = text.rfind(needle)
            if i > best:
                best, found = i, word
    return found


def _last_line(error: Any) -> str:
    lines = [ln.strip() for ln in str(error or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no error recorded"


def _eta(progress: dict[str, Any]) -> str:
    try:
        epoch, epochs, elapsed = int(progress["epoch"]), int(progress["epochs"]), float(progress["elapsed_s"])
    except (KeyError, TypeError, ValueError):
        return ""
    if epoch <= 0 or not math.isfinite(elapsed):
        return ""
    return f", about {hms(elapsed / epoch * (epochs - epoch))} left"


def _diverged(r: Record) -> str:
    stage = next((s for s, m in r.stages.items() if m.get("status") == "diverged"), "train")
    m = r.stages.get(stage, {})
    where = "" if stage == "train" else f"{stage} "
    text = f"{where}epoch {m.get('diverged_epoch', '?')}: loss not finite"
    loss, when = _last_finite_loss(r, m)
    if loss is None:
        return text + "; no finite loss logged before it"
    return text + f"; last finite loss {loss:.4f}" + (f" ({when})" if when else "")


def _last_finite_loss(r: Record, m: dict[str, Any]) -> tuple[float | None, str]:
    """(the last finite loss before a stage diverged, when it was logged): the record's own (the step
    before), else the last finished epoch's (history, progress.json)."""
    step = _number(m.get("diverged_step"))
    if (loss := _number(m.get("last_finite_loss"))) is not None:
        before = f"step {step - 1:g} of epoch {m.get('diverged_epoch')}" if step is not None and step > 1 else ""
        return loss, before or "the step before"
    history = m.get("history") or []
    rows = [h for h in history if isinstance(h, dict) and _number(h.get("train_loss")) is not None]
    if rows:
        return float(rows[-1]["train_loss"]), f"epoch {rows[-1]['epoch']}" if "epoch" in rows[-1] else ""
    # history_metrics' train_loss is the last finished (finite) epoch's; progress.json has it too
    return _number(m.get("train_loss", r.progress.get("train_loss") if r.progress else None)), ""


def _number(value: Any) -> float | None:
    """A finite number as a float, else None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def failure(r: Record, c: Classified) -> Failure | None:
    """The failures-section entry of one run, None when it is done."""
    log = str(r.run.log) if r.run.log.exists() else c.job_log
    if (c.state == "done" and r.status == "done") or r.status == STOPPED_EARLY:  # (a search's, not a failure)
        return None
    if c.state == "blocked":
        return Failure(r, "blocked", c.reason or "waits on a training that failed", log)
    if r.status == "diverged":
        return Failure(r, "diverged", _diverged(r), log)
    if c.state in ("running", "pending"):
        if c.state == "running" and r.progress:
            p = r.progress
            where = f"{p.get('stage', 'train')} epoch {p.get('epoch')}/{p.get('epochs')}{_eta(p)}"
            return Failure(r, "running", where, log)
        if c.state == "running":
            return Failure(r, "running", "started, no epoch finished yet", log)
        queued = f"in the queue as job {c.job_id}" + (f" ({c.job_state})" if c.job_state else "")
        return Failure(r, "pending", queued if c.job_id else "not submitted yet", log)
    if c.state in NAMED_ENDINGS:  # pipeline.jobs.endings named how the job ended (sacct, or the job's record)
        return Failure(r, NAMED_ENDINGS[c.state], c.reason, log)
    word = (JOB_STATES.get(c.job_state.split()[0], "") if c.job_state else "") or _log_sign(r.run.log, c.job_log)
    if r.status == "failed":
        stage = r.run.failed_stage() or "train"
        m = r.stages.get(stage, {})
        problem = next((p for p in r.problems if p.startswith(str(r.run.metrics_dir))), "")
        reason = problem or f"{stage} stage: {_last_line(m.get('error'))}"
        return Failure(r, word or "failed", reason, str(m.get("log") or log))
    if word:  # the job ended without the run recording why
        where = (
            f"{r.progress.get('stage', 'train')} epoch {r.progress.get('epoch')}/{r.progress.get('epochs')}"
            if r.progress
            else "before its first epoch"
        )
        return Failure(r, word, f"{where}; job {c.job_state or 'log'} says so; submit the sweep again to resume", log)
    if c.state == "failed":  # (the reason the job recorded, e.g. its shared store deleted under it)
        return Failure(r, "failed", c.reason or f"job ended {c.job_state or 'without a result'}; see the log", log)
    if c.state == "stopped" or r.status == "running":
        where = (
            f"{r.progress.get('stage', 'train')} epoch {r.progress.get('epoch')}/{r.progress.get('epochs')}"
            if r.progress
            else "not started"
        )
        return Failure(r, "stopped", f"{where}, no job alive: submit the sweep again to resume", log)
    return Failure(r, c.state, c.reason or r.status, log)


def failures(sweep_dir: Path, records: Sequence[Record]) -> tuple[list[Failure], list[str]]:
    """(every run not done, and every run with an unreadable file, with its reason; what is wrong with
    the sweep's own files)."""
    states, problems = classify(sweep_dir, records)
    out = []
    for r in records:
        f = failure(r, states.get(r.id, Classified(r.status)))
        unsaid = [p for p in r.problems if f is None or p not in f.reason]
        if f is None and unsaid:
            f = Failure(r, "unreadable", "; ".join(unsaid), str(r.run.log) if r.run.log.exists() else "")
        elif f is not None and unsaid:
            f = Failure(r, f.state, "; ".join([f.reason, *unsaid]), f.log)
        if f is not None:
            out.append(f)
    return out, problems

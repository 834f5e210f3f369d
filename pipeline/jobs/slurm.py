"""Slurm's command-line tools (squeue, sacct, scancel, scontrol): the only module that calls them. Torch-free."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Iterable

ACTIVE_STATES = (
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "RESIZING",
    "SUSPENDED",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
)
# PREEMPTED is not in ACTIVE_STATES: a preempted job that Slurm requeues is PENDING again in squeue
# (which is asked first); one that sacct alone reports as PREEMPTED has ended.


class SlurmUnreachable(Exception):
    """squeue did not answer: which jobs are queued cannot be told."""


def _run(cmd: list[str], timeout_s: float = 20.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def controller_answers(timeout_s: float = 10.0) -> bool:
    """``scontrol ping`` reports the controller UP (False where there is no scontrol: a laptop)."""
    out = _run(["scontrol", "ping"], timeout_s)
    return out is not None and " is UP" in out


def max_array_size() -> int | None:
    """``MaxArraySize`` of ``scontrol show config`` (array indices run 0..MaxArraySize-1), or None when
    scontrol cannot tell."""
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)\s*$", _run(["scontrol", "show", "config"]) or "", re.MULTILINE)
    return int(m.group(1)) if m else None


def _base_id(job_id: str) -> str:
    return job_id.split("_", 1)[0]


def job_states(job_ids: Iterable[str], strict: bool = False, full: bool = False) -> dict[str, str]:
    """State of each job or array task (``123`` or ``123_4``): squeue for live jobs, then sacct for
    ended ones. Jobs neither tool knows are left out. With ``strict``, an squeue that does not answer
    raises :class:`SlurmUnreachable` (a submitter must not take "unknown" for "not queued"). With
    ``full``, sacct's state is kept whole ("CANCELLED by 1000"), else its first word."""
    wanted = {str(j) for j in job_ids}
    if not wanted:
        return {}
    bases = sorted({_base_id(j) for j in wanted})
    states = _queued_states(wanted, bases, strict)
    missing = wanted - set(states)
    if missing:
        states.update(_accounted_states(missing, bases, full))
    return states


def _queued_states(wanted: set[str], bases: list[str], strict: bool) -> dict[str, str]:
    """squeue's state of each of ``wanted`` that is queued or running."""
    out = _run(["squeue", "-h", "-r", "-j", ",".join(bases), "-o", "%i|%T"])
    # squeue also exits non-zero when it knows none of the ids ("Invalid job id specified": all ended
    # and purged); only a controller that does not answer leaves the queue unknown
    if out is None and strict and not controller_answers():
        raise SlurmUnreachable("squeue did not answer (is the Slurm controller up? try: scontrol ping)")
    states: dict[str, str] = {}
    for line in (out or "").splitlines():
        jid, _, state = line.strip().partition("|")
        if jid in wanted:
            states[jid] = state
    return states


def _accounted_states(missing: set[str], bases: list[str], full: bool) -> dict[str, str]:
    """sacct's state of each of ``missing`` it knows, whole (``full``) or its first word."""
    out = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(bases), "-o", "JobID,State"])
    # sacct lists array tasks that never started only inside one record of the whole array:
    # "123_[1-3,7%2]" (or just "123" once cancelled); without these a pending task seen by sacct
    # alone would count as unknown, i.e. not active, and be submitted a second time.
    states: dict[str, str] = {}
    ranges: dict[str, str] = {}
    remainder: dict[str, str] = {}
    for line in (out or "").splitlines():
        jid, _, state = line.strip().partition("|")
        state = state.strip() if full else (state.split() or [""])[0]
        if jid in missing:
            states[jid] = state
        elif "_[" in jid:
            base, _, spec = jid.partition("_[")
            for task in _array_tasks(spec.rstrip("]")):
                ranges.setdefault(f"{base}_{task}", state)
        elif "_" not in jid:
            remainder[jid] = state
    for jid in missing - set(states):
        if "_" in jid and (ranges.get(jid) or remainder.get(_base_id(jid))):
            states[jid] = ranges.get(jid) or remainder[_base_id(jid)]
    return states


def queued_comments() -> dict[str, list[str]]:
    """comment -> ids of this user's queued or running jobs and array tasks carrying it (squeue).
    Raises :class:`SlurmUnreachable` when the controller does not answer."""
    import getpass

    out = _run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%k"])
    if out is None:
        if not controller_answers():
            raise SlurmUnreachable("squeue did not answer (is the Slurm controller up? try: scontrol ping)")
        return {}
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        jid, _, comment = line.strip().partition("|")
        if jid and comment and comment != "(null)":
            found.setdefault(comment, []).append(jid)
    return found


def _array_tasks(spec: str) -> list[int]:
    """Task ids of an array range as squeue/sacct print it: "1-3,7,9-11:2%4" -> [1, 2, 3, 7, 9, 11]."""
    tasks: list[int] = []
    for part in spec.split("%", 1)[0].split(","):
        rng, _, step = part.partition(":")
        lo, _, hi = rng.partition("-")
        try:
            tasks += list(range(int(lo), int(hi or lo) + 1, int(step or 1)))
        except ValueError:
            continue
    return tasks


def cancel(job_ids: Iterable[str]) -> bool:
    ids = sorted({str(j) for j in job_ids})
    return bool(ids) and _run(["scancel", *ids]) is not None


def requeue(job_id: str) -> bool:
    """Ask Slurm to requeue a job (from inside it, before its time limit); True on success."""
    return _run(["scontrol", "requeue", str(job_id)]) is not None

"""Which job this process runs in, and whether a job recorded in a manifest or an owner record still lives:
Slurm's word for Slurm jobs, the controller process itself for local ones. Torch-free."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.jobs import slurm as slurm_cli
from pipeline.jobs.procs import ProcessIdentity


def this_job() -> tuple[str, str]:
    """(cluster, job id) of the job this process runs in, as a manifest names it: ("slurm", "<array>_<task>"
    for an array task, else "<job>"), ("local", submitit's local job id: its controller's PID), or ("", "")
    for a process started by hand."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return "slurm", f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return "slurm", env["SLURM_JOB_ID"]
    if env.get("SUBMITIT_LOCAL_JOB_ID"):
        return "local", env["SUBMITIT_LOCAL_JOB_ID"]
    return "", ""


def this_slurm_job() -> str | None:
    """:func:`this_job`'s id when it is a Slurm job (as scontrol names it), else None."""
    cluster, job = this_job()
    return job if cluster == "slurm" else None


def active_jobs(
    jobs: Sequence[tuple[str, str]],
    records: Mapping[str, Mapping[str, Any]] | None = None,
    sweep_dir: Path | None = None,
) -> set[tuple[str, str]]:
    """The (cluster, job id) pairs of a manifest still queued or running; Slurm is asked once for all.
    ``records``: job id -> its manifest entry (local jobs are recognised by more than their id);
    ``sweep_dir``: the manifest's sweep (see :func:`local_job_identity`). Raises
    :class:`pipeline.jobs.slurm.SlurmUnreachable` when squeue does not answer."""
    slurm_ids = [jid for cluster, jid in jobs if cluster == "slurm"]
    states: dict[str, str] = {}
    if slurm_ids:
        states = {j: s for j, s in slurm_cli.job_states(slurm_ids, strict=True).items() if s in slurm_cli.ACTIVE_STATES}
    records = records or {}
    return {
        (c, j) for c, j in jobs if (j in states if c == "slurm" else job_is_active(c, j, records.get(j), sweep_dir))
    }


def local_job_identity(
    job_id: str, entry: Mapping[str, Any] | None, sweep_dir: Path | None = None
) -> ProcessIdentity | None:
    """The identity of a local job's controller from its manifest entry, or None for a malformed id. An
    entry with a PID only (written before start times were recorded) names the process only while its
    command line is that of a job controller of ``sweep_dir`` (none without it): the PID may be
    anyone's by now."""
    ident = ProcessIdentity.from_record({**(entry or {}), "pid": job_id})
    if ident is None or ident.started is not None or sweep_dir is None:
        return ident
    return dataclasses.replace(ident, commands=controller_commands(sweep_dir))


def controller_commands(sweep_dir: Path) -> tuple[str, ...]:
    """What the command line of a local job controller of ``sweep_dir`` holds: submitit's controller
    module and the jobs' folder (absolute, as submitit passes it; also with links resolved)."""
    folder = Path(sweep_dir) / "logs" / "%j"
    paths = dict.fromkeys((str(folder.absolute()), str(folder.resolve())))
    return tuple(f"submitit.local._local {p}" for p in paths)


def job_is_active(
    cluster: str, job_id: str, entry: Mapping[str, Any] | None = None, sweep_dir: Path | None = None
) -> bool:
    """Whether a job recorded in a manifest (``entry``: its manifest entry; ``sweep_dir``: the sweep it
    belongs to) is still queued or running.

    A local job is its controller process: active while that very process (same start time, or for an
    entry without one, a controller of this sweep: :func:`local_job_identity`) lives and is no zombie,
    and submitit has not yet written the job's result (the controller outlives the work by a moment).
    A local job recorded on another host cannot be looked at from here and counts as active."""
    if cluster == "local":
        ident = local_job_identity(job_id, entry, sweep_dir)
        if ident is None:
            return False
        if entry and entry.get("result") and Path(str(entry["result"])).exists():
            return False
        return ident.is_alive() if ident.on_this_machine() else True
    if cluster == "slurm":
        return slurm_cli.job_states([job_id]).get(job_id, "") in slurm_cli.ACTIVE_STATES
    return False

"""Where every run of a sweep stands: the run folders joined with the jobs they name (manifest.json,
owner.json, ending.json) and what the scheduler says of those jobs. ``status`` and ``collect`` both
read it from here. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline.jobs import slurm as slurm_cli
from pipeline.jobs.alive import job_is_active
from pipeline.jobs.endings import ENDING_FILE, classify, read_ending
from pipeline.jobs.manifest import checked_manifest
from pipeline.jobs.owner import OWNER_FILE, owner_alive, read_owner
from pipeline.rundir import RunDir, survey


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
    jobs = [(str((ending or {}).get("job_id") or ""), ENDING_FILE)]
    jobs.append((str(owner.get("job") or "") if owner.get("cluster") == "slurm" else "", OWNER_FILE))
    return [(job, source) for job, source in jobs if job]


def _active(state: str) -> bool:
    return state.split(" ", 1)[0] in slurm_cli.ACTIVE_STATES


@dataclass
class RunState:
    run: RunDir
    state: str  # a word of pipeline.jobs.endings.STATES
    job_id: str
    job_state: str  # the scheduler's word, or "" when it has none
    epoch: str
    val_acc_best: float | None
    elapsed_s: float | None
    reason: str = ""  # why it is in that state (pipeline.jobs.endings.classify), "" when the word says all
    note: str = ""  # what the user should know: a fallback checkpoint, a failed write to resume
    problems: list[str] = field(default_factory=list)  # unreadable files, each naming its file
    cluster: str = ""  # the job's scheduler: slurm | local | "" (started by hand, or none)


def job_log(sweep_dir: Path, job_id: str) -> Path:
    """submitit's stdout/stderr file of a job (array tasks are named <job>_<task>)."""
    return sweep_dir / "logs" / job_id / f"{job_id}_0_log.out"


def run_states(sweep_dir: Path) -> list[RunState]:
    return sweep_states(sweep_dir)[0]


def sweep_states(sweep_dir: Path) -> tuple[list[RunState], list[str]]:
    """(each run's state, what is wrong with the sweep's own files: folders that are no runs, an
    unreadable manifest.json), from the run folders and the jobs they name (:func:`run_jobs`)."""
    runs, strays = survey(sweep_dir)
    jobs, manifest_problem = run_jobs(sweep_dir, runs)
    return [_run_state(run, jobs[run.id]) for run in runs], sweep_problems(strays, manifest_problem)


def sweep_problems(strays: list[str], manifest_problem: str) -> list[str]:
    """The lines that name a sweep's unreadable files of its own (not of one run)."""
    if manifest_problem:
        return [*strays, f"{manifest_problem}: jobs are told from the run folders alone (owner.json, ending.json)"]
    return strays


def _run_state(run: RunDir, job: RunJob) -> RunState:
    ending = classify(run, job.state, submitted=bool(job.job_id))
    state, reason = ending.state, ending.reason
    if state == "running" and job.cluster == "local" and job.source == "manifest.json" and run.status() == "pending":
        state = "pending"  # a local slot that has not reached this run yet
    progress = _progress(run)
    epoch = f"{progress['epoch']}/{progress['epochs']}" if progress else ""
    stage = progress.get("stage", "train") if progress else "train"
    if epoch and stage != "train":
        epoch = f"{stage} {epoch}"
    if state == "failed" and (failed := run.failed_stage()) not in (None, "train"):
        epoch = f"{failed} stage failed"
    if state == "diverged":
        epoch = diverged_where(run) or epoch
    notes = run.notes()
    if state == "failed" and (why := run.resumable_failure()) is not None:
        notes.append(f"{why.get('error')}: free space, then submit again to resume")
    problems = run.problems()
    if problems:
        notes.append(f"{len(problems)} unreadable file(s), named below")
    return RunState(
        run,
        state,
        job.job_id,
        job.state,
        epoch,
        progress.get("val_acc_best"),
        progress.get("elapsed_s"),
        reason,
        "; ".join(notes),
        problems,
        job.cluster,
    )


def diverged_where(run: RunDir) -> str:
    """ "diverged at <stage> epoch E step S/N" from the first diverged stage's record ("" if it says less)."""
    for stage, status in run.stage_statuses().items():
        if status == "diverged":
            m = run.read_metrics(stage) or {}
            if m.get("diverged_step") is None:
                return f"diverged at {stage} epoch {m['diverged_epoch']}" if m.get("diverged_epoch") else ""
            phase = "train" if stage == "train" else ("qat" if stage == "quantize" else stage)
            return f"diverged at {phase} epoch {m.get('diverged_epoch')} step {m['diverged_step']}/{m.get('steps_per_epoch')}"
    return ""


def _progress(run: RunDir) -> dict:
    """progress.json, or a shared pruning's while it runs (the run's own progress.json links to its
    training's, and a shared fine-tune writes its epochs into the pruning's store)."""
    store = run.shared_store("prune")
    if store is not None and run.read_metrics("prune") is None and run.read_metrics("train") is not None:
        pruning = RunDir(store).read_progress()
        if pruning:
            return pruning
    return run.read_progress()

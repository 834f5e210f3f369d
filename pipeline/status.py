"""``python -m pipeline.status <out>/<sweep> [--watch] [--cancel]``: where every run of a sweep stands.

The scheduler's view (squeue, then sacct; the local executor's process ids) is joined with what the run
folders say, so a job that died without writing a result still shows as failed. Torch-free.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline import console as cli
from pipeline.jobs import slurm as slurm_cli
from pipeline.config import COMMAND_LINE, ConfigError
from pipeline.jobs.endings import STATES, RunJob, classify, run_jobs
from pipeline.jobs.alive import local_job_identity
from pipeline.jobs.manifest import read_manifest
from pipeline.rundir import RunDir, survey


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
    unreadable manifest.json), from the run folders and the jobs they name (pipeline.jobs.endings.run_jobs)."""
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


def _elapsed(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def render(sweep_dir: Path, states: list[RunState]) -> Table:
    keys = list(dict.fromkeys(k for s in states for k in s.run.read_meta().get("swept", {})))
    titles = cli.short_keys(keys)
    table = Table(title=f"{sweep_dir}", title_justify="left")
    notes = any(s.note for s in states)
    columns = ["run", *[titles[k] for k in keys], "state", "job", "epoch", "best val acc", "elapsed", "log"]
    for col in columns + (["note"] if notes else []):
        table.add_column(col, no_wrap=col in ("run", "job"))
    colours = {"done": "green", "diverged": "yellow", "running": "cyan", "stopped": "magenta", "pending": "white"}
    for s in states:
        swept = s.run.read_meta().get("swept", {})
        state = f"[{colours.get(s.state, 'red')}]{s.state}[/]" + (f" ({escape(s.reason)})" if s.reason else "")
        log = s.run.log if s.run.log.exists() else (job_log(sweep_dir, s.job_id) if s.job_id else "")
        table.add_row(
            s.run.id,
            *[cli.fmt(swept.get(k, "")) for k in keys],
            state,
            s.job_id,
            s.epoch,
            f"{100 * s.val_acc_best:.2f}%" if s.val_acc_best is not None else "",
            _elapsed(s.elapsed_s),
            str(log),
            *([s.note] if notes else []),
        )
    return table


def summary(states: list[RunState]) -> str:
    counts = {k: sum(1 for s in states if s.state == k) for k in STATES}
    return f"{len(states)} runs: " + ", ".join(
        f"{n} {k}" for k, n in counts.items() if n or k in ("pending", "running", "done", "failed")
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.status", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", type=Path, help="a sweep's results folder, e.g. runs/optimizers")
    p.add_argument("--watch", action="store_true", help="refresh until every run has ended (Ctrl-C stops)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between refreshes with --watch")
    p.add_argument("--cancel", action="store_true", help="cancel the sweep's queued and running jobs")
    args = p.parse_args(argv)
    con: Console = cli.console()
    with cli.exit_on_config_error():
        if not args.sweep_dir.is_dir():
            raise ConfigError(COMMAND_LINE, f"'{args.sweep_dir}' is not a folder", key="sweep_dir")
    if args.cancel:
        return cancel(args.sweep_dir, con)
    try:
        while True:
            states, problems = sweep_states(args.sweep_dir)
            con.print(render(args.sweep_dir, states))
            con.print(summary(states))
            show_problems(con, states, problems)
            if not args.watch or not any(s.state in ("pending", "running") for s in states):
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:  # Ctrl-C is how --watch is stopped: no traceback
        return 130


def show_problems(con: Console, states: list[RunState], problems: list[str]) -> None:
    """Unreadable files, one line each, below the table (whole paths: a table cell would wrap them)."""
    lines = [*problems, *(f"{s.run.id}: {p}" for s in states for p in s.problems)]
    if lines:
        con.print("Unreadable files (the runs are shown from what could be read):", markup=False)
    for line in lines:
        con.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)


def cancel(sweep_dir: Path, con: Console) -> int:
    states = run_states(sweep_dir)
    live = [s for s in states if s.state in ("pending", "running") and s.job_id]
    manifest = read_manifest(sweep_dir)
    # scancel only Slurm jobs: a local job's id is a PID, and the same number may be someone's Slurm job
    slurm = sorted({s.job_id for s in live if s.job_state and s.cluster == "slurm"})
    local = {
        s.job_id: manifest["runs"][s.run.id]
        for s in live
        if s.cluster == "local" and manifest["runs"].get(s.run.id, {}).get("job_id") == s.job_id
    }
    if slurm:
        slurm_cli.cancel(slurm)
    signalled = []
    for job_id, entry in sorted(local.items()):
        ident = local_job_identity(job_id, entry, sweep_dir)
        if ident is not None and not ident.on_this_machine():
            con.print(f"[yellow]local job {job_id} runs on {ident.host}: cancel it there[/]")
        # Only the recorded process itself (same start time): a reused PID belongs to someone else.
        # submitit's local controller stops its job on SIGINT (SIGINT, then SIGKILL, to the training).
        elif ident is not None and ident.send_signal(signal.SIGINT):
            signalled.append(job_id)
    con.print(f"cancelled {len(set(slurm) | set(signalled))} job(s) of {len(live)} unfinished run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

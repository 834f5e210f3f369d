"""``python -m pipeline.status <out>/<sweep> [--watch] [--cancel]``: where every run of a sweep stands.

The scheduler's view (squeue, then sacct; the local executor's process ids) is joined with what the run
folders say, so a job that died without writing a result still shows as failed. Torch-free.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline import cli, slurm_cli
from pipeline.config import COMMAND_LINE, ConfigError
from pipeline.endings import STATES, classify
from pipeline.launch import local_job_identity
from pipeline.manifest import read_manifest
from pipeline.rundir import RunDir, list_runs


@dataclass
class RunState:
    run: RunDir
    state: str  # a word of pipeline.endings.STATES
    job_id: str
    job_state: str  # the scheduler's word, or "" when it has none
    epoch: str
    val_acc_best: float | None
    elapsed_s: float | None
    reason: str = ""  # why it is in that state (pipeline.endings.classify), "" when the word says all
    note: str = ""  # what the user should know: a fallback checkpoint, a failed write to resume


def job_log(sweep_dir: Path, job_id: str) -> Path:
    """submitit's stdout/stderr file of a job (array tasks are named <job>_<task>)."""
    return sweep_dir / "logs" / job_id / f"{job_id}_0_log.out"


def run_states(sweep_dir: Path) -> list[RunState]:
    entries = read_manifest(sweep_dir)["runs"]
    slurm_ids = [e["job_id"] for e in entries.values() if e["cluster"] == "slurm"]
    sched = slurm_cli.job_states(slurm_ids, full=True) if slurm_ids else {}
    from pipeline.launch import job_is_active

    out = []
    for run in list_runs(sweep_dir):
        entry = entries.get(run.id, {})
        job_id = str(entry.get("job_id", ""))
        if entry.get("cluster") == "slurm":
            job_state = sched.get(job_id, "")
        elif entry.get("cluster") == "local":
            job_state = "RUNNING" if job_is_active("local", job_id, entry, sweep_dir) else ""
        else:
            job_state = ""
        ending = classify(run, job_state, submitted=bool(job_id))
        state, reason = ending.state, ending.reason
        if state == "running" and entry.get("cluster") == "local" and run.status() == "pending":
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
        out.append(
            RunState(
                run,
                state,
                job_id,
                job_state,
                epoch,
                progress.get("val_acc_best"),
                progress.get("elapsed_s"),
                reason,
                "; ".join(notes),
            )
        )
    return out


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
    while True:
        states = run_states(args.sweep_dir)
        con.print(render(args.sweep_dir, states))
        con.print(summary(states))
        if not args.watch or not any(s.state in ("pending", "running") for s in states):
            return 0
        time.sleep(args.interval)


def cancel(sweep_dir: Path, con: Console) -> int:
    states = run_states(sweep_dir)
    live = [s for s in states if s.state in ("pending", "running") and s.job_id]
    manifest = read_manifest(sweep_dir)
    # scancel only Slurm jobs: a local job's id is a PID, and the same number may be someone's Slurm job
    slurm = sorted(
        {s.job_id for s in live if s.job_state and manifest["runs"].get(s.run.id, {}).get("cluster") == "slurm"}
    )
    local = {
        s.job_id: manifest["runs"][s.run.id]
        for s in live
        if manifest["runs"].get(s.run.id, {}).get("cluster") == "local"
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

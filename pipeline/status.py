"""``python -m pipeline.status <out>/<sweep> [--watch] [--cancel]``: where every run of a sweep stands.

The scheduler's view (squeue, then sacct; the local executor's process ids) is joined with what the run
folders say, so a job that died without writing a result still shows as failed. Torch-free.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline import console as cli
from pipeline.config import COMMAND_LINE, ConfigError
from pipeline.jobs import slurm as slurm_cli
from pipeline.jobs.alive import local_job_identity
from pipeline.jobs.endings import STATES
from pipeline.jobs.manifest import read_manifest
from pipeline.jobs.states import RunState, job_log, run_states, sweep_states


def render(sweep_dir: Path, states: list[RunState]) -> Table:
    keys = list(dict.fromkeys(k for s in states for k in s.run.read_meta().get("swept", {})))
    titles = cli.short_keys(keys)
    table = Table(title=f"{sweep_dir}", title_justify="left")
    notes = any(s.note for s in states)
    columns = ["run", *[titles[k] for k in keys], "state", "job", "epoch", "best val acc", "elapsed", "log"]
    for col in columns + (["note"] if notes else []):
        table.add_column(col, no_wrap=col in ("run", "job"))
    colours = {"done": "green", "diverged": "yellow", "running": "cyan", "stopped": "magenta", "pending": "white"}
    colours["stopped early"] = "blue"  # a search stopped its training: finished, not failed
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
            "" if s.elapsed_s is None else cli.hms(s.elapsed_s),
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
            show_studies(con, args.sweep_dir)
            show_problems(con, states, problems)
            if not args.watch or not any(s.state in ("pending", "running") for s in states):
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:  # Ctrl-C is how --watch is stopped: no traceback
        return 130


def show_studies(con: Console, sweep_dir: Path) -> None:
    """A search's studies: counts, best so far and its run; a study that cannot be read, named."""
    from pipeline.search.report import study_views

    views, notes = study_views(sweep_dir)
    for v in views:
        con.print(v.summary, markup=False, highlight=False, soft_wrap=True)
    for note in notes:
        con.print(f"[yellow]{escape(note)}[/]", soft_wrap=True)


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

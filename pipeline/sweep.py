"""``python -m pipeline.sweep SWEEP.yaml [key=value ...]``: expand a sweep file into runs
(:mod:`pipeline.submit.expand`, where the sweep file's keys are described), write their folders, submit
them (:mod:`pipeline.submit.plan`, :mod:`pipeline.submit.launch`), print what was submitted and exit.
Torch-free: this runs on login nodes.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from rich.markup import escape

from pipeline import console as cli
from pipeline import share as sharing
from pipeline.config import (
    COMMAND_LINE,
    ConfigError,
    parse_overrides,
)
from pipeline.jobs import manifest
from pipeline.jobs import slurm as slurm_cli
from pipeline.rundir import (
    RunDir,
    atomic_write_text,
)
from pipeline.stages.runner import execute, execute_many
from pipeline.submit import launch
from pipeline.submit.expand import PlannedRun, SweepSpec, check_gpus, check_out, expand_sweep, merge_notes, read_sweep
from pipeline.submit.launch import Rejected, Submission
from pipeline.submit.lock import LockHeld, SubmitLock
from pipeline.submit.plan import (
    SUBMITTED,
    Decision,
    active_run_ids,
    claim_shared,
    follow_order,
    plan,
    plan_sharing,
    sync_files,
    trainings,
    wait_for_exiting_jobs,
    waiting_for_unqueued,
    write_runs,
)
from pipeline.submit.show import print_plan

if TYPE_CHECKING:
    from rich.console import Console


CLUSTERS = ("auto", "local", "debug", "slurm")
RERUN = ("failed", "all")
# Exit code when Slurm does not answer (before or during submission): nothing is wrong with the input,
# try again later. Bad input, a refused sbatch request and a running second submission exit 2.
EXIT_SLURM_DOWN = 3


def _record_submitting(sweep_dir: Path, cluster: str, submission: str, token: str, run_ids: list[str]) -> None:
    manifest.record_submitting(sweep_dir, cluster, token, run_ids, submission)


OWNER_QUEUED_WAIT_S = 60.0  # how long a follower waits for another submission to queue the owner's job


def _submit_later(
    submission: Submission, later: Sequence[Decision], launch_runs: Callable[[Sequence[Decision]], Submission]
) -> None:
    """Submit the runs that follow an owner another submission is queueing, once its job id is in the
    owner record (a submission under way records it within seconds); those whose owner was not queued
    within :data:`OWNER_QUEUED_WAIT_S` are listed as not submitted."""
    pending = [sh for d in later for sh in d.shares() if sh.role == "follow" and sh.foreign and not sh.after_job]
    deadline = time.monotonic() + OWNER_QUEUED_WAIT_S
    while pending and time.monotonic() < deadline:
        time.sleep(0.2)
        for sh in pending:
            sh.after_job = sharing.owner_job_id(sh.store)
        pending = [sh for sh in pending if not sh.after_job]
    unqueued = waiting_for_unqueued(later)
    ready = [d for d in later if d.run.id not in unqueued]
    if ready:
        more = launch_runs(ready)
        submission.job_ids.update(more.job_ids)
        submission.job_records.update(more.job_records)
        submission.jobs.extend(more.jobs)
        submission.rejected.extend(more.rejected)
    if unqueued:
        owners = sorted({str(sh.owner) for sh in pending})
        reason = (
            f"not tried: the run(s) doing the shared stage they wait for ({', '.join(owners)}) belong to another "
            f"submission that did not queue them within {OWNER_QUEUED_WAIT_S:.0f} s"
        )
        submission.rejected.append(Rejected(sorted(unqueued), reason))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sweep", type=Path, help="sweep YAML file")
    p.add_argument("overrides", nargs="*", help="key=value settings applied to every run")
    p.add_argument("--dry-run", action="store_true", help="show the runs (and sbatch header); write nothing")
    p.add_argument(
        "--cluster",
        default="auto",
        help="auto | local | debug | slurm (default auto: slurm when a controller answers, else local)",
    )
    p.add_argument("--out", type=Path, default=Path("runs"), help="results folder (default runs/)")
    p.add_argument(
        "--rerun",
        default=None,
        help="failed | all: start those runs again from scratch (old results are moved to <run>/archive/)",
    )
    p.add_argument("--all", action="store_true", help="list every run (long plans show the first and last)")
    p.add_argument(
        "--no-submit", action="store_true", help="write the run folders, submit nothing (for sbatch/array.sh)"
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="return when the runs have finished, also those an earlier submission's jobs still run",
    )
    p.add_argument("--parallel", type=int, default=1, help="local executor: runs at a time (default 1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    console = cli.console()
    with cli.exit_on_config_error():
        _check_args(args)
        spec = read_sweep(args.sweep)
        if spec.search_doc is not None:
            from pipeline.search.spec import parse_search

            spec.search = parse_search(spec.search_doc, spec.path)
        overrides = parse_overrides(args.overrides)
        runs = expand_sweep(spec, overrides)
        sweep_dir = args.out / spec.name
        check_out(args.out, sweep_dir, write=not args.dry_run)
    if spec.search is not None:
        return _search(args, console, spec, runs, overrides, sweep_dir)
    for note in merge_notes(runs, show_all=args.all):
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    if args.dry_run:
        return _dry_run(args, console, spec, runs, sweep_dir)

    if not args.no_submit:  # (plain sbatch/array.sh arrays ask for their resources in their own header)
        with cli.exit_on_config_error():
            check_gpus(spec, runs, _cluster_for(args, sweep_dir)[0])

    lock = _take_lock(sweep_dir, console)
    if lock is None:
        return cli.EXIT_USAGE
    try:
        if args.no_submit:
            return _write_only(args, console, spec, runs, sweep_dir)
        code, submission, cluster = _submit(args, console, spec, runs, sweep_dir)
    finally:
        lock.release()
    if code != 0 or submission is None:
        return code
    if args.wait or cluster == "debug":  # debug jobs run in this process, when waited for
        return _wait(submission, console, sweep_dir)
    return 0


def _check_args(args: argparse.Namespace) -> None:
    """The command-line options argparse cannot check itself (ConfigError naming the option)."""
    if args.cluster not in CLUSTERS:
        raise ConfigError(
            COMMAND_LINE,
            f"'{args.cluster}' is not allowed. Allowed values: {', '.join(CLUSTERS)}.",
            key="--cluster",
        )
    if args.rerun is not None and args.rerun not in RERUN:
        raise ConfigError(
            COMMAND_LINE, f"'{args.rerun}' is not allowed. Allowed values: {', '.join(RERUN)}.", key="--rerun"
        )
    if args.parallel < 1:
        raise ConfigError(COMMAND_LINE, f"must be >= 1, got {args.parallel}.", key="--parallel")


def _dry_run(
    args: argparse.Namespace, console: Console, spec: SweepSpec, runs: list[PlannedRun], sweep_dir: Path
) -> int:
    """``--dry-run``: the plan (and on Slurm the sbatch headers); writes nothing."""
    cluster = launch.resolve_cluster(args.cluster)
    try:
        check_gpus(spec, runs, cluster)
    except ConfigError as e:  # the plan is still worth seeing; a submission would stop here
        console.print(f"[yellow]warning:[/] {escape(str(e))} (a submission would stop here, exit 2)", soft_wrap=True)
    with cli.exit_on_os_error():
        decisions = plan(runs, sweep_dir, args.rerun, set())
        plan_sharing(decisions, sweep_dir, args.rerun, cluster)
    print_plan(console, spec, decisions, dry_run=True, show_all=args.all)
    console.print(f"{trainings(decisions, sweep_dir)} training(s) in all")
    if cluster == "slurm":
        for header in launch.sbatch_headers(sweep_dir, [d.run.config for d in decisions], spec.name):
            console.print(header, markup=False, highlight=False)
    return 0


def _wait(submission: Submission, console: Console, sweep_dir: Path) -> int:
    """``--wait``: block until every run has ended; 1 when any failed or is blocked."""
    console.print("waiting for the runs to finish")
    # also for those an earlier submission's jobs still run (skip-active): --wait waits for every run
    statuses = launch.wait(submission, console, still_active=functools.partial(active_run_ids, sweep_dir))
    failed = [rid for rid, s in statuses.items() if s in ("failed", "blocked")]
    if failed:
        console.print(
            f"[red]{len(failed)} run(s) failed or blocked:[/] "
            + ", ".join(f"{rid} (log {sweep_dir / rid / 'run.log'})" for rid in failed)
        )
        return 1
    return 0


def _search(
    args: argparse.Namespace,
    console: Console,
    spec: SweepSpec,
    runs: list[PlannedRun],
    overrides: dict[str, Any],
    sweep_dir: Path,
) -> int:
    """A sweep with ``search:`` (:mod:`pipeline.search.submit`): one study per point of its fixed axes,
    each run by an array of workers."""
    from pipeline.search import submit as search
    from pipeline.search.study import exit_on_storage_down

    with cli.exit_on_config_error():
        if args.no_submit:
            raise ConfigError(
                COMMAND_LINE, "a search's workers sample its runs: there are none to write ahead.", key="--no-submit"
            )
        if args.rerun == "all":
            raise ConfigError(COMMAND_LINE, "a search reruns its failed trials only. Allowed: failed.", key="--rerun")
        plans = search.study_plans(spec, runs, overrides)
    search.print_search(console, spec, plans, args.dry_run)
    if args.dry_run:
        for plan in plans:
            search.print_preview(console, spec, plan)
        if launch.resolve_cluster(args.cluster) == "slurm":
            n = min(spec.search.workers, spec.search.trials) if spec.search else 1
            for header in launch.sbatch_headers(sweep_dir, [plans[0].config] * n, spec.name):
                console.print(header, markup=False, highlight=False)
        return 0
    cluster, impossible = _cluster_for(args, sweep_dir)
    with cli.exit_on_config_error():
        check_gpus(spec, runs, cluster)
        search.check_storage_variables(spec)  # before the sweep folder is made
    if impossible is not None:
        cli.console(stderr=True).print(f"[bold red]error:[/] {escape(impossible)}", soft_wrap=True)
        return EXIT_SLURM_DOWN
    lock = _take_lock(sweep_dir, console)
    if lock is None:
        return cli.EXIT_USAGE
    try:
        with exit_on_storage_down(), cli.exit_on_config_error(), cli.exit_on_os_error():
            code, submitted = search.submit_search(console, spec, plans, sweep_dir, cluster, args.rerun)
    except (slurm_cli.SlurmUnreachable, launch.WorkersRefused) as e:
        down = isinstance(e, slurm_cli.SlurmUnreachable) or getattr(e, "unreachable", False)
        cli.console(stderr=True).print(f"[bold red]error:[/] not submitted: {escape(str(e))}", soft_wrap=True)
        return EXIT_SLURM_DOWN if down else cli.EXIT_USAGE
    finally:
        lock.release()
    if code == 0 and submitted and (args.wait or cluster == "debug"):
        console.print("waiting for the workers to finish")
        search.wait_for_workers(sweep_dir, submitted)
    return code


def _write_only(
    args: argparse.Namespace, console: Console, spec: SweepSpec, runs: list[PlannedRun], sweep_dir: Path
) -> int:
    """``--no-submit``: the run folders and array_runs.txt, for sbatch/array.sh."""
    with cli.exit_on_os_error():
        decisions = plan(runs, sweep_dir, args.rerun, set())
        sync_files(write_runs(sweep_dir, spec, decisions))
        # array task i of sbatch/array.sh runs line i+1: exactly this sweep file's runs, in its order
        atomic_write_text(
            sweep_dir / "array_runs.txt", "".join(f"{(sweep_dir / d.run.id).resolve()}\n" for d in decisions)
        )
    print_plan(console, spec, decisions, show_all=args.all)
    console.print(
        f"{len(decisions)} run folders in {sweep_dir}/ (listed in array_runs.txt); submit them "
        f"as a plain array with\n  sbatch --array=0-{len(decisions) - 1} sbatch/array.sh {sweep_dir}"
    )
    return 0


def _cluster_for(args: argparse.Namespace, sweep_dir: Path) -> tuple[str, str | None]:
    """(the cluster to submit to, why submitting now is impossible or None). A sweep whose manifest
    names Slurm jobs is not silently moved to the local executor by ``auto`` when the controller is down."""
    if args.cluster == "auto":
        if slurm_cli.controller_answers():
            return "slurm", None
        if any(c == "slurm" for c, _ in manifest.run_jobs(sweep_dir).values()):
            return "slurm", (
                "the Slurm controller does not answer (scontrol ping) and this sweep's manifest names Slurm "
                "jobs; nothing was submitted: try again when Slurm answers, or pass --cluster local to train here"
            )
        return "local", None
    if args.cluster == "slurm" and not slurm_cli.controller_answers():
        return "slurm", "the Slurm controller does not answer (scontrol ping); nothing was submitted: try again later"
    return args.cluster, None


def _submit(
    args: argparse.Namespace, console: Console, spec: SweepSpec, runs: list[PlannedRun], sweep_dir: Path
) -> tuple[int, Submission | None, str]:
    """Plan, write the run folders and submit, recording each array in the manifest as soon as it is
    queued; returns (exit code, submission, cluster)."""
    cluster, impossible = _cluster_for(args, sweep_dir)
    active, impossible = _queued_now(console, sweep_dir, impossible)
    if impossible is not None:
        cli.console(stderr=True).print(f"[bold red]error:[/] {escape(impossible)}", soft_wrap=True)
        return EXIT_SLURM_DOWN, None, cluster
    prepared = _prepare(args, spec, runs, sweep_dir, cluster, active)
    if prepared is None:
        return cli.EXIT_USAGE, None, cluster
    decisions, to_submit, submission_token = prepared
    launch_runs = functools.partial(_launch_runs, args, spec.name, sweep_dir, cluster, submission_token)
    # On Slurm a run that follows another submission's owner needs its job id: those go out last
    later = waiting_for_unqueued(to_submit) if cluster == "slurm" else set()
    with cli.exit_on_os_error():
        submission = launch_runs([d for d in to_submit if d.run.id not in later])
        if later:
            _submit_later(submission, [d for d in to_submit if d.run.id in later], launch_runs)
        for rej in submission.rejected:
            manifest.record_rejected(sweep_dir, cluster, rej.run_ids, rej.reason, rej.token)
    submission.elsewhere = [RunDir(sweep_dir / d.run.id) for d in decisions if d.action == "skip-active"]
    code = _print_submission(args, console, spec, sweep_dir, decisions, len(to_submit), submission)
    return code, submission, cluster


def _queued_now(console: Console, sweep_dir: Path, impossible: str | None) -> tuple[set[str], str | None]:
    """(ids of the runs queued or running now, why submitting is impossible or None). Settles the manifest's
    arrays whose sbatch was not known to have returned first, unless submitting is already impossible."""
    if impossible is not None:
        return set(), impossible
    try:
        for note in manifest.resolve_submitting(sweep_dir, slurm_cli.queued_comments):
            console.print(f"[yellow]{note}[/]")
        return active_run_ids(sweep_dir), None
    except slurm_cli.SlurmUnreachable as e:
        return set(), f"{e}; cannot tell which runs are queued, so nothing was submitted: try again later"


def _prepare(
    args: argparse.Namespace,
    spec: SweepSpec,
    runs: list[PlannedRun],
    sweep_dir: Path,
    cluster: str,
    active: set[str],
) -> tuple[list[Decision], list[Decision], str] | None:
    """Plan, write the folders of the runs to submit and claim shared stages, before anything is
    submitted; returns (decisions, those to submit, this submission's token), or None (error printed)
    while jobs that recorded their end still hold runs to submit."""
    with cli.exit_on_os_error():
        decisions = plan(runs, sweep_dir, args.rerun, active)
        plan_sharing(decisions, sweep_dir, args.rerun, cluster)
        to_submit = [d for d in decisions if d.action in SUBMITTED]
        still_held = wait_for_exiting_jobs(sweep_dir, [d.run.id for d in to_submit])
        if still_held:
            cli.console(stderr=True).print(
                f"[bold red]error:[/] runs {', '.join(still_held)} are still held by jobs that recorded their "
                "end but have not exited (see <run>/owner.json); nothing was submitted: try again shortly",
                soft_wrap=True,
            )
            return None
        unsynced = write_runs(sweep_dir, spec, to_submit)
        # before submitting (a follower that starts first waits for the owner); the owner's job is
        # found later through the manifest entry that carries this submission's token
        submission_token = uuid.uuid4().hex[:16]
        unsynced += claim_shared(decisions, sweep_dir, args.rerun, cluster, submission_token)
        to_submit = [d for d in decisions if d.action in SUBMITTED]
        sync_files(unsynced)
    return decisions, to_submit, submission_token


def _launch_runs(
    args: argparse.Namespace, name: str, sweep_dir: Path, cluster: str, submission_token: str, ds: Sequence[Decision]
) -> Submission:
    """Submit the runs of ``ds``, each array recorded in the manifest before and as soon as it is queued."""
    return launch.submit(
        [RunDir(sweep_dir / d.run.id) for d in ds],
        [d.run.config for d in ds],
        cluster=cluster,
        sweep_dir=sweep_dir,
        name=name,
        job=execute,
        job_many=execute_many,
        parallel=args.parallel,
        after=follow_order(ds),
        on_submitting=functools.partial(_record_submitting, sweep_dir, cluster, submission_token),
        on_submitted=functools.partial(_record_submitted, sweep_dir, cluster, submission_token),
    )


def _record_submitted(
    sweep_dir: Path,
    cluster: str,
    submission_token: str,
    job_ids: dict[str, str],
    token: str | None,
    job_records: dict[str, dict[str, Any]],
) -> None:
    try:
        manifest.record_submitted(sweep_dir, cluster, job_ids, token, job_records, submission_token)
    except OSError as e:
        # queued but not recorded: say which jobs, since a rerun cannot know them
        cli.console(stderr=True).print(
            f"[bold red]error:[/] jobs queued but {sweep_dir / 'manifest.json'} could not be written "
            f"({escape(e.strerror or str(e))}): " + ", ".join(f"{r}={j}" for r, j in job_ids.items()),
            soft_wrap=True,
        )
        raise


def _print_submission(
    args: argparse.Namespace,
    console: Console,
    spec: SweepSpec,
    sweep_dir: Path,
    decisions: list[Decision],
    n_to_submit: int,
    submission: Submission,
) -> int:
    """The plan with each run's job id, the count, and what was not submitted and why; the exit code."""
    shown = {**submission.job_ids, **{rid: "not submitted" for rej in submission.rejected for rid in rej.run_ids}}
    print_plan(console, spec, decisions, job_ids=shown, cluster=submission.cluster, show_all=args.all)
    n_submitted = n_to_submit - sum(len(rej.run_ids) for rej in submission.rejected)
    console.print(
        f"[bold]{n_submitted}[/] of {len(decisions)} runs submitted to [bold]{submission.cluster}[/] "
        f"({trainings(decisions, sweep_dir)} training(s)); results in {sweep_dir}/"
    )
    if not submission.rejected:
        return 0
    err = cli.console(stderr=True)
    for rej in submission.rejected:
        err.print(
            f"[bold red]not submitted:[/] {len(rej.run_ids)} run(s) ({', '.join(rej.run_ids)}): {escape(rej.reason)}",
            soft_wrap=True,
        )
    err.print(
        f"{len(submission.job_ids)} run(s) queued and recorded in {sweep_dir / 'manifest.json'}; "
        "once the cause is fixed, the same command submits only the runs not queued."
    )
    unreachable = any(rej.unreachable for rej in submission.rejected)
    return EXIT_SLURM_DOWN if unreachable else cli.EXIT_USAGE


def _take_lock(sweep_dir: Path, console: Console) -> SubmitLock | None:
    """The sweep's submit lock, held by this process; None (said on stderr) when another submitter holds
    it. One submitter per sweep at a time: two would both see every run as not queued and both submit it."""
    lock = SubmitLock(sweep_dir, on_recover=lambda message: console.print(f"[yellow]{message}[/]"))
    try:
        with cli.exit_on_os_error():
            lock.acquire()
    except LockHeld as e:
        cli.console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        return None
    return lock


if __name__ == "__main__":
    sys.exit(main())

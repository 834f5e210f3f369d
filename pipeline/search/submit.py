"""A search sweep submitted (``python -m pipeline.sweep`` with a ``search:`` section): each point of the
sweep's grid x zip x variants is one study (named ``search`` when there is one point, else
``search-<hash of its fixed values>``), checked against the schema, created in the storage, recorded in
``<sweep>/search/`` and run by one array of workers (:func:`pipeline.search.job.work`). Torch-free."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from rich.markup import escape

from pipeline import console as cli
from pipeline.config import COMMAND_LINE, Composer, ConfigError, Layer, flatten, read_yaml, tree_run_id, unflatten
from pipeline.jobs import alive
from pipeline.search.files import StudyPlan, read_jobs, record_jobs, write_record
from pipeline.search.spec import Choice, SearchSpec, check_space
from pipeline.submit.expand import PlannedRun, SweepSpec

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_STUDY = "search"  # as pipeline.search.study.DEFAULT_STUDY (not imported: optuna is slow to import)


# --------------------------------------------------------------------------------------------------
# Studies from the sweep's fixed points
# --------------------------------------------------------------------------------------------------


def study_name(fixed: dict[str, Any], alone: bool) -> str:
    if alone:
        return DEFAULT_STUDY
    return f"{DEFAULT_STUDY}-{hashlib.sha1(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:8]}"


def check_axes(sweep: SweepSpec, search: SearchSpec, overrides: dict[str, Any]) -> None:
    """A searched key cannot also be fixed by a grid/zip/variants axis or on the command line (which
    set every run's value: the sampled one would be overridden, or override it)."""
    axes = {"grid": set(sweep.grid), "zip": set(sweep.zip), "variants": {k for v in sweep.variants for k in v}}
    for key in search.params:
        for axis, keys in axes.items():
            if key in keys:
                raise ConfigError(
                    sweep.path,
                    f"is searched and is also a {axis} axis: take it out of one of them (a fixed axis gives "
                    "one study per value; a searched key is sampled in each).",
                    key=f"search.params.{key}",
                )
        if key in overrides:
            raise ConfigError(COMMAND_LINE, f"{key} is searched (search.params): it cannot be set here.", key=key)


def study_plans(sweep: SweepSpec, runs: Sequence[PlannedRun], overrides: dict[str, Any]) -> list[StudyPlan]:
    """One study per point of the sweep, every searched value checked on top of that point's config."""
    search = sweep.search
    assert search is not None
    check_axes(sweep, search, overrides)
    plans = []
    for run in runs:
        check_one_rank(sweep.path, run.config)
        check_space(search, composer_for(sweep.path, run.config))
        plans.append(StudyPlan(study_name(run.swept, len(runs) == 1), dict(run.swept), run.config))
    return plans


def check_one_rank(sweep_file: str | Path, config: dict[str, Any]) -> None:
    """A worker is one process: several ranks (data-parallel tasks) would each run the worker loop and
    claim trials of their own, instead of training one trial together."""
    for key in ("tasks_per_node", "nodes"):
        value = int(config["slurm"][key])
        if value > 1:
            raise ConfigError(
                sweep_file,
                f"is {value}: a search runs each trial in one process (a worker claims its trials alone, and "
                "several ranks would each claim their own). Allowed with search: 1; to train data-parallel, "
                "run the chosen config as a grid sweep.",
                key=f"slurm.{key}",
            )


def composer_for(sweep_file: str | Path, config: dict[str, Any]) -> Composer:
    return Composer([Layer(f"{sweep_file} (fixed settings)", flatten(config))])


def trial_run_id(composer: Composer, search: SearchSpec, params: dict[str, Any]) -> str:
    return tree_run_id(unflatten(composer.compose_flat([Layer(f"{search.source} (search.params)", params)])))


# --------------------------------------------------------------------------------------------------
# What a dry run and a submission print
# --------------------------------------------------------------------------------------------------


def space_text(search: SearchSpec) -> list[str]:
    lines = []
    for key, p in search.params.items():
        if isinstance(p, Choice):
            lines.append(f"  {key}: one of {', '.join(cli.fmt(v) for v in p.values)}")
        else:
            kind = "int" if p.integer else "float"
            scale = "log" if p.log else "linear"
            step = f", step {cli.fmt(p.step)}" if p.step else ""
            lines.append(f"  {key}: {kind} in [{cli.fmt(p.low)}, {cli.fmt(p.high)}], {scale}{step}")
    return lines


def storage_text(search: SearchSpec) -> str:
    """The storage, for people: a database URL without its password."""
    if search.storage is None:
        return "journal file search/journal.log"
    from pipeline.search.study import masked

    return masked(search.storage)


def print_search(console: Console, sweep: SweepSpec, plans: Sequence[StudyPlan], dry_run: bool) -> None:
    s = sweep.search
    assert s is not None
    early = s.early_stop
    stop = "none" if early.method == "none" else f"{early.method} (from epoch {early.min_epochs})"
    console.print(
        f"search [bold]{sweep.name}[/] ({escape(str(sweep.path))})" + (" — dry run, nothing written" if dry_run else "")
    )
    console.print(
        f"method {s.method}, {s.trials} trials, {s.workers} workers, objective "
        + ", ".join(f"{k}: {d}" for k, d in s.objective.items())
        + f", early stopping {stop}, seed {s.seed}, storage {escape(storage_text(s))}",
        soft_wrap=True,
    )
    if s.constraints:
        console.print("constraints: " + ", ".join(_bound_text(k, b) for k, b in s.constraints.items()), soft_wrap=True)
    console.print("space:")
    for line in space_text(s):
        console.print(escape(line), soft_wrap=True)
    console.print(f"{len(plans)} stud{'y' if len(plans) == 1 else 'ies'}: " + ", ".join(p.name for p in plans))


def _bound_text(figure: str, bound: Any) -> str:
    """'val_acc_drop <= 1.0', '0.5 <= x <= 2.0'."""
    low = f"{bound.min} <= " if bound.min is not None else ""
    high = f" <= {bound.max}" if bound.max is not None else ""
    return f"{low}{figure}{high}"


def print_preview(console: Console, sweep: SweepSpec, plan: StudyPlan) -> None:
    """The first configs one worker would sample (exact while they need no result), with their run ids."""
    from pipeline.search.study import preview

    s = sweep.search
    assert s is not None
    composer = composer_for(sweep.path, plan.config)
    fixed = f" (fixed: {', '.join(f'{k}={cli.fmt(v)}' for k, v in plan.fixed.items())})" if plan.fixed else ""
    console.print(f"study {plan.name}{escape(fixed)}: first sampled configs")
    for i, params in enumerate(preview(s)):
        try:
            rid = trial_run_id(composer, s, params)
        except ConfigError as e:
            rid = f"invalid, the trial would fail: {e}"
        values = ", ".join(f"{k}={cli.fmt(v)}" for k, v in params.items())
        console.print(f"  trial {i}: {escape(values)} -> run {escape(rid)}", soft_wrap=True)


# --------------------------------------------------------------------------------------------------
# Submission
# --------------------------------------------------------------------------------------------------


def open_studies(sweep: SweepSpec, sweep_dir: Path, plans: Sequence[StudyPlan]) -> dict[str, Any]:
    """Each study created (or loaded) in the storage, before anything is submitted: a database that does
    not answer raises StorageUnreachable (exit 3), a garbled journal JournalCorrupt (exit 2)."""
    from pipeline.search.study import open_study

    assert sweep.search is not None
    return {
        p.name: open_study(sweep.search, sweep_dir, p.name, max_epochs=int(p.config["train"]["epochs"])) for p in plans
    }


def busy_workers(sweep_dir: Path, study: str) -> dict[int, str]:
    """Worker indices of ``study`` that run or are queued now: a live process in its worker file, or a
    recorded job still active (raises SlurmUnreachable when squeue does not answer)."""
    from pipeline.search.worker import read_slot, workers_dir

    from pipeline.jobs import owner

    busy: dict[int, str] = {}
    for path in sorted(workers_dir(sweep_dir, study).glob("*.json")):
        data, age = read_slot(path)
        if data and path.stem.isdigit() and owner.owner_alive(data, age):
            busy[int(path.stem)] = owner.describe(data)
    jobs = read_jobs(sweep_dir).get(study, {})
    pairs = [(str(j.get("cluster")), str(j.get("job"))) for j in jobs.values()]
    records = {str(j.get("job")): j for j in jobs.values()}
    active = alive.active_jobs(pairs, records, sweep_dir)
    for w, j in jobs.items():
        if (str(j.get("cluster")), str(j.get("job"))) in active and w.isdigit():
            busy.setdefault(int(w), f"job {j.get('job')} ({j.get('cluster')})")
    return busy


def archive_failed_stores(run: Any) -> None:
    """The failed or diverged shared training (or pruning) of a trial's run, moved aside (kept) so that
    the trial asked again redoes it, as ``--rerun failed`` does for a grid's runs."""
    from pipeline import share
    from pipeline.rundir import RunDir

    for stage in ("train", "prune"):
        store = run.shared_store(stage)
        record = share.store_record(store, stage) if store is not None else None
        if record is not None and record.get("status") in ("failed", "diverged") and not share.resumable(record):
            RunDir(store).archive()


def rerun_failed(study: Any, sweep_dir: Path) -> int:
    """``--rerun failed``: each failed trial (except an invalid sampled config, which cannot change) is
    enqueued again with its values, its run folder's failed stage archived; returns how many."""
    from optuna.trial import TrialState

    from pipeline.rundir import RunDir
    from pipeline.search.worker import ATTR_FAILURE, ATTR_RUN

    trials = study.get_trials(deepcopy=False)
    rerun = {t.user_attrs.get("rerun_of") for t in trials}  # failed trials already asked again
    n = 0
    for t in trials:
        if t.state != TrialState.FAIL or t.number in rerun:
            continue
        if str(t.user_attrs.get(ATTR_FAILURE, "")).startswith("the sampled config is invalid"):
            continue
        run_id = t.user_attrs.get(ATTR_RUN)
        if isinstance(run_id, str) and RunDir(sweep_dir / run_id).status() in ("failed", "diverged"):
            archive_failed_stores(RunDir(sweep_dir / run_id))
            RunDir(sweep_dir / run_id).archive()
        study.enqueue_trial(dict(t.params), user_attrs={"rerun_of": t.number})
        n += 1
    return n


def check_storage_variables(sweep: SweepSpec) -> None:
    """ConfigError when the storage URL names an environment variable that is not set here (the workers
    read it from the environment they inherit from this command)."""
    from pipeline.search.study import expand_storage

    if sweep.search is not None and sweep.search.storage is not None:
        expand_storage(sweep.search.storage, sweep.search.source)


def submit_search(
    console: Console,
    sweep: SweepSpec,
    plans: Sequence[StudyPlan],
    sweep_dir: Path,
    cluster: str,
    rerun: str | None,
) -> tuple[int, dict[str, dict[int, dict[str, Any]]]]:
    """Create the studies, record them, submit the free workers of each; returns (exit code, study ->
    worker -> job). Called under the sweep's submit lock."""
    from pipeline.search.study import count
    from pipeline.submit import launch

    s = sweep.search
    assert s is not None
    studies = open_studies(sweep, sweep_dir, plans)
    write_record(sweep_dir, sweep.name, sweep.path, read_yaml(sweep.path)["search"], list(plans))
    submitted: dict[str, dict[int, dict[str, Any]]] = {}
    refused: list[str] = []
    for plan in plans:
        study = studies[plan.name]
        if rerun == "failed" and (n := rerun_failed(study, sweep_dir)):
            console.print(f"study {plan.name}: {n} failed trial(s) enqueued again")
        c = count(study.get_trials(deepcopy=False))
        if c.ended >= s.trials and not c.running and not c.waiting:
            console.print(f"study {plan.name}: complete ({c.done} finished, {c.stopped} stopped early); nothing to run")
            continue
        busy = busy_workers(sweep_dir, plan.name)
        free = [w for w in range(min(s.workers, s.trials)) if w not in busy]
        if not free:
            refused.append(f"study {plan.name}: the search is running (workers: {'; '.join(busy.values())})")
            continue
        from pipeline.search.job import work

        fn = functools.partial(work, str(sweep_dir.resolve()), plan.name)
        jobs = launch.submit_workers(plan.config, free, fn, cluster=cluster, sweep_dir=sweep_dir, name=sweep.name)
        record_jobs(sweep_dir, plan.name, jobs)
        submitted[plan.name] = jobs
        ids = sorted({j["job"].split("_")[0] for j in jobs.values()})
        console.print(
            f"study {plan.name}: {len(jobs)} worker(s) submitted to [bold]{cluster}[/] (job {', '.join(ids)}); "
            f"{c.ended} of {s.trials} trials ended so far; results in {sweep_dir}/"
        )
    err = cli.console(stderr=True)
    for line in refused:
        err.print(f"[bold red]error:[/] {escape(line)}; not submitted again", soft_wrap=True)
    return (cli.EXIT_USAGE if refused and not submitted else 0), submitted


def wait_for_workers(sweep_dir: Path, submitted: dict[str, dict[int, dict[str, Any]]], poll_s: float = 2.0) -> None:
    """Block until every submitted worker job has ended."""
    pairs = [(str(j["cluster"]), str(j["job"])) for jobs in submitted.values() for j in jobs.values()]
    records = {str(j["job"]): j for jobs in submitted.values() for j in jobs.values()}
    while alive.active_jobs(pairs, records, sweep_dir):
        time.sleep(poll_s)

"""What one worker of a search runs (one Slurm array task, or one local process): claim a trial, run it,
tell its outcome, until the study has ``trials`` finished or stopped trials.

Claiming happens under a lock in ``<sweep>/search/`` (Optuna's symlink lock, safe on NFS), in this order:

1. Resume: ``<sweep>/search/workers/<study>/<worker>.json`` names the trial this worker index held when
   it stopped (a requeue after a time limit or preemption, or a resubmitted sweep). If that trial is
   still running in the study, the worker runs it again: the run folder resumes from its checkpoint.
2. Adopt: a running trial that no live worker holds (its worker was killed with ``kill -9`` or
   ``scancel`` and its index is not coming back) is taken over, under the same trial number. A worker
   is live while its process runs (same host) or its file's heartbeat is fresh (another host).
3. Ask: when finished + stopped + running trials are fewer than ``trials``, a new trial is asked and
   every parameter sampled. Enqueued trials (``study.enqueue_trial``: what ``--rerun failed`` will do
   with a failed trial's values) are served first, even beyond ``trials``. Failed trials do not count, so each one is replaced; but a failed trial is
   final (never retried by the workers: ``--rerun failed`` does that), and once ``max_failed`` trials
   (default: ``trials``) have failed no more are asked (trials running then still end), so a config
   that always fails cannot loop.

The run id is resolved inside the lock too, and the worker that goes on to train a run folder says so
in its file there, so two trials that sample the same config see each other: the later one waits (or
takes the folder over if that worker dies) and is told the result, read from the run folder, without
training. A worker stops when there is nothing to resume, adopt or ask (the last trials may still be
running in other workers).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.jobs import owner
from pipeline.config import ConfigError
from pipeline.rundir import atomic_write_text, read_json
from pipeline.search.figures import Outcome, outcome_from_run
from pipeline.search.spec import Bound, EarlyStop, SearchSpec
from pipeline.search.study import DEFAULT_STUDY, SEARCH_DIR, Counts, ask, count, judged, open_study

log = logging.getLogger("pipeline.search")

WORKERS_DIR = "workers"
CLAIMS = "claims"  # <sweep>/search/claims(.lock): the lock every claim is made under
POLL_S = 5.0  # how often a trial waiting for its twin (same run) looks again
# user attributes of a trial: its run folder, why it failed, the earlier trial of the same run
ATTR_RUN, ATTR_FAILURE, ATTR_SAME_AS = "run_id", "failure", "same_as"
ATTR_FIGURES = "constraint_figures"  # the figures search.constraints bounds, as the run recorded them


class WorkerBusy(RuntimeError):
    """Another live process is this worker index (two submissions of one search at once)."""


# --------------------------------------------------------------------------------------------------
# What a trial runner sees and gives back
# --------------------------------------------------------------------------------------------------


class Reporter:
    """The training loop's handle on early stopping: ``report(epoch, value)`` after every epoch returns
    whether to stop now. Backed by ``trial.report`` / ``trial.should_prune`` (shared through the storage),
    on the epochs the pruner judges (:func:`pipeline.search.study.judged`); with several objectives or
    no early stopping nothing is reported and it never stops."""

    def __init__(self, trial: optuna.Trial | None, early: EarlyStop, reported: set[int] | None = None):
        self.trial = trial
        self.early = early
        self.reported = set(reported or ())  # epochs already in the study (a resumed trial's)
        self.stopped_at: int | None = None

    def report(self, epoch: int, value: float) -> bool:
        if self.trial is None or not judged(self.early, epoch) or not math.isfinite(value):
            return False
        if epoch not in self.reported:  # an epoch redone after a resume is not reported twice
            self.trial.report(value, epoch)
            self.reported.add(epoch)
        if self.trial.should_prune():
            self.stopped_at = epoch
            return True
        return False


@dataclass
class Assignment:
    """One trial for the runner: its number, the sampled values (dotted key -> value: the run's
    overrides), the run id they resolve to, the early-stop reporter, and whether it ran before."""

    number: int
    params: dict[str, Any]
    run_id: str
    reporter: Reporter
    resumed: bool = False


class TrialRunner(Protocol):
    def resolve(self, params: dict[str, Any]) -> str:
        """The run id of the config with ``params`` set; ConfigError when the combination is invalid."""
        ...

    def existing(self, run_id: str) -> Outcome | None:
        """The outcome the run folder already holds (done, stopped, failed), None when it holds none."""
        ...

    def run(self, assignment: Assignment) -> Outcome:
        """Run (or resume) the trial's run folder to its end, calling the reporter every epoch."""
        ...

    def shared(self, run_id: str, params: dict[str, Any]) -> list[str]:
        """The shared stores (train once, compress many) the run's stages use: two trials with one in
        common do not run at once (the later one waits, then reuses the result)."""
        ...


class RunFolderRunner:
    """A runner whose runs live in ``<sweep_dir>/<run id>/``: :meth:`existing` reads the folder; the
    job's runner (phase 2) adds ``resolve`` and ``run``."""

    def __init__(self, sweep_dir: Path, objectives: list[str], constraints: Sequence[str] = ()):
        self.sweep_dir = Path(sweep_dir)
        self.objectives = objectives
        self.constraints = list(constraints)  # figures read for search.constraints

    def existing(self, run_id: str) -> Outcome | None:
        return outcome_from_run(self.sweep_dir / run_id, self.objectives, self.constraints)

    def shared(self, run_id: str, params: dict[str, Any]) -> list[str]:
        return []


# --------------------------------------------------------------------------------------------------
# Worker files: which trial each worker index holds, and whether that worker lives
# --------------------------------------------------------------------------------------------------


def workers_dir(sweep_dir: Path, study_name: str) -> Path:
    return Path(sweep_dir) / SEARCH_DIR / WORKERS_DIR / study_name


@dataclass
class Slot:
    """``<sweep>/search/workers/<study>/<worker>.json``: this process's identity and its trial."""

    path: Path
    worker: int
    record: dict[str, Any] = field(default_factory=owner.my_record)

    def hold(self, trial: int | None, run: str | None = None, shared: Sequence[str] = ()) -> None:
        """Say which trial this worker holds, the run folder it is training (None: not yet) and the
        shared stores that run uses."""
        # no fsync: after a machine crash a lost file only makes its trial an orphan, adopted by anyone
        held = {"worker": self.worker, "trial": trial, "run": run, "shared": list(shared)}
        text = json.dumps({**self.record, **held}, indent=2) + "\n"
        atomic_write_text(self.path, text, fsync=False)

    def check_free(self) -> int | None:
        """The trial this index held before (None: none); WorkerBusy when a live process holds it."""
        data, age = read_slot(self.path)
        if data and not _same_process(data, self.record) and owner.owner_alive(data, age):
            raise WorkerBusy(
                f"worker {self.worker} of this search is already running ({owner.describe(data)}; "
                f"{self.path}): not starting it twice"
            )
        trial = data.get("trial")
        return trial if isinstance(trial, int) else None


def _same_process(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("pid", "started", "host", "boot_id"))


def read_slot(path: Path) -> tuple[dict[str, Any], float]:
    """(record, seconds since its heartbeat); ({}, 0) when absent or unreadable."""
    data = read_json(path)
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return {}, 0.0
    return (data if isinstance(data, dict) else {}), age


def live_slots(folder: Path) -> list[dict[str, Any]]:
    """The records of the live workers that hold a trial."""
    out = []
    for path in sorted(folder.glob("*.json")):
        data, age = read_slot(path)
        if isinstance(data.get("trial"), int) and owner.owner_alive(data, age):
            out.append(data)
    return out


@contextlib.contextmanager
def heartbeat(path: Path, every_s: float = owner.HEARTBEAT_S) -> Iterator[None]:
    """Refresh ``path``'s time while the block runs: workers on other hosts read it as alive."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(OSError):
                os.utime(path)

    thread = threading.Thread(target=beat, name="search-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def claim_lock(sweep_dir: Path) -> Iterator[None]:
    from pipeline.search.lock import PromptSymlinkLock

    target = Path(sweep_dir) / SEARCH_DIR / CLAIMS
    target.parent.mkdir(parents=True, exist_ok=True)
    # the link's target must exist: the lock stats it (through the link) for its grace period
    target.touch(exist_ok=True)
    lock = PromptSymlinkLock(str(target))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


# --------------------------------------------------------------------------------------------------
# Counting, claiming, settling, telling
# --------------------------------------------------------------------------------------------------


@dataclass
class Claim:
    trial: FrozenTrial
    how: str  # asked | resumed | adopted
    run_id: str = ""
    invalid: str = ""  # the ConfigError of a sampled combination the schema refuses
    shared: list[str] = field(default_factory=list)  # the shared stores its run uses
    may_run: bool = False  # no live worker trains its run folder now: this one does


def _trial_id(trial: FrozenTrial | optuna.Trial) -> int:
    return trial._trial_id  # Optuna has no public way from a trial number to a Trial of another process


def _resolve(study: optuna.Study, runner: TrialRunner, claim: Claim) -> Claim:
    """The run id of the claimed trial, recorded on it (ConfigError: the combination is invalid)."""
    known = claim.trial.user_attrs.get(ATTR_RUN)
    if isinstance(known, str):
        claim.run_id = known
    else:
        try:
            claim.run_id = runner.resolve(dict(claim.trial.params))
        except ConfigError as e:
            claim.invalid = str(e)
            return claim
        study._storage.set_trial_user_attr(_trial_id(claim.trial), ATTR_RUN, claim.run_id)
    claim.shared = runner.shared(claim.run_id, dict(claim.trial.params))
    return claim


def claim_next(study: optuna.Study, spec: SearchSpec, sweep_dir: Path, slot: Slot, runner: TrialRunner) -> Claim | None:
    """Under the claim lock: this worker's own unfinished trial, else an orphan, else a new trial, else
    None (the study has its trials, or ``max_failed`` trials failed)."""
    with claim_lock(sweep_dir):
        trials = study.get_trials(deepcopy=False)
        by_number = {t.number: t for t in trials}
        claim = None
        mine = slot.check_free()
        if mine is not None and mine in by_number and by_number[mine].state == TrialState.RUNNING:
            claim = Claim(by_number[mine], "resumed")
        if claim is None:
            held = {data["trial"] for data in live_slots(slot.path.parent)}
            orphans = [t for t in trials if t.state == TrialState.RUNNING and t.number not in held]
            if orphans:
                claim = Claim(orphans[0], "adopted")
        if claim is None:
            counts = count(trials)
            full = counts.ended + counts.running >= spec.trials or counts.failed >= spec.failure_limit
            if full and not counts.waiting:
                slot.hold(None)
                return None
            trial = ask(study, spec, slot.worker)  # an enqueued trial first (Optuna pops it), else sampled
            claim = Claim(study._storage.get_trial(_trial_id(trial)), "asked")
        slot.hold(claim.trial.number)  # which worker holds which trial: the worker files, not the study
        claim = _resolve(study, runner, claim)
        claim.may_run = not claim.invalid and _take_run(slot, claim)
        return claim


def _take_run(slot: Slot, claim: Claim) -> bool:
    """Under the claim lock: unless another live worker trains the claim's run folder now (a twin: a
    trial that sampled the same config) or a shared stage it uses (a trial of the same training), note
    in this worker's file that this one does."""
    studies = slot.path.parent.parent  # every study of the sweep: their trials may share a training too
    for data in [d for folder in sorted(studies.iterdir()) if folder.is_dir() for d in live_slots(folder)]:
        if _same_process(data, slot.record):
            continue
        if data.get("run") == claim.run_id or set(data.get("shared") or ()) & set(claim.shared):
            return False
    slot.hold(claim.trial.number, claim.run_id, claim.shared)
    return True


def settle(
    study: optuna.Study,
    spec: SearchSpec,
    sweep_dir: Path,
    claim: Claim,
    runner: TrialRunner,
    slot: Slot,
    poll_s: float = POLL_S,
) -> Outcome:
    """The claimed trial's outcome: refused config, a result already in the run folder, the result of an
    earlier trial of the same run (waited for), or the runner's."""
    if claim.invalid:
        return Outcome.failed(f"the sampled config is invalid: {claim.invalid}")
    while True:
        found = runner.existing(claim.run_id)
        if found is not None:
            return _copy(study, claim, found)
        if claim.may_run:
            break
        log.info(
            "trial %d: run %s (or its shared training) is being trained by another trial; waiting for it",
            claim.trial.number,
            claim.run_id,
        )
        time.sleep(poll_s)
        with claim_lock(sweep_dir):
            claim.may_run = _take_run(slot, claim)  # its worker died: train it here
    trial = optuna.Trial(study, _trial_id(claim.trial))
    single = len(study.directions) == 1
    reporter = Reporter(trial if single else None, spec.early_stop, set(claim.trial.intermediate_values))
    params = dict(claim.trial.params)
    return runner.run(Assignment(claim.trial.number, params, claim.run_id, reporter, claim.how != "asked"))


def _copy(study: optuna.Study, claim: Claim, found: Outcome) -> Outcome:
    """A result read from the run folder, for a trial that did not train it: note the trial that did,
    and give a stopped trial that trial's epoch values (Optuna ranks stopped trials by them)."""
    first = next(
        (
            t
            for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get(ATTR_RUN) == claim.run_id
            and t.number != claim.trial.number
            and t.state.is_finished()
            and ATTR_SAME_AS not in t.user_attrs
        ),
        None,
    )
    if first is not None:
        study._storage.set_trial_user_attr(_trial_id(claim.trial), ATTR_SAME_AS, first.number)
        if found.status == "stopped" and len(study.directions) == 1:
            trial = optuna.Trial(study, _trial_id(claim.trial))
            for step, value in first.intermediate_values.items():
                if step not in claim.trial.intermediate_values:
                    trial.report(value, step)
    return found


def constrain(study: optuna.Study, claim: Claim, outcome: Outcome, constraints: Mapping[str, Bound]) -> Outcome:
    """Before tell: the constraints' figures as a user attribute (the tables' columns) and each bound's
    violation through ``Trial.set_constraint`` (the system attributes Optuna 5's samplers, best trial and
    Pareto front read: a violating trial finishes but is infeasible). A figure not recorded fails it."""
    if outcome.status != "done" or not constraints:
        return outcome
    missing = [n for n in constraints if not math.isfinite(outcome.figures.get(n, math.nan))]
    if missing:
        return Outcome.failed(f"constraint figure(s) {', '.join(missing)} not recorded as finite numbers")
    trial = optuna.Trial(study, _trial_id(claim.trial))
    study._storage.set_trial_user_attr(_trial_id(claim.trial), ATTR_FIGURES, dict(outcome.figures))
    done = set(
        study._storage.get_trial(_trial_id(claim.trial)).constraints
    )  # a resumed tell: Optuna keeps the first value of each
    for name, bound in constraints.items():
        for key, value in bound.violations(name, outcome.figures[name]).items():
            if key not in done:
                trial.set_constraint(key, value)
    return outcome


def feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def tell(study: optuna.Study, claim: Claim, outcome: Outcome, constraints: Mapping[str, Bound] | None = None) -> str:
    """Record the outcome in the study; returns the trial's final state name."""
    number = claim.trial.number
    outcome = constrain(study, claim, outcome, constraints or {})
    if outcome.status == "done" and not (
        outcome.values is not None
        and len(outcome.values) == len(study.directions)
        and all(math.isfinite(v) for v in outcome.values)
    ):
        outcome = Outcome.failed(f"objective values {outcome.values} are not one finite number per objective")
    if outcome.status == "done":
        assert outcome.values is not None
        study.tell(number, list(outcome.values), skip_if_finished=True)
    elif outcome.status == "stopped":
        study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
    else:
        study._storage.set_trial_user_attr(_trial_id(claim.trial), ATTR_FAILURE, outcome.reason[:2000])
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    return study._storage.get_trial(_trial_id(claim.trial)).state.name


@dataclass
class WorkerSummary:
    worker: int
    trials: list[tuple[int, str, str]] = field(default_factory=list)  # (number, how claimed, final state)
    counts: Counts = field(default_factory=Counts)


def run_worker(
    spec: SearchSpec,
    sweep_dir: Path,
    worker: int,
    runner: TrialRunner,
    *,
    study_name: str = DEFAULT_STUDY,
    max_epochs: int | None = None,
    poll_s: float = POLL_S,
) -> WorkerSummary:
    """Claim, run and tell trials until there is nothing left for this worker (see the module's text)."""
    study = open_study(spec, Path(sweep_dir), study_name, max_epochs=max_epochs)
    folder = workers_dir(sweep_dir, study_name)
    slot = Slot(folder / f"{worker}.json", worker)
    summary = WorkerSummary(worker)
    with heartbeat(slot.path):
        while (claim := claim_next(study, spec, Path(sweep_dir), slot, runner)) is not None:
            log.info("worker %d: trial %d (%s) %s", worker, claim.trial.number, claim.how, dict(claim.trial.params))
            outcome = settle(study, spec, Path(sweep_dir), claim, runner, slot, poll_s)
            state = tell(study, claim, outcome, spec.constraints)
            summary.trials.append((claim.trial.number, claim.how, state))
            log.info(
                "worker %d: trial %d %s %s", worker, claim.trial.number, state, outcome.reason or outcome.values or ""
            )
    summary.counts = count(study.get_trials(deepcopy=False))
    return summary

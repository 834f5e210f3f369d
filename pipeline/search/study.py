"""The study of a search: its storage, sampler and pruner, and the configs a dry run shows.

Storage: by default Optuna's journal file ``<sweep>/search/journal.log`` (JournalFileBackend), made for
NFS where ``fcntl`` locks fail. Its lock is Optuna's symlink lock (:mod:`pipeline.search.lock`, which
waits less between tries): ``symlink()`` is atomic on every NFS version, where the ``O_EXCL`` create of
:class:`JournalFileOpenLock` is atomic only from NFSv3 on. A holder that dies is broken after its grace
period (30 s in which the journal did not change). ``search.storage`` may name a database URL instead
(RDBStorage); one that does not answer raises :class:`StorageUnreachable` (the commands exit 3: try
again later).

Sampling and seeds: a sampler is made afresh before each ``ask``, seeded from the search's seed, the
worker's index and the number of trials the study has then. With one worker that sequence is fixed, so
the same seed gives the same configs (random, and TPE given the same results). With several workers,
which worker asks when depends on timing, and TPE sees whichever trials have ended by then: the configs
differ from run to run, though no two workers draw from the same random stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from pipeline.config import ConfigError
from pipeline.search.journal import JournalCorrupt, check_journal
from pipeline.search.spec import ENV_VAR, Choice, EarlyStop, Range, SearchSpec, check_not_sqlite

SEARCH_DIR = "search"
JOURNAL = "journal.log"
DEFAULT_STUDY = "search"
CONNECT_TIMEOUT_S = 10  # a database that does not answer within this is unreachable
PREVIEW_TRIALS = 5  # configs a dry run shows

optuna.logging.set_verbosity(optuna.logging.WARNING)  # no INFO line per trial in job logs


class StorageUnreachable(Exception):
    """The storage URL's server did not answer: nothing is wrong with the input, try again later."""


EXIT_STORAGE_DOWN = 3  # as pipeline.sweep.EXIT_SLURM_DOWN: nothing is wrong with the input, try again later


@contextlib.contextmanager
def exit_on_storage_down() -> Iterator[None]:
    """For the commands: StorageUnreachable printed in red on stderr, exit code 3 (nothing submitted)."""
    try:
        yield
    except StorageUnreachable as e:
        from rich.markup import escape

        from pipeline import console as cli

        cli.console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        sys.exit(EXIT_STORAGE_DOWN)


class NoStudy(LookupError):
    """The search has not started: no journal file, or no study of that name in the storage."""


def journal_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / SEARCH_DIR / JOURNAL


def directions(spec: SearchSpec) -> list[StudyDirection]:
    return [StudyDirection.MAXIMIZE if d == "max" else StudyDirection.MINIMIZE for d in spec.objective.values()]


# --------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------


def open_storage(spec: SearchSpec, sweep_dir: Path, *, write: bool = True) -> BaseStorage:
    """The journal file (created with its folder when ``write``) or the database of ``spec.storage``.
    A writer moves a cut last journal record aside first (:mod:`pipeline.search.journal`)."""
    if spec.storage is not None:
        return _database(spec.storage, spec.source)
    path = journal_path(sweep_dir)
    if not write and not path.exists():  # a reader creates nothing (Optuna's backend would: an empty file)
        raise NoStudy(f"{path} does not exist: the search has not started")
    check_journal(path, repair=write)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend

    from pipeline.search.lock import PromptSymlinkLock

    backend = JournalFileBackend(str(path), lock_obj=PromptSymlinkLock(str(path)))
    try:
        return optuna.storages.JournalStorage(backend)
    except (ValueError, KeyError, TypeError, AssertionError) as e:  # a record check_journal let through
        raise JournalCorrupt(path, f"Optuna cannot replay it ({type(e).__name__}: {e})") from None


def masked(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


_REFUSALS = ("password authentication failed", "does not exist", "access denied", "permission denied")


def _refused_by_server(orig: Any, reason: str) -> bool:
    """A server that answered and said no (wrong password, unknown database): bad input, exit 2, not
    "try again later". MySQL/MariaDB codes below 2000 come from the server, 2000-2999 from the client
    (cannot connect, lost connection); other drivers are judged by their message."""
    code = orig.args[0] if orig is not None and orig.args and isinstance(orig.args[0], int) else None
    if code is not None:
        return code < 2000
    return any(word in reason.lower() for word in _REFUSALS)


def expand_storage(url: str, source: str, environ: Mapping[str, str] | None = None) -> str:
    """``url`` with each ``$NAME`` or ``${NAME}`` replaced by that environment variable, read where the
    storage is opened (the login node, then each worker: Slurm passes the submitting environment on), so
    that a password need not be written in the sweep file or in the sweep folder's copy of it. A value in
    the user and password part is percent-encoded (a password may hold ``@``, ``/`` or ``:``); elsewhere
    it goes in as it is (``storage: $OPTUNA_STORAGE`` names a whole URL). ConfigError names an unset one."""
    env = os.environ if environ is None else environ
    scheme_end = url.find("://") + 3
    path_start = url.find("/", scheme_end)
    host_end = path_start if path_start >= 0 else len(url)
    userinfo_end = url.rfind("@", scheme_end, host_end)

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in env:
            raise ConfigError(
                source,
                f"names ${name}, which is not set in this environment: export it before submitting (Slurm "
                "passes the submitting environment to the jobs), or write the value in the URL",
                key="search.storage",
            )
        return urllib.parse.quote(env[name], safe="") if m.start() < userinfo_end else env[name]

    return ENV_VAR.sub(value, url)


def _database(url: str, source: str) -> BaseStorage:
    import sqlalchemy.exc

    url = expand_storage(url, source)
    check_not_sqlite(url, source)  # (a URL read from a variable is checked here)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith(("mysql", "mariadb", "postgresql")):
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.TimeoutError) as e:
        orig = getattr(e, "orig", None)  # the driver's error: (code, message) for MySQL
        reason = str(orig.args[-1] if orig is not None and orig.args else e).splitlines()[0]
        if _refused_by_server(orig, reason):
            raise ConfigError(source, f"{masked(url)} answered but refused: {reason}", key="search.storage") from None
        raise StorageUnreachable(
            f"the search storage {masked(url)} does not answer ({reason}): try again later"
        ) from None
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ImportError) as e:
        hint = " (mysql+pymysql:// needs PyMySQL: pip install 'pipeline[mysql]')" if isinstance(e, ImportError) else ""
        raise ConfigError(source, f"cannot use {masked(url)}: {e}{hint}", key="search.storage") from None


# --------------------------------------------------------------------------------------------------
# Sampler, pruner, search space
# --------------------------------------------------------------------------------------------------


def derived_seed(seed: int, worker: int, n_trials: int) -> int:
    """A 32-bit seed for the sampler a worker makes before asking, when the study has ``n_trials``."""
    digest = hashlib.sha256(f"{seed}/{worker}/{n_trials}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def make_sampler(spec: SearchSpec, seed: int) -> BaseSampler:
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.method == "tpe":
        # constant_liar: a running trial counts as a poor result, so parallel workers spread out
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    # NSGA-II's first generation is random: a population of a quarter of the trials (4..50) leaves
    # generations to evolve in a small study
    population = max(4, min(50, spec.trials // 4))
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)


def make_pruner(early: EarlyStop, max_epochs: int | None = None) -> BasePruner:
    """The pruner of ``early_stop``; ``max_epochs`` (train.epochs) bounds Hyperband's brackets."""
    if early.method == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=early.startup_trials, n_warmup_steps=early.min_epochs)
    if early.method == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=early.min_epochs, reduction_factor=early.reduction)
    if early.method == "hyperband":
        top = early.max_epochs or max_epochs
        return optuna.pruners.HyperbandPruner(
            min_resource=early.min_epochs, max_resource=top if top else "auto", reduction_factor=early.reduction
        )
    return optuna.pruners.NopPruner()


def judged(early: EarlyStop, epoch: int) -> bool:
    """Whether the pruner looks at ``epoch`` (1-based): the reporter writes a value to the storage only
    then (every write is a locked, fsynced journal append; the run folder keeps every epoch anyway).
    Median: every epoch from min_epochs on. ASHA and Hyperband: the rungs, min_epochs x reduction^k
    (Hyperband's brackets start at successive rungs of the same ladder)."""
    if early.method == "median":
        return epoch >= early.min_epochs
    if early.method in ("asha", "hyperband"):
        rung = early.min_epochs
        while rung < epoch:
            rung *= early.reduction
        return rung == epoch
    return False


def distributions(spec: SearchSpec) -> dict[str, BaseDistribution]:
    out: dict[str, BaseDistribution] = {}
    for key, p in spec.params.items():
        if isinstance(p, Choice):
            out[key] = CategoricalDistribution(p.values)
        elif isinstance(p, Range) and p.integer:
            out[key] = IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[key] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    return out


# --------------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------------


def open_study(
    spec: SearchSpec,
    sweep_dir: Path,
    name: str = DEFAULT_STUDY,
    *,
    max_epochs: int | None = None,
    create: bool = True,
    storage: BaseStorage | None = None,
) -> optuna.Study:
    """The study ``name`` of the sweep, created on first use (``create``), else loaded (NoStudy when
    absent). Raises StorageUnreachable, JournalCorrupt, or ConfigError for a bad storage URL and for a
    sweep file whose objectives or search space differ from the study's (``trials``, ``workers``,
    ``early_stop`` and ``seed`` may change between submissions: more trials extend the search)."""
    storage = storage or open_storage(spec, sweep_dir, write=create)
    sampler = make_sampler(spec, derived_seed(spec.seed, 0, 0))
    pruner = make_pruner(spec.early_stop, max_epochs)
    if not create:
        try:
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        except KeyError:
            raise NoStudy(f"no study {name!r} in {_where(spec, sweep_dir)}: the search has not started") from None
    else:
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            directions=directions(spec),
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    _check_same_search(study, spec, sweep_dir, write=create)
    return study


SPACE_ATTR = "pipeline.search"  # the study's user attribute: its objectives and search space


def space_record(spec: SearchSpec) -> dict[str, Any]:
    """What a study is fixed to: its objectives and its parameters (JSON)."""
    params = {k: dataclasses.asdict(p) if isinstance(p, Range) else list(p.values) for k, p in spec.params.items()}
    constraints = {k: dataclasses.asdict(b) for k, b in spec.constraints.items()}
    return {"objective": dict(spec.objective), "params": params, "constraints": constraints}


def _where(spec: SearchSpec, sweep_dir: Path) -> str:
    return masked(spec.storage) if spec.storage else str(journal_path(sweep_dir))


def _check_same_search(study: optuna.Study, spec: SearchSpec, sweep_dir: Path, write: bool) -> None:
    """A started study keeps its objectives and space: trials told under others would be compared with
    them (and Optuna refuses a parameter whose range changed only when a trial sets it)."""
    mine = space_record(spec)
    theirs = study.user_attrs.get(SPACE_ATTR)
    if theirs is None:
        if write:
            study.set_user_attr(SPACE_ATTR, mine)
        return
    for key in ("objective", "params", "constraints"):
        if json.dumps(theirs.get(key, {}), sort_keys=True) != json.dumps(mine[key], sort_keys=True):
            raise ConfigError(
                spec.source,
                f"differs from the {key} of the study this search started with in {_where(spec, sweep_dir)} "
                f"({json.dumps(theirs.get(key))}): a started search keeps its objectives and space. Undo the "
                "change, or give the sweep a new name to start another search.",
                key=f"search.{key}",
            )


def ask(study: optuna.Study, spec: SearchSpec, worker: int) -> optuna.Trial:
    """A new trial with every parameter sampled, by a sampler seeded for this worker and this moment."""
    study.sampler = make_sampler(spec, derived_seed(spec.seed, worker, len(study.get_trials(deepcopy=False))))
    return study.ask(fixed_distributions=distributions(spec))


def preview_limit(spec: SearchSpec) -> int:
    """How many first configs a dry run can know without results: all for random; TPE's random
    start-up trials (10); NSGA-II's first generation."""
    if spec.method == "random":
        return PREVIEW_TRIALS
    startup = 10 if spec.method == "tpe" else max(4, min(50, spec.trials // 4))
    return min(PREVIEW_TRIALS, startup)


def preview(spec: SearchSpec, n: int | None = None) -> list[dict[str, Any]]:
    """The first configs a single worker would sample (``--dry-run``), from a study in memory: nothing
    is written. Exact for the first :func:`preview_limit` trials, which need no results."""
    n = min(spec.trials, preview_limit(spec) if n is None else n)
    study = optuna.create_study(directions=directions(spec), sampler=make_sampler(spec, 0))
    return [dict(ask(study, spec, 0).params) for _ in range(n)]


@dataclass(frozen=True)
class Counts:
    done: int = 0
    stopped: int = 0
    running: int = 0
    failed: int = 0
    waiting: int = 0  # enqueued (``--rerun failed``): served by the next asks, beyond ``trials``

    @property
    def ended(self) -> int:
        """Trials that count toward ``trials``: finished or stopped early."""
        return self.done + self.stopped


def count(trials: list[FrozenTrial]) -> Counts:
    states = [t.state for t in trials]
    return Counts(
        done=states.count(TrialState.COMPLETE),
        stopped=states.count(TrialState.PRUNED),
        running=states.count(TrialState.RUNNING),
        failed=states.count(TrialState.FAIL),
        waiting=states.count(TrialState.WAITING),
    )


@dataclass(frozen=True)
class Progress:
    """Where a study stands, for ``status``: its counts, the trials not yet started, and the best trial
    so far (the Pareto front with several objectives), each naming its run in ``user_attrs["run_id"]``."""

    counts: Counts
    to_go: int
    best: list[FrozenTrial]


def progress(study: optuna.Study, spec: SearchSpec) -> Progress:
    trials = study.get_trials(deepcopy=False)
    counts = count(trials)
    best = study.best_trials if counts.done else []
    return Progress(counts, max(0, spec.trials - counts.ended - counts.running), best)

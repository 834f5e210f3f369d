"""Submission through submitit: the one module that submits with it (imported lazily). Torch-free. The
function a job runs is handed in (:func:`submit`'s ``job`` and ``job_many``); nothing here imports it.

- slurm: one job array per distinct set of Slurm resources, throttled by ``slurm.array_parallelism``;
  each array task runs ``job`` on one run folder. A set larger than the cluster's
  MaxArraySize goes out as several arrays of at most that many tasks (never one sbatch per run).
- local: ``--parallel`` submitit local jobs, each running ``job_many`` on its share of the runs (one after another), so a
  CPU machine trains one network at a time by default. The jobs outlive this process.
- debug: submitit's in-process executor (breakpoints work); runs execute when waited for.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from pipeline.jobs import slurm
from pipeline.jobs.manifest import comment_of
from pipeline.jobs.procs import ProcessIdentity
from pipeline.rundir import RunDir

if TYPE_CHECKING:
    from rich.console import Console


LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # local jobs run until done; submitit's default would kill them at 2 min
DEFAULT_MAX_ARRAY_SIZE = 1000  # when scontrol cannot tell (Slurm's own default is 1001)
MAX_ARRAY_SIZE_ENV = "PIPELINE_MAX_ARRAY_SIZE"  # forces the array size limit (tests; unreadable configs)


def resolve_cluster(name: str) -> str:
    if name == "auto":
        return "slurm" if slurm.controller_answers() else "local"
    return name


def signal_delay_s(time_min: int) -> int:
    """Seconds before the time limit at which Slurm signals the job to checkpoint.

    slurmctld checks limits about every 30 s and signals once now + delay + ~30 s passes the end, so a
    delay of 30 s or more on a 1-minute job signals it before Python is up (FACTS.md). Take a tenth of
    the limit, at least 10 s and at most 120 s.
    """
    return int(min(120, max(10, time_min * 60 // 10)))


def slurm_parameters(slurm: dict[str, Any], name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters from a config's ``slurm`` section."""
    p: dict[str, Any] = {
        "name": f"pipeline-{name}",
        "timeout_min": int(slurm["time_min"]),
        "nodes": int(slurm["nodes"]),
        "tasks_per_node": int(slurm["tasks_per_node"]),
        "cpus_per_task": int(slurm["cpus_per_task"]),
        "mem_gb": float(slurm["mem_gb"]),
        "array_parallelism": int(slurm["array_parallelism"]),
        "signal_delay_s": signal_delay_s(int(slurm["time_min"])),
        "stderr_to_stdout": True,
    }
    for key in ("partition", "account", "qos", "constraint"):
        if slurm[key]:
            p[key] = str(slurm[key])
    gpus = int(slurm["gpus_per_node"])
    if gpus and slurm["gpu_type"]:
        p["gres"] = f"gpu:{slurm['gpu_type']}:{gpus}"
    elif gpus:
        p["gpus_per_node"] = gpus
    if slurm["setup"]:
        p["setup"] = list(slurm["setup"])
    return p


def _slurm_section(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """A config's ``slurm`` section as a plain dict (configs come as DictConfigs or plain nested dicts)."""
    section = cfg["slurm"]
    out = OmegaConf.to_container(section) if isinstance(section, DictConfig) else dict(section)
    assert isinstance(out, dict)
    return {str(k): v for k, v in out.items()}


def _groups(cfgs: Sequence[DictConfig | Mapping[str, Any]], name: str) -> list[tuple[dict[str, Any], list[int]]]:
    """Runs with identical Slurm resources go into one array."""
    groups: dict[str, tuple[dict[str, Any], list[int]]] = {}
    for i, cfg in enumerate(cfgs):
        params = slurm_parameters(_slurm_section(cfg), name)
        key = repr(sorted(params.items()))
        groups.setdefault(key, (params, []))[1].append(i)
    return list(groups.values())


@functools.lru_cache(maxsize=1)
def max_array_size() -> int:
    """The most tasks one job array may have: ``MaxArraySize`` of ``scontrol show config`` (indices run
    0..MaxArraySize-1), read once; $PIPELINE_MAX_ARRAY_SIZE wins; 1000 when neither can be read."""
    forced = os.environ.get(MAX_ARRAY_SIZE_ENV, "").strip()
    if forced.isdigit():
        return max(1, int(forced))
    found = slurm.max_array_size()
    return max(1, found) if found is not None else DEFAULT_MAX_ARRAY_SIZE


def split_arrays(indices: Sequence[int], max_size: int) -> list[list[int]]:
    """``indices`` in order, cut into as few arrays of at most ``max_size`` as possible, of near-equal
    sizes (so their throttles, which share ``array_parallelism``, stay busy alike)."""
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    n = len(indices)
    k = max(1, -(-n // max_size))
    bounds = [n * i // k for i in range(k + 1)]
    return [list(indices[bounds[i] : bounds[i + 1]]) for i in range(k) if bounds[i] < bounds[i + 1]]


def _arrays(
    cfgs: Sequence[DictConfig | Mapping[str, Any]], name: str, max_size: int | None
) -> list[tuple[dict[str, Any], list[int]]]:
    """(:func:`slurm_parameters`, run indices) per array to submit: one group of runs with the same
    resources per array, cut by ``max_size`` (default: the cluster's MaxArraySize)."""
    max_size = max_array_size() if max_size is None else max_size
    out = []
    for params, idx in _groups(cfgs, name):
        chunks = split_arrays(idx, max_size)
        for chunk in chunks:
            p = dict(params)
            # array_parallelism is the cap for the whole set of runs: share it out between its arrays
            p["array_parallelism"] = max(1, params["array_parallelism"] // len(chunks))
            out.append((p, chunk))
    return out


def _executor_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """SlurmExecutor's own names and units for :func:`slurm_parameters`' (generic) ones."""
    import submitit
    from submitit.slurm.slurm import _convert_mem

    renamed = submitit.SlurmExecutor._equivalence_dict() or {}
    out: dict[str, Any] = {str(renamed.get(k, k)): v for k, v in params.items()}
    if "mem" in out:
        out["mem"] = _convert_mem(out["mem"])
    return out


def sbatch_headers(
    sweep_dir: Path, cfgs: Sequence[DictConfig | Mapping[str, Any]], name: str, max_size: int | None = None
) -> list[str]:
    """The #SBATCH lines that submission would use, one text per array; writes nothing."""
    from submitit.slurm.slurm import _make_sbatch_string

    out = []
    for params, idx in _arrays(cfgs, name, max_size):
        text = _make_sbatch_string(
            command="<python -u -m submitit.core._submit ...>",
            folder=str(sweep_dir / "logs" / "%j"),
            map_count=len(idx),
            **_executor_parameters(params),
        )
        out.append("\n".join(line for line in text.splitlines() if line.startswith("#SBATCH")))
    return out


@dataclass
class Rejected:
    """Runs whose array was not submitted, and why (sbatch's own words)."""

    run_ids: list[str]
    reason: str
    unreachable: bool = False  # the controller did not answer (rather than refusing the request)
    token: str | None = None  # the token given to on_submitting, if the array got that far


@dataclass
class Submission:
    cluster: str
    job_ids: dict[str, str] = field(default_factory=dict)  # run id -> job id
    # job id -> what identifies the job beyond its id, for the manifest (local jobs: see local_job_record)
    job_records: dict[str, dict[str, Any]] = field(default_factory=dict)
    jobs: list[tuple[list[RunDir], Any]] = field(default_factory=list)  # (runs, submitit job)
    rejected: list[Rejected] = field(default_factory=list)  # arrays sbatch did not take
    # runs of the sweep that jobs of an earlier submission still run (not submitted again): wait() waits
    # for them too
    elsewhere: list[RunDir] = field(default_factory=list)


def _sbatch_error(e: BaseException) -> str:
    """sbatch's message from submitit's error (its stderr), on one line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:500]


def visible_gpu_count() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return len([d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in r.stdout.splitlines() if line.startswith("GPU "))


def submit(
    runs: Sequence[RunDir],
    cfgs: Sequence[DictConfig | Mapping[str, Any]],
    *,
    cluster: str,
    sweep_dir: Path,
    name: str,
    job: Callable[[str], Any],
    job_many: Callable[[list[str]], Any],
    parallel: int = 1,
    max_size: int | None = None,
    after: Mapping[int, int | str] | None = None,
    on_submitting: Callable[[str, list[str]], Any] | None = None,
    on_submitted: Callable[[dict[str, str], str | None, dict[str, dict[str, Any]]], None] | None = None,
) -> Submission:
    """Submit one run folder per config (DictConfig or plain nested dict); ``max_size`` overrides the
    cluster's MaxArraySize. A Slurm array task runs ``job(run folder)``; a local or debug job runs
    ``job_many(run folders)``, its share of the runs one after another (the job reads them by the
    module path of these functions: they must be importable where the job runs).

    ``on_submitting(token, run ids)`` is called before each sbatch, whose array carries the comment
    ``pipeline.jobs.manifest.comment_of(token)``; ``on_submitted(run id -> job id, token, job records)`` as soon as each
    array (or local job, token None) is queued, before the next one is submitted, so that a kill midway
    leaves a record of what is queued. An array that sbatch refuses is listed in
    ``Submission.rejected`` (with its token) and the others are still submitted; once the
    controller stops answering, the remaining arrays are not tried (each would wait for sbatch's own
    timeouts) and are listed as unreachable.

    ``after`` maps the index of a run that must wait for a shared training to the index of the run that
    trains it in this submission, or to the job id of an earlier submission's owner ("" when not known
    yet: on Slurm such runs are not submitted). On Slurm such runs
    go out after the others, one array per owner, with ``--dependency=afterok:<job>_<task>`` (so each
    starts when its own training ends) and ``--kill-on-invalid-dep=yes`` (a failed training cancels its
    followers instead of leaving them queued forever). Locally they go after the others in every slot
    and wait for the owner's record when they get there (:func:`pipeline.share.wait_for_owner`)."""
    sub = Submission(cluster)
    if not runs:
        return sub
    after = dict(after or {})
    log_folder = sweep_dir / "logs" / "%j"
    if cluster == "slurm":
        arrays = _SlurmArrays(sub, runs, cfgs, name, max_size, log_folder, job, on_submitting, on_submitted)
        for wave, waits_for in _waves(len(runs), after):
            arrays.submit_wave(wave, waits_for)
        return sub
    executor = _slot_executor(cluster, log_folder)
    slots = min(parallel, len(runs))
    order = _slot_order(len(runs), after)
    for s in range(slots):
        _submit_slot(sub, executor, [runs[i] for i in order[s::slots]], job_many, sweep_dir, on_submitted)
    return sub


def _waves(n: int, after: Mapping[int, int | str]) -> list[tuple[list[int], int | str | None]]:
    """Run indices in the order Slurm gets them: first every run that waits for no one, then one wave per
    owner (an index of this submission, or an earlier submission's job id) with the runs that wait for it."""
    waves: list[tuple[list[int], int | str | None]] = [([i for i in range(n) if i not in after], None)]
    by_owner: dict[int | str, list[int]] = {}
    for i, owner in after.items():
        by_owner.setdefault(owner, []).append(i)
    waves.extend((sorted(idx), owner) for owner, idx in by_owner.items())
    return [(wave, owner) for wave, owner in waves if wave]


@dataclass
class _SlurmArrays:
    """Submits the waves of :func:`submit` on Slurm, one array per set of resources, recording into
    ``sub`` what was queued and what was refused; once the controller stops answering, the rest is not tried."""

    sub: Submission
    runs: Sequence[RunDir]
    cfgs: Sequence[DictConfig | Mapping[str, Any]]
    name: str
    max_size: int | None
    log_folder: Path
    job: Callable[[str], Any]
    on_submitting: Callable[[str, list[str]], Any] | None
    on_submitted: Callable[[dict[str, str], str | None, dict[str, dict[str, Any]]], None] | None
    unreachable: str | None = None  # why the remaining arrays are not tried

    def submit_wave(self, wave: list[int], waits_for: int | str | None) -> None:
        depend: str | None = None
        if waits_for is not None:
            owner_job = self._owner_job(waits_for)
            if not owner_job:  # its owner was refused (or not queued yet): it would start and train on its own
                owner = self.runs[waits_for].id if isinstance(waits_for, int) else "of another submission"
                reason = f"not tried: the run whose training they share ({owner}) was not submitted"
                self.sub.rejected.append(Rejected(self._ids(wave), reason, unreachable=self.unreachable is not None))
                return
            depend = f"afterok:{owner_job}"
        for params, chunk in _arrays([self.cfgs[i] for i in wave], self.name, self.max_size):
            self._submit_array(params, [wave[j] for j in chunk], depend)

    def _owner_job(self, waits_for: int | str) -> str | None:
        if isinstance(waits_for, int):
            return self.sub.job_ids.get(self.runs[waits_for].id)
        return waits_for

    def _ids(self, idx: Sequence[int]) -> list[str]:
        return [self.runs[i].id for i in idx]

    def _submit_array(self, params: dict[str, Any], idx: list[int], depend: str | None) -> None:
        import submitit
        from submitit.core.utils import FailedJobError

        run_ids = self._ids(idx)
        if self.unreachable is not None:
            self.sub.rejected.append(Rejected(run_ids, f"not tried: {self.unreachable}", unreachable=True))
            return
        max_requeues = int(_slurm_section(self.cfgs[idx[0]])["max_requeues"])
        executor = submitit.SlurmExecutor(folder=self.log_folder, max_num_timeout=max_requeues)
        token = uuid.uuid4().hex[:16]
        # a follower starts when its own training ends; a failed training cancels it (else it would
        # stay queued forever, DependencyNeverSatisfied) and the files show it as blocked
        extra = {"additional_parameters": {"dependency": depend, "kill_on_invalid_dep": "yes"}} if depend else {}
        executor.update_parameters(**_executor_parameters(params), comment=comment_of(token), **extra)
        if self.on_submitting is not None:
            self.on_submitting(token, run_ids)
        try:
            jobs = executor.map_array(self.job, [str(self.runs[i].path) for i in idx])
        except (FailedJobError, OSError) as e:
            # refused, or no answer at all? Asking the controller tells them apart.
            down = not slurm.controller_answers()
            self.sub.rejected.append(Rejected(run_ids, _sbatch_error(e), unreachable=down, token=token))
            if down:
                self.unreachable = "the Slurm controller does not answer (scontrol ping)"
            return
        queued = {self.runs[i].id: task.job_id for i, task in zip(idx, jobs)}
        if self.on_submitted is not None:
            self.on_submitted(queued, token, {})
        self.sub.job_ids.update(queued)
        self.sub.jobs.extend(([self.runs[i]], task) for i, task in zip(idx, jobs))


def _slot_executor(cluster: str, log_folder: Path) -> Any:
    """submitit's executor for local or debug slots."""
    import submitit

    if cluster == "local":
        executor = submitit.LocalExecutor(folder=log_folder)
        executor.update_parameters(
            timeout_min=LOCAL_TIMEOUT_MIN, gpus_per_node=visible_gpu_count(), stderr_to_stdout=True
        )
        return executor
    if cluster == "debug":
        return submitit.DebugExecutor(folder=log_folder)
    raise ValueError(f"unknown cluster {cluster!r}; allowed: slurm, local, debug")


def _slot_order(n: int, after: Mapping[int, int | str]) -> list[int]:
    """Every slot runs the runs that train (or need no one) before those that wait for a training."""
    return [i for i in range(n) if i not in after] + [i for i in range(n) if i in after]


def _submit_slot(
    sub: Submission,
    executor: Any,
    share: list[RunDir],
    job_many: Callable[[list[str]], Any],
    sweep_dir: Path,
    on_submitted: Callable[[dict[str, str], str | None, dict[str, dict[str, Any]]], None] | None,
) -> None:
    """One local or debug job running ``share`` one after another; recorded into ``sub``."""
    paths = [str(r.path) for r in share]
    if sub.cluster == "local":
        with detached_local_jobs(sweep_dir / "logs" / "local-controllers.err"):
            slot_job = executor.submit(job_many, paths)
        sub.job_records[str(slot_job.job_id)] = local_job_record(slot_job)
    else:
        slot_job = executor.submit(job_many, paths)
    queued = {r.id: str(slot_job.job_id) for r in share}
    if on_submitted is not None:
        on_submitted(queued, None, sub.job_records)
    sub.job_ids.update(queued)
    sub.jobs.append((share, slot_job))


class _DetachedPopen:
    """Stands in for the ``subprocess`` module inside submitit's local executor: the job controller it
    starts gets its own session and no terminal. Otherwise the controller inherits this command's stdout
    (``sweep ... | tee`` or a captured pipe would stay open until every job ends) and its process group
    (Ctrl-C on ``--wait``, or the SIGHUP of a closed login session, would kill the jobs). Its own
    messages go to ``err``; each training's output goes to submitit's job logs as before."""

    def __init__(self, err: Path) -> None:
        self._err = err

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    def Popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802 (subprocess's name)
        self._err.parent.mkdir(parents=True, exist_ok=True)
        with open(self._err, "ab") as err:
            detached: dict[str, Any] = dict(
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
                preexec_fn=_default_interrupt,
            )
            return subprocess.Popen(*args, **{**kwargs, **detached})


def _default_interrupt() -> None:
    """In a job controller about to start: SIGINT and SIGQUIT back to their defaults. A sweep started in
    the background by a script, or under nohup, has them ignored, and the controller would inherit that:
    ``status --cancel`` (SIGINT, which submitit's controller turns into stopping its job) would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@contextlib.contextmanager
def detached_local_jobs(err: Path) -> Iterator[None]:
    """While active, submitit's local executor starts its job controllers detached (:class:`_DetachedPopen`)."""
    from submitit.local import local as submitit_local

    saved = submitit_local.subprocess
    submitit_local.subprocess = _DetachedPopen(err)  # type: ignore[assignment]
    try:
        yield
    finally:
        submitit_local.subprocess = saved


def local_job_record(job: Any) -> dict[str, Any]:
    """What names a submitit local job for as long as it exists: its controller's PID (the job id, which
    forwards SIGINT/SIGTERM to the training and whose death by SIGKILL stops it too), that process's
    start time, host and boot, and the result file submitit writes when the job's function returns."""
    ident = ProcessIdentity.of(int(job.job_id))
    record: dict[str, Any] = {"result": str(job.paths.result_pickle)}
    if ident is not None:
        record.update(started=ident.started, host=ident.host, boot_id=ident.boot_id)
    return record


def wait(
    sub: Submission,
    console: Console | None = None,
    poll_s: float = 2.0,
    still_active: Callable[[list[str]], set[str]] | None = None,
) -> dict[str, str]:
    """Block until every job of the submission has ended, and every run of ``sub.elsewhere`` while
    ``still_active(run ids)`` names it (those a job of an earlier submission runs); print each run as it
    finishes; returns run id -> run status (from its folder)."""
    runs = [r for rs, _ in sub.jobs for r in rs] + list(sub.elsewhere)
    reported: set[str] = set()
    if sub.cluster == "debug":  # the debug executor runs each job inside result()
        for _, job in sub.jobs:
            _result(job, console)
            _report_finished(runs, reported, console)
    else:
        while not all(job.done() for _, job in sub.jobs):
            _report_finished(runs, reported, console)
            time.sleep(poll_s)
        for _, job in sub.jobs:
            _result(job, console)
    while _elsewhere_running(sub, still_active):
        _report_finished(runs, reported, console)
        time.sleep(poll_s)
    _report_finished(runs, reported, console)
    return {r.id: r.status() for r in runs}


def _report_finished(runs: Sequence[RunDir], reported: set[str], console: Console | None) -> None:
    """Print each run that has ended since the last call (adding it to ``reported``)."""
    for r in runs:
        status = r.status()
        if r.id in reported or status in ("pending", "running"):
            continue
        reported.add(r.id)
        if console is not None:
            m = r.read_metrics("train") or {}
            acc = f"  test acc {100 * m['test_acc']:.2f}%" if m.get("test_acc") is not None else ""
            console.print(f"  {r.id}: {status}{acc}")


def _elsewhere_running(sub: Submission, still_active: Callable[[list[str]], set[str]] | None) -> bool:
    """Whether a job of an earlier submission still runs one of ``sub.elsewhere``."""
    if not sub.elsewhere or still_active is None:
        return False
    from pipeline.jobs.slurm import SlurmUnreachable

    try:
        return bool(still_active([r.id for r in sub.elsewhere]))
    except SlurmUnreachable:
        return True  # cannot tell now: ask again at the next poll


def _result(job: Any, console: Console | None) -> None:
    try:
        job.result()
    except Exception as e:  # a failed run is reported through its status, with its log
        if console is not None:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            console.print(f"[yellow]job {job.job_id} ended with an error:[/] {first}")


class WorkersRefused(Exception):
    """sbatch refused a search's worker array (``unreachable``: the controller did not answer)."""

    def __init__(self, reason: str, unreachable: bool):
        super().__init__(reason)
        self.unreachable = unreachable


def submit_workers(
    cfg: Mapping[str, Any],
    workers: Sequence[int],
    fn: Callable[[int], Any],
    *,
    cluster: str,
    sweep_dir: Path,
    name: str,
) -> dict[int, dict[str, Any]]:
    """A search's workers: on Slurm one array whose task i runs ``fn(workers[i])`` with the resources of
    ``cfg``'s slurm section; locally (or debug) one job per worker. Returns worker -> {"cluster", "job",
    ...the local job's record}; raises :class:`WorkersRefused` when sbatch refuses the array."""
    import submitit
    from submitit.core.utils import FailedJobError

    folder = sweep_dir / "logs" / "%j"
    if cluster == "slurm":
        params = slurm_parameters(_slurm_section(cfg), name)
        array = submitit.SlurmExecutor(folder=folder, max_num_timeout=int(_slurm_section(cfg)["max_requeues"]))
        array.update_parameters(**_executor_parameters(params))
        try:
            jobs = array.map_array(fn, list(workers))
        except (FailedJobError, OSError) as e:
            raise WorkersRefused(_sbatch_error(e), unreachable=not slurm.controller_answers()) from None
        return {w: {"cluster": "slurm", "job": str(j.job_id)} for w, j in zip(workers, jobs)}
    out: dict[int, dict[str, Any]] = {}
    for w in workers:
        if cluster == "local":
            executor = submitit.LocalExecutor(folder=folder)
            executor.update_parameters(
                timeout_min=LOCAL_TIMEOUT_MIN, gpus_per_node=visible_gpu_count(), stderr_to_stdout=True
            )
            with detached_local_jobs(sweep_dir / "logs" / "local-controllers.err"):
                job = executor.submit(fn, w)
            out[w] = {"cluster": "local", "job": str(job.job_id), **local_job_record(job)}
        else:
            job = submitit.DebugExecutor(folder=folder).submit(fn, w)
            job.result()  # the debug executor runs the job when its result is asked for
            out[w] = {"cluster": "debug", "job": str(job.job_id)}
    return out

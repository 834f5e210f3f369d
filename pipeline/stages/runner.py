"""A run folder taken through its stages in this process: :func:`execute` (what a submitted job calls,
and ``python -m pipeline.run``) and :func:`execute_many` (a local job slot's runs one after another).
Stages run in order; each is skipped when its ``metrics/<stage>.json`` exists and writes that file
atomically when it ends. Torch-free at import: the login node imports it to hand it to submitit.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, cast

from omegaconf import DictConfig, OmegaConf

from pipeline import share
from pipeline.config import from_run_file
from pipeline.jobs import endings, owner, preempt
from pipeline.jobs.alive import this_slurm_job
from pipeline.jobs.procs import die_with_parent
from pipeline.rundir import (
    STAGES,
    UNREADABLE_OUTPUT,
    RunDir,
    disk_error,
    producing_stage,
    release_space,
    reserve_space,
    resumable,
)
from pipeline.stages.distributed import job_rank, wait_for_all_ranks
from pipeline.stages.logs import DISK_HINT, attach_log, disk_message, quiet_disk_errors, stage_log

log = logging.getLogger("pipeline")


def stage_functions() -> dict[str, Callable[[RunDir, Any], dict[str, Any]]]:
    """Each stage's function, ``stage(run, cfg) -> metrics``, by name (:data:`pipeline.rundir.STAGES`).
    Imported here, when a stage is about to run: they import torch, and this module must not."""
    from pipeline.stages.measure import measure_stage
    from pipeline.stages.prune import prune_stage
    from pipeline.stages.quantize import quantize_stage
    from pipeline.stages.train import train_stage

    return {"train": train_stage, "prune": prune_stage, "quantize": quantize_stage, "measure": measure_stage}


@dataclass
class _Job:
    """This process's hold on one run folder while :func:`execute` takes it through its stages."""

    run: RunDir
    rank: int
    handler: logging.Handler | None = None
    ownership: owner.Ownership | None = None
    reserved: bool = False  # .space-reserve is this job's to free (not another job's that owns the folder)


def execute(run_dir: str | Path) -> str:
    """Run every unfinished stage of one run folder; returns the run's status, or "preempted" when a
    stop signal ended it early (after a checkpoint; requeued on SIGUSR2 within slurm.max_requeues).

    An exception in a stage is written to metrics/<stage>.json as status "failed" (with the error and
    the log path) and raised again, so the scheduler marks the job failed too. In a multi-task job every
    rank runs this; only rank 0 writes the log file and the metrics.
    """
    run = RunDir(Path(run_dir))
    if not run.config.is_file():  # never create a run folder here: sweep or prepare_single writes it
        message = f"{run.config} does not exist (was the run folder deleted?); nothing is written"
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise owner.RunFolderVanished(message)
    job = _Job(run, job_rank())
    job.handler = attach_log(run, to_file=job.rank == 0)
    preempt.STOP.install()
    previous_hook = threading.excepthook
    threading.excepthook = quiet_disk_errors
    try:
        if job.rank == 0:
            _take_folder(job)
        return _run_stages(job, from_run_file(run.config))
    except owner.RunFolderVanished as e:
        message = f"run {run.id}: {e}; stopped"
        log.error("%s", message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        if job.ownership is not None:
            job.ownership.record_vanished(e)
        raise
    finally:
        _let_go(job, previous_hook)


def _take_folder(job: _Job) -> None:
    """Rank 0 becomes the folder's owner (:class:`pipeline.jobs.owner.RunBusy` when a live job is) and
    reserves room for a failure record; a full or read-only disk stops it here, naming the folder."""
    run = job.run
    try:
        job.ownership = owner.acquire(run)
        endings.clear_ending(run)  # this attempt's own ending, if any, replaces the last one's
        # room for a failure record on a disk that fills up later
        reserve_space(run.path)
        job.reserved = True
    except owner.RunBusy as e:
        log.error("run %s: %s", run.id, e)
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise
    except OSError as e:  # a disk already full (or read-only): stop before any work, naming the folder
        if disk_error(e) is None:
            raise
        message = f"run {run.id}: cannot write in {run.path}: {e}; free space, then submit again"
        log.error("%s", message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise


def _let_go(job: _Job, excepthook: Callable[..., Any]) -> None:
    """Give back everything :func:`execute` took: the folder, the stop signal's handler, the threads'
    exception hook, the reserve, the log."""
    if job.ownership is not None:
        job.ownership.release()
    preempt.STOP.restore()
    threading.excepthook = excepthook
    if job.reserved:
        release_space(job.run.path)
    if job.handler is not None:
        logging.getLogger("pipeline").removeHandler(job.handler)
        job.handler.close()


def _run_stages(job: _Job, cfg: DictConfig) -> str:
    """The stages in order until one does not end "done"; returns the run's status."""
    run = job.run
    stores = {
        "train": run.shared_store("train") if bool(cfg.share.train) else None,
        "prune": run.shared_store("prune") if bool(cfg.share.train) and bool(cfg.share.prune) else None,
    }
    for stage in STAGES:
        if job.ownership is not None:
            job.ownership.check()
        if job.rank != 0 and stage == "measure":  # one process times the models; the others would disturb it
            continue
        status = _stage(job, cfg, stores, stage)
        if status != "done":
            return status
    return "done"


def _stage(job: _Job, cfg: DictConfig, stores: dict[str, Path | None], stage: str) -> str:
    """One stage, in its own folder (the shared store for a shared training or pruning, else the run's):
    skipped when recorded done, else run. Returns "done" for the run to go on, else its status."""
    store = stores.get(stage)
    target = RunDir(store) if store is not None else job.run
    if target is not job.run:
        shared = _shared_stage(job.run, cfg, target, job.rank, stage)
        if shared is not None:
            return shared
        if job.ownership is not None:  # this job does it: a store deleted meanwhile stops it
            job.ownership.watch_also(target.path)
    done = _earlier_record(job, target, stage)
    if done is None:
        return _run_stage(job, cfg, stores, target, stage)
    if done.get("status") == "failed":
        return _failed_before(job.run, stage, done)
    return str(done.get("status"))


def _earlier_record(job: _Job, target: RunDir, stage: str) -> dict[str, Any] | None:
    """The stage's record from an earlier attempt; None when there is none or the stage is to be resumed."""
    done = target.read_metrics(stage)
    if not resumable(done):
        return done
    # it failed writing (full disk, quota, read-only) and its last checkpoint is intact
    log.warning(
        "run %s: the %s stage stopped before on a failed write (%s); resuming it from its last checkpoint",
        job.run.id,
        stage,
        done.get("error"),
    )
    if job.rank == 0:
        target.metrics_path(stage).unlink(missing_ok=True)
    return None


def _run_stage(job: _Job, cfg: DictConfig, stores: dict[str, Path | None], target: RunDir, stage: str) -> str:
    """Run the stage and record it; a stop signal ends the run "preempted", an exception is recorded as
    the stage's failure and raised again."""
    log.info("run %s: stage %s", job.run.id, stage)
    try:
        metrics = _call_stage(job, cfg, target, stage)
    except preempt.Preempted as p:
        if job.rank == 0:
            _record_preemption(job, cfg, stage, p)
        return "preempted"
    except owner.RunFolderVanished:
        raise
    except Exception as e:
        _stage_failed(job, stores, target, stage, e)
        raise
    if metrics["status"] != "done" and target is not job.run:  # its lines went to the shared log: say here
        log.warning("run %s: stage %s %s%s", job.run.id, stage, metrics["status"], _divergence(metrics))
    return str(metrics["status"])


def _call_stage(job: _Job, cfg: DictConfig, target: RunDir, stage: str) -> dict[str, Any]:
    """The stage's function on ``target``, its metrics (with its wall and CPU seconds) written by rank 0."""
    started, cpu_started = time.time(), _cpu_seconds()
    if preempt.STOP:  # a stop signal during the last stage's final steps: stop between stages
        raise preempt.Preempted(preempt.STOP.signum or 0)
    with stage_log(job.handler, target.log if target is not job.run and job.rank == 0 else None, stage):
        metrics = stage_functions()[stage](target, cfg)
    metrics["wall_s"] = time.time() - started
    metrics["cpu_s"] = _cpu_seconds() - cpu_started
    if stage != "measure":  # (rank 0 alone measures)
        # every rank waits here before rank 0 records the stage: a rank that was slower to start it has
        # read its record (none) by now, so none sees it done and skips it, one barrier short of the
        # others (rank 0 then waited alone in its last barrier). The next stage reads rank 0's models.
        wait_for_all_ranks()
    if job.rank == 0:
        target.write_metrics(stage, metrics)  # on a full disk: a failed, resumable stage (_stage_failed)
    return metrics


def _record_preemption(job: _Job, cfg: DictConfig, stage: str, p: preempt.Preempted) -> None:
    """Requeue (or not) the stopped job, and leave its ending where status and collect find it."""
    ending, message = preempt.handle(p, int(cfg.slurm.max_requeues))
    log.warning("run %s: %s", job.run.id, message)
    if ending is not None:  # for status and collect when sacct cannot tell
        endings.write_ending(job.run, ending, message, stage=stage, job_id=this_slurm_job())


def _stage_failed(job: _Job, stores: dict[str, Path | None], target: RunDir, stage: str, e: Exception) -> None:
    """Record the stage's failure (and that of the stage that made an unreadable input) and log it.
    Called while ``e`` is being handled (its traceback is logged)."""
    if job.ownership is not None:
        job.ownership.check()  # a failure caused by a deleted folder is not written back into it
    if job.rank == 0:
        extra = _mark_maker_failed(job.run, stores, stage, e)
        _record_failure(target, stage, e, job.run, extra)
    else:
        extra = {}
    if (disk := disk_error(e)) is not None:  # where and why is all there is to say
        log.error("stage %s failed: %s", stage, disk_message(disk))
    elif unreadable_model(e):  # the file and what is wrong with it: a traceback adds nothing
        log.error("stage %s failed: %s%s", stage, e, f"; {extra['hint']}" if extra else "")
    else:
        log.error("stage %s failed: %s\n%s", stage, e, traceback.format_exc())


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process's threads and of its children that have exited (data
    loader workers once their loader is gone): what the stage cost the node's CPUs, on this rank."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _divergence(metrics: dict[str, Any]) -> str:
    """Where a stage's loss turned non-finite, from its record ("" when it did not)."""
    if metrics.get("diverged_epoch") is None:
        return ""
    where = f" at epoch {metrics['diverged_epoch']}"
    if metrics.get("diverged_step") is not None:
        where += f" step {metrics['diverged_step']}/{metrics.get('steps_per_epoch', '?')}"
    return f"{where} (last finite loss {metrics.get('last_finite_loss')})"


def _record_failure(target: RunDir, stage: str, e: Exception, run: RunDir, extra: dict[str, Any] | None = None) -> None:
    """``target``'s metrics/<stage>.json (``run`` itself, or a shared training's store) as failed, with
    the error (and ``extra`` fields). When a write failed because the disk is full, over quota or
    read-only, the record says ``resume: true``: the previous checkpoint is intact and running the job
    again once there is space resumes the stage. The space reserved at the start is freed first, so the
    record fits on a full disk."""
    disk = disk_error(e)
    record: dict[str, Any] = {
        "status": "failed",
        "error": f"{type(e).__name__}: {e}",
        "log": str(run.log),
        "stage": stage,
        **(extra or {}),
    }
    if disk is not None:
        record.update(
            # a write without a file name (TensorBoard's writer thread, say) is named by its folder
            error=f"{os.fsdecode(disk.filename) if disk.filename else target.path}: {disk.strerror or disk}",
            resume=True,
            hint=DISK_HINT,
        )
    release_space(run.path, settle=disk is not None)
    try:
        target.write_metrics(stage, record)
    except OSError as e2:
        log.error("could not write the failure record %s either: %s", target.metrics_path(stage), e2)


def unreadable_model(e: BaseException) -> bool:
    from pipeline.models.files import UnreadableModel  # (torch: a stage has run, it is loaded already)

    return isinstance(e, UnreadableModel)


def _mark_maker_failed(run: RunDir, stores: dict[str, Path | None], stage: str, e: Exception) -> dict[str, Any]:
    """When ``e`` says that a model file an earlier stage made is unreadable (truncated, garbled, gone),
    that stage's record, in the run or in the shared store the stage was done in, becomes failed with
    an error naming the file (its figures kept), so that ``--rerun failed`` makes the file again instead
    of redoing only ``stage``, which would fail the same way (a shared store is moved aside then, as for
    any failed shared stage). Returns the fields that say so in ``stage``'s own failure record."""
    from pipeline.models.files import UnreadableModel

    if not isinstance(e, UnreadableModel):
        return {}
    maker = producing_stage(e.path.name)
    if maker is None or list(STAGES).index(maker) >= list(STAGES).index(stage):
        return {}
    store = stores.get(maker)
    owner = RunDir(store) if store is not None else run
    made = owner.models / e.path.name
    record = owner.read_metrics(maker)
    if os.path.realpath(made) != os.path.realpath(e.path) or record is None or record.get("status") != "done":
        return {}
    owner.write_metrics(
        maker,
        {
            **record,
            "status": "failed",
            "stage": maker,
            "error": f"{made} is unreadable ({e.reason}), found by the {stage} stage of run {run.id}; "
            f"--rerun failed makes it again",
            UNREADABLE_OUTPUT: f"models/{e.path.name}",
        },
    )
    log.error("run %s: %s, made by the %s stage, is unreadable: that stage is marked failed", run.id, made, maker)
    return {
        "hint": f"its input {made} is unreadable: the {maker} stage that made it is marked failed, and "
        "--rerun failed redoes it"
    }


def _shared_stage(run: RunDir, cfg: Any, store: RunDir, rank: int, stage: str) -> str | None:
    """A shared training or pruning (pipeline.share): "done" when it is recorded and this run goes on, a
    status to end the run with (a failed stage of another run blocks this one: "blocked"), or None when
    this run is to do it now (as its owner, or taking over from an owner whose job ended without a result)."""
    what = "training" if stage == "train" else "pruning"
    tree = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    if rank == 0:
        share.link_stage(run, stage, store.path, tree)  # again after an archive; idempotent
    record = store.read_metrics(stage)
    if record is None or share.resumable(record):
        record = share.wait_for_owner(run, store.path, stage=stage)  # returns at once for the owner
    if share.resumable(record) and _failed_in_owners_job(run, store, stage):
        # its owner's job just failed writing it: the disk is likely still full. Not retried by every run
        # sharing it (an epoch lost each time); the next submission's owner resumes it.
        log.warning(
            "run %s: the shared %s %s failed writing in its owner's job (%s); submit again once there is "
            "space: it resumes from its last checkpoint",
            run.id,
            what,
            store.path,
            (record or {}).get("error"),
        )
        return "failed"
    if record is None or share.resumable(record):  # to do, or to resume (the stage loop resumes it)
        if rank == 0:
            if not share.is_owner(run, share.read_owner(store.path)):
                log.warning("run %s: the owner of the shared %s stopped without a result; doing it here", run.id, what)
                share.take_over(store.path, run)
            log.info("run %s: shared %s %s (log %s)", run.id, what, store.path, store.log)
        return None
    status = str(record.get("status", "failed"))
    if status == "done":
        log.info("run %s: reuses the shared %s %s", run.id, what, store.path)
        return "done"
    blocked = run.blocked_by()
    if blocked is not None:
        log.warning(
            "run %s: blocked by run %s, whose %s this run shares, failed (%s); after fixing the "
            "cause, submit the sweep again with --rerun failed",
            run.id,
            blocked[0],
            what,
            blocked[1],
        )
        return "blocked"
    if status == "failed":
        return _failed_before(run, stage, record)
    return status


def _failed_in_owners_job(run: RunDir, store: RunDir, stage: str) -> bool:
    """The shared stage's failure was recorded by its current owner's job (after it was made owner), and
    ``run`` is not that owner."""
    owner = share.read_owner(store.path)
    if owner is None or share.is_owner(run, owner):
        return False
    try:
        recorded = store.metrics_path(stage).stat().st_mtime
    except OSError:
        return False
    return recorded >= float(owner.get("since") or 0)


def _failed_before(run: RunDir, stage: str, record: dict[str, Any]) -> str:
    log.warning(
        "run %s: the %s stage failed before (%s); it is not retried on its own: "
        "python -m pipeline.run %s --rerun failed (or the sweep with --rerun failed) "
        "redoes it once the cause is fixed",
        run.id,
        stage,
        record.get("error", "no reason recorded"),
        run.path,
    )
    return "failed"


def execute_many(run_dirs: Sequence[str | Path]) -> dict[str, str]:
    """Run folders one after another (a local job slot); a failing run does not stop the others, a stop
    signal does."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "local" and os.environ.get("SUBMITIT_LOCAL_JOB_ID", "").isdigit():
        # submitit's local controller (the job id users see) forwards SIGTERM and SIGINT to this process
        # but cannot forward SIGKILL: without this a `kill -9` of it would leave the training orphaned.
        die_with_parent(expected_parent=int(os.environ["SUBMITIT_LOCAL_JOB_ID"]))
    out: dict[str, str] = {}
    for d in run_dirs:
        try:
            out[Path(d).name] = execute(d)
        except Exception as e:  # the next run of the slot still runs; this one's error is said here
            log.error("run %s stopped: %s: %s", Path(d).name, type(e).__name__, e)
            out[Path(d).name] = "failed"
        if out[Path(d).name] == "preempted":
            break
    return out

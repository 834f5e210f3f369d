"""``python -m pipeline.run RUN_DIR_OR_CONFIG [key=value ...]``: run one config in this process.

A submitted job calls :func:`execute` on its run folder; ``python -m pipeline.run`` runs the same code
in the foreground (what the plain sbatch scripts call). Stages run in order; each is skipped when its
``metrics/<stage>.json`` exists and writes that file atomically when it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import resource
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, cast

from omegaconf import OmegaConf

from pipeline.config import COMMAND_LINE, ConfigError, absolutize_paths, from_run_file, load_config, run_id, to_yaml
from pipeline.rundir import (
    STAGES,
    UNREADABLE_OUTPUT,
    RunDir,
    atomic_write_json,
    atomic_write_text,
    disk_error,
    producing_stage,
    release_space,
    reserve_space,
    resumable,
)

EXIT_PREEMPTED = 3  # stopped by a signal after saving a checkpoint: run the same command to resume

log = logging.getLogger("pipeline")


def _stage_function(stage: str) -> Callable[..., dict[str, Any]]:
    module, _, fn = STAGES[stage].partition(":")
    return getattr(importlib.import_module(module), fn)


class RunLogHandler(logging.FileHandler):
    """A run's log file. When the file cannot be written (a full, over-quota or read-only filesystem), it
    says so once on stderr and stops writing, instead of Python's traceback for every later line; the
    same lines still reach the job's output through the stdout handler. Closing it never raises."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as e:
            self._give_up(e)

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            self._give_up(error)
        else:
            super().handleError(record)

    def _give_up(self, error: OSError) -> None:
        if not self.failed:
            self.failed = True
            print(
                f"error: cannot write the log {self.baseFilename}: {error.strerror or error}; "
                "its lines go only to this output from now on",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        try:
            super().close()
        except OSError as e:
            self._give_up(e)
            with contextlib.suppress(OSError):
                if self.stream is not None:
                    self.stream.close()
            self.stream = None


def _file_handler(path: Path) -> logging.Handler:
    handler = RunLogHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    return handler


def _attach_log(run: RunDir, to_file: bool = True) -> logging.Handler | None:
    """Log to stdout (the scheduler's log) and, unless ``to_file`` is False (ranks other than 0), to
    <run>/run.log, appended across restarts."""
    root = logging.getLogger("pipeline")
    root.setLevel(logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        root.addHandler(stream)
    if not to_file:
        return None
    handler = _file_handler(run.log)
    root.addHandler(handler)
    return handler


def execute(run_dir: str | Path) -> str:
    """Run every unfinished stage of one run folder; returns the run's status, or "preempted" when a
    stop signal ended it early (after a checkpoint; requeued on SIGUSR2 within slurm.max_requeues).

    An exception in a stage is written to metrics/<stage>.json as status "failed" (with the error and
    the log path) and raised again, so the scheduler marks the job failed too. In a multi-task job every
    rank runs this; only rank 0 writes the log file and the metrics.
    """
    from pipeline.jobs import endings, owner, preempt

    run = RunDir(Path(run_dir))
    if not run.config.is_file():  # never create a run folder here: sweep or prepare_single writes it
        message = f"{run.config} does not exist (was the run folder deleted?); nothing is written"
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise owner.RunFolderVanished(message)
    rank = _distributed_rank()
    handler = _attach_log(run, to_file=rank == 0)
    preempt.STOP.install()
    previous_hook = threading.excepthook
    threading.excepthook = _quiet_disk_errors
    ownership: owner.Ownership | None = None
    reserved = False  # .space-reserve is this job's to free (not another job's that owns the folder)
    try:
        if rank == 0:
            try:
                ownership = owner.acquire(run)
                endings.clear_ending(run)  # this attempt's own ending, if any, replaces the last one's
                # room for a failure record on a disk that fills up later
                reserve_space(run.path)
                reserved = True
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
        cfg = from_run_file(run.config)
        stores = {
            "train": run.shared_store("train") if bool(cfg.share.train) else None,
            "prune": run.shared_store("prune") if bool(cfg.share.train) and bool(cfg.share.prune) else None,
        }
        for stage in STAGES:
            if ownership is not None:
                ownership.check()
            if rank != 0 and stage == "measure":  # one process times the models; the others would disturb it
                continue
            # the stage's own folder: the shared store for a shared training or pruning, else the run's
            store = stores.get(stage)
            target = RunDir(store) if store is not None else run
            if target is not run:
                shared = _shared_stage(run, cfg, target, rank, stage)
                if shared is not None:
                    if shared == "done":
                        continue
                    return shared
                if ownership is not None:  # this job does it: a store deleted meanwhile stops it
                    ownership.watch_also(target.path)
            done = target.read_metrics(stage)
            if resumable(done):
                # it failed writing (full disk, quota, read-only) and its last checkpoint is intact
                log.warning(
                    "run %s: the %s stage stopped before on a failed write (%s); resuming it from its last checkpoint",
                    run.id,
                    stage,
                    done.get("error"),
                )
                if rank == 0:
                    target.metrics_path(stage).unlink(missing_ok=True)
                done = None
            if done is not None:
                if done.get("status") != "done":
                    if done.get("status") == "failed":
                        return _failed_before(run, stage, done)
                    return str(done.get("status"))
                continue
            log.info("run %s: stage %s", run.id, stage)
            started, cpu_started = time.time(), _cpu_seconds()
            try:
                if preempt.STOP:  # a stop signal during the last stage's final steps: stop between stages
                    raise preempt.Preempted(preempt.STOP.signum or 0)
                with _stage_log(handler, target.log if target is not run and rank == 0 else None, stage):
                    metrics = _stage_function(stage)(target, cfg)
                metrics["wall_s"] = time.time() - started
                metrics["cpu_s"] = _cpu_seconds() - cpu_started
                if rank == 0:
                    target.write_metrics(stage, metrics)  # on a full disk: a failed, resumable stage below
                if stage != "measure":  # (rank 0 alone measures)
                    _ranks_in_step()  # the next stage reads what rank 0 just wrote (models/trained.pt, ...)
            except preempt.Preempted as p:
                if rank == 0:
                    ending, message = preempt.handle(p, int(cfg.slurm.max_requeues))
                    log.warning("run %s: %s", run.id, message)
                    if ending is not None:  # for status and collect when sacct cannot tell
                        endings.write_ending(run, ending, message, stage=stage, job_id=preempt.slurm_job_id())
                return "preempted"
            except owner.RunFolderVanished:
                raise
            except Exception as e:
                if ownership is not None:
                    ownership.check()  # a failure caused by a deleted folder is not written back into it
                extra = _mark_maker_failed(run, stores, stage, e) if rank == 0 else {}
                if rank == 0:
                    _record_failure(target, stage, e, run, extra)
                if (disk := disk_error(e)) is not None:  # where and why is all there is to say
                    log.error("stage %s failed: %s", stage, _disk_message(disk))
                elif _unreadable_model(e):  # the file and what is wrong with it: a traceback adds nothing
                    log.error("stage %s failed: %s%s", stage, e, f"; {extra['hint']}" if extra else "")
                else:
                    log.error("stage %s failed: %s\n%s", stage, e, traceback.format_exc())
                raise
            if metrics["status"] != "done":
                if target is not run:  # its lines went to the shared log: say here how it ended
                    log.warning("run %s: stage %s %s%s", run.id, stage, metrics["status"], _divergence(metrics))
                return str(metrics["status"])
        return "done"
    except owner.RunFolderVanished as e:
        message = f"run {run.id}: {e}; stopped"
        log.error("%s", message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        if ownership is not None:
            ownership.record_vanished(e)
        raise
    finally:
        if ownership is not None:
            ownership.release()
        preempt.STOP.restore()
        threading.excepthook = previous_hook
        if reserved:
            release_space(run.path)
        if handler is not None:
            logging.getLogger("pipeline").removeHandler(handler)
            handler.close()


DISK_HINT = "free space (or fix the mount), then submit again: the run resumes from its last checkpoint"


def _disk_message(disk: OSError) -> str:
    name = os.fsdecode(disk.filename) if disk.filename else ""
    return f"[Errno {disk.errno}] {disk.strerror}" + (f": '{name}'" if name else "") + f"; {DISK_HINT}"


def _quiet_disk_errors(args: threading.ExceptHookArgs) -> None:
    """A background writer (TensorBoard's event thread) stopped by a full, over-quota or read-only disk:
    one line, not a traceback; the stage itself fails on its next write and says where."""
    error = args.exc_value
    if isinstance(error, OSError) and disk_error(error) is not None:
        name = args.thread.name if args.thread is not None else "a thread"
        print(f"error: background writer {name} stopped: {error}", file=sys.stderr, flush=True)
        return
    threading.__excepthook__(args)


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


def _unreadable_model(e: BaseException) -> bool:
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
    from pipeline import share

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
                share.write_owner(store.path, run, *_this_job())
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
    from pipeline import share

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


def _this_job() -> tuple[str, str]:
    """(cluster, job id) of the job this process runs in, as a manifest records it."""
    import os

    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return "slurm", f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        return "slurm", os.environ["SLURM_JOB_ID"]
    return "local", str(os.getpid())


@contextlib.contextmanager
def _stage_log(run_handler: logging.Handler | None, path: Path | None, stage: str = "train") -> Iterator[None]:
    """Log to ``path`` instead of the run's own log meanwhile: a shared training or pruning keeps its lines
    in the shared store (the run reaches them as train.log, prune.log); the run's log says so once instead
    of repeating them."""
    if path is None:
        yield
        return
    root = logging.getLogger("pipeline")
    what = "training" if stage == "train" else "pruning"
    log.info("%s lines go to %s (%s.log in this folder)", what, path, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _file_handler(path)
    if run_handler is not None:
        root.removeHandler(run_handler)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        if run_handler is not None:
            root.addHandler(run_handler)


def _distributed_rank() -> int:
    """This process's data-parallel rank; in a multi-task Slurm job the torch.distributed variables are
    exported from Slurm's first (through submitit's helper)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        from pipeline.launch import export_distributed_env

        export_distributed_env()
    return int(os.environ.get("RANK", "0"))


def _ranks_in_step() -> None:
    """In a multi-rank job, wait until every rank has finished the stage (rank 0 has written its files)."""
    torch = sys.modules.get("torch")  # imported by the stage when there is one; never imported here
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def execute_many(run_dirs: Sequence[str | Path]) -> dict[str, str]:
    """Run folders one after another (a local job slot); a failing run does not stop the others, a stop
    signal does."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "local" and os.environ.get("SUBMITIT_LOCAL_JOB_ID", "").isdigit():
        # submitit's local controller (the job id users see) forwards SIGTERM and SIGINT to this process
        # but cannot forward SIGKILL: without this a `kill -9` of it would leave the training orphaned.
        from pipeline.jobs.procs import die_with_parent

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


def prepare_single(config: Path, overrides: Sequence[str], out: Path) -> RunDir:
    """A run folder under ``out`` for one config file plus overrides (resumed if it exists)."""
    cfg = absolutize_paths(load_config([config], overrides), Path.cwd())
    run = RunDir(out / run_id(cfg))
    text = to_yaml(cfg)
    if not run.config.exists() or run.config.read_text() != text:
        atomic_write_text(run.config, text)
    if not run.meta.exists():
        atomic_write_json(
            run.meta,
            {"id": run.id, "sweep": out.name, "config_file": str(config), "swept": {}, "overrides": list(overrides)},
        )
    return run


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline import console as cli

    p = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__.split("\n\n")[0])
    p.add_argument("target", type=Path, help="a run folder (holding config.yaml) or a config YAML file")
    p.add_argument("overrides", nargs="*", help="key=value settings (with a config file only)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/single"),
        help="with a config file: where its run folder goes (default runs/single)",
    )
    p.add_argument(
        "--rerun",
        default=None,
        help="failed: redo the failed stage and those after it; all: "
        "start again from scratch (old results are moved to <run>/archive/, never deleted)",
    )
    args = p.parse_intermixed_args(argv)
    with cli.exit_on_config_error():
        if args.rerun is not None and args.rerun not in ("failed", "all"):
            raise ConfigError(
                COMMAND_LINE, f"'{args.rerun}' is not allowed. Allowed values: failed, all.", key="--rerun"
            )
        if args.target.is_dir():
            if args.overrides:
                raise ConfigError(
                    COMMAND_LINE,
                    "a run folder's config is fixed; pass a config file to change settings",
                    key=args.overrides[0].split("=")[0],
                )
            run = RunDir(args.target)
            if not run.config.exists():
                raise ConfigError(args.target, "not a run folder (no config.yaml)")
            from_run_file(run.config)
        else:
            run = prepare_single(args.target, args.overrides, args.out)
    if args.rerun == "all":
        run.archive()
    elif args.rerun == "failed" and run.resumable_failure() is not None:
        pass  # a failed write (full disk): its checkpoint is intact and execute resumes it
    elif args.rerun == "failed" and (stage := run.failed_stage()) is not None:
        store = run.shared_store(stage) if stage in ("train", "prune") else None
        if store is not None:  # a failed shared training or pruning: nobody can use it; kept aside
            from pipeline import share

            RunDir(store).archive()
            share.write_owner(store, run, *_this_job())
        run.archive(None if stage == "train" else stage)  # a failed training: start afresh, log included
    try:
        status = execute(run.path)
    except (OSError, ValueError) as e:
        if disk_error(e) is None and not _unreadable_model(e):
            raise
        return 1  # said above, in one line, with the file: a traceback would add nothing
    cli.console().print(f"run {run.id}: [bold]{status}[/]  ({run.path})")
    return {"done": 0, "diverged": 0, "preempted": EXIT_PREEMPTED}.get(status, 1)


if __name__ == "__main__":
    sys.exit(main())

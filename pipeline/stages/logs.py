"""A run's log: to the job's output and to <run>/run.log (a shared stage's lines to its store), and disk
errors said once in a line rather than as tracebacks. Torch-free."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Iterator

from pipeline.rundir import (
    RunDir,
    disk_error,
)

log = logging.getLogger("pipeline")


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


def attach_log(run: RunDir, to_file: bool = True) -> logging.Handler | None:
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


DISK_HINT = "free space (or fix the mount), then submit again: the run resumes from its last checkpoint"


def disk_message(disk: OSError) -> str:
    name = os.fsdecode(disk.filename) if disk.filename else ""
    return f"[Errno {disk.errno}] {disk.strerror}" + (f": '{name}'" if name else "") + f"; {DISK_HINT}"


def quiet_disk_errors(args: threading.ExceptHookArgs) -> None:
    """A background writer (TensorBoard's event thread) stopped by a full, over-quota or read-only disk,
    or by its folder deleted under it: one line, not a traceback; the stage itself fails on its next write
    and says where (a deleted run folder or shared store: :class:`pipeline.jobs.owner.RunFolderVanished`)."""
    error = args.exc_value
    name = args.thread.name if args.thread is not None else "a thread"
    if isinstance(error, OSError) and disk_error(error) is not None:
        print(f"error: background writer {name} stopped: {error}", file=sys.stderr, flush=True)
        return
    if isinstance(error, FileNotFoundError):  # its folder was deleted: the stage sees it and names the folder
        where = os.fsdecode(error.filename) if error.filename else "its file"
        print(f"error: background writer {name} stopped: {where} is gone", file=sys.stderr, flush=True)
        return
    threading.__excepthook__(args)


@contextlib.contextmanager
def stage_log(run_handler: logging.Handler | None, path: Path | None, stage: str = "train") -> Iterator[None]:
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

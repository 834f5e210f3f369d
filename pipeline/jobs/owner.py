"""One job at a time per run folder, and a job that notices its run folder being deleted. Torch-free.

A job takes ``<run>/owner.json`` (host, boot, PID, process start time, Slurm job) before its first stage
and gives it back when it ends. A second job finding a live owner refuses the run instead of training
it a second time in the same folder; an owner that is dead (its process gone or reused, the machine
rebooted, or, on another host, a record not refreshed for :data:`STALE_S`) is taken over.

The record is created with ``link()``, atomic on NFS too (no reliance on flock), and a dead owner is
moved aside with one ``rename()`` that only one taker can win.

While it owns the folder, a watcher thread refreshes the record's time (the heartbeat other hosts read)
and checks the folder is still the one the job started in. If it was deleted or replaced, the job
stops at once with a message in its log and on stderr, and writes nothing more: see
:func:`pipeline.rundir.check_folder`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.jobs import endings
from pipeline.jobs.alive import this_job, this_slurm_job
from pipeline.jobs.procs import ProcessIdentity
from pipeline.rundir import (
    FIELDS,
    RunDir,
    RunFolderVanished,
    check_folder,
    folder_key,
    guard_folder,
    read_mapping,
    unguard_folder,
)

log = logging.getLogger("pipeline.jobs.owner")

OWNER_FILE = "owner.json"
WATCH_S = float(os.environ.get("PIPELINE_WATCH_S", "2"))  # how often the folder is checked (a stat)
HEARTBEAT_S = 60.0  # how often the record's mtime is refreshed
STALE_S = 600.0  # an owner on another host whose record is older than this is dead
_INTERRUPT = signal.SIGUSR1  # raised in the main thread when the folder vanished (unused by Slurm/submitit)


class RunBusy(RuntimeError):
    """Another live job owns this run folder."""


def my_record() -> dict[str, Any]:
    me = ProcessIdentity.of(os.getpid())
    assert me is not None  # this process exists
    # cluster "" (a process started by hand): its PID is all there is, and status asks Slurm only about
    # Slurm's jobs
    cluster, job = this_job()
    return {**me.record(), "job": job, "cluster": cluster, "since": time.time()}


def read_owner(run: RunDir) -> tuple[dict[str, Any], float] | None:
    """(owner record, seconds since it was last refreshed), or None when no job owns the folder. An
    unreadable record (a foreign tool, a torn copy) reads as an owner with no PID, which is dead."""
    path = run.path / OWNER_FILE
    record = read_mapping(path)[0]
    try:
        age = time.time() - path.stat().st_mtime
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        age = 0.0
    return record or {}, age


def owner_alive(record: dict[str, Any], age_s: float) -> bool:
    ident = ProcessIdentity.from_record(record)
    if ident is None or ident.started is None:
        return False
    if ident.on_this_machine():
        return ident.is_alive()
    if record.get("job") and record.get("job") == this_job()[1]:
        return False  # this same Slurm job, requeued: Slurm ran its earlier instance to its end first
    return age_s < STALE_S


def live_owner(run: RunDir) -> dict[str, Any] | None:
    """The record of a live job owning the folder, or None."""
    found = read_owner(run)
    if found is None or not owner_alive(*found):
        return None
    return found[0]


def describe(record: dict[str, Any]) -> str:
    job = f"job {record['job']}, " if record.get("job") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("since", 0))))
    return f"{job}pid {record.get('pid')} on {record.get('host') or '?'}, since {since}"


@dataclass
class Ownership:
    run: RunDir
    record: dict[str, Any]
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _previous_handler: Any = None
    vanished: str = ""  # why the watcher stopped the job ("" while the folder is there)
    also: list[Path] = field(default_factory=list)  # shared stores this job works in, watched as well

    @property
    def path(self) -> Path:
        return self.run.path / OWNER_FILE

    def check(self) -> None:
        """Raise :class:`RunFolderVanished` if the run folder, or a shared store this job works in, is
        gone or was replaced."""
        check_folder(self.run.path)
        if not self.run.config.exists():
            # `rm -rf` of the folder under way: its files go before the folder itself, so say the same
            raise RunFolderVanished(
                f"run folder {self.run.path} was deleted or replaced while this job was running"
                f" (its {self.run.config.name} is gone); nothing more is written there"
            )
        for store in self.also:
            check_folder(store)

    def watch_also(self, store: Path) -> None:
        """Watch ``store`` (a shared training or pruning this job does) like the run folder: deleted
        under the job, it stops the job and nothing is written back into it."""
        guard_folder(store, "shared store")
        self.also.append(store)

    def record_vanished(self, error: RunFolderVanished) -> None:
        """After a shared store vanished under the job: the run folder, still there, says the run failed
        (ending.json), so that status and collect show it failed rather than waiting on itself."""
        try:
            check_folder(self.run.path)
        except RunFolderVanished:
            return
        if not self.also or not self.run.config.exists():
            return
        reason = f"{error}; submit the sweep again to redo it"
        endings.write_ending(self.run, "failed", reason, job_id=this_slurm_job())

    def _watch(self, main_thread: int | None) -> None:
        beat = time.monotonic()
        while not self._stop.wait(WATCH_S):
            try:
                self.check()
            except RunFolderVanished as e:
                self.vanished = str(e)
                if main_thread is not None:  # the job's main thread reports it as it stops
                    signal.pthread_kill(main_thread, _INTERRUPT)
                else:
                    message = f"run {self.run.id}: {e}; its writes will fail"
                    log.error("%s", message)
                    print(f"error: {message}", file=sys.stderr, flush=True)
                return
            if time.monotonic() - beat >= HEARTBEAT_S:
                beat = time.monotonic()
                try:
                    os.utime(self.path)
                except OSError:
                    pass  # the heartbeat only matters to other hosts; the next one may succeed

    def _interrupted(self, signum: int, frame: Any) -> None:
        raise RunFolderVanished(self.vanished or f"run folder {self.run.path} vanished")

    def start_watching(self) -> None:
        main: int | None = None
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(_INTERRUPT, self._interrupted)
            main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._watch, args=(main,), name="run-folder-watch", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop watching; remove the record if it is still this job's (never a successor's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._previous_handler is not None:
            signal.signal(_INTERRUPT, self._previous_handler)
        for folder in (self.run.path, *self.also):
            unguard_folder(folder)
        found = read_owner(self.run)
        if found is not None and _same_owner(found[0], self.record):
            try:
                self.path.unlink(missing_ok=True)
            except OSError as e:  # a read-only filesystem: the record stays, and is dead once this exits
                log.warning("could not remove %s: %s (it is stale once this job has exited)", self.path, e)


def _same_owner(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("pid", "started", "host", "boot_id"))


def acquire(run: RunDir, watch: bool = True) -> Ownership:
    """Own ``run``'s folder for this process, taking it over from a dead owner; raises :class:`RunBusy`
    naming the live owner, or :class:`RunFolderVanished` when the folder does not exist."""
    if folder_key(run.path) is None or not run.config.exists():
        raise RunFolderVanished(f"run folder {run.path} (or its config.yaml) does not exist")
    record = my_record()
    target = run.path / OWNER_FILE
    tmp = run.path / f".{OWNER_FILE}.{record['pid']}.new"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    try:
        for _ in range(5):
            try:
                os.link(tmp, target)
                break
            except FileExistsError:
                pass
            found = read_owner(run)
            if found is None:
                continue  # released meanwhile: try again
            current, age = found
            if _same_owner(current, record):
                break
            if owner_alive(current, age):
                raise RunBusy(
                    f"run folder {run.path} is in use by another job ({describe(current)}); "
                    f"not training it twice. Remove {target} only if that job is really gone."
                )
            # Dead owner: move its record aside. Of several takers only one rename succeeds; if the
            # file moved aside is not the dead record we read, a taker was faster: put its record back.
            aside = run.path / f".{OWNER_FILE}.{record['pid']}.dead"
            try:
                os.rename(target, aside)
            except FileNotFoundError:
                continue
            moved = read_owner_file(aside)
            if not _same_owner(moved, current):
                try:
                    os.link(aside, target)
                except FileExistsError:
                    pass
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            log.warning("run %s: taking over from a job that is gone (%s)", run.id, describe(current))
        else:
            raise RunBusy(f"run folder {run.path}: could not take {target} (other jobs keep taking it)")
    finally:
        tmp.unlink(missing_ok=True)
    guard_folder(run.path)
    own = Ownership(run, record)
    if watch:
        own.start_watching()
    return own


def read_owner_file(path: Path) -> dict[str, Any]:
    return read_mapping(path, FIELDS[OWNER_FILE])[0] or {}

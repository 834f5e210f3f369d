"""One submission of a sweep at a time: ``<sweep>/.submit.lock``, safe on NFS and Lustre. Torch-free.

flock/fcntl locks are not reliable on every network file system, so the lock is a file made the
classic NFS-safe way: write a unique temporary file holding who we are, then ``os.link`` it to the
lock's name. link() is atomic on the server; its answer can be lost on the way back (a retried RPC
then reports EEXIST for our own link), so success is judged by the temporary's link count (2 when the
link exists), not by the call's return value.

The lock holds the host, the pid, that process's start time (``/proc/<pid>/stat`` field 22, with the
boot id: a recycled pid or a reboot does not look alive) and when it was taken. While held, a thread
touches the file every :data:`HEARTBEAT_S` seconds. A lock is stale, and is taken over with a message,
when its holder is on this host and no longer runs (pid gone, or another process with that pid, or a
pid recorded without its start time, which cannot be shown to be the holder), or
when it is on another host (whose processes cannot be seen from here) and its file has not been
touched for :data:`STALE_AFTER_S` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pipeline.jobs.procs import ProcessIdentity, host
from pipeline.rundir import link_exclusive

log = logging.getLogger("pipeline.submit.lock")

LOCK_NAME = ".submit.lock"
HEARTBEAT_S = 30.0  # how often a holder touches its lock
# A lock of another host untouched this long is stale: ten missed heartbeats (clock skew between a
# login node and the file server is seconds, not minutes)
STALE_AFTER_S = 300.0
BREAK_STALE_S = 60.0  # a takeover marker older than this was left by a process killed mid-takeover


class LockHeld(Exception):
    """Another submission of the sweep is running."""

    def __init__(self, path: Path, holder: dict[str, Any]):
        self.path = path
        self.holder = holder
        since = holder.get("since")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
        super().__init__(
            f"another submission of this sweep is running (host {holder.get('host', '?')}, "
            f"pid {holder.get('pid', '?')}, since {when}); wait for it to end, or, if no such process "
            f"exists, remove {path}"
        )


def process_start(pid: int) -> str | None:
    """What tells this process apart from a later one with the same pid: the boot id and the start
    time in clock ticks since boot; None when no such process runs (a zombie has stopped running)."""
    ident = ProcessIdentity.of(pid)
    if ident is None or not ident.is_alive():
        return None
    return f"{ident.boot_id}:{ident.started}"


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    start: str | None
    since: float
    token: str

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "start": self.start, "since": self.since, "token": self.token}


def _me() -> Holder:
    pid = os.getpid()
    return Holder(host(), pid, process_start(pid), time.time(), uuid.uuid4().hex)


def _read(path: Path) -> tuple[dict[str, Any] | None, float | None]:
    """(the lock's content, its mtime); (None, None) when there is no lock. A lock whose content cannot
    be read (it is never half-written: it is linked complete) gives ({}, mtime)."""
    try:
        mtime = path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    return (data if isinstance(data, dict) else {}), mtime


def stale_reason(holder: dict[str, Any], mtime: float, now: float | None = None) -> str | None:
    """Why a lock with this content and modification time is stale, or None when its holder may live."""
    now = time.time() if now is None else now
    if holder.get("host") == host() and isinstance(holder.get("pid"), int):
        alive = process_start(holder["pid"])
        if alive is None:
            return f"its holder, pid {holder['pid']} on this host, no longer runs"
        if holder.get("start") is None:  # a PID alone may be anyone's by now (a lock not written by us)
            return f"it names pid {holder['pid']} on this host without its start time: not shown to be held"
        if alive != holder["start"]:
            return f"pid {holder['pid']} on this host is now another process"
        return None
    age = now - mtime
    if age > STALE_AFTER_S:
        who = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}" if holder else "unreadable lock"
        return f"{who}: no heartbeat for {age:.0f} s (more than {STALE_AFTER_S:.0f} s)"
    return None


class SubmitLock:
    """``with SubmitLock(sweep_dir):`` holds ``<sweep_dir>/.submit.lock`` or raises :class:`LockHeld`.

    ``on_recover(message)`` is told when a stale lock is taken over."""

    def __init__(self, sweep_dir: Path, on_recover: Any = None):
        self.path = Path(sweep_dir) / LOCK_NAME
        self.on_recover = on_recover
        self.holder: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = _me()
        content = json.dumps(me.to_dict()) + "\n"
        for _ in range(5):  # a takeover race lost to another submitter is retried a few times
            if link_exclusive(content, self.path):
                self.holder = me
                self._thread = threading.Thread(target=self._heartbeat, name="submit-lock-heartbeat", daemon=True)
                self._thread.start()
                return
            data, mtime = _read(self.path)
            if data is None or mtime is None:
                continue  # released meanwhile: try again
            reason = stale_reason(data, mtime)
            if reason is None:
                raise LockHeld(self.path, data)
            self._take_over(data, reason)
        data, _ = _read(self.path)
        raise LockHeld(self.path, data or {})

    def _take_over(self, seen: dict[str, Any], reason: str) -> None:
        """Remove a stale lock, unless someone replaced it meanwhile. Two submitters may both find it
        stale: only the one that creates the takeover marker removes it, and only if the lock still
        holds what was judged stale (the other one may already have taken a fresh lock)."""
        marker = self.path.with_name(self.path.name + ".break")
        try:
            if time.time() - marker.stat().st_mtime > BREAK_STALE_S:
                marker.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        if not link_exclusive(f"{os.getpid()}\n", marker):
            time.sleep(0.2)
            return
        try:
            now, _ = _read(self.path)
            if now == seen:
                self.path.unlink(missing_ok=True)
                message = f"took over the stale submission lock {self.path}: {reason}"
                log.warning(message)
                if self.on_recover is not None:
                    self.on_recover(message)
        finally:
            marker.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # gone or unwritable: release() will say what it finds
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.holder is not None:
            data, _ = _read(self.path)
            if data is not None and data.get("token") == self.holder.token:
                self.path.unlink(missing_ok=True)
            elif data is not None:
                log.warning("the submission lock %s was taken over by another process; left to it", self.path)
            self.holder = None

    def __enter__(self) -> SubmitLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

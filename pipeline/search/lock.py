"""The lock around the journal file and the claim file: the same symlink lock as Optuna's default
(``<file>.lock``, a symbolic link to the file it guards, made with ``symlink()``, which is atomic on
every NFS version), tried again every few milliseconds while it is held.

Why not Optuna's :class:`~optuna.storages.journal.JournalFileSymlinkLock` itself: its wait between tries
doubles up to a second, so with several workers on one journal a waiter sleeps on long after the lock
was freed (``bench/search_storage.py``: 209 ms of 233 ms per trial went to waiting, 8 workers on 2
cores, with the lock held for about a millisecond at a time). Here the wait grows to
:data:`MAX_WAIT_S` at most, with jitter so that waiters do not retry in step.

The lock file and its protocol are Optuna's, so a process using Optuna's class (``optuna`` commands on
the same journal, an older worker) and one using this class exclude each other. A holder that died is
broken as Optuna breaks it: after ``grace_period`` seconds in which neither the lock nor the file it
guards changed (``stat`` through the link reads the guarded file), measured on this process's clock, so
clocks that differ between nodes do not matter.
"""

from __future__ import annotations

import logging
import os
import random
import time

from optuna.storages.journal import JournalFileSymlinkLock

log = logging.getLogger("pipeline.search")

LOCK_SUFFIX = ".lock"  # Optuna's: its lock and this one are the same file
FIRST_WAIT_S = 0.001
MAX_WAIT_S = 0.02
GRACE_S = 30.0  # Optuna's default


class PromptSymlinkLock(JournalFileSymlinkLock):
    """Exclusive lock on ``filepath`` between processes, on one machine or across NFS. A subclass of
    Optuna's class for its type only (the journal backend takes any of Optuna's lock classes): both of
    its methods are replaced."""

    def __init__(self, filepath: str, grace_period: float | None = GRACE_S) -> None:
        super().__init__(filepath, grace_period=None)
        self.target = filepath
        self.link = filepath + LOCK_SUFFIX
        self.grace_s = grace_period

    def acquire(self) -> bool:
        wait, seen, since = FIRST_WAIT_S, None, time.monotonic()
        while True:
            try:
                os.symlink(self.target, self.link)
                return True
            except FileExistsError:
                pass
            try:
                stamp: tuple[float, ...] | None = _stamp(self.link)
            except FileNotFoundError:  # released meanwhile, or the guarded file is gone
                stamp = None
            if stamp != seen:
                seen, since = stamp, time.monotonic()
            elif self.grace_s is not None and time.monotonic() - since > self.grace_s:
                self._break()
                continue
            time.sleep(wait * random.uniform(0.5, 1.0))
            wait = min(wait * 1.5, MAX_WAIT_S)

    def release(self) -> None:
        try:
            os.unlink(self.link)
        except OSError as e:
            raise RuntimeError(f"the lock {self.link} was not held (broken by another process?): {e}") from e

    def _break(self) -> None:
        log.warning(
            "the lock %s has not changed for %s s: its holder is taken to be dead and the lock is broken",
            self.link,
            self.grace_s,
        )
        try:
            os.unlink(self.link)
        except FileNotFoundError:
            pass  # another waiter broke it first


def _stamp(link: str) -> tuple[float, ...]:
    """What changes while a live holder works: the guarded file (through the link) and the link itself."""
    guarded, own = os.stat(link), os.lstat(link)
    return (guarded.st_mtime, guarded.st_size, own.st_ino, own.st_mtime)

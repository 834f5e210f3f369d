"""The file lock of the journal and of claiming trials: Optuna's symlink lock with short waits."""

from __future__ import annotations

import logging
import os
import random
import time
import uuid

from optuna.storages.journal import JournalFileSymlinkLock

log = logging.getLogger("pipeline.search")

LOCK_SUFFIX = ".lock"  # Optuna's own name for it: a process using Optuna's default lock excludes us too
GRACE_S = 30.0  # a lock whose file has not changed for this long is a dead holder's: broken
MAX_WAIT_S = 0.02  # the longest sleep between two tries (jittered)


class SymlinkLock(JournalFileSymlinkLock):
    """Optuna's :class:`JournalFileSymlinkLock` protocol (``symlink(path, path + ".lock")`` to take it,
    rename then unlink to give it back: atomic on every NFS version), with waits capped at
    :data:`MAX_WAIT_S`. Optuna's doubles each wait up to 1 s: with 8 workers appending at once, a waiter
    slept up to a second for a lock held 5 ms, and 64 trials took 1 s each instead of tens of ms.

    A holder that died is broken after :data:`GRACE_S` in which the locked file (the link's target) did
    not change, as Optuna does."""

    def __init__(self, path: str | os.PathLike, grace_s: float = GRACE_S):
        super().__init__(str(path), grace_period=None)  # a JournalFileSymlinkLock, with our own fields
        self.target = str(path)
        self.lock_file = self.target + LOCK_SUFFIX
        self.grace_s = grace_s

    def acquire(self) -> bool:
        wait, seen, since = 0.0005, None, time.monotonic()
        while True:
            try:
                os.symlink(self.target, self.lock_file)
                return True
            except FileExistsError:
                pass
            try:
                mtime = os.stat(self.lock_file).st_mtime
            except OSError:  # released meanwhile
                mtime = None
            if mtime is not None and mtime != seen:
                seen, since = mtime, time.monotonic()
            elif mtime is not None and time.monotonic() - since > self.grace_s:
                log.warning("%s: held for %.0f s by a process that wrote nothing: broken", self.lock_file, self.grace_s)
                self._remove()
                seen, since = None, time.monotonic()
                continue
            time.sleep(wait * random.uniform(0.5, 1.5))
            wait = min(wait * 2, MAX_WAIT_S)

    def release(self) -> None:
        if not self._remove():
            raise RuntimeError(f"{self.lock_file}: released by a process that did not hold it")

    def _remove(self) -> bool:
        """Rename the link to a name of our own, then unlink it: of two removers only one succeeds."""
        aside = f"{self.lock_file}.{uuid.uuid4().hex}.rename"
        try:
            os.rename(self.lock_file, aside)
        except FileNotFoundError:
            return False
        os.unlink(aside)
        return True

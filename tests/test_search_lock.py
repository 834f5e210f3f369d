"""pipeline.search.lock.PromptSymlinkLock, the lock around a search's journal and claim files: it excludes
other processes (its own class and Optuna's, which use the same lock file), waits at most
MAX_WAIT_S between tries (Optuna's waits double up to a second), breaks a dead holder's lock after the
grace period and never a live holder's."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from optuna.storages.journal import JournalFileSymlinkLock

from pipeline.search import lock as lock_module
from pipeline.search.lock import FIRST_WAIT_S, MAX_WAIT_S, PromptSymlinkLock
from tests.conftest import REPO

COUNTER = """
import sys, time
from pathlib import Path
from pipeline.search.lock import PromptSymlinkLock
path = Path(sys.argv[1])
for _ in range(int(sys.argv[2])):
    lock = PromptSymlinkLock(str(path))
    lock.acquire()
    try:
        n = int(path.read_text() or 0)
        time.sleep(0.0005)  # a lost update shows if another process gets in here
        path.write_text(str(n + 1))
    finally:
        lock.release()
"""


def test_processes_never_hold_it_at_once(tmp_path):
    counter = tmp_path / "counter"
    counter.write_text("0")
    procs = [
        subprocess.Popen([sys.executable, "-c", COUNTER, str(counter), "40"], cwd=REPO, env={"PYTHONPATH": str(REPO)})
        for _ in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    assert counter.read_text() == "160"
    assert not Path(str(counter) + ".lock").exists()


def _acquired_in_thread(lock) -> tuple[threading.Thread, threading.Event]:
    got = threading.Event()

    def take() -> None:
        lock.acquire()
        got.set()

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    return thread, got


@pytest.mark.parametrize(
    "holder_class, waiter_class",
    [
        (PromptSymlinkLock, PromptSymlinkLock),
        (JournalFileSymlinkLock, PromptSymlinkLock),  # an optuna command, or an older worker, holds it
        (PromptSymlinkLock, JournalFileSymlinkLock),
    ],
)
def test_it_and_optunas_lock_exclude_each_other(tmp_path, holder_class, waiter_class):
    journal = tmp_path / "journal.log"
    journal.touch()
    holder = holder_class(str(journal))
    holder.acquire()
    waiter = waiter_class(str(journal))
    thread, got = _acquired_in_thread(waiter)
    assert not got.wait(0.5), "took a lock another object holds"
    holder.release()
    assert got.wait(10), "not taken once released"
    waiter.release()
    thread.join(5)


def test_waits_grow_to_the_cap_and_no_further(tmp_path, monkeypatch):
    """No real time passes: the fake sleep records each wait and frees the lock after 60 of them."""
    journal = tmp_path / "journal.log"
    journal.touch()
    other = PromptSymlinkLock(str(journal))
    other.acquire()
    waits: list[float] = []

    def fake_sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 60:
            other.release()

    monkeypatch.setattr(lock_module.time, "sleep", fake_sleep)
    lock = PromptSymlinkLock(str(journal))
    assert lock.acquire()
    lock.release()
    assert len(waits) == 60
    assert max(waits) <= MAX_WAIT_S and max(waits) > 4 * FIRST_WAIT_S, waits
    assert min(waits[-10:]) >= MAX_WAIT_S / 2  # at the cap (with jitter) once grown


def test_a_dead_holders_lock_is_broken_after_the_grace_period(tmp_path, caplog):
    journal = tmp_path / "journal.log"
    journal.write_text("x\n")
    link = Path(str(journal) + ".lock")
    link.symlink_to(journal)  # a holder killed with kill -9 leaves its link
    lock = PromptSymlinkLock(str(journal), grace_period=0.3)
    with caplog.at_level("WARNING", logger="pipeline.search"):
        assert lock.acquire()
    assert link.is_symlink() and "is taken to be dead" in caplog.text
    lock.release()
    assert not link.exists()
    with pytest.raises(RuntimeError, match="was not held"):
        lock.release()


def test_a_live_holder_that_keeps_writing_is_not_broken(tmp_path):
    journal = tmp_path / "journal.log"
    journal.write_text("")
    holder = PromptSymlinkLock(str(journal))
    holder.acquire()
    released_at: list[float] = []

    def work() -> None:  # writes for 3 grace periods, then lets go
        for i in range(60):
            with open(journal, "a") as f:
                f.write(f"{i}\n")
            time.sleep(0.05)
        released_at.append(time.monotonic())
        holder.release()

    writer = threading.Thread(target=work)
    writer.start()
    waiter = PromptSymlinkLock(str(journal), grace_period=1.0)
    assert waiter.acquire()
    acquired_at = time.monotonic()
    writer.join(10)
    assert released_at and acquired_at >= released_at[0], "broke the lock of a holder still writing"
    waiter.release()

"""Which process is which, beyond its PID. Torch-free, Linux (/proc).

A PID alone names a process only while it lives: the kernel hands the number to the next process once
the old one is reaped, and a dead process whose parent has not reaped it (a zombie) still answers
``kill(pid, 0)``. A process is identified here by host, boot, PID and its start time (field 22 of
/proc/<pid>/stat, clock ticks after boot), which together never repeat. A record without a start time
(written by an earlier version, or by hand) names a process only when its command line can be checked
against what the job runs (:attr:`ProcessIdentity.commands`); otherwise it names none: such a PID is
never signalled or waited on.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def boot_id() -> str:
    """This boot of this machine ("" when the kernel does not say)."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def host() -> str:
    return socket.gethostname()


def cpu_name() -> str:
    """This machine's processor, as /proc/cpuinfo names it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on, or None when there is no such process. The command name
    (field 2) may hold spaces and parentheses, so the fields are counted from its last ')'."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def command_line(pid: int) -> str:
    """The process's arguments joined by spaces ("" when it is gone or cannot be read)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    started: int | None  # clock ticks after boot; None: recorded by an older version, PID only
    host: str = ""
    boot_id: str = ""
    # Without a start time: texts of which the process's command line must hold one (the job's own
    # folder, say) for the PID to still be the job's. Never recorded; empty: a PID alone names nothing.
    commands: tuple[str, ...] = ()

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The identity of the live process ``pid`` on this machine, or None when it does not exist."""
        fields = _stat_fields(pid)
        if fields is None:
            return None
        return cls(pid, int(fields[19]), host(), boot_id())

    @classmethod
    def from_record(cls, record: Mapping[str, Any], pid_key: str = "pid") -> ProcessIdentity | None:
        """From a manifest entry or owner record; None when it holds no usable PID."""
        try:
            pid = int(record[pid_key])
        except (KeyError, TypeError, ValueError):
            return None
        started = record.get("started")
        return cls(
            pid,
            int(started) if isinstance(started, int) else None,
            str(record.get("host", "")),
            str(record.get("boot_id", "")),
        )

    def record(self) -> dict[str, Any]:
        return {"pid": self.pid, "started": self.started, "host": self.host, "boot_id": self.boot_id}

    def on_this_machine(self) -> bool:
        """False when recorded on another host; an empty host (old records) counts as this one."""
        return not self.host or self.host == host()

    def is_alive(self) -> bool:
        """Whether this very process still runs on this machine (zombies are dead). Only meaningful where
        :meth:`on_this_machine`; callers decide what a process on another host means to them."""
        if self.pid <= 0:
            return False
        if self.boot_id and boot_id() and self.boot_id != boot_id():
            return False  # the machine rebooted since: every process of that boot is gone
        fields = _stat_fields(self.pid)
        if fields is None or fields[0] in ("Z", "X", "x"):
            return False
        if self.started is None:  # a PID alone may be anyone's by now: only the job's command line tells
            line = command_line(self.pid)
            return any(c in line for c in self.commands)
        return int(fields[19]) == self.started

    def send_signal(self, signum: int) -> bool:
        """Signal this process only if it is still the one recorded; True when the signal was sent.

        Through a pidfd where the kernel has them, so a PID freed and reused between the check and the
        signal cannot redirect it: the pidfd keeps naming the process it was opened on."""
        if not self.on_this_machine():
            return False
        pidfd = None
        if hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(self.pid)
            except ProcessLookupError:
                return False
            except OSError:
                pidfd = None  # an old kernel: fall back to kill() right after the check
        try:
            if not self.is_alive():
                return False
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signum)
            else:
                os.kill(self.pid, signum)
            return True
        except ProcessLookupError:
            return False
        finally:
            if pidfd is not None:
                os.close(pidfd)


def die_with_parent(signum: int = signal.SIGTERM, expected_parent: int | None = None) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent exits (Linux prctl
    PR_SET_PDEATHSIG), so that killing a local job's controller, even with SIGKILL, which it cannot
    forward, still stops the training it started. Returns False where that is not available.

    If the parent is already gone (this process was reparented before the call: its parent is not
    ``expected_parent``), the signal is sent at once."""
    parent = os.getppid() if expected_parent is None else expected_parent
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)
    return True

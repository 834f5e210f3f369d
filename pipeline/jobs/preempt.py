"""Stopping cleanly before a time limit or on preemption. Torch-free.

Slurm sends SIGUSR2 some time before a job's limit (``--signal=USR2@<delay>``: submitit's sbatch header
and the plain sbatch scripts ask for it) and SIGTERM when it preempts or requeues a job or when it is
cancelled. A signal handler only records the signal: Python runs handlers between bytecodes, possibly in
the middle of an optimizer update, so saving from there could write half-updated weights. The training
loop polls :data:`STOP` after every step and, at that safe point, writes a checkpoint and raises
:class:`Preempted`. The job then asks Slurm to requeue it (SIGUSR2: the time limit; Slurm itself
requeues preempted or ``scontrol requeue``-ed jobs), and the requeued job resumes from the checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType
from typing import Any

from pipeline.jobs import slurm as slurm_cli
from pipeline.jobs.alive import this_slurm_job

log = logging.getLogger("pipeline.jobs.preempt")

HANDLED = (signal.SIGUSR2, signal.SIGTERM)


class Preempted(Exception):
    """Raised by a stage after it has saved a checkpoint in response to a signal."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by signal {signum}; checkpoint saved")


class StopRequest:
    """Which handled signal (if any) arrived since :meth:`install`."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        self.signum = None
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            log.warning("received %s: stopping at the next step", signal.Signals(signum).name)
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None


STOP = StopRequest()


def handle(p: Preempted, max_requeues: int) -> tuple[str | None, str]:
    """After a stage stopped on a signal: requeue on SIGUSR2 (time limit) within ``max_requeues``.

    Returns (how the run ended as a word of :data:`pipeline.jobs.endings.STATES`, or None when it goes on in
    a requeued job; what happened, for the log). On SIGTERM Slurm is already requeueing or cancelling
    the job; which of the two, the job cannot tell (sacct can).
    """
    job = this_slurm_job()
    if p.signum != signal.SIGUSR2:
        return "stopped", "stopped on SIGTERM (preempted, requeued or cancelled by Slurm)"
    if job is None:
        return "stopped", "stopped on SIGUSR2 outside Slurm: run the same command again to resume"
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts >= max_requeues:
        return "time-limit", (
            f"time limit near and slurm.max_requeues={max_requeues} requeues used: not requeued; "
            "submit the sweep again to resume"
        )
    if slurm_cli.requeue(job):
        return None, f"time limit near: job {job} requeued ({restarts + 1}/{max_requeues})"
    return "time-limit", f"time limit near: requeue of job {job} failed; submit the sweep again to resume"

"""The training loop's hook into a search's early stopping, set around a trial's run by the search job
(:mod:`pipeline.search.job`) as a context variable, so nothing is passed through the stages' signatures.
Outside a search there is none and the loop never stops early. No optuna, no torch."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Protocol, Sequence

from pipeline.search.figures import FIGURES


class EpochReporter(Protocol):
    def report(self, epoch: int, value: float) -> bool:
        """Report the epoch's value; True when the trial is to stop now."""
        ...


class EarlyStopHook:
    """What the loop calls after each training epoch: the objective's epoch value (the best validation
    accuracy so far for accuracies) handed to the trial's reporter."""

    def __init__(self, reporter: EpochReporter, objective: str):
        self.reporter = reporter
        self.figure = FIGURES[objective]
        self.stopped_at: int | None = None

    def after_epoch(self, epoch: int, history: Sequence[dict[str, Any]]) -> bool:
        value = self.figure.epoch_value(history)
        if value is None or not self.reporter.report(epoch, value):
            return False
        self.stopped_at = epoch
        return True


_CURRENT: contextvars.ContextVar[EarlyStopHook | None] = contextvars.ContextVar("early_stop_hook", default=None)


def current_hook() -> EarlyStopHook | None:
    """The running trial's hook, None outside a search."""
    return _CURRENT.get()


@contextlib.contextmanager
def installed(hook: EarlyStopHook | None) -> Iterator[None]:
    token = _CURRENT.set(hook)
    try:
        yield
    finally:
        _CURRENT.reset(token)

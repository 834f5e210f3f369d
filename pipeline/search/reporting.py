"""The training loop's hook into a search's early stopping, set around a trial's run by the search job
(:mod:`pipeline.search.job`) through :mod:`pipeline.stages.hooks` (a context variable the loop reads), so
nothing is passed through the stages' signatures and the stages import nothing of the search. No optuna,
no torch."""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from pipeline.search.figures import FIGURES
from pipeline.stages.hooks import current_hook, installed  # noqa: F401  (the search job sets the hook)


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

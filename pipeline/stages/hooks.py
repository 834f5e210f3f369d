"""Hooks a caller above the stages sets around a run, read by the training loop: today the early-stopping
hook of a search's trial (:mod:`pipeline.search.reporting` makes it, :mod:`pipeline.search.job` sets it),
held in a context variable so nothing is passed through the stages' signatures and the stages import
nothing of the search. Outside a search there is none and the loop never stops early."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Protocol, Sequence


class EpochHook(Protocol):
    def after_epoch(self, epoch: int, history: Sequence[dict[str, Any]]) -> bool:
        """Called after each training epoch (1-based) with the history so far; True stops the training."""
        ...


_CURRENT: contextvars.ContextVar[EpochHook | None] = contextvars.ContextVar("epoch_hook", default=None)


def current_hook() -> EpochHook | None:
    """The running trial's hook, None outside a search."""
    return _CURRENT.get()


@contextlib.contextmanager
def installed(hook: EpochHook | None) -> Iterator[None]:
    token = _CURRENT.set(hook)
    try:
        yield
    finally:
        _CURRENT.reset(token)

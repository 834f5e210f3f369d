"""The decisions of a budget search as pure functions of the attempts so far (no torch, no files).

An attempt is a plain dict, as it is written to ``metrics/prune.json`` or ``metrics/quantize.json``: what
was tried (``level`` on the allocation path, ``fraction`` for a sparsity or a uniform ratio,
``fp32_layers`` for int8), what it reached (``val_acc``, and ``drop``: points of top-1 lost against the
reference model) and how much it removed (``macs_removed`` or ``fraction``). With the same settings and the
same finished attempts, ``next_level``, ``next_fraction`` and ``next_fp32_layers`` propose the same next
attempt: a job that was killed reloads the attempts it finished and proposes the one in progress again,
whose fine-tune then resumes from its checkpoint.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "DONE",
    "OVER_BUDGET",
    "allocation_path",
    "check_budget",
    "choose",
    "drop_points",
    "first_level",
    "next_fp32_layers",
    "next_fraction",
    "next_level",
    "within_budget",
]

DONE = "done"
OVER_BUDGET = "over budget"  # no attempt met the budget: the best one is kept and the run is not failed

Attempt = Mapping[str, Any]

# A drop equal to the budget meets it; sums of float accuracies differ in the last bits.
_TOLERANCE = 1e-9
# Points of top-1 added to every predicted drop increase when ranking upgrades: a group whose sensitivity
# shows no loss is not infinitely attractive, and drops below this noise level count alike.
_DROP_FLOOR = 0.05


def drop_points(reference_acc: float, acc: float) -> float:
    """Validation top-1 lost against the reference, in points (accuracies are fractions in [0, 1])."""
    return 100.0 * (float(reference_acc) - float(acc))


def within_budget(drop: float, max_drop: float) -> bool:
    return float(drop) <= float(max_drop) + _TOLERANCE


def check_budget(max_drop: float, max_attempts: int | None = None) -> None:
    """ValueError unless ``max_drop`` is a finite number >= 0 and ``max_attempts`` an int >= 1."""
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop):
        raise ValueError(f"max_drop must be a finite number of points >= 0, got {max_drop!r}")
    if max_drop < 0:
        raise ValueError(f"max_drop must be >= 0 points, got {max_drop}")
    if max_attempts is not None and (
        isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1
    ):
        raise ValueError(f"max_attempts must be an int >= 1, got {max_attempts!r}")


def choose(history: Sequence[Attempt], max_drop: float, size: Callable[[Attempt], float]) -> tuple[int, str]:
    """(index of the chosen attempt, status): the largest ``size`` within budget (then the better accuracy,
    then the earlier attempt), status ``done``; if none is within budget, the best accuracy (then the
    smaller size, then the earlier), status ``over budget``."""
    if not history:
        raise ValueError("no attempt to choose from")
    ok = [i for i, h in enumerate(history) if within_budget(h["drop"], max_drop)]
    if ok:
        return max(ok, key=lambda i: (size(history[i]), history[i]["val_acc"], -i)), DONE
    best = max(range(len(history)), key=lambda i: (history[i]["val_acc"], -size(history[i]), -i))
    return best, OVER_BUDGET


# --------------------------------------------------------------------------------------------------
# Structured pruning: a path of per-group ratios, bisected by fine-tuned attempts
# --------------------------------------------------------------------------------------------------


def _monotone(points: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """A group's sensitivity points by ratio, without those that remove no more MACs than a smaller ratio
    (``round_to`` can make several ratios, or a large one, keep the same width), with the drop made
    non-decreasing (a larger ratio never predicts less loss: a lower measured drop is noise)."""
    out: list[dict[str, float]] = []
    drop = macs = 0.0
    for p in sorted(points, key=lambda p: float(p["ratio"])):
        drop = max(drop, float(p["drop"]))
        if float(p["macs_removed"]) > macs:
            macs = float(p["macs_removed"])
            out.append({"ratio": float(p["ratio"]), "drop": drop, "macs_removed": macs})
    return out


def _path_entry(groups: Mapping[str, list[dict[str, float]]], at: Mapping[str, int]) -> dict[str, Any]:
    chosen = {name: groups[name][i] for name, i in sorted(at.items())}
    return {
        "ratios": {name: p["ratio"] for name, p in chosen.items()},
        "macs_removed_pred": sum(p["macs_removed"] for p in chosen.values()),
        "drop_pred": sum(p["drop"] for p in chosen.values()),
    }


def _best_upgrade(groups: Mapping[str, list[dict[str, float]]], at: Mapping[str, int]) -> tuple[str, int] | None:
    """The (group, point) that removes the most predicted MACs per predicted point of drop."""
    best: tuple[tuple[float, float], str, int] | None = None
    for name in sorted(groups):
        points = groups[name]
        current = points[at[name]] if name in at else {"macs_removed": 0.0, "drop": 0.0}
        for i in range(at.get(name, -1) + 1, len(points)):
            gained = points[i]["macs_removed"] - current["macs_removed"]
            if gained <= 0:
                continue
            cost = points[i]["drop"] - current["drop"]
            key = (gained / (max(cost, 0.0) + _DROP_FLOOR), gained)
            if best is None or key > best[0]:
                best = (key, name, i)
    return None if best is None else (best[1], best[2])


def allocation_path(sensitivity: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-group ratios from none pruned (level 0) to every group at its largest ratio (the last level).

    Each step raises one group to the sensitivity ratio that removes the most MACs per point of predicted
    drop (greedy on a multiple-choice knapsack; drops and MACs of groups are taken as additive). Level i
    holds ``ratios`` ({group: ratio}, groups at 0 left out), ``macs_removed_pred`` (fraction of the model's
    MACs) and ``drop_pred`` (points, without fine-tuning). The same record gives the same path.
    """
    groups = {str(g["name"]): _monotone(g["points"]) for g in sensitivity["groups"] if g["points"]}
    at: dict[str, int] = {}
    path = [_path_entry(groups, at)]
    while (step := _best_upgrade(groups, at)) is not None:
        at[step[0]] = step[1]
        path.append(_path_entry(groups, at))
    return path


def first_level(path: Sequence[Mapping[str, Any]], max_drop: float) -> int:
    """The last level whose predicted drop (no fine-tuning) is within budget, at least 1."""
    fits = [i for i, p in enumerate(path) if i > 0 and within_budget(p["drop_pred"], max_drop)]
    return max(fits, default=1)


def next_level(
    path: Sequence[Mapping[str, Any]], history: Sequence[Attempt], *, max_drop: float, max_attempts: int
) -> int | None:
    """The path level to fine-tune next, or None when the search is over.

    The first attempt is ``first_level``; then bisection between the highest level within budget (level 0,
    the unpruned model, counts as within) and the lowest level above it that missed (or one past the
    last level while none has), until the two are adjacent or ``max_attempts`` fine-tunes are spent.
    """
    last = len(path) - 1
    if last < 1 or len(history) >= max_attempts:
        return None
    if not history:
        return first_level(path, max_drop)
    levels = [(int(h["level"]), within_budget(h["drop"], max_drop)) for h in history]
    lo = max((level for level, ok in levels if ok), default=0)
    hi = min((level for level, ok in levels if not ok and level > lo), default=last + 1)
    mid = (lo + hi) // 2
    if mid <= lo or mid > last or mid in {level for level, _ in levels}:
        return None
    return mid


# --------------------------------------------------------------------------------------------------
# One number: unstructured sparsity, or a uniform structured ratio
# --------------------------------------------------------------------------------------------------


def next_fraction(
    history: Sequence[Attempt],
    *,
    max_drop: float,
    max_attempts: int,
    start: float = 0.5,
    upper: float = 0.98,
    resolution: float = 0.01,
) -> float | None:
    """The next ``fraction`` (a global sparsity, or one ratio for every group) to fine-tune, or None.

    Starts at ``start``; then bisection between the largest fraction within budget (0 counts as within)
    and the smallest larger one that missed (1 while none has), rounded to ``resolution`` and at most
    ``upper``, until no new fraction lies strictly between them or ``max_attempts`` are spent.
    """
    if len(history) >= max_attempts:
        return None
    if not history:
        return float(start)
    tried = [float(h["fraction"]) for h in history]
    lo = max((f for f, h in zip(tried, history) if within_budget(h["drop"], max_drop)), default=0.0)
    hi = min((f for f, h in zip(tried, history) if f > lo and not within_budget(h["drop"], max_drop)), default=1.0)
    mid = min(round(round((lo + hi) / 2 / resolution) * resolution, 6), float(upper))
    if not lo < mid < hi or any(math.isclose(mid, f, abs_tol=1e-9) for f in tried):
        return None
    return mid


# --------------------------------------------------------------------------------------------------
# int8: layers left in fp32 one at a time
# --------------------------------------------------------------------------------------------------


def next_fp32_layers(steps: Sequence[Attempt], *, max_drop: float, max_steps: int | None = None) -> list[str] | None:
    """The layers to keep in fp32 at the next int8 step, or None when the search is over.

    Step 0 keeps none. After a step that missed the budget, its ``fp32_layers`` plus the quantized layer
    with the highest ``costs`` entry (ties: the first name). Over when a step met the budget, when
    ``max_steps`` layers were moved already, or when no quantized layer is left to move.
    """
    if not steps:
        return []
    last = steps[-1]
    kept = list(last["fp32_layers"])
    if within_budget(last["drop"], max_drop) or (max_steps is not None and len(kept) >= max_steps):
        return None
    candidates = sorted((-float(c), name) for name, c in (last.get("costs") or {}).items() if name not in kept)
    if not candidates or int(last.get("quantized_layers", len(candidates))) <= 1:
        return None  # the last quantized layer cannot go: an int8 program needs one quantized op
    return kept + [candidates[0][1]]

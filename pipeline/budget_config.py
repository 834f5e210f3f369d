"""The settings of compression to an accuracy budget (issue 18, docs/budget-design.md): their rules and
which of them do nothing in a run. :func:`pipeline.config.validate_flat` calls :func:`budget_problems`;
both functions read a complete dotted dict of typed values. Torch-free (login node).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

AUTO = "auto"
_AUTO_ONLY = ("max_attempts", "sensitivity_ratios", "sensitivity_batches", "compare_uniform")
# settings added with the budget: hashed into run ids and stage keys only when not at their default
LATER_KEYS = tuple(
    [f"prune.{k}" for k in ("max_drop", *_AUTO_ONLY)]
    + [f"quant.{k}" for k in ("max_drop", "ranking", "max_fp32_layers")]
)
_STRUCTURED_ONLY = ("sensitivity_ratios", "sensitivity_batches", "compare_uniform")


def is_auto(flat: Mapping[str, Any]) -> bool:
    return flat["prune.method"] != "none" and flat["prune.sparsity"] == AUTO


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _drop_problem(value: Any) -> str | None:
    if value is None or (_is_number(value) and value >= 0):
        return None
    return f"must be a number of points of validation top-1 >= 0 (e.g. 1.0) or null, got {value!r}."


def _sparsity_problems(flat: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    s = flat["prune.sparsity"]
    if s == AUTO:
        return
    if not _is_number(s) or not 0 <= s < 1:
        yield "prune.sparsity", f"must be a fraction in [0, 1) of the weights removed, or auto, got {s!r}."


def _auto_problems(flat: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    if flat["prune.method"] == "none":
        return  # every prune setting does nothing
    if flat["prune.sparsity"] != AUTO:
        if flat["prune.max_drop"] is not None:
            yield "prune.max_drop", "applies only to prune.sparsity: auto (allowed here: null)."
        return
    if flat["prune.during"] != "finetune" or (
        flat["prune.method"] == "structured" and flat["prune.iterative_steps"] > 1
    ):
        yield (
            "prune.sparsity",
            "auto works with prune.method structured or unstructured, prune.during: finetune and "
            "prune.iterative_steps: 1 (the search spends fine-tunes; the sensitivity pass prunes in one step).",
        )
    if flat["prune.max_drop"] is None:
        yield (
            "prune.max_drop",
            "prune.sparsity: auto needs prune.max_drop (points of validation top-1 the pruned model may "
            "lose, e.g. 1.0).",
        )
    ratios = flat["prune.sensitivity_ratios"]
    if not ratios or not all(_is_number(r) and 0 < r < 1 for r in ratios):
        yield "prune.sensitivity_ratios", f"must be a non-empty list of ratios in (0, 1), got {list(ratios)}."


def _quant_problems(flat: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    drop = flat["quant.max_drop"]
    if drop is not None and flat["quant.method"] not in ("int8", "qat"):
        yield "quant.max_drop", f"applies to quant.method int8 or qat, not {flat['quant.method']} (allowed here: null)."
    n = flat["quant.max_fp32_layers"]
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        yield "quant.max_fp32_layers", f"must be an int >= 1 or null, got {n!r}."


def budget_problems(flat: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(dotted key, message) for each budget setting that is wrong, in a fixed order. A missing
    ``prune.max_drop`` is named as such; :func:`origin` says whose file to blame."""
    yield from _sparsity_problems(flat)
    for key in ("prune.max_drop", "quant.max_drop"):
        if (problem := _drop_problem(flat[key])) is not None:
            yield key, problem
    yield from _auto_problems(flat)
    yield from _quant_problems(flat)
    budget = (is_auto(flat) and flat["prune.max_drop"] is not None) or flat["quant.max_drop"] is not None
    if budget and flat["data.val_size"] < 1:
        key = "prune.max_drop" if is_auto(flat) else "quant.max_drop"
        yield key, "prune.max_drop / quant.max_drop need a validation split: set data.val_size > 0."


def inert_budget(flat: Mapping[str, Any]) -> dict[str, str]:
    """The budget settings that do nothing with these values (see :func:`pipeline.config.inert_settings`)."""
    out: dict[str, str] = {}
    if not is_auto(flat):
        for leaf in (*_AUTO_ONLY, "max_drop"):
            out[f"prune.{leaf}"] = "does nothing without prune.sparsity: auto"
    elif flat["prune.method"] == "unstructured":
        for leaf in _STRUCTURED_ONLY:
            out[f"prune.{leaf}"] = "does nothing with prune.method=unstructured"
    if flat["quant.max_drop"] is None:
        for leaf in ("ranking", "max_fp32_layers"):
            out[f"quant.{leaf}"] = "does nothing without quant.max_drop"
    return out


def origin(key: str, message: str) -> str:
    """The setting whose source an error about ``key`` names: a missing prune.max_drop was asked for
    by whoever set prune.sparsity: auto."""
    return "prune.sparsity" if key == "prune.max_drop" and "needs prune.max_drop" in message else key

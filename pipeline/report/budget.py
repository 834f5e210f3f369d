"""Compression to an accuracy budget in the report (issue 18): the models block's budget cells, the notes
under it (over budget, the int8 layers kept in fp32) and one plot per run of every attempt. Reads the
JSON records only (``budget`` in metrics/prune.json and metrics/quantize.json): no torch, login node.
"""

from __future__ import annotations

from typing import Any, Sequence

from pipeline.report.records import Record

_STAGE = {"pruned": "prune", "int8": "quantize"}


def budget_record(r: Record, stage: str) -> dict[str, Any] | None:
    b = (r.stages.get(stage) or {}).get("budget")
    return b if isinstance(b, dict) and isinstance(b.get("max_drop"), (int, float)) else None


def _points(value: Any) -> str:
    return f"{value:.2f} pt" if isinstance(value, (int, float)) else ""


def budget_cells(r: Record, name: str) -> dict[str, Any]:
    """The budget columns of the model row ``name`` (pruned, int8) of run ``r``; {} without a budget."""
    stage = _STAGE.get(name)
    b = budget_record(r, stage) if stage else None
    if b is None:
        return {}
    cells: dict[str, Any] = {"budget": f"{b['max_drop']:g} pt", "drop": _points(b.get("drop"))}
    if stage == "prune":
        cells["attempts"] = f"{len(b.get('attempts') or [])}/{b.get('max_attempts', '?')}"
        uniform = b.get("uniform") or {}
        cells["uniform_top1"] = uniform.get("val_acc")
    else:
        cells["attempts"] = str(len(b.get("steps") or []))
        cells["fp32_layers"] = len(b.get("fp32_layers") or [])
    if b.get("status") != "done":
        cells["drop"] += " (over budget)"
    return cells


def budget_notes(records: Sequence[Record]) -> list[str]:
    """Lines under a models block: runs over budget (a note, not a failure) and the int8 fp32 layers."""
    notes = []
    for r in records:
        for stage, what in (("prune", "pruning"), ("quantize", "int8")):
            b = budget_record(r, stage)
            if b is None:
                continue
            if b.get("status") != "done":
                notes.append(
                    f"{r.id}: {what} over budget: best attempt {b.get('drop', 0):.2f} pt > {b['max_drop']:g} "
                    "(kept; the run did not fail)"
                )
            if stage == "quantize" and b.get("fp32_layers"):
                notes.append(f"{r.id}: int8 layers kept in fp32: {', '.join(b['fp32_layers'])}")
    if any(budget_record(r, s) for r in records for s in _STAGE.values()):
        notes.append(
            "budget: points of validation top-1 the step may lose (pruning against the trained model, int8 "
            "against the model it quantizes); drop: what the chosen attempt lost; uniform: one ratio for "
            "every layer at the same MACs, fine-tuned the same way"
        )
    return notes


# --------------------------------------------------------------------------------------------------
# The plot: every attempt of a run (drawn by pipeline.report.plots.render_budget)
# --------------------------------------------------------------------------------------------------


def _prune_points(b: dict[str, Any]) -> tuple[str, list[tuple[float, float]]]:
    attempts = b.get("attempts") or []
    if b.get("method") == "unstructured":
        return "weights pruned (%)", [(100 * a.get("fraction", 0), 100 * a["val_acc"]) for a in attempts]
    return "MACs (M)", [(a["macs"] / 1e6, 100 * a["val_acc"]) for a in attempts]


def budget_panels(r: Record) -> list[dict[str, Any]]:
    """What the per-run budget plot draws, one panel per budgeted stage: ``points`` (x, validation top-1 %)
    of every attempt in order, ``chosen``, ``line`` (reference - max_drop), ``uniform`` (x, y) or None."""
    panels = []
    for stage in ("prune", "quantize"):
        b = budget_record(r, stage)
        if b is None:
            continue
        if stage == "prune":
            xlabel, pts = _prune_points(b)
        else:
            xlabel = "layers kept in fp32"
            pts = [(float(len(s["fp32_layers"])), 100 * s["val_acc"]) for s in b.get("steps") or []]
        uniform = b.get("uniform") or {}
        structured = stage == "prune" and b.get("method") != "unstructured" and "macs" in uniform
        panels.append(
            {
                "stage": stage,
                "xlabel": xlabel,
                "points": pts,
                "chosen": b.get("chosen"),
                "status": b.get("status"),
                "max_drop": b["max_drop"],
                "line": 100 * b["reference_val_acc"] - b["max_drop"],
                "uniform": (uniform["macs"] / 1e6, 100 * uniform["val_acc"]) if structured else None,
            }
        )
    return panels

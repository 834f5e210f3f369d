"""The figures a run records that a search objective may name, where each is read from, and a run
folder's result as a search outcome. Torch-free and optuna-free (the login node validates with it).

The names are the runs table's CSV keys (:mod:`pipeline.report.tables`), so what a search optimizes is
what ``collect`` shows under the same name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pipeline.report.records import Record, read_record
from pipeline.report.tables import COMPRESSION_COLUMNS, TRAIN_COLUMNS
from pipeline.rundir import STOPPED_EARLY, RunDir, resumable

STOPPED = STOPPED_EARLY  # metrics/train.json's status of a training the search stopped early


@dataclass(frozen=True)
class Figure:
    name: str
    where: str  # the file and key it is read from, for messages
    read: Callable[[Record], Any]
    # history key of metrics/train.json judged every epoch by early stopping, and whether the best so
    # far is reported (accuracies) rather than the epoch's own value (losses); None: no epoch value
    per_epoch: tuple[str, bool] | None = None
    # settings the run needs for the figure to exist: dotted key -> values that make it
    requires: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def epoch_value(self, history: Sequence[dict[str, Any]]) -> float | None:
        """The value early stopping judges after the last epoch of ``history`` (train.json's rows)."""
        if self.per_epoch is None or not history:
            return None
        key, best_so_far = self.per_epoch
        values = [float(row[key]) for row in history if isinstance(row.get(key), (int, float))]
        if not values:
            return None
        return max(values) if best_so_far else values[-1]


def _train(key: str) -> Callable[[Record], Any]:
    return lambda r: r.metrics.get(key) if r.metrics.get("status") == "done" else None


def _final_model(key: str) -> Callable[[Record], Any]:
    """A figure of the run's last fp32 model as measured: the pruned one when there is one."""

    def read(r: Record) -> Any:
        entries = {e["name"]: e for e in r.measured()}
        entry = entries.get("pruned") or entries.get("trained") or {}
        return entry.get(key)

    return read


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _val_acc(stage: dict[str, Any], key: str) -> float | None:
    """A validation accuracy of a compress stage's record: its budget's, else its own top-level one."""
    budget = stage.get("budget")
    budget = budget if isinstance(budget, dict) else {}
    return _number(budget.get(key, stage.get(key)))


def val_acc_drop(r: Record) -> float | None:
    """Points of validation top-1 the compressed model (int8 when quantized, else pruned) loses against
    the trained model. The compressed accuracy is the quantize (else prune) record's ``val_acc``; the
    trained model's is the prune budget's ``reference_val_acc`` (the trained model), else the quantize
    budget's when nothing was pruned, else the last epoch of train.json. None when the run has no
    compressed model or its stage recorded no validation accuracy (only budgets do: quant.max_drop,
    prune.sparsity auto)."""
    prune = r.stages.get("prune") or {}
    quant = r.stages.get("quantize") or {}
    pruned, quantized = prune.get("method", "none") != "none", quant.get("method", "none") != "none"
    acc = _val_acc(quant, "val_acc") if quantized else _val_acc(prune, "val_acc") if pruned else None
    reference = _val_acc(prune, "reference_val_acc") if pruned else None
    if reference is None and not pruned and quantized:
        reference = _val_acc(quant, "reference_val_acc")
    if reference is None:
        history = r.metrics.get("history") or [{}]
        reference = _number(history[-1].get("val_acc")) if isinstance(history[-1], dict) else None
    return None if acc is None or reference is None else 100.0 * (reference - acc)


_ACC_EPOCH = ("val_acc", True)  # accuracies are judged by the best validation accuracy so far
_PER_EPOCH: dict[str, tuple[str, bool]] = {
    "train_loss": ("train_loss", False),
    "train_acc_best": ("train_acc", True),
    "val_loss": ("val_loss", False),
    "val_acc_best": _ACC_EPOCH,
    "test_loss": ("val_loss", False),
    "test_acc": _ACC_EPOCH,
    "pruned_test_acc": _ACC_EPOCH,
    "int8_test_acc": _ACC_EPOCH,
}
_QUANTIZED = {"quant.method": ("int8", "qat")}
_MEASURED = {"measure.enabled": (True,)}
_REQUIRES: dict[str, dict[str, tuple[Any, ...]]] = {
    "sparsity": {"prune.method": ("unstructured", "structured")},
    "pruned_test_acc": {"prune.method": ("unstructured", "structured"), "prune.during": ("finetune",)},
    "int8_test_acc": _QUANTIZED,
    "fp32_bytes": _MEASURED,
    "int8_bytes": _QUANTIZED,
    "int8_gzip_bytes": _QUANTIZED,
    "fp32_latency_ms": _MEASURED,
    "int8_latency_ms": {**_QUANTIZED, **_MEASURED},
    "params": _MEASURED,
    "macs": _MEASURED,
}
_WHERE = {
    "sparsity": "metrics/prune.json sparsity",
    "pruned_test_acc": "metrics/prune.json test_acc",
    "int8_test_acc": "metrics/quantize.json test_acc",
    "fp32_bytes": "metrics/measure.json models[trained].file_bytes",
    "int8_bytes": "metrics/measure.json models[int8].file_bytes",
    "int8_gzip_bytes": "metrics/measure.json models[int8].file_gzip_bytes",
    "fp32_latency_ms": "metrics/measure.json models[trained].latency_b1_ms",
    "int8_latency_ms": "metrics/measure.json models[int8].latency_b1_ms",
}


def _figures() -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    for key, _, train_key, *_ in TRAIN_COLUMNS:
        out[key] = Figure(key, f"metrics/train.json {train_key}", _train(train_key), _PER_EPOCH.get(key))
    out["train_time_s"] = Figure("train_time_s", "metrics/train.json train_time_s", _train("train_time_s"))
    for key, _, read, *_ in COMPRESSION_COLUMNS:
        out[key] = Figure(key, _WHERE[key], read, _PER_EPOCH.get(key), _REQUIRES.get(key, {}))
    out["params"] = Figure(
        "params", "metrics/measure.json parameters (pruned, else trained)", _final_model("parameters"), None, _MEASURED
    )
    out["macs"] = Figure(
        "macs",
        "metrics/measure.json macs_per_image (pruned, else trained)",
        _final_model("macs_per_image"),
        None,
        _MEASURED,
    )
    out["val_acc_drop"] = Figure(
        "val_acc_drop",
        "points: metrics/train.json or prune.json budget.reference_val_acc minus quantize.json (else "
        "prune.json) val_acc",
        val_acc_drop,
    )
    return out


FIGURES: dict[str, Figure] = _figures()
# Shorter names people write (the issue's own example says int8_ms)
ALIASES: dict[str, str] = {"int8_ms": "int8_latency_ms", "fp32_ms": "fp32_latency_ms"}


def figure(name: str) -> Figure | None:
    return FIGURES.get(ALIASES.get(name, name))


def figures_text() -> str:
    """Every figure with where it is read from, for error messages."""
    return "; ".join(f"{f.name} ({f.where})" for f in FIGURES.values())


# --------------------------------------------------------------------------------------------------
# A run folder's result as a search outcome
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How a trial ended: ``done`` with one value per objective (the spec's order), ``stopped`` early by
    the search (at ``epoch``), or ``failed`` with a reason."""

    status: Literal["done", "stopped", "failed"]
    values: tuple[float, ...] | None = None
    reason: str = ""
    epoch: int | None = None
    figures: dict[str, float] = field(default_factory=dict)  # the constraints' figures (done only)

    @classmethod
    def done(cls, values: Sequence[float], figures: dict[str, float] | None = None) -> Outcome:
        return cls("done", tuple(float(v) for v in values), figures=dict(figures or {}))

    @classmethod
    def stopped(cls, epoch: int | None = None) -> Outcome:
        return cls("stopped", epoch=epoch)

    @classmethod
    def failed(cls, reason: str) -> Outcome:
        return cls("failed", reason=reason)


def read_values(record: Record, objectives: Sequence[str], constraints: Sequence[str] = ()) -> Outcome:
    """The objectives' values (and the constraints' figures) of a finished run; failed naming the file
    when one is missing or not a finite number (a figure the run's settings do not produce)."""
    values = []
    for name in [*objectives, *constraints]:
        fig = figure(name)
        assert fig is not None, f"unchecked objective {name!r}"  # the spec was validated
        value = fig.read(record)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return Outcome.failed(
                f"run {record.id}: {name} is not recorded as a finite number ({fig.where}: {value!r})"
            )
        values.append(float(value))
    return Outcome.done(values[: len(objectives)], dict(zip(constraints, values[len(objectives) :])))


def outcome_from_run(run_path: Path, objectives: Sequence[str], constraints: Sequence[str] = ()) -> Outcome | None:
    """The outcome a run folder already holds: done (with the objectives' values), stopped early,
    failed or diverged (a reason naming its log); None while it has none (absent, pending, running)."""
    if not (run_path / "config.yaml").exists():
        return None
    record = read_record(RunDir(run_path), run_path.parent.name)
    if any(resumable(m) for m in record.stages.values()):
        return None  # a stage that failed writing (disk full) with its checkpoint intact: not an end
    train = record.stages.get("train") or {}
    if train.get("status") == STOPPED:
        epoch = train.get("epochs")
        return Outcome.stopped(epoch if isinstance(epoch, int) else None)
    if record.status == "done":
        return read_values(record, objectives, constraints)
    if record.status in ("diverged", "failed", "blocked"):
        stage = next((s for s, m in record.stages.items() if m.get("status") not in (None, "done")), "train")
        error = str(record.stages.get(stage, {}).get("error") or record.status)
        return Outcome.failed(f"run {record.id} {record.status} in its {stage} stage ({error}; log {record.run.log})")
    return None

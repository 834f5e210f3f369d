"""Tables in the shapes the studies published, built from records: raw values per row, formatting
left to the writers. Two shapes:

- ``runs_table``: one row per run (study 1): swept values, losses and accuracies, the compression key
  figures when the sweep compresses, time, status; seeds averaged into mean ± std when runs differ only
  in ``train.seed``; ``group_tables`` splits it by the value of a key.
- ``model_tables``: study 3's block per training: one row per model (base, pruned, int8, ...) with
  parameters, file size, top-1/top-5 error and their change from the base, memory, latency, CPU/CUDA
  time, and size and latency reduction factors against the base.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from pipeline import console as cli
from pipeline.report.budget import budget_cells, budget_notes
from pipeline.report.records import AFTER_TRAINING, Record, sort_key
from pipeline.rundir import STOPPED_EARLY, UNREADABLE_OUTPUT


@dataclass(frozen=True)
class Stat:
    """Mean ± sample standard deviation of ``n`` runs (seeds), of the ``of`` that finished (fewer where
    some have no value: a target accuracy some seeds never reached)."""

    mean: float
    std: float
    n: int
    of: int = 0


@dataclass(frozen=True)
class Column:
    key: str  # CSV / JSON key
    title: str  # markdown / terminal title
    kind: str = "text"  # pct | loss | bytes | ms | s | int | factor | text
    better: str | None = None  # "max" | "min": the best value is marked
    delta: bool = False  # the row may hold "<key>_delta" (change from the base), shown after the value


@dataclass
class Table:
    columns: list[Column]
    rows: list[dict[str, Any]]
    title: str = ""
    notes: list[str] = field(default_factory=list)

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if name in (c.key, c.title)), None)


def number(value: Any) -> float | None:
    """A finite float from a raw cell (a Stat gives its mean), else None."""
    if isinstance(value, Stat):
        value = value.mean
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------------
# runs (study 1)
# --------------------------------------------------------------------------------------------------

# (CSV key, title, metrics/train.json key, kind, better)
TRAIN_COLUMNS: list[tuple[str, str, str, str, str]] = [
    ("train_loss", "training loss", "train_loss", "loss", "min"),
    ("train_acc_best", "train best acc", "train_acc_best", "pct", "max"),
    ("val_loss", "val loss", "val_loss", "loss", "min"),
    ("val_acc_best", "val best acc", "val_acc_best", "pct", "max"),
    ("test_loss", "test loss", "test_loss", "loss", "min"),  # shown once some run has it
    ("test_acc", "test acc", "test_acc", "pct", "max"),
]


def _stage(r: Record, stage: str, key: str) -> Any:
    m = r.stages.get(stage) or {}
    return m.get(key) if m.get("status") == "done" and m.get("method", "none") != "none" else None


def _entry(r: Record, name: str, key: str) -> Any:
    return next((e.get(key) for e in r.measured() if e["name"] == name), None)


def runtime(entry: dict[str, Any]) -> str:
    """How a measured model ran: "aoti" (a compiled package), "inductor" (compiled in the job) or "eager";
    records older than this field say it through their compile info."""
    if isinstance(entry.get("runtime"), str):
        return entry["runtime"]
    info = entry.get("compile")
    if not isinstance(info, dict):
        return "eager"
    return str(info.get("backend") or "inductor") if info.get("compiled") else "eager"


def speed_counts(entry: dict[str, Any]) -> bool:
    """Whether the entry's timing is the model's speed: not for an int8 program run eagerly (it
    dequantizes, runs fp32 kernels and quantizes again: slower than fp32, and not what anyone deploys)."""
    return entry.get("name") != "int8" or runtime(entry) != "eager"


def int8_fast_cpu(r: Record) -> bool | None:
    """Whether the CPU the run was measured on has int8 dot-product instructions (VNNI or AMX), as
    measure.json records it (``cpu_int8``); None in records older than that."""
    value = (r.stages.get("measure") or {}).get("cpu_int8")
    return value if isinstance(value, bool) else None


def _int8_latency(r: Record) -> Any:
    e = next((e for e in r.measured() if e["name"] == "int8"), None)
    return e.get("latency_b1_ms") if e is not None and speed_counts(e) else None


def _quant_acc(r: Record) -> Any:
    return _stage(r, "quantize", "test_acc") if _stage(r, "quantize", "method") in ("int8", "qat") else None


def _quant_size(r: Record) -> Any:
    return _entry(r, "int8", "file_bytes") or (_stage(r, "quantize", "raw") if _quant_acc(r) is not None else None)


def _quant_gzip(r: Record) -> Any:
    return _entry(r, "int8", "file_gzip_bytes") or (
        _stage(r, "quantize", "gzip") if _quant_acc(r) is not None else None
    )


def _pruned_acc(r: Record) -> Any:
    return _stage(r, "prune", "test_acc") if _stage(r, "prune", "during") == "finetune" else None


# The compression stages' key figures in the runs table: (CSV key, title, value of a record, kind, better)
COMPRESSION_COLUMNS: list[tuple[str, str, Callable[[Record], Any], str, str | None]] = [
    ("sparsity", "removed", lambda r: _stage(r, "prune", "sparsity"), "pct", None),  # weights/parameters pruned
    ("pruned_test_acc", "pruned acc", _pruned_acc, "pct", "max"),
    ("int8_test_acc", "int8 acc", _quant_acc, "pct", "max"),
    ("fp32_bytes", "fp32 size", lambda r: _entry(r, "trained", "file_bytes"), "bytes", "min"),
    ("int8_bytes", "int8 size", _quant_size, "bytes", "min"),
    ("int8_gzip_bytes", "int8 gzip", _quant_gzip, "bytes", "min"),
    ("fp32_latency_ms", "fp32 ms/img", lambda r: _entry(r, "trained", "latency_b1_ms"), "ms", "min"),
    ("int8_latency_ms", "int8 ms/img", _int8_latency, "ms", "min"),
]


def compresses(records: Sequence[Record]) -> bool:
    """Some run prunes or quantizes: the sweep gets the compression columns and blocks."""
    return any((r.stages.get(s) or {}).get("method", "none") != "none" for r in records for s in ("prune", "quantize"))


def accuracy_split(r: Record) -> str:
    """Which accuracy time to a target reads for this run: "test" when its history has the test
    accuracy of every epoch (``train.test_every_epoch``), else "val"."""
    rows = [row for row in r.metrics.get("history") or [] if isinstance(row, dict)]
    return "test" if rows and all(number(row.get("test_acc")) is not None for row in rows) else "val"


def time_to_accuracy(r: Record, target: float) -> float | None:
    """Training seconds until the run's accuracy (:func:`accuracy_split`: test when logged every epoch,
    else validation) first reached ``target`` (0-1), from the per-epoch history in metrics/train.json;
    None when never reached or not logged."""
    key = f"{accuracy_split(r)}_acc"
    for row in r.metrics.get("history") or []:
        if isinstance(row, dict) and (number(row.get(key)) or 0.0) >= target:
            return number(row.get("elapsed_s"))
    return None


def gpu_seconds(r: Record) -> float | None:
    """GPU time of the training: its wall time times the GPUs it held (one per rank), None on a CPU."""
    seconds = number(r.metrics.get("train_time_s"))
    if seconds is None or not str(r.metrics.get("device", "")).startswith("cuda"):
        return None
    return seconds * int(r.metrics.get("world_size") or 1)


def cpu_seconds(r: Record) -> float | None:
    """CPU time (user + system, the job's main process and its finished data workers) of every stage
    the run recorded it for; None when none did (records older than this field)."""
    values = [v for m in r.stages.values() if (v := number(m.get("cpu_s"))) is not None]
    return sum(values) if values else None


def run_status(r: Record, raw: bool = False) -> str:
    """The status cell: the state, and where it stands or what went wrong (the failures section has more)."""
    status = r.status
    if status == "running" and r.progress:
        stage = r.progress.get("stage", "train")
        where = "" if stage == "train" else f"{stage}, "
        return f"running ({where}epoch {r.progress.get('epoch')}/{r.progress.get('epochs')})"
    diverged = next((s for s, m in r.stages.items() if m.get("status") == "diverged"), None)
    if status == "diverged" and diverged and r.stages[diverged].get("diverged_epoch"):
        where = "" if diverged == "train" else f"{diverged} "
        return f"diverged ({where}epoch {r.stages[diverged]['diverged_epoch']})"
    if status == STOPPED_EARLY and r.metrics.get("epochs"):
        return f"{STOPPED_EARLY} (epoch {r.metrics['epochs']})"
    if status == "failed" and not raw:
        stage = r.run.failed_stage()
        where = f"{stage} stage; " if stage and stage != "train" else ""
        return f"failed ({where}log {r.run.log})"
    return status


def _training_key(key: str) -> bool:
    """A dotted key that changes the training (not only what is done after it)."""
    return key.split(".")[0] not in AFTER_TRAINING


def _train_value(r: Record, key: str) -> Any:
    # training's figures, once it ended (also when its model file went bad later: the figures stand)
    finished = r.metrics.get("status") in ("done", "diverged", STOPPED_EARLY) or bool(r.metrics.get(UNREADABLE_OUTPUT))
    return r.metrics.get(key) if finished else None


def runs_table(
    keys: Sequence[str],
    records: Sequence[Record],
    *,
    sweep_column: bool = False,
    target_acc: float | None = None,
    seeds: bool = True,
) -> Table:
    """One row per run (or per seed group), swept values first and status last."""
    layout = _RunsLayout.of(records, target_acc)
    titles = cli.short_keys(list(keys))
    cols = [Column("run", "run")]
    if sweep_column:
        cols.append(Column("sweep", "sweep"))
    cols += [Column(k, titles[k]) for k in keys]
    cols += layout.columns(records)
    cols.append(Column("status", "status"))
    table = Table(cols, [layout.row(r, keys) for r in records])
    if seeds and "train.seed" in keys:
        table = average_seeds(table, [k for k in keys if k != "train.seed"], sweep_column)
    return table


@dataclass
class _RunsLayout:
    """Which figure columns the runs table has (those some run can fill), and each run's row."""

    train_cols: list[tuple[str, str, str, str, str]]
    extra: list[tuple[str, str, Callable[[Record], Any], str, str | None]]  # compression figures
    timed: bool  # some run has a training time
    gpus: bool  # some run trained on CUDA
    cpu_timed: bool
    target_acc: float | None

    @classmethod
    def of(cls, records: Sequence[Record], target_acc: float | None) -> _RunsLayout:
        return cls(
            train_cols=[
                c
                for c in TRAIN_COLUMNS
                if c[0] != "test_loss" or any(_train_value(r, "test_loss") is not None for r in records)
            ],
            extra=COMPRESSION_COLUMNS if compresses(records) else [],
            timed=any(number(r.metrics.get("train_time_s")) is not None for r in records),
            gpus=any(str(r.metrics.get("device", "")).startswith("cuda") for r in records),
            cpu_timed=any(cpu_seconds(r) is not None for r in records),
            target_acc=target_acc,
        )

    def columns(self, records: Sequence[Record]) -> list[Column]:
        """The figure columns, between the swept values and the status."""
        cols = [Column(key, title, kind, better) for key, title, _, kind, better in self.train_cols]
        cols += [Column(key, title, kind, better) for key, title, _, kind, better in self.extra]
        if self.timed:
            cols.append(Column("train_time_s", "train time", "s", "min"))
        if self.timed and self.gpus:
            cols.append(Column("gpu_time_s", "GPU time", "s", "min"))
        if self.cpu_timed:
            cols.append(Column("cpu_time_s", "CPU time", "s", "min"))
        if self.target_acc is not None:
            splits = sorted({accuracy_split(r) for r in records if r.metrics.get("history")}, reverse=True)
            which = {("test",): "test", ("val",): "val", ("val", "test"): "val or test"}.get(tuple(splits), "val")
            cols.append(Column("time_to_target_s", f"time to {100 * self.target_acc:g}% {which}", "s", "min"))
        return cols

    def row(self, r: Record, keys: Sequence[str]) -> dict[str, Any]:
        row: dict[str, Any] = {"run": r.id, "sweep": r.sweep, "status": run_status(r), "status_word": r.status}
        # a key some runs do not sweep (one variant sets it) shows their config's value, not a blank;
        # but not a compression setting: a run that does not prune has no sparsity worth showing
        row.update({k: r.setting(k, "") if _training_key(k) else r.swept.get(k, "") for k in keys})
        row.update({key: _train_value(r, src) for key, _, src, _, _ in self.train_cols})
        row.update({key: get(r) for key, _, get, _, _ in self.extra})
        if self.timed:
            row["train_time_s"] = number(r.metrics.get("train_time_s"))
            if r.run.shared_store() is not None:  # the one shared training's time, counted once in totals
                row["train_time_s_note"] = "shared"
        if self.timed and self.gpus:
            row["gpu_time_s"] = gpu_seconds(r)
        if self.cpu_timed:
            row["cpu_time_s"] = cpu_seconds(r)
            if r.run.shared_store() is not None:  # includes the shared training's, counted once in totals
                row["cpu_time_s_note"] = "shared"
        if self.target_acc is not None:
            row["time_to_target_s"] = time_to_accuracy(r, self.target_acc)
        return row


def average_seeds(table: Table, other_keys: Sequence[str], by_sweep: bool) -> Table:
    """Rows equal in every swept value but train.seed become one: numbers as mean ± std over the runs
    that finished, ``n`` their count, the seeds listed. Groups of one run stay as they are."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in table.rows:
        same = tuple(repr(row.get(k)) for k in other_keys) + ((row["sweep"],) if by_sweep else ())
        groups.setdefault(same, []).append(row)
    if all(len(g) == 1 for g in groups.values()):
        return table
    numeric = {c.key for c in table.columns if c.kind not in ("text",)}
    rows = []
    for group in groups.values():
        if len(group) == 1:
            rows.append({**group[0], "n": 1})
            continue
        done = [row for row in group if row["status_word"] == "done"]
        merged: dict[str, Any] = {
            **group[0],
            "run": f"{len(group)} runs",
            "train.seed": ", ".join(str(row["train.seed"]) for row in group),
        }
        for key in numeric:
            values = [v for row in done if (v := number(row.get(key))) is not None]
            merged[key] = (
                Stat(
                    statistics.fmean(values),
                    statistics.stdev(values) if len(values) > 1 else 0.0,
                    len(values),
                    len(done),
                )
                if values
                else None
            )
        words = [row["status_word"] for row in group]
        merged["status"] = ", ".join(f"{words.count(w)} {w}" for w in dict.fromkeys(words))
        merged["status_word"] = "done" if len(done) == len(group) else "mixed"
        merged["n"] = len(done)
        rows.append(merged)
    cols = list(table.columns)
    cols.insert(len(cols) - 1, Column("n", "n", "int"))
    return Table(cols, rows, table.title, [*table.notes, "mean ± standard deviation over seeds (n: runs finished)"])


def group_tables(table: Table, key: str) -> list[Table]:
    """One table per value of ``key`` (the study printed one per batch size / workers / weight decay)."""
    values: dict[str, list[dict[str, Any]]] = {}
    order: dict[str, Any] = {}
    for row in table.rows:
        text = cli.fmt(row.get(key, ""))
        values.setdefault(text, []).append(row)
        order[text] = sort_key(row.get(key))
    cols = [c for c in table.columns if c.key != key]
    return [Table(cols, values[v], f"{key} = {v}", table.notes) for v in sorted(values, key=lambda v: order[v])]


def sort_rows(table: Table, name: str, reverse: bool = False) -> None:
    """Sort by a column (title or key): best first where the column has a better direction, else
    ascending; rows without a value last."""
    col = table.column(name)
    assert col is not None
    descending = (col.better == "max") != reverse

    def key(row: dict[str, Any]) -> tuple:
        v = row.get(col.key)
        n = number(v)
        if n is not None:
            return (0, -n if descending else n, "")
        if v in (None, ""):
            return (2, 0.0, "")
        return (1, 0.0, str(v))

    table.rows.sort(key=key)
    if reverse and col.better is None:
        table.rows.reverse()


def select_columns(table: Table, names: Sequence[str]) -> Table:
    """Only the named columns (titles or keys), in the order given; the run column always first."""
    cols = [table.column(n) for n in names]
    chosen = [c for c in cols if c is not None and c.key != "run"]
    return Table([table.columns[0], *chosen], table.rows, table.title, table.notes)


def best_rows(table: Table) -> dict[str, set[int]]:
    """For each column with a better direction: the indices of the rows holding its best value (ties
    included); only where at least two rows have a value to compare."""
    out: dict[str, set[int]] = {}
    for col in table.columns:
        if col.better is None:
            continue
        values = [(i, n) for i, row in enumerate(table.rows) if (n := number(row.get(col.key))) is not None]
        if len(values) < 2:
            continue
        best = (max if col.better == "max" else min)(n for _, n in values)
        if all(n == best for _, n in values):  # nothing to choose between
            continue
        out[col.key] = {i for i, n in values if n == best}
    return out


# --------------------------------------------------------------------------------------------------
# models (study 3)
# --------------------------------------------------------------------------------------------------

MODEL_COLUMNS: list[Column] = [
    Column("model", "model"),
    Column("run", "run"),
    Column("parameters", "parameters", "int"),
    Column("nonzero_parameters", "non-zero", "int"),
    Column("file_bytes", "file size", "bytes"),
    Column("file_gzip_bytes", "gzip", "bytes"),
    Column("top1_error", "top-1 error", "pct", delta=True),
    Column("top5_error", "top-5 error", "pct", delta=True),
    Column("peak_memory_bytes", "memory", "bytes"),
    Column("latency_b1_ms", "ms/img", "ms"),
    Column("self_cpu_ms_per_batch", "CPU ms/batch", "ms"),
    Column("self_cuda_ms_per_batch", "CUDA ms/batch", "ms"),
    Column("size_factor", "smaller", "factor"),
    Column("speed_factor", "faster", "factor"),
    # compression to an accuracy budget (pipeline.report.budget); empty columns are left out
    Column("budget", "budget"),
    Column("drop", "drop"),
    Column("attempts", "attempts"),
    Column("fp32_layers", "fp32 layers", "int"),
    Column("uniform_top1", "uniform val top-1", "pct"),
]


def _prune_label(r: Record) -> str:
    method = _stage(r, "prune", "method")
    if method is None:
        return ""
    target = number(_stage(r, "prune", "sparsity_target"))
    if _stage(r, "prune", "budget"):  # prune.sparsity: auto
        return f"{method} auto"
    return f"{method} {100 * target:g}%" if target is not None else str(method)


def model_rows(r: Record) -> list[dict[str, Any]]:
    """The models of one run as table rows (raw figures). From measure.json when the run measured them
    (CUDA timing merged from the '<name>-cuda' entry), else from the stage records (fewer columns)."""
    prune = _prune_label(r)
    quant = _stage(r, "quantize", "method")
    while_training = _stage(r, "prune", "during") == "train"  # the trained model is the pruned one
    labels = {
        "trained": f"{prune} while training" if while_training and prune else "base",
        "pruned": prune or "pruned",
        "int8": f"{prune} + {quant}" if prune else str(quant or "int8"),
        "fp16": f"{prune} + fp16" if prune else "fp16",
    }
    entries = r.measured()
    rows = _measured_rows(entries) if entries else _stage_rows(r, quant)
    fast_cpu = int8_fast_cpu(r)
    for row in rows:
        row["model"] = labels.get(row["name"], row["name"])
        row["run"] = r.id
        row["int8_fast_cpu"] = fast_cpu if row["name"] == "int8" else None
        row["top1_error"] = None if row["top1"] is None else 1 - row["top1"]
        row["top5_error"] = None if row["top5"] is None else 1 - row["top5"]
        row.update(budget_cells(r, row["name"]))
    return rows


def _measured_rows(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model of measure.json; a '<name>-cuda' entry's CUDA time goes on its CPU twin's row."""
    by_name = {e["name"]: e for e in entries}
    rows = []
    for e in entries:
        name = e["name"]
        if name.endswith("-cuda"):
            if name.removesuffix("-cuda") in by_name:
                continue  # its CUDA time goes on its CPU twin's row
            # a GPU-only model (fp16): its own row, CPU columns empty (its GPU latency and memory are
            # not comparable with the CPU figures of the other rows)
            name, e = name.removesuffix("-cuda"), {**e, "latency_b1_ms": None, "self_cpu_ms_per_batch": None}
            e.update(peak_memory_batch_bytes=None, peak_memory_b1_bytes=None)
        cuda = by_name.get(f"{name}-cuda", {})
        timed = speed_counts(e)
        rows.append(
            {
                "name": name,
                "top1": number(e.get("test_top1")),
                "top5": number(e.get("test_top5")),
                "parameters": e.get("parameters"),
                "nonzero_parameters": e.get("nonzero_parameters"),
                "file_bytes": e.get("file_bytes"),
                "file_gzip_bytes": e.get("file_gzip_bytes"),
                "peak_memory_bytes": e.get("peak_memory_batch_bytes") or e.get("peak_memory_b1_bytes"),
                "latency_b1_ms": number(e.get("latency_b1_ms")) if timed else None,
                "self_cpu_ms_per_batch": number(e.get("self_cpu_ms_per_batch")) if timed else None,
                "runtime": runtime(e),
                "self_cuda_ms_per_batch": number(cuda.get("self_cuda_ms_per_batch") or e.get("self_cuda_ms_per_batch")),
            }
        )
    return rows


def _stage_rows(r: Record, quant: Any) -> list[dict[str, Any]]:
    """The models of a run that measured nothing, from its stage records (fewer columns)."""
    rows = []
    if r.metrics.get("status") == "done":
        rows.append(
            {
                "name": "trained",
                "top1": number(r.metrics.get("test_acc")),
                "top5": number(r.metrics.get("test_top5")),
                "parameters": r.metrics.get("params"),
            }
        )
    if _stage(r, "prune", "during") == "finetune":
        p = r.stages["prune"]
        rows.append(
            {
                "name": "pruned",
                "top1": number(p.get("test_acc")),
                "top5": number(p.get("test_top5")),
                "parameters": p.get("params"),
                "nonzero_parameters": p.get("nonzero_params"),
            }
        )
    if quant is not None and quant != "none":
        q = r.stages["quantize"]
        rows.append(
            {
                "name": "int8" if quant != "fp16" else "fp16",
                "top1": number(q.get("test_acc")),
                "top5": number(q.get("test_top5")),
                "file_bytes": q.get("raw"),
                "file_gzip_bytes": q.get("gzip"),
            }
        )
    return rows


def training_groups(records: Sequence[Record]) -> list[list[Record]]:
    """Runs that share one training (equal config outside the compression sections), in order; the
    run without pruning first in each (it holds the base model's figures)."""
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.training_key(), []).append(r)
    # a stable sort: the others keep the records' order (by swept values), not the ids' (hashes)
    return [sorted(g, key=lambda r: _stage(r, "prune", "method") is not None) for g in groups.values()]


def _with_base(rows: list[dict[str, Any]], base: dict[str, Any] | None) -> None:
    """Deltas (percentage points of error) and reduction factors against the base row."""
    for row in rows:
        for key in ("top1_error", "top5_error"):
            b, v = (number(base.get(key)) if base else None), number(row.get(key))
            row[f"{key}_delta"] = v - b if b is not None and v is not None and row is not base else None
        b, v = (number(base.get("file_bytes")) if base else None), number(row.get("file_bytes"))
        row["size_factor"] = b / v if b and v and row is not base else None
        # a timing only compares with one taken in the same job (measure alternates the models there): each
        # run times its own copy of the base model, and other jobs may have run on a busier machine
        timed = row.pop("timing_base", None) or base
        b, v = (number(timed.get("latency_b1_ms")) if timed else None), number(row.get("latency_b1_ms"))
        row["speed_factor"] = b / v if b and v and row is not timed else None
        if row["speed_factor"] is not None and row.get("int8_fast_cpu") is False:
            row["speed_factor_note"] = "no VNNI"


SPEED_NOTE = (
    "faster: batch-1 latency of the base model over the model's own, both timed in the same job; the base "
    "is fp32 run eagerly (as a user runs it), int8 runs compiled (its AOTInductor package)"
)


def speed_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The line under a models table: what 'faster' compares, why an int8 row has no speed, and where
    int8 ran on a CPU without int8 instructions."""
    notes = [SPEED_NOTE]
    int8 = [row for row in rows if row.get("name") == "int8"]
    if any(row.get("runtime") == "eager" for row in int8):
        notes.append(
            "int8 without ms/img: not timed, having no compiled form (measure.compile=false, or its compile "
            "failed: metrics/quantize.json says why); run eagerly a PT2E int8 graph dequantizes, runs fp32 "
            "kernels and quantizes again, slower than fp32"
        )
    if any(row.get("int8_fast_cpu") is False for row in int8):
        notes.append(
            "no VNNI: measured on a CPU without int8 dot-product instructions (avx512_vnni, avx_vnni and "
            "amx_int8 absent from /proc/cpuinfo): its int8 kernels are no faster than fp32 there; on VNNI "
            "or AMX processors compiled int8 is 2-5x faster than fp32 eager (BENCHMARKS.md)"
        )
    return notes


def model_tables(keys: Sequence[str], records: Sequence[Record], *, flat: bool = False) -> list[Table]:
    """One block per training (or, ``flat``, one table of every model of the sweep with a training
    column); runs not done are left out (the failures section lists them)."""
    while_training = any(_stage(r, "prune", "during") == "train" for r in records)
    # the keys that tell trainings apart (pruning while training is part of the training)
    train_keys = [k for k in keys if _training_key(k) or (while_training and k.startswith("prune."))]
    tables = []
    flat_rows: list[dict[str, Any]] = []
    for group in training_groups(records):
        rows: list[dict[str, Any]] = []
        for r in group:
            own = model_rows(r)
            timing_base = next((x for x in own if x["name"] == "trained"), None)
            for row in own:
                row["timing_base"] = timing_base
                if row["name"] == "trained" and any(x["name"] == "trained" for x in rows):
                    continue  # the same training: its base model once
                rows.append(row)
        if not rows:
            continue
        base = next((x for x in rows if x["name"] == "trained"), None)
        _with_base(rows, base)
        described = ", ".join(f"{k}={cli.fmt(group[0].swept[k])}" for k in train_keys if k in group[0].swept)
        title = f"training {group[0].id}" + (f" ({described})" if described else "")
        if flat:
            for row in rows:
                row["training"] = group[0].id
                row.update({k: group[0].swept.get(k, "") for k in train_keys})
            flat_rows += rows
        else:
            tables.append(Table(list(MODEL_COLUMNS), rows, title, speed_notes(rows) + budget_notes(group)))
    if flat:
        titles = cli.short_keys(train_keys)
        cols = [
            MODEL_COLUMNS[0],
            Column("training", "training"),
            *[Column(k, titles[k]) for k in train_keys],
            *MODEL_COLUMNS[1:],
        ]
        notes = speed_notes(flat_rows) + budget_notes(records)
        return [Table(cols, flat_rows, "", notes)] if flat_rows else []
    return tables


def drop_empty_columns(table: Table, keep: Sequence[str] = ("run", "model", "status")) -> Table:
    """Columns no row has a value for (a CPU-only sweep has no CUDA time) are left out."""
    cols = [c for c in table.columns if c.key in keep or any(row.get(c.key) not in (None, "") for row in table.rows)]
    return Table(cols, table.rows, table.title, table.notes)

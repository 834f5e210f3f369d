"""Tables as text: markdown (best values bold), CSV (raw numbers, full keys), JSON, and a rich table for
the terminal. Formatting lives here only; tables hold raw values."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Sequence

from pipeline import console as cli
from pipeline.report.failures import Failure
from pipeline.report.tables import Column, Stat, Table, best_rows, number


def format_value(value: Any, kind: str) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, Stat):
        part = f" ({value.n} of {value.of})" if value.n < value.of else ""  # the others have no value
        return f"{format_value(value.mean, kind)} ± {_spread(value.std, kind)}{part}"
    n = number(value)
    if n is None:
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return cli.fmt(value)
    if kind == "bytes":
        return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
    if kind == "ms":
        return f"{n:.2f}"
    if kind == "pct":
        return f"{100 * n:.2f}%"
    if kind == "loss":
        return f"{n:.4f}"
    if kind == "s":
        return f"{n:.1f} s" if n < 600 else cli.hms(n)
    if kind == "int":
        return f"{int(n):,}"
    if kind == "factor":
        return f"×{n:.1f}"
    return cli.fmt(value)


def _spread(std: float, kind: str) -> str:
    """The ± part in the value's unit, without repeating a % sign (93.10% ± 0.21)."""
    return f"{100 * std:.2f}" if kind == "pct" else format_value(std, kind)


def cell(row: dict[str, Any], col: Column) -> str:
    text = format_value(row.get(col.key), col.kind)
    delta = number(row.get(f"{col.key}_delta")) if col.delta else None
    if text and delta is not None:
        text += f" ({100 * delta:+.2f})" if col.kind == "pct" else f" ({delta:+.4g})"
    note = row.get(f"{col.key}_note")  # e.g. "shared": the figure belongs to a training several runs share
    if text and note:
        text += f" ({note})"
    return text


def cells(table: Table) -> list[list[str]]:
    return [[cell(row, c) for c in table.columns] for row in table.rows]


def _numeric(texts: list[str]) -> bool:
    seen = False
    for t in texts:
        if not t:
            continue
        head = t.split(" ")[0].strip("*").lstrip("×").rstrip("%").replace(",", "")
        try:
            float(head)
        except ValueError:
            return False
        seen = True
    return seen


def markdown(table: Table, level: int = 3) -> str:
    """A markdown table (title as a heading), the best value of each marked column in bold."""

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    body = cells(table)
    for key, indices in best_rows(table).items():
        j = next(i for i, c in enumerate(table.columns) if c.key == key)
        for i in indices:
            if body[i][j]:
                body[i][j] = f"**{body[i][j]}**"
    numeric = [_numeric([r[j] for r in body]) for j in range(len(table.columns))]
    lines = [f"{'#' * level} {table.title}", ""] if table.title else []
    lines += [
        "| " + " | ".join(esc(c.title) for c in table.columns) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    lines += [""] + [f"{note}" for note in table.notes] if table.notes else []
    return "\n".join(lines) + "\n"


def _raw(value: Any) -> Any:
    if isinstance(value, Stat):
        return value.mean
    return value


def csv_text(table: Table) -> str:
    """Full keys as the header and unrounded numbers; a delta column after each column that has one,
    a ``<key>_std`` column after each averaged one."""
    header: list[str] = []
    for c in table.columns:
        header.append(c.key)
        if c.delta:
            header.append(f"{c.key}_delta")
        if any(isinstance(row.get(c.key), Stat) for row in table.rows):
            header.append(f"{c.key}_std")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in table.rows:
        out = []
        for key in header:
            if key.endswith("_std") and key[:-4] in row and isinstance(row.get(key[:-4]), Stat):
                out.append(repr(row[key[:-4]].std))
                continue
            v = _raw(row.get("status_word" if key == "status" and "status_word" in row else key))
            out.append("" if v is None else (repr(v) if isinstance(v, float) else str(v)))
        w.writerow(out)
    return buf.getvalue()


def jsonable(table: Table) -> dict[str, Any]:
    def value(v: Any) -> Any:
        if isinstance(v, Stat):
            return {"mean": v.mean, "std": v.std, "n": v.n}
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        return v

    keys = [c.key for c in table.columns] + [f"{c.key}_delta" for c in table.columns if c.delta]
    return {
        "title": table.title,
        "columns": [{"key": c.key, "title": c.title, "kind": c.kind} for c in table.columns],
        "rows": [{k: value(row.get(k)) for k in keys} for row in table.rows],
        "notes": table.notes,
    }


def one_line(text: str) -> str:
    """A reason on one markdown line: a multi-line one (a traceback inside) as its first and last line."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0]} … {lines[-1]}"


def failures_markdown(items: Sequence[Failure], sweep_column: bool = False) -> str:
    """The 'Not finished' section: one line per run with its state, reason and log."""
    if not items:
        return ""
    lines = ["## Not finished", ""]
    for f in items:
        swept = ", ".join(f"{k}={cli.fmt(v)}" for k, v in f.record.swept.items())
        who = f"{f.record.sweep}/{f.record.id}" if sweep_column else f.record.id
        lines.append(
            f"- `{who}`{f' ({swept})' if swept else ''}: **{f.state}**: {one_line(f.reason)}"
            + (f" (log {f.log})" if f.log else "")
        )
    return "\n".join(lines) + "\n"


def problems_markdown(problems: Sequence[str]) -> str:
    """The sweep's own unreadable files (a manifest, folders that are no runs), one line each."""
    return "\n".join(["## Unreadable files", "", *(f"- {one_line(p)}" for p in problems)]) + "\n"


def failures_json(items: Sequence[Failure]) -> list[dict[str, Any]]:
    return [
        {
            "run": f.record.id,
            "sweep": f.record.sweep,
            "state": f.state,
            "reason": f.reason,
            "log": f.log,
            "swept": f.record.swept,
        }
        for f in items
    ]


def to_json(tables: dict[str, list[Table]], items: Sequence[Failure], extra: dict[str, Any]) -> str:
    data = {name: [jsonable(t) for t in ts] for name, ts in tables.items()}
    return json.dumps({**data, "not_finished": failures_json(items), **extra}, indent=2, default=str) + "\n"


def rich_table(table: Table) -> Any:
    """A rich Table for the terminal, best values bold."""
    from rich.table import Table as RichTable

    out = RichTable(title=table.title or None, title_justify="left")
    body = cells(table)
    best = best_rows(table)
    for j, c in enumerate(table.columns):
        out.add_column(c.title, justify="right" if _numeric([r[j] for r in body]) else "left", no_wrap=c.key == "run")
    for i, row in enumerate(body):
        out.add_row(
            *[
                f"[bold]{text}[/]" if i in best.get(c.key, ()) and text else text.replace("[", "\\[")
                for text, c in zip(row, table.columns)
            ]
        )
    return out

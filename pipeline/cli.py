"""Terminal output shared by the command-line tools: one rich console, errors as exit code 2."""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from rich.console import Console
from rich.table import Table

from pipeline.config import ConfigError

if TYPE_CHECKING:
    from pipeline.sweep import Decision, SweepSpec

EXIT_USAGE = 2


def console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False)


@contextlib.contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Print a ConfigError (or missing-file error) in red on stderr and exit with code 2."""
    try:
        yield
    except ConfigError as e:
        console(stderr=True).print(f"[bold red]error:[/] {e}", markup=True, soft_wrap=True)
        sys.exit(EXIT_USAGE)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Column titles: the last part of each dotted key, longer where that would be ambiguous."""
    out = {}
    for k in keys:
        parts = k.split(".")
        if parts[-1] == "name" and len(parts) > 1:  # optim.name reads better as "optim"
            parts = parts[:-1]
        n = 1
        while n < len(parts) and sum(1 for o in keys if o.split(".")[-n:] == parts[-n:]) > 1:
            n += 1
        out[k] = ".".join(parts[-n:])
    return out


def print_plan(con: Console, spec: "SweepSpec", decisions: Sequence["Decision"], *, dry_run: bool = False,
               job_ids: dict[str, str] | None = None, cluster: str | None = None) -> None:
    keys = list(dict.fromkeys(k for d in decisions for k in d.run.swept))
    titles = short_keys(keys)
    title = f"sweep [bold]{spec.name}[/] ({spec.path})" + (" — dry run, nothing written" if dry_run else "")
    table = Table(title=title, title_justify="left")
    table.add_column("run id", style="cyan", no_wrap=True)
    for k in keys:
        table.add_column(titles[k])
    table.add_column("action")
    if job_ids is not None:
        table.add_column("job id")
    for d in decisions:
        row = [d.run.id] + [fmt(d.run.swept.get(k, "")) for k in keys]
        row.append(d.action + (f" ({d.note})" if d.note else ""))
        if job_ids is not None:
            row.append(job_ids.get(d.run.id, ""))
        table.add_row(*row)
    con.print(table)
    con.print(f"{len(decisions)} runs")

"""Terminal output shared by the command-line tools: one rich console, errors as exit code 2."""

from __future__ import annotations

import contextlib
import errno
import sys
from typing import Any, Iterator, Sequence

from rich.console import Console
from rich.markup import escape

from pipeline.config import ConfigError


EXIT_USAGE = 2
SHOWN_ROWS = 40  # plans longer than this show their first and last rows (--all shows every one)


def console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False)


@contextlib.contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Print a ConfigError (or missing-file error) in red on stderr and exit with code 2."""
    try:
        yield
    except ConfigError as e:
        # escaped: a path or value like "[/x]" is text, not markup (rich would fail or swallow it)
        console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", markup=True, soft_wrap=True)
        sys.exit(EXIT_USAGE)


# OSError numbers that mean the file system refuses a write (or a read): read-only, permission, disk
# full, quota. Reported with the path as bad input; any other OSError is a bug and keeps its traceback.
FS_REFUSALS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def exit_on_os_error() -> Iterator[None]:
    """Print a file-system refusal (:data:`FS_REFUSALS`) as the path and the reason in red on stderr and
    exit with code 2, instead of a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in FS_REFUSALS:
            raise
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or "a file"
        console(stderr=True).print(
            f"[bold red]error:[/] {escape(where)}: {escape(e.strerror or str(e))}", markup=True, soft_wrap=True
        )
        sys.exit(EXIT_USAGE)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def hms(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Column titles: the last part of each dotted key, longer where that would be ambiguous."""
    out = {}
    for k in keys:
        parts = k.split(".")
        if parts[-1] in ("name", "method") and len(parts) > 1:  # optim.name reads better as "optim"
            parts = parts[:-1]
        n = 1
        while n < len(parts) and sum(1 for o in keys if o.split(".")[-n:] == parts[-n:]) > 1:
            n += 1
        out[k] = ".".join(parts[-n:])
    return out


def print_table(
    con: Console,
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    first_style: str = "",
    limit: int | None = SHOWN_ROWS,
) -> None:
    """A rich table (title on the left; ``title`` is markup, cells are text). Past ``limit`` rows only
    the first and last ones are shown: a 1,000-row table is no use on a terminal, and rich lays out each
    row at about 3 ms."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, style=(first_style or None) if i == 0 else None, no_wrap=i == 0)
    shown: list[Sequence[str] | None] = list(rows)
    if limit is not None and len(rows) > limit:
        tail = 5
        shown = [*rows[: limit - tail], None, *rows[-tail:]]
    hidden = len(rows) - len(shown) + 1
    for row in shown:
        if row is None:
            table.add_row(f"... {hidden} more", *[""] * (len(headers) - 1), style="dim")
        else:
            table.add_row(*(Text(c) for c in row))
    con.print(table)

"""The study's journal file, checked before Optuna reads it.

What Optuna 5.0.0 does itself (``JournalFileBackend.read_logs``): a last line without its newline (a
writer killed mid-write) is skipped without a word, and a complete line that is not JSON raises only
when another line follows it. Two gaps follow. The cut record is not said, and it stays in the file:
the next append lands on the same line, so that record is garbled too and every later read fails. And
a garbled line in the middle fails with a bare ``JSONDecodeError`` (or ``UnicodeDecodeError`` for
binary bytes) that names no file.

:func:`check_journal` fills them: it validates every complete line (UTF-8 JSON with an operation code),
raising :class:`JournalCorrupt` naming the file and line, and a writer (``repair=True``) moves a cut last
record out of the journal, under the journal's own lock, into ``<journal>.cut``, with a warning naming
both files. A reader (``status``, ``collect``) leaves the file alone and only reports the cut record.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError

log = logging.getLogger("pipeline.search")

CUT_SUFFIX = ".cut"
_OP_CODES = range(0, 11)  # optuna.storages.journal._storage.JournalOperation in 5.0.0


class JournalCorrupt(ConfigError):
    """A journal line that is not a record Optuna wrote: the study cannot be read past it. Shown by
    ``status`` and ``collect`` (which still list the run folders); the other commands exit 2."""

    def __init__(self, path: Path, message: str):
        self.path = path
        super().__init__(
            path,
            f"{message}. The study cannot be read past it; the run folders are intact. Move the file aside "
            "to start the study afresh, or delete that line if you know what it held.",
        )


@dataclass(frozen=True)
class JournalCheck:
    path: Path
    records: int  # complete records in the file
    cut_bytes: int = 0  # bytes of a cut last record: moved to <path>.cut (repair) or still there

    @property
    def note(self) -> str:
        """What a reader should say about the file ("" when nothing)."""
        if not self.cut_bytes:
            return ""
        return (
            f"{self.path}: its last record ({self.cut_bytes} bytes) was cut short by a writer that was "
            "killed; it is left out (the next worker moves it to " + self.path.name + CUT_SUFFIX + ")"
        )


def _line_problem(line: bytes) -> str | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return f"binary bytes (0x{line[e.start]:02x} at column {e.start + 1}), not UTF-8 text"
    except ValueError as e:
        return f"not a JSON record ({e})"
    if not isinstance(record, dict) or record.get("op_code") not in _OP_CODES:
        return "not an Optuna journal record (no known op_code)"
    return None


def _scan(path: Path, data: bytes) -> tuple[int, int]:
    """(complete records, bytes after the last newline); raises JournalCorrupt at the first bad line."""
    end = data.rfind(b"\n") + 1
    lines = data[:end].split(b"\n")[:-1]
    for number, line in enumerate(lines, start=1):
        problem = _line_problem(line)
        if problem:
            preview = line[:60].decode("utf-8", "backslashreplace")
            raise JournalCorrupt(path, f"line {number} of {len(lines)} is garbled: {problem} ({preview!r})")
    return len(lines), len(data) - end


def check_journal(path: Path, repair: bool = False) -> JournalCheck:
    """Validate the journal at ``path`` (absent or empty: nothing to check). With ``repair``, a cut last
    record is moved out of the file into ``<path>.cut`` and a warning says so."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return JournalCheck(path, 0)
    records, cut = _scan(path, data)
    if cut and not repair:
        time.sleep(0.2)  # a live writer's append in flight ends in a moment; a killed writer's never does
        records, cut = _scan(path, path.read_bytes())
    if cut and repair:
        cut = _move_cut_record(path)
    return JournalCheck(path, records, cut)


def _move_cut_record(path: Path) -> int:
    """Under the journal's lock (no live writer is mid-append then), cut the file after its last newline
    and append what was cut to ``<path>.cut``; returns the bytes moved (0 when a writer finished it)."""
    from pipeline.search.lock import PromptSymlinkLock  # the journal's own lock

    lock = PromptSymlinkLock(str(path))
    lock.acquire()
    try:
        with open(path, "r+b") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            tail = data[end:]
            if not tail:
                return 0
            with open(str(path) + CUT_SUFFIX, "ab") as aside:
                aside.write(tail + b"\n")
                aside.flush()
                os.fsync(aside.fileno())
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    finally:
        lock.release()
    log.warning(
        "%s: its last record was cut short (a writer was killed mid-write): %d bytes dropped from the study "
        "and kept in %s",
        path,
        len(tail),
        path.name + CUT_SUFFIX,
    )
    return len(tail)

"""The run folder: the only interface between sweep (writes config.yaml), the job (writes results)
and collect/status (read them). Torch-free.

    <out>/<sweep>/<run id>/
        config.yaml          fully resolved config, written before submission, never rewritten
        meta.json            run id, sweep name and the swept values (for table columns)
        run.log              the job's log, appended across restarts
        progress.json        epoch x/y and best val acc so far, rewritten every epoch
        metrics/<stage>.json one file per finished stage; its existence means "skip this stage"
        checkpoints/         last.pt (training), prune.pt, qat.pt: written atomically every epoch
        models/              trained.pt, pruned.pt, int8.pt2, fp16.pt: every model the run made
        tb/                  TensorBoard event files (tb/prune, tb/qat: fine-tunes; tb/sparsity: by step)
        ending.json          how the last job stopped early on a signal (pipeline.jobs.endings), if it did
        archive/<time>/      what --rerun moved aside (nothing is deleted; tb/ packed as tb.tar)
        shared.json          where a shared training lives (pipeline.share); then metrics/train.json,
                             models/trained.pt, progress.json, train.log and tb/train are relative
                             symlinks into <out>/.shared/train/<key>/ (and, when the pruning is shared
                             too, metrics/prune.json, models/pruned.pt, prune.log and tb/prune into
                             <out>/.shared/prune/<key>/)
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

# The stages of every run, in order; each writes metrics/<stage>.json (a dict with a "status" key). Their
# functions are pipeline.stages.<name>.<name>_stage (pipeline.stages.runner.stage_functions).
STAGES: tuple[str, ...] = ("train", "prune", "quantize", "measure")
# What each stage writes besides metrics/<stage>.json (relative to the run folder): ``--rerun failed``
# moves aside the files of the failed stage and of those after it, and keeps the earlier ones.
STAGE_FILES: dict[str, tuple[str, ...]] = {
    "train": (
        "checkpoints/last.pt",
        "checkpoints/last.prev.pt",
        "checkpoints/last.pt.corrupt",
        "models/trained.pt",
        "tb",
        "progress.json",
    ),
    "prune": (
        "checkpoints/prune.pt",
        "checkpoints/prune.prev.pt",
        "checkpoints/prune.pt.corrupt",
        "models/pruned.pt",
        "tb/prune",
    ),
    "quantize": (
        "checkpoints/qat.pt",
        "checkpoints/qat.prev.pt",
        "checkpoints/qat.pt.corrupt",
        "models/int8.pt2",
        "models/int8.so.pt2",
        "models/fp16.pt",
        "tb/qat",
    ),
    "measure": (),
}
# A run whose training is shared (pipeline.share) reaches it through these relative symlinks: run-folder
# path -> path in the shared store. Readers (collect, status, TensorBoard) see them as the run's own files;
# atomic writes replace a link instead of writing through it, so no run can change the shared result.
SHARED_POINTER = "shared.json"
SHARED_TRAIN_LINKS: dict[str, str] = {
    "metrics/train.json": "metrics/train.json",
    "models/trained.pt": "models/trained.pt",
    "progress.json": "progress.json",
    "train.log": "run.log",
    "tb/train": "tb",
}
# A run whose pruning is shared too (prune keys equal: same training, same prune settings) reaches it in
# <out>/.shared/prune/<key>/ the same way.
SHARED_PRUNE_LINKS: dict[str, str] = {
    "metrics/prune.json": "metrics/prune.json",
    "models/pruned.pt": "models/pruned.pt",
    "prune.log": "run.log",
    "tb/prune": "tb/prune",
}
SHARED_LINKS: dict[str, dict[str, str]] = {"train": SHARED_TRAIN_LINKS, "prune": SHARED_PRUNE_LINKS}
# metrics/train.json's status of a training a search stopped early: finished, keeps its checkpoint and
# metrics, and its later stages do not run
STOPPED_EARLY = "stopped early"
FINAL_STATUSES = ("done", "diverged", STOPPED_EARLY)  # a run in one of these is finished and is not resubmitted
# Top-level sections every config.yaml the sweep writes has (a file without them is cut short or foreign)
REQUIRED_SECTIONS = ("data", "model", "optim", "train")
# In a stage's failure record: the model file it made that a later stage found unreadable (the record
# was "done" until then, and keeps its figures). A run whose every stage had finished stays done.
UNREADABLE_OUTPUT = "unreadable_output"


_UMASK: int | None = None
_UMASK_LOCK = threading.Lock()


def process_umask() -> int:
    """The process umask, read once: from /proc/self/status (reading it changes nothing, so no other
    thread can create a file under a wrong umask), else by setting and restoring it under a lock (0o077
    meanwhile: a file another thread creates then is private, never world-writable)."""
    global _UMASK
    with _UMASK_LOCK:
        if _UMASK is None:
            try:
                found = re.search(r"^Umask:\s*([0-7]+)\s*$", Path("/proc/self/status").read_text(), re.M)
            except OSError:
                found = None
            if found:
                _UMASK = int(found.group(1), 8)
            else:
                _UMASK = os.umask(0o077)
                os.umask(_UMASK)
        return _UMASK


class RunFolderVanished(FileNotFoundError):
    """The run folder a job works in was deleted (or replaced by a new one) under it."""


# Folders a job in this process works in (its run folder, a shared store it trains in) -> ((st_dev,
# st_ino) when it started, what the folder is): writes below them must not recreate the folder once it
# is gone, or a deleted run comes back holding one stray file.
_GUARDED: dict[Path, tuple[tuple[int, int], str]] = {}


def folder_key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino)


def guard_folder(path: Path, what: str = "run folder") -> None:
    """Remember ``path`` (an existing run folder, or ``what`` it is) as it is now; see :func:`check_folder`."""
    key = folder_key(path)
    if key is None:
        raise RunFolderVanished(f"{what} {path} does not exist")
    _GUARDED[Path(os.path.abspath(path))] = (key, what)


def unguard_folder(path: Path) -> None:
    _GUARDED.pop(Path(os.path.abspath(path)), None)


def check_folder(path: Path) -> None:
    """Raise :class:`RunFolderVanished` when ``path`` lies in a guarded run folder that is no longer the
    folder it was (deleted, moved away, or deleted and created again)."""
    absolute = Path(os.path.abspath(path))
    for root, (key, what) in list(_GUARDED.items()):
        if (absolute == root or root in absolute.parents) and folder_key(root) != key:
            raise RunFolderVanished(
                f"{what} {root} was deleted or replaced while this job was running; nothing more is written there"
            )


def make_parent(path: Path) -> None:
    """``path``'s folder, created if missing, unless that would recreate a vanished run folder."""
    check_folder(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)


def atomic_write_text(path: Path, text: str, fsync: bool = True) -> None:
    """Write to a temporary file in the same folder, fsync (unless the caller syncs many files at once
    later), then rename over ``path``. The file gets the mode a plain ``open()`` would (0o666 less the
    umask), not mkstemp's 0o600: lab mates must be able to read results where the umask lets them."""
    atomic_write_bytes(path, text.encode(), fsync)


def atomic_write_bytes(path: Path, data: bytes | memoryview, fsync: bool = True) -> None:
    """:func:`atomic_write_text` for bytes. A failed write (a full disk, a quota, a read-only file
    system) leaves ``path`` as it was and raises OSError naming ``path`` with the system's reason."""
    make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        e.filename = str(path)  # the file being written, not its random temporary name
        raise
    try:
        try:
            os.fchmod(fd, 0o666 & ~process_umask())
        except OSError:  # a file system without modes (some FUSE/SMB mounts): the write matters more
            pass
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # write() on a full disk names no file
            e.filename = str(path)
        raise


# Why a write can fail that freeing space (or remounting) cures: the run is resumable afterwards
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def link_exclusive(content: str, target: Path, fsync: bool = True) -> bool:
    """Create ``target`` holding ``content`` if it does not exist, atomically (NFS-safe); True if we did.
    Never half-written: readers see no file or the whole of it. ``fsync=False`` when the caller syncs
    the file system once for many files (:func:`pipeline.submit.plan.sync_files`)."""
    tmp = target.with_name(f"{target.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, content.encode())
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        e.filename = str(target)  # the lock being made, not its temporary name
        raise
    try:
        try:
            os.link(tmp, target)
        except FileExistsError:
            pass  # maybe ours after a lost reply: the link count says
        return os.stat(tmp).st_nlink == 2
    finally:
        tmp.unlink(missing_ok=True)


def disk_error(e: BaseException) -> OSError | None:
    """The OSError in ``e`` or its causes that says the disk is full, over quota or read-only."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_ERRNOS:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


RESERVE = ".space-reserve"  # in every run folder while its job runs
RESERVE_BYTES = 256 * 1024  # far more than a failure record needs (a few KB, plus a metrics/ folder)


def reserve_space(folder: Path) -> None:
    """Hold ``RESERVE_BYTES`` in ``folder`` (real bytes, not a sparse file), so that on a disk filled
    later :func:`release_space` frees room to write why the run stopped. Raises OSError naming the
    file when not even that fits."""
    path = folder / RESERVE
    if path.is_file() and path.stat().st_size >= RESERVE_BYTES:
        return
    atomic_write_bytes(path, bytes(RESERVE_BYTES))


def release_space(folder: Path, settle: bool = False) -> None:
    """Free the reserve. With ``settle`` (about to write on a full or over-quota disk), also commit the
    filesystem holding ``folder`` (syncfs): a quota that counts space at commit time (btrfs qgroups, some
    network filesystems) only gives the freed bytes back then."""
    try:
        (folder / RESERVE).unlink(missing_ok=True)
    except OSError:  # a read-only filesystem: nothing can be written there anyway
        return
    if settle:
        _syncfs(folder)


def _syncfs(folder: Path) -> None:
    if not syncfs(folder):
        try:
            os.sync()
        except OSError:
            pass


def syncfs(folder: Path) -> bool:
    """Write back and commit every file of the file system holding ``folder`` (Linux ``syncfs``: one
    call for thousands of files); False where that is not available or failed (the caller falls back)."""
    import ctypes

    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return getattr(libc, "syncfs", None) is not None and libc.syncfs(fd) == 0
    except OSError:
        return False
    finally:
        os.close(fd)


# A temporary of atomic_write_text: mkstemp's ".<name>." + 8 random characters + ".tmp".
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
STALE_TEMPORARY_S = 3600.0  # far longer than any live write takes (the file's mtime moves as it is written)


def clean_stale_temporaries(folder: Path, older_than_s: float = STALE_TEMPORARY_S) -> list[Path]:
    """Remove what atomic writes killed midway left in ``folder`` (not below it): ``.<name>.<random>.tmp``
    files unmodified for ``older_than_s`` seconds, which no live writer still holds; returns them.
    Other files, folders and links are left alone."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    now = time.time()
    removed = []
    for entry in entries:
        if not _TEMPORARY.match(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < older_than_s:
                continue
            os.unlink(entry.path)
        except FileNotFoundError:  # removed meanwhile, e.g. by a second sweep
            continue
        removed.append(Path(entry.path))
    return removed


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


# --------------------------------------------------------------------------------------------------
# Reading the files of run folders: every reader (status, collect's tables, plots and HParams, the job)
# goes through read_text / read_mapping, which never raise on what a file holds. A file that is
# binary, cut short, empty, not UTF-8, or of the wrong shape reads as nothing, with a problem that
# names it; a field of the wrong type is left out, and named the same way.
# --------------------------------------------------------------------------------------------------

# The fields readers use in each file, and the type each must have (None is always allowed: unknown)
FIELDS: dict[str, dict[str, str]] = {
    "metrics": {
        **dict.fromkeys(("status", "error", "method", "during", "device", "stage", "log", "diverged_loss"), "text"),
        **dict.fromkeys(("history", "models", "sparsity_log"), "list"),
        **dict.fromkeys(
            (
                "epochs",
                "train_loss",
                "train_acc_best",
                "val_loss",
                "val_acc_best",
                "test_loss",
                "test_acc",
                "test_top5",
                "images_per_s",
                "train_time_s",
                "qat_train_time_s",
                "wall_s",
                "cpu_s",
                "world_size",
                "diverged_epoch",
                "diverged_step",
                "steps_per_epoch",
                "stopped_at_step",
                "last_finite_loss",
                "sparsity",
                "sparsity_target",
                "raw",
                "gzip",
            ),
            "number",
        ),
    },  # fmt: skip
    "meta.json": {"id": "text", "sweep": "text", "swept": "mapping"},
    "progress.json": {
        **dict.fromkeys(("epoch", "epochs", "val_acc_best", "train_loss", "elapsed_s", "updated"), "number"),
        "stage": "text",
        "notes": "list",
    },
    "shared.json": {"train": "mapping", "prune": "mapping"},
    "key.json": {"key": "text", "stage": "text", "settings": "mapping"},
    "trainer.json": {"run": "text", "run_id": "text", "cluster": "text", "job_id": "text", "since": "number"},
    "owner.json": {
        **dict.fromkeys(("host", "boot_id", "job", "cluster"), "text"),
        **{"pid": "int", "started": "int", "since": "number"},
    },
    "ending.json": {"state": "text", "reason": "text", "time": "number", "stage": "text", "job_id": "text"},
    "manifest.json": {"runs": "mapping", "history": "list", "submitting": "mapping"},
}
_TYPES: dict[str, tuple[type, ...]] = {
    "text": (str,),
    "number": (int, float),
    "int": (int,),
    "list": (list,),
    "mapping": (dict,),
}
_TYPE_WORDS = {"text": "text", "number": "a number", "int": "a whole number", "list": "a list", "mapping": "a mapping"}


def _unreadable(path: Path, why: str) -> str:
    return f"{path} is unreadable ({why})"


def read_text(path: Path) -> tuple[str | None, str]:
    """(the file's text, "") ; (None, "") when it does not exist; (None, problem naming the file) when
    it cannot be read or is not text: binary (a NUL byte), not UTF-8 (latin-1, UTF-16), or empty."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None, ""
    except OSError as e:
        return None, _unreadable(path, e.strerror or str(e))
    if not data:
        return None, _unreadable(path, "empty")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return None, _unreadable(path, "UTF-16 text, not UTF-8")
    if b"\x00" in data:
        return None, _unreadable(path, "binary")
    try:
        return data.decode("utf-8-sig"), ""  # (a byte-order mark some editors write is fine)
    except UnicodeDecodeError as e:
        return None, _unreadable(path, f"not UTF-8 text: byte {data[e.start]:#04x} at {e.start}")


# While set (:func:`reading_once`): path -> what _parse_json gave, so that one record's readers, which
# open some files twice (the record, then the check of every file), read and parse each once
_ONCE: ContextVar[dict[Path, tuple[Any, str]] | None] = ContextVar("_ONCE", default=None)


@contextlib.contextmanager
def reading_once() -> Iterator[None]:
    """Inside, each JSON file is read and parsed once, and every reader gets the same parsed object:
    for readers of results that do not change them (collect), never for a job that writes them."""
    token = _ONCE.set({})
    try:
        yield
    finally:
        _ONCE.reset(token)


def _parse_json(path: Path) -> tuple[Any, str]:
    memo = _ONCE.get()
    if memo is None:
        return _parse_json_file(path)
    if path not in memo:
        memo[path] = _parse_json_file(path)
    return memo[path]


def _parse_json_file(path: Path) -> tuple[Any, str]:
    text, problem = read_text(path)
    if text is None:
        return None, problem
    try:
        return json.loads(text), ""
    except json.JSONDecodeError as e:
        return None, _unreadable(path, f"cut short or not JSON: {e.msg} at line {e.lineno} column {e.colno}")
    except ValueError as e:  # a number too long to convert
        return None, _unreadable(path, f"not JSON: {e}")


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it is missing or not JSON text (see :func:`read_text`)."""
    return _parse_json(path)[0]


def _has_type(value: Any, kind: str) -> bool:
    return value is None or (isinstance(value, _TYPES[kind]) and not isinstance(value, bool))


def read_mapping(path: Path, fields: Mapping[str, str] | None = None) -> tuple[dict[str, Any] | None, str]:
    """(the JSON mapping in ``path``, "" or a problem naming the file): None when it is missing or not a
    mapping. Each of ``fields`` (name -> "text", "number", "int", "list", "mapping"; default: the
    entry of :data:`FIELDS` for the file's name) whose value has another type is left out and named."""
    data, problem = _parse_json(path)
    if data is None:
        return None, problem
    if not isinstance(data, dict):
        return None, _unreadable(path, f"{_json_kind(data)} where a mapping is expected")
    fields = FIELDS.get(path.name, {}) if fields is None else fields
    wrong = [k for k, kind in fields.items() if k in data and not _has_type(data[k], kind)]
    if not wrong:
        return data, ""
    said = ", ".join(f"{k} is {_json_kind(data[k])}, not {_TYPE_WORDS[fields[k]]}" for k in wrong)
    return {k: v for k, v in data.items() if k not in wrong}, f"{path}: {said} (left out)"


def _json_kind(value: Any) -> str:
    if isinstance(value, str):
        return f"text {value[:20]!r}"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return "a list" if isinstance(value, list) else "a mapping"


def resumable(record: Mapping[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    """A stage's record that says it failed writing (full disk, quota, read-only) with its checkpoint
    intact: not a result, and not a failure that blocks the runs sharing it. The next job that does the
    stage resumes it."""
    return record is not None and record.get("status") == "failed" and record.get("resume") is True


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def meta(self) -> Path:
        return self.path / "meta.json"

    @property
    def log(self) -> Path:
        return self.path / "run.log"

    @property
    def progress(self) -> Path:
        return self.path / "progress.json"

    @property
    def metrics_dir(self) -> Path:
        return self.path / "metrics"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def models(self) -> Path:
        return self.path / "models"

    def metrics_path(self, stage: str) -> Path:
        return self.metrics_dir / f"{stage}.json"

    def read_metrics(self, stage: str) -> dict[str, Any] | None:
        """The stage's record; None when there is none. A record that exists but cannot be read (binary,
        truncated, not a mapping, no status) counts as a failed stage naming the file, never as one not
        yet run; a figure of the wrong type is left out (:func:`read_mapping`)."""
        path = self.metrics_path(stage)
        m, problem = read_mapping(path, FIELDS["metrics"])
        if m is None and not problem and not path.exists() and not path.is_symlink():
            # a shared stage whose links the run's job has not made yet: its record, through shared.json
            store = self.shared_store(stage) if stage in SHARED_LINKS else None
            if store is None:
                return None
            path = RunDir(store).metrics_path(stage)
            m, problem = read_mapping(path, FIELDS["metrics"])
        if m is None and not problem:
            return None
        if m is None or not isinstance(m.get("status"), str):
            why = problem if m is None else _unreadable(path, "no status")
            return {"status": "failed", "stage": stage, "error": f"{why}; --rerun failed redoes the stage"}
        return m

    def read_config_text(self) -> tuple[str, str]:
        """(config.yaml's text, "") after a cheap check, or ("", a problem naming the file): UTF-8 text,
        the main sections each a mapping of settings, a final newline. The full YAML parse waits until
        a value is needed (it is most of the cost of reading a large sweep)."""
        text, problem = read_text(self.config)
        if text is None:
            return "", problem or _unreadable(self.config, "missing")
        sections = config_sections(text)
        missing = [s for s in REQUIRED_SECTIONS if s not in sections]
        flat = [s for s in REQUIRED_SECTIONS if s in sections and sections[s].split("\n", 1)[0].rstrip() != f"{s}:"]
        if missing:
            return "", _unreadable(self.config, f"no {', '.join(missing)} section: corrupt or not a run's config")
        if flat:
            return "", _unreadable(self.config, f"{', '.join(flat)} not a mapping of settings")
        if not text.endswith("\n"):
            return "", _unreadable(self.config, "cut short")
        return text, ""

    def problems(self, config: bool = True) -> list[str]:
        """What is wrong with the files status and collect read here and in the shared stores this run
        uses, each naming its file (config.yaml, unless ``config`` is False: :meth:`read_config_text`)."""
        paths = [
            self.path / name for name in ("meta.json", "progress.json", SHARED_POINTER, "owner.json", "ending.json")
        ]
        paths += [self.metrics_path(stage) for stage in STAGES]
        for stage in SHARED_LINKS:
            store = self.shared_store(stage)
            paths += [store / "key.json", store / "trainer.json"] if store is not None else []
        found = [read_mapping(p, FIELDS["metrics"] if p.parent.name == "metrics" else None)[1] for p in paths]
        return [p for p in (self.read_config_text()[1] if config else "", *found) if p]

    def write_metrics(self, stage: str, metrics: dict[str, Any]) -> None:
        atomic_write_json(self.metrics_path(stage), metrics)

    def read_meta(self) -> dict[str, Any]:
        """meta.json ({} when missing or unreadable; ``swept`` always a mapping)."""
        meta = read_mapping(self.meta)[0] or {}
        return {**meta, "swept": meta.get("swept") or {}}

    def read_progress(self) -> dict[str, Any]:
        """progress.json when it says which epoch of how many ({} otherwise)."""
        progress = read_mapping(self.progress)[0] or {}
        return progress if all(progress.get(k) is not None for k in ("epoch", "epochs")) else {}

    def notes(self) -> list[str]:
        """What the job wants a user to see in status (e.g. a checkpoint it could not load)."""
        progress = read_mapping(self.progress)[0] or {}
        return [str(n) for n in progress.get("notes") or []]

    def add_note(self, text: str) -> None:
        """Append ``text`` to progress.json's notes (kept there when the epoch fields are rewritten)."""
        progress = read_mapping(self.progress)[0] or {}
        atomic_write_json(self.progress, {**progress, "notes": [*self.notes(), text]})

    def resumable_failure(self) -> dict[str, Any] | None:
        """The failed stage's record when it failed writing (full disk, quota, read-only): the previous
        checkpoint is intact, so running the job again resumes it instead of leaving it failed."""
        stage = self.failed_stage()
        m = self.read_metrics(stage) if stage else None
        return m if resumable(m) else None

    def shared_store(self, stage: str = "train") -> Path | None:
        """The shared-store folder of this run's ``stage`` (train or prune, from ``shared.json``), or
        None: the stage runs in this folder."""
        pointer = read_mapping(self.path / SHARED_POINTER)[0] or {}
        rel = (pointer.get(stage) or {}).get("store")
        return Path(os.path.normpath(self.path / rel)) if isinstance(rel, str) else None

    def training_owner(self, stage: str = "train") -> dict[str, Any] | None:
        """trainer.json of the shared stage's store: the run that does (or did) it, and its job."""
        store = self.shared_store(stage)
        return read_mapping(store / "trainer.json")[0] if store is not None else None

    def blocked_by(self) -> tuple[str, str] | None:
        """(run id of the owner, why) when a shared stage (training, then pruning) this run waits for
        failed in another run; None otherwise (the owner itself shows as failed)."""
        for stage in SHARED_LINKS:
            store = self.shared_store(stage)
            if store is None:
                continue
            record = RunDir(store).read_metrics(stage)
            if record is None or record.get("status") != "failed" or resumable(record):
                continue  # (one that failed writing blocks nothing: the next submission resumes it)
            owner = self.training_owner(stage) or {}
            owner_path = Path(str(owner.get("run", "")))
            if owner_path.name and os.path.normpath(owner_path) == os.path.normpath(self.path.absolute()):
                return None
            return owner_path.name or "another run", str(record.get("error", f"its {stage} stage failed"))
        return None

    def status(self) -> str:
        """pending | running | done | diverged | failed | blocked, from the files alone.

        'running' means started and not finished: the job may be alive, or dead and resumable.
        'blocked': the shared training it waits for failed in another run (:meth:`blocked_by`).
        """
        started = self.progress.exists()
        for stage in STAGES:
            m = self.read_metrics(stage)
            if m is None:
                return "running" if started else "pending"
            if m.get(UNREADABLE_OUTPUT) and self._finished():
                continue  # its results stand; the stage is made again when another run needs the file
            if m.get("status") != "done":
                if stage in SHARED_LINKS and m.get("status") == "failed" and self.blocked_by() is not None:
                    return "blocked"
                return str(m.get("status", "failed"))
            started = True
        return "done"

    def _finished(self) -> bool:
        final = self.read_metrics(list(STAGES)[-1])
        return final is not None and final.get("status") == "done"

    def unlink_shared(self, stages: tuple[str, ...] = ("train", "prune")) -> None:
        """Remove the links into shared stages (pointers only: the shared results are not touched)."""
        for stage in stages:
            for rel in SHARED_LINKS[stage]:
                link = self.path / rel
                if link.is_symlink():
                    link.unlink()

    def stage_statuses(self) -> dict[str, str | None]:
        """Each stage's recorded status (None: not finished yet)."""
        return {
            stage: (m.get("status", "failed") if (m := self.read_metrics(stage)) is not None else None)
            for stage in STAGES
        }

    def failed_stage(self) -> str | None:
        """The first stage whose record says failed, if any."""
        return next((s for s, st in self.stage_statuses().items() if st == "failed"), None)

    def archive(self, from_stage: str | None = None) -> Path | None:
        """Move results aside into archive/<UTC time>/ so the run starts again; keeps config.yaml.

        Without ``from_stage`` everything goes (a fresh start). With it, only that stage's and the later
        stages' records, models, checkpoints and TensorBoard folders: what came before stays and is not
        redone. Nothing is deleted (tb/ is packed as tb.tar). Links into a shared training are removed
        rather than moved (the shared result stays where other runs use it; the next job links it again)."""
        if from_stage in (None, "train", "prune"):
            self.unlink_shared(("train", "prune") if from_stage in (None, "train") else ("prune",))
        if from_stage is None:
            movable = [self.metrics_dir, self.checkpoints, self.models, self.tensorboard, self.progress, self.log]
        else:
            stages = list(STAGES)[list(STAGES).index(from_stage) :]
            movable = [self.metrics_path(s) for s in stages] + [self.path / f for s in stages for f in STAGE_FILES[s]]
        movable = [p for p in dict.fromkeys(movable) if p.exists()]
        if not movable:
            return None
        dest = self.path / "archive" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        n = 0
        while dest.exists():
            n += 1
            dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        dest.mkdir(parents=True)
        for p in movable:
            rel = p.relative_to(self.path)
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if p.is_dir() and rel.parts[0] == "tb":
                # packed, so `tensorboard --logdir <sweep>` does not show old attempts as extra runs
                tmp = target.parent / f".{target.name}.tar.tmp"
                with tarfile.open(tmp, "w") as tar:
                    tar.add(p, arcname=p.name)
                os.replace(tmp, target.parent / f"{target.name}.tar")
                shutil.rmtree(p)
            else:
                os.replace(p, target)
        return dest


def model_file_problem(path: Path, whole: bool = False) -> str | None:
    """Why a model file of a run (a zip archive: ``torch.save``'s ``.pt``, ``torch.export``'s ``.pt2``)
    cannot be the file its stage wrote, or None when it looks whole: missing, empty, not a whole zip
    archive (truncated, overwritten); with ``whole``, also a member whose bytes fail their checksum
    (garbled; this reads the whole file). Torch-free: the login node calls it (without ``whole``)."""
    try:
        if path.stat().st_size == 0:
            return "empty (0 bytes)"
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip() if whole else None
    except zipfile.BadZipFile as e:
        return f"not a whole zip archive ({e}): truncated or overwritten"
    except (OSError, EOFError, ValueError, zlib.error) as e:
        return f"cannot be read ({type(e).__name__}: {e})"
    return None if bad is None else f"its member {bad} fails its checksum (garbled)"


def producing_stage(name: str) -> str | None:
    """The stage that writes ``models/<name>`` (:data:`STAGE_FILES`), None for another file."""
    return next((stage for stage, files in STAGE_FILES.items() if f"models/{name}" in files), None)


def list_runs(sweep_dir: Path) -> list[RunDir]:
    """Run folders of a sweep (those holding a config.yaml), sorted by id."""
    return [RunDir(p.parent) for p in sorted(Path(sweep_dir).glob("*/config.yaml"))]


# What makes a folder a run even when its config.yaml is unreadable: the sweep wrote meta.json beside it,
# or a job has run there
RUN_TRACES = ("meta.json", "metrics", "progress.json", "run.log", SHARED_POINTER)


def survey(sweep_dir: Path) -> tuple[list[RunDir], list[str]]:
    """(the runs of a sweep, one line per folder that holds a config.yaml but is no run): an unreadable
    config.yaml (not a mapping, binary, ...) in a folder with no trace of a run. Readers show the runs
    and name the others; nothing is written into them."""
    runs, strays = [], []
    for run in list_runs(sweep_dir):
        if any((run.path / name).exists() for name in RUN_TRACES):
            runs.append(run)
        elif problem := run.read_config_text()[1]:
            strays.append(f"{problem}; {run.path} holds nothing else of a run, so it is no run (left as it is)")
        else:
            runs.append(run)
    return runs, strays


def config_sections(text: str) -> dict[str, str]:
    """Top-level YAML block sections of a config.yaml: name -> its text."""
    out: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            current = line.split(":", 1)[0]
            out[current] = [line]
        elif current:
            out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}

"""Training checkpoints: written atomically, the one before kept as ``<name>.prev.pt``, loaded with a fallback to
it when the latest cannot be read (never a silent restart from scratch)."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.models.files import atomic_torch_save
from pipeline.rundir import RunDir

log = logging.getLogger("pipeline.stages.checkpoint")


def previous_checkpoint(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept: last.pt -> last.prev.pt."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


# errnos of a file system that has no hard links (some FUSE, SMB and object-store mounts)
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically and keep the checkpoint it replaces as
    :func:`previous_checkpoint` (a corrupt latest file then costs one epoch, not the run).

    Order: the current file is hard-linked to a temporary name that is renamed over ``<name>.prev.pt``
    (no copy, no extra space), then the new one is written beside it and renamed over ``path``. A kill
    at any point leaves ``path`` whole (old or new) and ``.prev`` whole; a write that fails (a full
    disk) leaves ``path`` as it was. ``state`` holds only tensors and plain containers, so it loads
    with ``weights_only=True``."""
    prev = previous_checkpoint(path)
    if path.exists():
        for stale in path.parent.glob(f".{prev.name}.*.link"):  # left by a kill between link and rename
            stale.unlink(missing_ok=True)
        link = prev.with_name(f".{prev.name}.{os.getpid()}.link")
        try:
            os.link(path, link)
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
            # no hard links: rename instead; until the new file is in place only .prev exists, and
            # load_checkpoint resumes from it
            os.replace(path, prev)
        else:
            os.replace(link, prev)
    atomic_torch_save(state, path)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "epoch"} <= ckpt.keys():
        raise ValueError("not a training checkpoint (no model, optimizer and epoch)")
    return ckpt


def load_checkpoint(path: Path, run: RunDir | None = None) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None when there is none (nor a previous one).

    When ``path`` is missing or cannot be read but :func:`previous_checkpoint` can, that one is used,
    with a warning in the log and a note in ``run``'s progress.json (what ``pipeline.status`` shows); an
    unreadable ``path`` is first moved aside to ``<name>.corrupt``, so the next save keeps the good
    previous file. Only rank 0 passes ``run`` (the others only read). Never a silent restart from
    scratch: when neither file can be read this raises, naming both."""
    prev = previous_checkpoint(path)
    if not path.exists() and not prev.exists():
        return None
    problem = "is missing"
    if path.exists():
        try:
            return _read_checkpoint(path)
        except Exception as e:
            problem = f"cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            if not prev.exists():
                raise RuntimeError(
                    f"checkpoint {path} {problem} and there is no previous checkpoint {prev.name}; "
                    "move it away to start this run again from scratch"
                ) from e
    try:
        ckpt = _read_checkpoint(prev)
    except Exception as e:
        raise RuntimeError(
            f"checkpoint {path} {problem}, and the previous checkpoint {prev} cannot be loaded either "
            f"({type(e).__name__}: {e}); move both away to start this run again from scratch"
        ) from e
    where = f"epoch {int(ckpt['epoch'])}" + (f" step {int(ckpt['step'])}" if ckpt.get("step") else "")
    note = f"checkpoint {path} {problem}; resumed from the previous checkpoint {prev.name} ({where})"
    if run is not None:
        if path.exists():
            corrupt = path.with_name(path.name + ".corrupt")
            os.replace(path, corrupt)  # kept for a post-mortem, out of the way of the next save
            note += f"; the unreadable file is now {corrupt.name}"
        run.add_note(note)
    log.warning("WARNING: %s", note)
    return ckpt

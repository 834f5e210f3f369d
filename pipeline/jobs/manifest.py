"""``<sweep>/manifest.json``: which job runs which run folder. Torch-free.

    {"runs": {"<run id>": {"cluster": "slurm", "job_id": "123_4", "submission": "<token>"}, ...},
                                                                             the latest job of each run
     "history": [{"cluster": "slurm", "job_ids": {"<run id>": "123_4", ...}, "time": 1700000000.0}, ...
                 {"cluster": "slurm", "rejected": ["<run id>", ...], "reason": "...", "time": ...}],
     "submitting": {"<token>": {"cluster": "slurm", "runs": ["<run id>", ...], "time": ...}}}

Written atomically before and after every sbatch, while the sweep's submission lock
(:mod:`pipeline.submit.lock`) is held. Before: the array's runs under a fresh token, which the array
carries as its Slurm comment; after: its job ids (or its refusal), the token removed. A command killed
between sbatch's answer and the second write leaves the token, and the next submission finds the array
in squeue by its comment (:func:`resolve_submitting`), so the manifest names exactly what was queued.
Older manifests (no "time", no "submitting", one history entry per submission) read the same; a
manifest that cannot be read is moved aside, never overwritten. A run's "submission" is the token of the
submission that queued its job: a shared stage's owner record made at submission names it
(:func:`pipeline.share.owner_job`), so the job needs no second write there.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.rundir import atomic_write_text, read_mapping

MANIFEST = "manifest.json"


def manifest_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / MANIFEST


def read_manifest(sweep_dir: Path) -> dict[str, Any]:
    """The manifest, with ``runs`` holding only well-formed entries (cluster and job id as strings);
    an empty one when there is none or it cannot be read."""
    return checked_manifest(sweep_dir)[0]


def checked_manifest(sweep_dir: Path) -> tuple[dict[str, Any], str]:
    """(:func:`read_manifest`, "" or what is wrong with the file, naming it)."""
    data, problem = read_mapping(manifest_path(sweep_dir))
    data = data or {}
    clean = {
        str(rid): {**e, "cluster": str(e["cluster"]), "job_id": str(e["job_id"])}
        for rid, e in (data.get("runs") or {}).items()
        if isinstance(e, dict) and "cluster" in e and "job_id" in e
    }
    return {**data, "runs": clean, "history": data.get("history") or []}, problem


def _aside_if_unreadable(path: Path) -> Path | None:
    """A manifest.json that exists but is no manifest (binary, truncated, a list, a field of the wrong
    type) is renamed to manifest.json.unreadable-<time> so that writing a new one loses nothing."""
    if not path.exists() or not checked_manifest(path.parent)[1]:
        return None
    dest = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(path, dest)
    return dest


# path -> (the file as this process last wrote it: inode, mtime, size; its content). A submission writes
# the manifest twice per array: reading back and parsing 10,000 runs each time would cost more than the rest.
_WRITTEN: dict[Path, tuple[tuple[int, int, int], dict[str, Any]]] = {}


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _update(sweep_dir: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    path = manifest_path(sweep_dir)
    written = _WRITTEN.pop(path, None)  # (dropped while changing: a failed write must not leave it changed)
    if written is not None and written[0] == _stamp(path):
        manifest = written[1]
    else:
        _aside_if_unreadable(path)
        manifest = read_manifest(sweep_dir)
    change(manifest)
    atomic_write_text(path, _dumps(manifest))
    stamp = _stamp(path)
    if stamp is not None:
        _WRITTEN[path] = (stamp, manifest)
    return path


def _dumps(manifest: dict[str, Any]) -> str:
    """The manifest as JSON, one run (or history entry) a line. Through json's C encoder: with an indent,
    json falls back to its Python one, five times slower on a 10,000-run manifest written 20 times."""

    encode = _ENCODER.encode  # one encoder for every entry: json.dumps(default=...) makes one per call

    def block(value: Any) -> str:
        if isinstance(value, dict) and value:
            lines = (f"  {encode(str(k))}: {encode(v)}" for k, v in value.items())
            return "{\n" + ",\n".join(lines) + "\n}"
        if isinstance(value, list) and value:
            return "[\n" + ",\n".join("  " + encode(v) for v in value) + "\n]"
        return encode(value)

    return "{\n" + ",\n".join(f"{encode(str(k))}: {block(v)}" for k, v in manifest.items()) + "\n}\n"


_ENCODER = json.JSONEncoder(default=str)


def _submitting(manifest: dict[str, Any]) -> dict[str, Any]:
    pending = manifest.get("submitting")
    if not isinstance(pending, dict):
        pending = manifest["submitting"] = {}
    return pending


def record_submitting(
    sweep_dir: Path, cluster: str, token: str, run_ids: list[str], submission: str | None = None
) -> Path:
    """Before an sbatch: the runs of the array about to be submitted with comment ``token`` (by the
    submission ``submission``)."""

    def change(m: dict[str, Any]) -> None:
        entry = {"cluster": cluster, "runs": list(run_ids), "time": time.time()}
        _submitting(m)[token] = {**entry, "submission": submission} if submission else entry

    return _update(sweep_dir, change)


def record_submitted(
    sweep_dir: Path,
    cluster: str,
    job_ids: dict[str, str],
    token: str | None = None,
    job_records: dict[str, dict[str, Any]] | None = None,
    submission: str | None = None,
) -> Path:
    """Record jobs just queued: each run's latest job (with ``job_records[job id]``, what else identifies
    it: a local job's process start time, and the token of the ``submission`` that queued it), plus
    one history entry (and the array's token removed)."""
    extra = {"submission": submission} if submission else {}

    def change(m: dict[str, Any]) -> None:
        for rid, jid in job_ids.items():
            m["runs"][rid] = {"cluster": cluster, "job_id": str(jid), **(job_records or {}).get(str(jid), {}), **extra}
        m["history"].append({"cluster": cluster, "job_ids": dict(job_ids), "time": time.time()})
        if token is not None:
            _submitting(m).pop(token, None)

    return _update(sweep_dir, change)


def record_rejected(sweep_dir: Path, cluster: str, run_ids: list[str], reason: str, token: str | None = None) -> Path:
    """Record an array that was not queued (the runs keep their previous job, if any)."""

    def change(m: dict[str, Any]) -> None:
        m["history"].append({"cluster": cluster, "rejected": list(run_ids), "reason": reason, "time": time.time()})
        if token is not None:
            _submitting(m).pop(token, None)

    return _update(sweep_dir, change)


def resolve_submitting(sweep_dir: Path, queued_by_comment: Callable[[], dict[str, list[str]]]) -> list[str]:
    """Arrays whose submission was interrupted: each token found among the queued jobs' comments
    (``queued_by_comment()`` -> comment -> job ids, e.g. from squeue) is recorded as submitted (task i
    runs the array's i-th run); a token not found was never queued and is dropped. Returns what was
    recorded, for the user."""
    pending = read_manifest(sweep_dir).get("submitting")
    if not isinstance(pending, dict) or not pending:
        return []
    found = queued_by_comment()
    notes = []
    for token, entry in pending.items():
        runs = entry.get("runs", []) if isinstance(entry, dict) else []
        cluster = str(entry.get("cluster", "slurm")) if isinstance(entry, dict) else "slurm"
        jobs = found.get(comment_of(token), [])
        if jobs and runs:
            job_ids = _task_ids(jobs, len(runs))
            submission = entry.get("submission") if isinstance(entry.get("submission"), str) else None
            record_submitted(sweep_dir, cluster, dict(zip(runs, job_ids)), token, submission=submission)
            notes.append(f"recorded jobs {', '.join(job_ids)} queued by an interrupted submission")
        else:
            _update(sweep_dir, functools.partial(_drop, token=token))
    return notes


def _drop(manifest: dict[str, Any], token: str) -> None:
    _submitting(manifest).pop(token, None)


def comment_of(token: str) -> str:
    """The Slurm comment an array submitted under ``token`` carries."""
    return f"pipeline-submit:{token}"


def _task_ids(jobs: list[str], n: int) -> list[str]:
    """The job id of each of an array's ``n`` tasks, from any of its ids as squeue lists them."""
    if n == 1 and len(jobs) == 1 and "_" not in jobs[0]:
        return [jobs[0]]
    base = jobs[0].split("_", 1)[0]
    return [f"{base}_{i}" for i in range(n)]


def run_jobs(sweep_dir: Path) -> dict[str, tuple[str, str]]:
    """run id -> (cluster, job id) of each run's latest job."""
    return {rid: (e["cluster"], e["job_id"]) for rid, e in read_manifest(sweep_dir)["runs"].items()}

"""``<sweep>/manifest.json``: which job runs which run folder. Torch-free.

    {"runs": {"<run id>": {"cluster": "slurm", "job_id": "123_4"}, ...},    the latest job of each run
     "history": [{"cluster": "slurm", "job_ids": {"<run id>": "123_4", ...}, "time": 1700000000.0}, ...
                 {"cluster": "slurm", "rejected": ["<run id>", ...], "reason": "...", "time": ...}]}

Written atomically after every array that sbatch accepts (and after every refused one), while the
sweep's submission lock (:mod:`pipeline.submitlock`) is held, so it names exactly what was queued even
when the submitting command is killed between two arrays. Older manifests (no "time", one history entry
per submission) read the same; a manifest that cannot be read is moved aside, never overwritten.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pipeline.rundir import atomic_write_json, read_json

MANIFEST = "manifest.json"


def manifest_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / MANIFEST


def read_manifest(sweep_dir: Path) -> dict[str, Any]:
    """The manifest, with ``runs`` holding only well-formed entries (cluster and job id as strings);
    an empty one when there is none or it cannot be read."""
    data = read_json(manifest_path(sweep_dir))
    if not isinstance(data, dict):
        return {"runs": {}, "history": []}
    runs = data.get("runs")
    if not isinstance(runs, dict):
        runs = {}
    clean = {
        str(rid): {**e, "cluster": str(e["cluster"]), "job_id": str(e["job_id"])}
        for rid, e in runs.items()
        if isinstance(e, dict) and "cluster" in e and "job_id" in e
    }
    history = data.get("history")
    if not isinstance(history, list):
        history = []
    return {**data, "runs": clean, "history": history}


def _aside_if_unreadable(path: Path) -> Path | None:
    """A manifest.json that exists but is no manifest (binary, truncated, a list) is renamed to
    manifest.json.unreadable-<time> so that writing a new one loses nothing."""
    if not path.exists() or isinstance(read_json(path), dict):
        return None
    dest = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(path, dest)
    return dest


def record_submitted(sweep_dir: Path, cluster: str, job_ids: dict[str, str]) -> Path:
    """Record jobs just queued: each run's latest job, plus one history entry."""
    path = manifest_path(sweep_dir)
    _aside_if_unreadable(path)
    manifest = read_manifest(sweep_dir)
    for rid, jid in job_ids.items():
        manifest["runs"][rid] = {"cluster": cluster, "job_id": str(jid)}
    manifest["history"].append({"cluster": cluster, "job_ids": dict(job_ids), "time": time.time()})
    atomic_write_json(path, manifest)
    return path


def record_rejected(sweep_dir: Path, cluster: str, run_ids: list[str], reason: str) -> Path:
    """Record an array that was not queued (the runs keep their previous job, if any)."""
    path = manifest_path(sweep_dir)
    _aside_if_unreadable(path)
    manifest = read_manifest(sweep_dir)
    manifest["history"].append({"cluster": cluster, "rejected": list(run_ids), "reason": reason, "time": time.time()})
    atomic_write_json(path, manifest)
    return path


def run_jobs(sweep_dir: Path) -> dict[str, tuple[str, str]]:
    """run id -> (cluster, job id) of each run's latest job."""
    return {rid: (e["cluster"], e["job_id"]) for rid, e in read_manifest(sweep_dir)["runs"].items()}

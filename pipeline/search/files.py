"""What the login node records for a search's jobs in ``<sweep>/search/``, and reads back for status
and collect: ``search.json`` (the sweep file, its ``search:`` section as written, and each study's
fixed settings and resolved base config) and ``jobs.json`` (which job runs which worker index of which
study). No optuna, no torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.rundir import atomic_write_text, read_json
from pipeline.search.spec import SearchSpec, parse_search
from pipeline.search.study import SEARCH_DIR

RECORD = "search.json"
JOBS = "jobs.json"


@dataclass(frozen=True)
class StudyPlan:
    """One study of a search: its name, the fixed settings of its grid/zip/variants point, and the
    resolved config every trial starts from (the sampled values are set on top)."""

    name: str
    fixed: dict[str, Any]
    config: dict[str, Any]


@dataclass(frozen=True)
class SearchRecord:
    sweep: str  # the sweep's name
    sweep_file: str
    spec: SearchSpec
    studies: dict[str, StudyPlan]


def record_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / SEARCH_DIR / RECORD


def is_search(sweep_dir: Path) -> bool:
    return record_path(sweep_dir).is_file()


def write_record(sweep_dir: Path, sweep: str, sweep_file: Path, doc: Any, plans: list[StudyPlan]) -> None:
    studies = {p.name: {"fixed": p.fixed, "config": p.config} for p in plans}
    text = json.dumps({"sweep": sweep, "sweep_file": str(sweep_file), "search": doc, "studies": studies}, indent=2)
    path = record_path(sweep_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text + "\n")


def read_record(sweep_dir: Path) -> SearchRecord:
    path = record_path(sweep_dir)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("studies"), dict):
        raise ConfigError(path, "is not a search record the sweep command wrote; submit the sweep again.")
    spec = parse_search(data.get("search"), str(data.get("sweep_file")))
    studies = {n: StudyPlan(n, dict(s["fixed"]), dict(s["config"])) for n, s in data["studies"].items()}
    return SearchRecord(str(data.get("sweep")), str(data.get("sweep_file")), spec, studies)


def jobs_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / SEARCH_DIR / JOBS


def read_jobs(sweep_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """study -> worker index (text) -> {"cluster", "job", ...the local job's record}."""
    data = read_json(jobs_path(sweep_dir))
    return data if isinstance(data, dict) else {}


def record_jobs(sweep_dir: Path, study: str, jobs: dict[int, dict[str, Any]]) -> None:
    data = read_jobs(sweep_dir)
    data.setdefault(study, {}).update({str(w): j for w, j in jobs.items()})
    atomic_write_text(jobs_path(sweep_dir), json.dumps(data, indent=2) + "\n")

"""The layout's promise: the login-node side of the package (the commands, the spine, submit/, jobs/,
report/, search/) imports without torch, so `sweep`, `status` and `collect` start fast on a login node and
never need a GPU build; the job side (stages/, data/, models/, compress/) is where torch lives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
LOGIN_FOLDERS = ("submit", "jobs", "report", "search")
JOB_FOLDERS = ("stages", "data", "models", "compress")


def _modules(folders: tuple[str, ...], top_level: bool) -> list[str]:
    names = [f"pipeline.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"] if top_level else []
    for folder in folders:
        for p in sorted((PACKAGE / folder).rglob("*.py")):
            parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(set(names))


def _heavy_after_import(module: str) -> list[str]:
    code = (
        f"import sys, {module}\n"
        "print(' '.join(m for m in ('torch', 'torchvision', 'torchao', 'submitit', 'optuna', 'matplotlib')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_the_folders_are_the_sides():
    login, job = _modules(LOGIN_FOLDERS, True), _modules(JOB_FOLDERS, False)
    assert "pipeline.sweep" in login and "pipeline.submit.launch" in login and "pipeline.jobs.slurm" in login
    assert "pipeline.stages.loop" in job and "pipeline.data.cifar" in job
    assert not set(login) & set(job)


@pytest.mark.parametrize("module", _modules(LOGIN_FOLDERS, True))
def test_login_side_modules_import_without_torch(module):
    # submitit and matplotlib are loaded where they are used (submitting, a plot), optuna only by search/
    # (a study), so the commands that only read (status, collect without plots) never pay for them either
    heavy = _heavy_after_import(module)
    allowed = {"optuna"} if module.startswith("pipeline.search.") else set()
    assert set(heavy) <= allowed, f"{module} imports {heavy}"

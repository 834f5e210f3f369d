"""Shared fixtures: the repository root, a subprocess runner for the CLIs, and a tiny synthetic
CIFAR-format data set written by the project's own generator (no downloads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            check: bool = False) -> subprocess.CompletedProcess:
    """``python -m <args>`` in a subprocess with this interpreter; output captured as text."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **(env or {})}
    r = subprocess.run([sys.executable, "-m", *args], cwd=cwd or REPO, env=full_env, capture_output=True,
                       text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """10 classes x 60 train / 20 test images in the synthetic layout (CIFAR-10 file format)."""
    from pipeline.data import write_synthetic
    root = tmp_path_factory.mktemp("data")
    write_synthetic(root, train_per_class=60, test_per_class=20, seed=0)
    return root


def tree_snapshot(path: Path) -> dict[str, float]:
    """Every file under ``path`` with its modification time (to prove nothing was written)."""
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}

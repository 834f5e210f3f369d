"""The sbatch script of a representative sweep (study 1 on the Greene RTX8000 settings), header and body,
as submitit renders it for one array, compared byte for byte with tests/data/sbatch/optimizers.sh.

The real submission code runs (pipeline.submit.launch.submit with submitit's SlurmExecutor); only
``sbatch`` is a stand-in on PATH that keeps the script it is handed and answers with a job id, so the
Slurm-facing text is tested on any machine, without a cluster or root. Paths that differ between
machines are written as placeholders. After a deliberate change of the script, regenerate the file with
``PIPELINE_REGENERATE_SBATCH=1 .venv/bin/python -m pytest tests/test_sbatch_script.py`` and review its diff.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from pipeline.stages.runner import execute, execute_many
from pipeline.submit import launch
from pipeline.submit.expand import expand_sweep, read_sweep
from pipeline.submit.plan import write_run
from tests.conftest import REPO

GOLDEN = REPO / "tests/data/sbatch/optimizers.sh"
REGENERATE = "PIPELINE_REGENERATE_SBATCH"
FAKE_SBATCH = """#!/bin/sh
# stands in for sbatch: keeps the script it is given, answers as sbatch does
cp "$1" "$SBATCH_CAPTURE/$(ls "$SBATCH_CAPTURE" | wc -l).sh"
echo "Submitted batch job 4242"
"""


def _fake_sbatch(folder: Path) -> Path:
    (folder / "bin").mkdir()
    sbatch = folder / "bin/sbatch"
    sbatch.write_text(FAKE_SBATCH)
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IXUSR)
    (folder / "scripts").mkdir()
    return folder / "scripts"


def _machine_independent(text: str, sweep_dir: Path, tokens: list[str]) -> str:
    text = text.replace(str(sweep_dir), "{sweep}").replace(sys.executable, "{python}")
    for i, token in enumerate(tokens):
        text = text.replace(token, f"{{token{i}}}")
    return text


def test_sbatch_script_of_a_study_sweep_matches_the_stored_copy(tmp_path, monkeypatch):
    scripts = _fake_sbatch(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_CAPTURE", str(scripts))
    spec = read_sweep(REPO / "sweeps/optimizers.yaml")
    planned = expand_sweep(spec, {"slurm.account": "pr_123_general"}, cwd=REPO)
    sweep_dir = tmp_path / "runs/optimizers"
    runs = [write_run(sweep_dir, spec, r) for r in planned]
    tokens: list[str] = []

    sub = launch.submit(
        runs,
        [r.config for r in planned],
        cluster="slurm",
        sweep_dir=sweep_dir,
        name=spec.name,
        job=execute,
        job_many=execute_many,
        max_size=1000,
        on_submitting=lambda token, run_ids: tokens.append(token),
    )

    assert not sub.rejected and len(tokens) == 1  # five runs with the same resources: one array
    assert sorted(sub.job_ids) == sorted(r.id for r in runs)
    assert sorted(sub.job_ids.values()) == [f"4242_{i}" for i in range(5)]
    (script,) = sorted(scripts.iterdir())
    text = _machine_independent(script.read_text(), sweep_dir, tokens)
    if os.environ.get(REGENERATE):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), f"the sbatch script changed; if on purpose, regenerate it ({REGENERATE}=1)"
    assert "{sweep}" in text and "{python}" in text and "{token0}" in text  # placeholders, no machine's paths

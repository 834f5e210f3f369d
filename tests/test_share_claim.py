"""Who trains a shared training when two sweeps in one ``--out`` are submitted at the same moment, on the
real local Slurm cluster: the owner record is created with ``link()`` (pipeline.share.claim), so exactly
one says "trains <key>" and the other "waits for <run>", and the waiting run's job depends on the
owner's. The jobs run ``sleep`` as their setup line and are cancelled at the end: the tests look at what
was claimed and queued, not at training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline import share, sweep
from pipeline.rundir import list_runs
from tests.conftest import REPO
from tests.test_share_slurm import dependencies
from tests.test_slurm import TINY, cancel_all, manifest

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

IDLE = {"slurm.setup": ["sleep 120"], "output.tensorboard": False}


def write_sweeps(tmp_path: Path, data_root: Path, same_run: bool = False) -> tuple[Path, Path]:
    """Two sweeps whose one run each needs the same training (they differ in what comes after it, or,
    ``same_run``, not at all: one run id in two sweep folders)."""
    paths = []
    for name, quant in (("first", "none"), ("second", "none" if same_run else "fp16")):
        settings = {**TINY, **IDLE, "data.root": str(data_root), "quant.method": quant}
        lines = [f"name: {name}", f"base: [{REPO / 'configs/base.yaml'}]", "cluster: local", "set:"]
        lines += [f"  {k}: {json.dumps(v)}" for k, v in settings.items()]
        path = tmp_path / f"{name}.yaml"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def job_ids(out: Path) -> list[str]:
    ids = []
    for name in ("first", "second"):
        if (out / name / "manifest.json").exists():
            ids += [e["job_id"] for e in manifest(out / name)["runs"].values()]
    return ids


def check_one_trains(out: Path, text: str) -> None:
    """One sweep trains the key, the other waits for that run, and its job waits for the owner's job."""
    (first,), (second,) = list_runs(out / "first"), list_runs(out / "second")
    store = first.shared_store()
    assert store is not None and store == second.shared_store()
    key = store.name
    assert text.count(f"trains {key}") == 1, text
    owner = share.read_owner(store)
    assert owner is not None
    follower = second if Path(owner["run"]) == first.path.absolute() else first
    assert Path(owner["run"]) != follower.path.absolute()
    assert text.count(f"waits for {owner['run_id']} (training {key})") == 1, text
    owner_job = manifest(Path(owner["run"]).parent)["runs"][owner["run_id"]]["job_id"]
    follower_job = manifest(follower.path.parent)["runs"][follower.id]["job_id"]
    assert f"afterok:{owner_job}" in dependencies([follower_job]).get(follower_job, ""), dependencies([follower_job])


@pytest.mark.parametrize("same_run", [False, True])
def test_a_claim_lost_between_planning_and_submitting_makes_the_sweep_follow(
    tmp_path, synthetic_root, monkeypatch, capsys, same_run
):
    """Both submissions plan while no one owns the training (forced: each waits for the other after
    planning), then both claim it: one gets it, the other plans again and follows."""
    spec_a, spec_b = write_sweeps(tmp_path, synthetic_root, same_run)
    out = tmp_path / "runs"
    planned = threading.Barrier(2, timeout=120)
    waited: set[int] = set()
    real = sweep.plan_sharing

    def plan_then_wait_for_the_other(*args, **kwargs):
        real(*args, **kwargs)
        if threading.get_ident() not in waited:  # the first planning of each submission only
            waited.add(threading.get_ident())
            planned.wait()

    monkeypatch.setattr(sweep, "plan_sharing", plan_then_wait_for_the_other)
    monkeypatch.setenv("COLUMNS", "300")
    codes: list[int] = []

    def submit(spec: Path) -> None:
        codes.append(sweep.main([str(spec), "--cluster", "slurm", "--out", str(out)]))

    threads = [threading.Thread(target=submit, args=(spec,)) for spec in (spec_a, spec_b)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        text = capsys.readouterr().out  # both submissions' output (printed from both threads)
        assert codes == [0, 0], text
        check_one_trains(out, text)
    finally:
        cancel_all(job_ids(out))


@pytest.mark.parametrize("attempt", range(3))
def test_two_sweeps_submitted_at_the_same_moment_train_once(tmp_path, synthetic_root, attempt):
    spec_a, spec_b = write_sweeps(tmp_path, synthetic_root)
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.sweep", str(spec), "--cluster", "slurm", "--out", str(out)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for spec in (spec_a, spec_b)
    ]
    try:
        results = [(p.communicate(timeout=300)[0], p.returncode) for p in procs]
        assert [rc for _, rc in results] == [0, 0], results
        check_one_trains(out, "\n".join(text for text, _ in results))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        cancel_all(job_ids(out))

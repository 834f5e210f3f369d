"""Train once, compress many, end to end through the local executor (real job processes, tiny data):
a 1 training x 3 compression sweep trains once and ends as three unshared runs would; a second sweep in
the same --out reuses the training; --rerun all of a follower keeps it; a failed training blocks its
followers until --rerun failed; kill -9 during a shared training, then a resubmission, resumes it."""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.rundir import RunDir, list_runs, read_json
from tests.conftest import REPO, run_cli

SWEEP = """\
name: {name}
set:
  data.name: synthetic
  data.root: {root}
  data.val_size: 50
  data.train_size: {train_size}
  train.epochs: {epochs}
  train.device: cpu
  train.batch_size: 32
  train.eval_batch_size: 256
  output.log_every: 1000
  model.name: resnet20
  model.shortcut: B
  prune.epochs: 1
  prune.frequency: 1
  prune.sparsity: 0.5
  measure.enabled: false
variants:
  - {{prune.method: none}}
  - {{prune.method: unstructured}}
  - {{prune.method: structured}}
"""
TRAINING_STARTED = "INFO training resnet20"  # logged once when a training starts from scratch


def sweep_file(tmp: Path, root: Path, name: str = "share", epochs: int = 1, train_size: int = 64) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(SWEEP.format(name=name, root=root, epochs=epochs, train_size=train_size))
    return path


def sweep(path: Path, out: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return run_cli("pipeline.sweep", str(path), "--cluster", "local", "--out", str(out), *args, timeout=timeout)


def trainings_started(out: Path) -> int:
    """Training starts from scratch under an output root: from the shared store's logs, and from the
    logs of runs that train in their own folder."""
    logs = list(out.glob(".shared/train/*/run.log"))
    logs += [p for p in out.glob("*/*/run.log") if RunDir(p.parent).shared_store() is None]
    return sum(p.read_text().count(TRAINING_STARTED) for p in logs)


def stores_of(sweep_dir: Path) -> Path:
    (store,) = {RunDir(p.parent).shared_store() for p in sweep_dir.glob("*/config.yaml")}
    return store


def log_time(run: RunDir, text: str) -> float:
    for line in run.log.read_text().splitlines():
        if text in line:
            return datetime.datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S").timestamp()
    raise AssertionError(f"{text!r} not in {run.log}")


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, synthetic_root):
    """The sweep with sharing (--parallel 2: followers in the other slot wait) and without."""
    tmp = tmp_path_factory.mktemp("share")
    path = sweep_file(tmp, synthetic_root)
    shared, unshared = tmp / "shared", tmp / "unshared"
    r = sweep(path, shared, "--parallel", "2", "--wait")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r2 = sweep(path, unshared, "--parallel", "2", "--wait", "share.train=false")
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    return tmp, path, shared / "share", unshared / "share", r.stdout


def test_one_training_three_compressions_identical_to_unshared_runs(swept):
    tmp, _, shared, unshared, stdout = swept
    assert "1 training(s)" in stdout
    runs = list_runs(shared)
    assert len(runs) == 3 and all(r.status() == "done" for r in runs)
    assert trainings_started(shared.parent) == 1
    assert trainings_started(unshared.parent) == 3
    assert sum(f"training lines go to {stores_of(shared)}" in r.log.read_text() for r in runs) == 1
    stores = list((shared.parent / ".shared" / "train").iterdir())
    assert len(stores) == 1 and not (unshared.parent / ".shared").exists()
    trained_at = (stores[0] / "metrics" / "train.json").stat().st_mtime
    for run in runs:
        # every compression starts after the one training was recorded (log times: whole seconds)
        assert log_time(run, "stage prune") >= int(trained_at)
        # the training's lines are in the store's log only; the owner's run.log says where they are
        assert TRAINING_STARTED not in run.log.read_text()
        assert run.read_metrics("train") == read_json(stores[0] / "metrics" / "train.json")
        assert (run.path / "tb" / "train").resolve() == (stores[0] / "tb").resolve()
        twin = RunDir(unshared / run.id)  # same id: sharing is not part of a run's identity
        assert twin.status() == "done" and twin.shared_store() is None
        for key in ("test_acc", "val_loss", "train_loss", "val_acc_best"):
            assert run.read_metrics("train")[key] == twin.read_metrics("train")[key]
        assert run.read_metrics("prune").get("test_acc") == twin.read_metrics("prune").get("test_acc")
        for name in ("trained.pt", "pruned.pt"):
            if (twin.models / name).exists():
                a, b = state_dict(run.models / name), state_dict(twin.models / name)
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    status = run_cli("pipeline.status", str(shared), check=True)
    assert "3 done" in status.stdout
    collect = run_cli("pipeline.collect", str(shared), check=True)
    assert collect.returncode == 0 and (shared / "results.md").read_text().count("| done |") == 3


def test_second_sweep_in_the_same_out_reuses_the_training(swept):
    tmp, path, shared, _, _ = swept
    dry = sweep(path, shared.parent, "--dry-run", "prune.sparsity=0.7")
    assert dry.returncode == 0, dry.stderr
    assert "0 training(s) in all" in dry.stdout and dry.stdout.count("reuses training") == 3
    r = sweep(path, shared.parent, "--wait", "prune.sparsity=0.7")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = list_runs(shared)
    assert len(runs) == 6 and all(run.status() == "done" for run in runs)
    assert trainings_started(shared.parent) == 1


def test_rerun_all_of_a_follower_keeps_the_shared_training(swept):
    _, _, shared, _, _ = swept
    follower = next(r for r in list_runs(shared) if (r.read_meta()["swept"] or {}).get("prune.method") == "structured")
    store = follower.shared_store()
    assert store is not None
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file() and p.name != "run.log"}
    old_prune = follower.read_metrics("prune")
    r = run_cli("pipeline.run", str(follower.path), "--rerun", "all", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the shared training untouched
    assert follower.status() == "done" and follower.shared_store() == store
    assert trainings_started(shared.parent) == 1
    archived = sorted((follower.path / "archive").glob("*/metrics/prune.json"))
    assert archived and read_json(archived[-1]) == old_prune


def test_failed_training_blocks_its_followers_until_rerun_failed(tmp_path, synthetic_root):
    root = tmp_path / "data"  # missing at first: the training fails when it loads the data
    path = sweep_file(tmp_path, root, name="blocked")
    out = tmp_path / "runs"
    r = sweep(path, out, "--wait")
    assert r.returncode == 1
    runs = list_runs(out / "blocked")
    states = sorted(run.status() for run in runs)
    assert states == ["blocked", "blocked", "failed"]
    owner = next(run for run in runs if run.status() == "failed")
    for run in runs:
        if run is not owner:
            assert run.blocked_by()[0] == owner.id
            assert run.read_metrics("prune") is None  # never started its own stages
    status = run_cli("pipeline.status", str(out / "blocked"), check=True)
    assert status.stdout.count(f"blocked by {owner.id}") == 2 and "2 blocked" in status.stdout
    again = sweep(path, out, "--dry-run")
    assert again.stdout.count("skip-blocked") == 2 and "skip-failed" in again.stdout
    shutil.copytree(synthetic_root, root)  # the fix
    r = sweep(path, out, "--wait", "--rerun", "failed")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert all(run.status() == "done" for run in runs)
    store = owner.shared_store()
    assert store is not None and list((store / "archive").glob("*/metrics/train.json"))  # failure kept aside
    assert trainings_started(out) == 1  # the failed attempt stopped loading the data, before training


def test_kill_9_during_a_shared_training_then_resubmit_resumes_it(tmp_path, synthetic_root):
    path = sweep_file(tmp_path, synthetic_root, name="killed", epochs=3, train_size=300)
    out = tmp_path / "runs"
    # the debug executor trains inside the sweep process: a process of this test's own, to kill -9
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.sweep", str(path), "--cluster", "debug", "--out", str(out)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        progress = [read_json(p) or {} for p in out.glob(".shared/train/*/progress.json")]
        if progress and progress[0].get("epoch") == 1:
            killed_at = progress[0]["epoch"]
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert killed_at is not None, "the training ended before it could be killed"
    (store,) = list((out / ".shared" / "train").iterdir())
    assert read_json(store / "metrics" / "train.json") is None  # really interrupted
    r = sweep(path, out, "--wait")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 training(s)" in r.stdout
    runs = list_runs(out / "killed")
    assert len(runs) == 3 and all(run.status() == "done" for run in runs)
    assert trainings_started(out) == 1  # resumed, not started again
    assert "resuming from" in (store / "run.log").read_text()
    assert read_json(store / "metrics" / "train.json")["epochs"] == 3


def test_sharing_never_imports_torch_on_the_login_node():
    code = "import sys, pipeline.share, pipeline.sweep, pipeline.status; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)

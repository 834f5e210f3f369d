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
    # prune.sparsity does nothing with prune.method=none: that run is the finished one (same id)
    assert "0 training(s) in all" in dry.stdout and dry.stdout.count("reuses training") == 2
    assert dry.stdout.count("skip-done") == 1
    r = sweep(path, shared.parent, "--wait", "prune.sparsity=0.7")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = list_runs(shared)
    assert len(runs) == 5 and all(run.status() == "done" for run in runs)
    assert trainings_started(shared.parent) == 1


def test_rerun_all_of_a_follower_keeps_the_shared_training(swept):
    _, _, shared, _, _ = swept
    follower = next(r for r in list_runs(shared) if (r.read_meta()["swept"] or {}).get("prune.method") == "structured")
    store, prune_store = follower.shared_store(), follower.shared_store("prune")
    assert store is not None and prune_store is not None
    kept = [*store.rglob("*"), *prune_store.rglob("*")]
    before = {p: p.stat().st_mtime_ns for p in kept if p.is_file() and p.name != "run.log"}
    old_prune, old_quantize = follower.read_metrics("prune"), follower.read_metrics("quantize")
    r = run_cli("pipeline.run", str(follower.path), "--rerun", "all", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the shared training and pruning untouched
    assert follower.status() == "done" and follower.shared_store() == store
    assert follower.shared_store("prune") == prune_store and follower.read_metrics("prune") == old_prune
    assert trainings_started(shared.parent) == 1
    archived = sorted((follower.path / "archive").glob("*/metrics/quantize.json"))  # its own stages redone
    assert archived and read_json(archived[-1]) == old_quantize
    assert not list((follower.path / "archive").glob("*/metrics/prune.json"))  # links are not archived


def test_rerun_all_with_share_prune_false_prunes_in_the_run_folder(swept):
    """The way to redo one run's pruning without touching the shared one: share.prune=false."""
    tmp, path, shared, _, first_stdout = swept
    follower = next(  # one of this sweep file's runs (not of the prune.sparsity=0.7 sweep beside them)
        r
        for r in list_runs(shared)
        if (r.read_meta()["swept"] or {}).get("prune.method") == "unstructured" and r.id in first_stdout
    )
    prune_store = follower.shared_store("prune")
    assert prune_store is not None
    r = sweep(path, shared.parent, "--wait", "--rerun", "all", "share.prune=false")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert follower.status() == "done" and follower.shared_store("prune") is None
    assert not (follower.models / "pruned.pt").is_symlink() and (prune_store / "models" / "pruned.pt").is_file()
    a, b = state_dict(follower.models / "pruned.pt"), state_dict(prune_store / "models" / "pruned.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # pruned again here, to the same weights


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


PRUNE_SWEEP = """\
name: {name}
set:
  data.name: synthetic
  data.root: {root}
  data.val_size: 50
  data.train_size: 64
  train.epochs: 1
  train.device: cpu
  train.batch_size: 32
  train.eval_batch_size: 256
  output.log_every: 1000
  model.name: resnet20
  model.shortcut: B
  prune.epochs: 1
  prune.frequency: 1
  prune.sparsity: 0.5
  quant.calib_batches: 1
  measure.enabled: false
  measure.compile: false  # no AOTInductor package of each int8 model (a minute of CPU each; nothing times it)
variants:
  - {{prune.method: none, quant.method: int8}}
  - {{prune.method: unstructured, quant.method: int8}}
  - {{prune.method: unstructured, quant.method: fp16}}
"""
PRUNED = "INFO pruned (unstructured"  # logged once per pruning fine-tune


def prunings(out: Path) -> int:
    logs = list(out.glob(".shared/prune/*/run.log"))
    logs += [p for p in out.glob("*/*/run.log") if RunDir(p.parent).shared_store("prune") is None]
    return sum(p.read_text().count(PRUNED) for p in logs)


@pytest.mark.slow
def test_one_training_one_pruning_two_quantizations_identical_to_unshared_runs_and_blocked(tmp_path, synthetic_root):
    """The unpruned run trains; the int8 one (waiting for that training) prunes; the fp16 one waits for
    that pruning: one training, one pruning, and every result bitwise that of unshared runs. Then a
    failed shared pruning blocks the run waiting for it until --rerun failed."""
    path = tmp_path / "prune.yaml"
    path.write_text(PRUNE_SWEEP.format(name="pr", root=synthetic_root))
    dry = sweep(path, tmp_path / "shared", "--dry-run")
    assert "1 training(s) in all" in dry.stdout and "prunes " in dry.stdout and "(pruning " in dry.stdout, dry.stdout
    r = sweep(path, tmp_path / "shared", "--parallel", "2", "--wait")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r2 = sweep(path, tmp_path / "unshared", "--parallel", "2", "--wait", "share.train=false")
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    shared, unshared = tmp_path / "shared" / "pr", tmp_path / "unshared" / "pr"
    runs = list_runs(shared)
    assert len(runs) == 3 and all(run.status() == "done" for run in runs)
    assert trainings_started(shared.parent) == 1 and prunings(shared.parent) == 1
    assert trainings_started(unshared.parent) == 3 and prunings(unshared.parent) == 2
    (store,) = list((shared.parent / ".shared" / "prune").iterdir())
    pruned_at = (store / "metrics" / "prune.json").stat().st_mtime
    assert sum(f"pruning lines go to {store}/run.log (prune.log" in run.log.read_text() for run in runs) == 1
    for run in runs:
        twin = RunDir(unshared / run.id)
        assert twin.status() == "done" and twin.shared_store("prune") is None
        if run.read_metrics("prune")["method"] == "none":
            assert run.shared_store("prune") is None
        else:
            assert run.shared_store("prune") == store
            assert (run.models / "pruned.pt").is_symlink() and log_time(run, "stage quantize") >= int(pruned_at)
            a, b = state_dict(run.models / "pruned.pt"), state_dict(twin.models / "pruned.pt")
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            assert run.read_metrics("prune")["test_acc"] == twin.read_metrics("prune")["test_acc"]
        quant = run.read_metrics("quantize")
        assert quant["method"] in ("int8", "fp16") and quant.get("test_acc") == twin.read_metrics("quantize").get(
            "test_acc"
        )
        if (twin.models / "fp16.pt").exists():
            assert (run.models / "fp16.pt").read_bytes() == (twin.models / "fp16.pt").read_bytes()
    collect = run_cli("pipeline.collect", str(shared), check=True)
    assert "1 training(s) shared by 3 runs; 1 pruning(s) shared by 2 runs, each counted once" in collect.stdout

    # the shared pruning fails (its record replaced by a failure, as a crashed fine-tune writes it): its
    # owner is failed, the other run blocked by it, until --rerun failed prunes once more (not trains)
    owner = read_json(store / "trainer.json")["run_id"]
    (follower,) = [run for run in runs if run.shared_store("prune") == store and run.id != owner]
    (store / "metrics" / "prune.json").write_text('{"status": "failed", "error": "RuntimeError: boom"}')
    assert RunDir(shared / owner).status() == "failed" and follower.status() == "blocked"
    assert follower.blocked_by() == (owner, "RuntimeError: boom")
    status = run_cli("pipeline.status", str(shared), check=True)
    assert f"blocked by {owner}" in status.stdout and "1 blocked" in status.stdout
    dry = sweep(path, tmp_path / "shared", "--dry-run")
    assert dry.stdout.count("skip-blocked") == 1 and dry.stdout.count("skip-failed") == 1, dry.stdout
    r = sweep(path, tmp_path / "shared", "--wait", "--rerun", "failed")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert all(run.status() == "done" for run in runs)
    assert trainings_started(shared.parent) == 1 and prunings(shared.parent) == 1  # the store's new log
    (archived,) = list((store / "archive").glob("*"))  # the failure kept aside, with the first attempt's log
    assert (archived / "metrics" / "prune.json").is_file() and (archived / "run.log").read_text().count(PRUNED) == 1
    a, b = state_dict(follower.models / "pruned.pt"), state_dict(RunDir(unshared / follower.id).models / "pruned.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # pruned again, to the same weights


def test_a_shared_training_that_failed_writing_resumes_when_the_sweep_is_submitted_again(tmp_path, synthetic_root):
    """A scratch disk (or a group quota) fills up during a shared training: its owner fails writing with
    the checkpoint intact, and the runs sharing it are not blocked. Submitting the sweep again, without
    --rerun, resumes that one training from its checkpoint (nothing archived, never started afresh) and
    every run finishes. A real tmpfs, shrunk under the running job (CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], check=True)
    try:
        path = sweep_file(tmp_path, synthetic_root, name="full", epochs=3, train_size=300)
        out = disk / "runs"
        cmd = [sys.executable, "-m", "pipeline.sweep", str(path), "--cluster", "local", "--out", str(out), "--wait"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        first = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline, last = time.monotonic() + 600, None
        while last is None and time.monotonic() < deadline and first.poll() is None:
            for candidate in out.glob(".shared/train/*/checkpoints/last.pt"):
                try:
                    torch.load(candidate, weights_only=True)
                    last = candidate
                except Exception:
                    pass
            time.sleep(0.05)
        assert last is not None, first.communicate()[0][-3000:]
        room_kb = (shutil.disk_usage(disk).used + last.stat().st_size // 2) // 1024  # not one more checkpoint
        subprocess.run(["mount", "-o", f"remount,size={room_kb}k", str(disk)], check=True)
        stdout = first.communicate(timeout=900)[0]
        assert first.returncode == 1, stdout[-3000:]
        store = last.parent.parent
        record = RunDir(store).read_metrics("train")
        assert record["status"] == "failed" and record["resume"] is True, record
        runs = list_runs(out / "full")
        assert sorted(r.status() for r in runs) == ["failed"] * 3  # failed writing, none blocked
        assert "resuming from" not in (store / "run.log").read_text()  # not retried on the full disk by each run
        dry = sweep(path, out, "--dry-run")
        assert dry.stdout.count("resume") >= 3 and "skip-blocked" not in dry.stdout, dry.stdout

        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)  # space freed
        again = sweep(path, out, "--wait")
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert all(r.status() == "done" for r in runs)
        log = (store / "run.log").read_text()
        assert log.count(f"resuming from {last}") == 1, log[-3000:]
        assert trainings_started(out) == 1 and not (store / "archive").exists()
        assert RunDir(store).read_metrics("train")["status"] == "done"
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)

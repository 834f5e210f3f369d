"""Faults during training, injected for real (real processes, real files, a real small tmpfs):

- a diverging run (NaN/inf loss) stops within ``train.nan_check_steps`` steps of its first non-finite
  loss, in training and in the pruning and QAT fine-tunes, and its record says where;
- a full disk during training: the previous checkpoint is intact, the run is failed with the path and
  "No space left on device", and running it again after space is freed resumes it bitwise;
- a quota exceeded (a real btrfs qgroup limit) and a filesystem forced read-only under the job (a real
  ext4 error): one line saying so, no traceback, the checkpoint intact, and a resubmission resumes;
- a corrupt latest checkpoint: the run resumes from the previous one with a warning naming the file,
  status shows it, and the final model equals an unbroken run's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data.loaders import DeviceLoader
from pipeline.data.cifar import Split
from pipeline.models import build_model
from pipeline.rundir import RunDir, list_runs
from tests.conftest import REPO, run_cli, run_ranks, tiny_args, write

BASE = REPO / "configs/base.yaml"


def tiny(root: Path, *extra: str) -> list[str]:
    """pipeline.run arguments of a ResNet-20 run on the tiny synthetic data: 400 train images, batch 25
    (20 steps per epoch: 600 images less 100 for validation)."""
    changes = {"train.batch_size": 25, "train.device": "cpu", "schedule.name": "constant"}
    return tiny_args(root, *extra, changes=changes)


def job(tmp_path: Path, root: Path, *extra: str, out: str = "runs", expect: int = 0) -> RunDir:
    r = run_cli("pipeline.run", *tiny(root, *extra), "--out", str(tmp_path / out), cwd=tmp_path, timeout=900)
    assert r.returncode == expect, r.stdout[-3000:] + r.stderr[-3000:]
    (run,) = list_runs(tmp_path / out)
    return run


# --------------------------------------------------------------------------------------------------
# 1. A diverging run stops early
# --------------------------------------------------------------------------------------------------


class _Recording(nn.Module):
    """Passes through to ``inner`` and keeps every training output (to recompute each step's loss)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.outputs = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        self.outputs.append(out.detach().clone())
        return out


class _PoisonAt:
    """A loader that hands out batches of ``loader`` and makes batch ``bad`` (0-based) all NaN, the way
    a corrupt image or an overflow would; it counts the batches it handed out."""

    def __init__(self, loader: DeviceLoader, bad: int):
        self.loader, self.bad, self.served, self.labels = loader, bad, 0, []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, (x, y) in enumerate(self.loader):
            if i == self.bad:
                x = torch.full_like(x, float("nan"))
            self.served += 1
            self.labels.append(y.clone())
            yield x, y


def test_nan_loss_ends_the_epoch_within_nan_check_steps_and_names_the_step():
    from pipeline.stages.loop import train_one_epoch

    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (320, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(320) % 10)
    loader = DeviceLoader(split, 8, device=torch.device("cpu"), mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=False)
    loader.set_epoch(0)
    poisoned = _PoisonAt(loader, bad=9)  # step 10 (1-based) of 40
    torch.manual_seed(0)
    model = _Recording(build_model("resnet20", 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    res = train_one_epoch(model, poisoned, opt, nan_check_steps=4)

    # the window of steps 9-12 holds the first NaN: the epoch ends after step 12, not after step 40
    assert poisoned.served == 12 and res.steps == 12 and not res.stopped
    assert res.diverged is not None and res.diverged["step"] == 10 and res.diverged["loss"] == "nan"
    last = F.cross_entropy(model.outputs[8], poisoned.labels[8]).float().item()  # step 9, recomputed
    assert math.isfinite(last) and res.diverged["last_finite_loss"] == last


def test_healthy_epoch_reports_no_divergence_and_its_last_loss():
    from pipeline.stages.loop import train_one_epoch

    g = torch.Generator().manual_seed(1)
    split = Split(torch.randint(0, 256, (80, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(80) % 10)
    loader = DeviceLoader(split, 8, device=torch.device("cpu"), mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=False)
    loader.set_epoch(0)
    torch.manual_seed(0)
    model = _Recording(build_model("resnet20", 10))
    res = train_one_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.01), nan_check_steps=3)
    assert res.steps == 10 and res.diverged is None  # 10 steps: windows of 3, 3, 3 and the last 1 read at the end
    labels = [y for _, y in loader]
    assert res.last_loss == F.cross_entropy(model.outputs[-1], labels[-1]).float().item()


def _assert_diverged_early(record: dict, k: int) -> None:
    assert record["status"] == "diverged" and record["diverged_epoch"] == 1, record
    assert record["diverged_loss"] in ("nan", "inf", "-inf")
    assert record["steps_per_epoch"] == 20
    # stopped at the end of the window holding the first non-finite loss: within k steps of it
    assert record["diverged_step"] <= record["stopped_at_step"] < record["diverged_step"] + k
    assert record["stopped_at_step"] < 20 - k  # well before the end of the epoch
    if record["diverged_step"] > 1:
        assert math.isfinite(record["last_finite_loss"])


def test_huge_lr_stops_training_within_k_steps_and_the_record_and_status_say_where(tmp_path, synthetic_root):
    run = job(tmp_path, synthetic_root, "optim.lr=1e6", "train.epochs=2", "train.nan_check_steps=2")
    record = run.read_metrics("train")
    _assert_diverged_early(record, 2)
    assert record["test_acc"] is None and not (run.models / "trained.pt").exists()
    assert run.status() == "diverged" and run.read_metrics("prune") is None
    text = run.log.read_text()
    assert f"train epoch 1 step {record['diverged_step']}/20: loss is {record['diverged_loss']}" in text
    assert "epoch 1/2" not in text  # no epoch-end line: it never finished the epoch
    status = run_cli("pipeline.status", str(run.path.parent), cwd=tmp_path, check=True).stdout
    assert f"diverged at train epoch 1 step {record['diverged_step']}/20" in status


@pytest.mark.parametrize(
    ("bad", "rank0_step", "rank0_loss"),
    [
        (9, 11, "nan"),  # rank 1's step 10 is NaN; the averaged gradients make rank 0's step 11 NaN
        (11, 12, None),  # rank 1's step 12 is NaN, the window's last: rank 0's own losses are all finite
    ],
)
def test_a_nan_on_one_rank_stops_both_ranks_at_the_same_step(tmp_path, bad, rank0_step, rank0_loss):
    """Data-parallel (gloo, two processes): only rank 1 sees a NaN loss, both ranks end the epoch after
    the same window (4 steps: 9-12) instead of one rank raising or leaving the other in an all-reduce."""
    results = run_ranks(["-m", "tests.ddp_nan_rank", str(bad), "4"], tmp_path)
    assert [r.returncode for r in results] == [0, 0], [r.stdout[-3000:] for r in results]
    rank0, rank1 = (json.loads(r.stdout.strip().splitlines()[-1]) for r in results)
    assert rank0["batches"] == 20 and rank0["steps"] == rank1["steps"] == 12  # not 20: stopped early
    assert rank1["diverged"]["step"] == bad + 1 and rank1["diverged"]["loss"] == "nan"
    assert rank0["diverged"]["step"] == rank0_step and rank0["diverged"]["loss"] == rank0_loss
    assert math.isfinite(rank0["diverged"]["last_finite_loss"])


def test_a_diverging_two_rank_job_ends_on_both_ranks_with_rank_0_s_record(tmp_path, synthetic_root):
    """pipeline.run as two gloo ranks with a huge lr: both processes end (no hang), rank 0 writes the
    diverged record with the step, no model is saved, and the run's status says diverged."""
    from pipeline.run import prepare_single

    args = tiny(synthetic_root, "optim.lr=1e6", "train.epochs=2", "train.nan_check_steps=2", "model.norm=group")
    run = prepare_single(BASE, args[1:], tmp_path / "ddp")
    results = run_ranks(["-m", "pipeline.run", str(run.path)], tmp_path)
    assert [r.returncode for r in results] == [0, 0], [r.stdout[-3000:] for r in results]
    record = run.read_metrics("train")
    assert record["world_size"] == 2
    # 20 steps per epoch of 25 images on one process; two ranks of 25 each: 10 steps of the global batch of 50
    assert record["status"] == "diverged" and record["diverged_epoch"] == 1, record
    assert record["diverged_step"] <= record["stopped_at_step"] < record["diverged_step"] + 2
    assert record["stopped_at_step"] < record["steps_per_epoch"]
    assert not (run.models / "trained.pt").exists() and run.status() == "diverged"


@pytest.mark.slow
def test_pruning_finetune_and_qat_that_diverge_stop_early_with_the_same_record(tmp_path, synthetic_root):
    common = ("train.epochs=1", "train.nan_check_steps=3", "measure.enabled=false")
    pruned = job(
        tmp_path, synthetic_root, *common, "prune.method=unstructured", "prune.epochs=2", "prune.lr=1e6", out="p"
    )
    assert pruned.read_metrics("train")["status"] == "done"
    _assert_diverged_early(pruned.read_metrics("prune"), 3)
    assert "prune epoch 1 step" in pruned.log.read_text() and pruned.read_metrics("quantize") is None

    qat = job(tmp_path, synthetic_root, *common, "quant.method=qat", "quant.epochs=2", "quant.lr=1e6", out="q")
    record = qat.read_metrics("quantize")
    _assert_diverged_early(record, 3)
    assert "qat epoch 1 step" in qat.log.read_text() and not (qat.models / "int8.pt2").exists()


# --------------------------------------------------------------------------------------------------
# 2. A corrupt latest checkpoint is survivable
# --------------------------------------------------------------------------------------------------


def _state(epoch: int) -> dict:
    return {"model": {"w": torch.full((3,), float(epoch))}, "optimizer": {}, "epoch": epoch}


def test_checkpoint_rotation_keeps_the_previous_one_and_every_kill_point_loads(tmp_path, caplog):
    from pipeline.stages.checkpoint import load_checkpoint, previous_checkpoint, save_checkpoint

    path = tmp_path / "checkpoints" / "last.pt"
    prev = previous_checkpoint(path)
    assert prev.name == "last.prev.pt" and load_checkpoint(path) is None
    for epoch in (1, 2, 3):
        save_checkpoint(path, _state(epoch))
    assert torch.load(path, weights_only=True)["epoch"] == 3 and torch.load(prev, weights_only=True)["epoch"] == 2
    assert os.stat(path).st_ino != os.stat(prev).st_ino
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.prev.pt", "last.pt"]  # no temporaries left

    # a kill after the previous file was renamed away and before the new one was in place (the
    # rename fallback of file systems without hard links): only .prev is there, and it is used
    os.replace(path, prev)
    run = RunDir(tmp_path)
    with caplog.at_level("WARNING", logger="pipeline.stages.checkpoint"):
        ckpt = load_checkpoint(path, run)
    assert ckpt["epoch"] == 3 and f"checkpoint {path} is missing" in caplog.text
    assert "resumed from the previous checkpoint last.prev.pt (epoch 3)" in run.notes()[0]


def test_unreadable_latest_and_previous_checkpoint_is_an_error_naming_both(tmp_path):
    from pipeline.stages.checkpoint import load_checkpoint, previous_checkpoint

    path = tmp_path / "prune.pt"
    path.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="no previous checkpoint prune.prev.pt"):
        load_checkpoint(path, RunDir(tmp_path))
    previous_checkpoint(path).write_bytes(b"more garbage")
    with pytest.raises(RuntimeError, match=r"prune\.pt cannot be loaded .*prune\.prev\.pt cannot be loaded either"):
        load_checkpoint(path, RunDir(tmp_path))
    assert path.read_bytes() == b"garbage"  # nothing moved when nothing could be loaded


def _kill_when(proc: subprocess.Popen, out: Path, stage: str, epoch: int) -> None:
    """SIGKILL ``proc`` a moment after its progress.json says ``stage`` finished ``epoch`` epochs."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        progress = list(out.glob("*/progress.json"))
        if progress:
            p = json.loads(progress[0].read_text() or "{}")
            if p.get("stage") == stage and p.get("epoch", 0) >= epoch:
                time.sleep(0.3)  # into the next epoch
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def _garble(path: Path) -> int:
    """Replace ``path`` by its first half (a new file: the previous checkpoint is not touched); returns
    the epoch it held."""
    epoch = int(torch.load(path, weights_only=True)["epoch"])
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])
    return epoch


@pytest.mark.slow
def test_corrupt_latest_checkpoint_resumes_from_the_previous_one_in_training_and_pruning(tmp_path, synthetic_root):
    extra = (
        "train.epochs=4",
        "data.train_size=250",  # 10 steps an epoch: the kill lands inside the next epoch all the same
        "prune.method=unstructured",
        "prune.sparsity=0.5",
        "prune.epochs=3",
        "prune.frequency=3",
        "measure.enabled=false",
    )
    unbroken = job(tmp_path, synthetic_root, *extra, out="a")
    out_b = tmp_path / "b"
    command = [sys.executable, "-m", "pipeline.run", *tiny(synthetic_root, *extra), "--out", str(out_b)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    for stage, name in (("train", "last"), ("prune", "prune")):
        popen = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_when(popen, out_b, stage, 2)
        (run,) = list_runs(out_b)
        assert run.read_metrics(stage) is None  # killed inside the stage
        latest = run.checkpoints / f"{name}.pt"
        epoch = _garble(latest)
        prev_epoch = int(torch.load(run.checkpoints / f"{name}.prev.pt", weights_only=True)["epoch"])
        assert prev_epoch == epoch - 1 >= 1
        before = run.log.read_text()

    # after the second garbling: run to the end (the first resume happened in the second Popen)
    r = run_cli("pipeline.run", str(run.path), cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = run.log.read_text()
    for name in ("last", "prune"):
        warning = f"WARNING: checkpoint {run.checkpoints / (name + '.pt')} cannot be loaded ("
        assert warning in log and f"resumed from the previous checkpoint {name}.prev.pt (epoch " in log
        assert (run.checkpoints / f"{name}.pt.corrupt").is_file()  # kept, out of the way
    assert f"prune: resuming from {run.checkpoints / 'prune.pt'} at epoch {prev_epoch + 1}/3" in log[len(before) :]
    assert log.count("training resnet20") == 1  # the training was never restarted from scratch
    notes = run.notes()
    assert len(notes) == 2 and "last.prev.pt" in notes[0] and "prune.prev.pt" in notes[1]
    status = run_cli("pipeline.status", str(out_b), cwd=tmp_path, env={"COLUMNS": "2000"}, check=True).stdout
    assert "note" in status and "resumed from the previous checkpoint prune.prev.pt" in status

    # deterministic on a CPU: the same weights as the unbroken run, trained and pruned, bitwise
    for file in ("trained.pt", "pruned.pt"):
        sa = torch.load(unbroken.models / file, weights_only=True)["state_dict"]
        sb = torch.load(run.models / file, weights_only=True)["state_dict"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), file
    for stage in ("train", "prune"):
        ma, mb = unbroken.read_metrics(stage), run.read_metrics(stage)
        for key in ("train_loss", "train_acc_best", "val_loss", "val_acc_best", "test_acc"):
            assert ma[key] == mb[key], (stage, key)


@pytest.mark.slow
def test_corrupt_latest_qat_checkpoint_resumes_from_the_previous_one(tmp_path, synthetic_root):
    """The QAT fine-tune's checkpoint (a prepared, fake-quantized graph's state) rotates and recovers like
    training's: killed in its last epoch, qat.pt garbled, the rerun resumes from qat.prev.pt and ends
    with its int8 model; nothing before QAT is redone."""
    extra = ("train.epochs=1", "data.train_size=150", "quant.method=qat", "quant.epochs=3", "measure.enabled=false")
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "pipeline.run", *tiny(synthetic_root, *extra), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    popen = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(popen, out, "qat", 2)
    (run,) = list_runs(out)
    assert run.read_metrics("quantize") is None and run.read_metrics("train")["status"] == "done"
    latest = run.checkpoints / "qat.pt"
    epoch = _garble(latest)
    prev_epoch = int(torch.load(run.checkpoints / "qat.prev.pt", weights_only=True)["epoch"])
    assert prev_epoch == epoch - 1 >= 1
    r = run_cli("pipeline.run", str(run.path), cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = run.log.read_text()
    assert f"WARNING: checkpoint {latest} cannot be loaded (" in log
    assert "resumed from the previous checkpoint qat.prev.pt (epoch " in log
    assert f"qat: resuming from {latest} at epoch {prev_epoch + 1}/3" in log
    assert (run.checkpoints / "qat.pt.corrupt").is_file() and log.count("training resnet20") == 1
    quant = run.read_metrics("quantize")
    assert quant["status"] == "done" and quant["qat_epochs"] == 3
    assert (run.models / "int8.pt2").is_file() and quant["model"] == "models/int8.pt2"  # (scored as loaded)
    assert any("qat.prev.pt" in note for note in run.notes())


# --------------------------------------------------------------------------------------------------
# 3. A full disk loses nothing (a real tmpfs: CI runs as root)
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(where: Path, size_kb: int):
    """A real tmpfs of ``size_kb`` KiB mounted at ``where`` (needs root, as in CI), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.slow
def test_full_disk_during_training_keeps_the_checkpoint_says_why_and_resumes_bitwise(tmp_path, synthetic_root):
    extra = ("train.epochs=3", "data.train_size=200", "measure.enabled=false")
    unbroken = job(tmp_path, synthetic_root, *extra, out="a")
    checkpoint_kb = (unbroken.checkpoints / "last.pt").stat().st_size // 1024
    # room for everything of the first epoch and one checkpoint, not for the second one beside it
    size_kb = 512 + checkpoint_kb * 3 // 2
    with _tmpfs(tmp_path / "disk", size_kb) as disk:
        out = disk / "runs"
        r = run_cli("pipeline.run", *tiny(synthetic_root, *extra), "--out", str(out), cwd=tmp_path, timeout=900)
        assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
        (run,) = list_runs(out)
        last = run.checkpoints / "last.pt"
        record = run.read_metrics("train")
        # the record fits on the full disk and names the file and the reason; the run is failed
        assert record["status"] == "failed" and record["error"] == f"{last}: No space left on device", record
        assert record["resume"] is True and run.status() == "failed"
        # the first message names them too, never torch's stream error
        first = next(line for line in r.stdout.splitlines() if "failed" in line)
        assert f"stage train failed: [Errno 28] No space left on device: '{last}'" in first
        assert "basic_ios" not in r.stdout + r.stderr and "iostream" not in r.stdout + r.stderr
        # the previous checkpoint is intact: epoch 1, loadable; no temporary left taking the space
        assert torch.load(last, weights_only=True)["epoch"] == 1
        assert not [p for p in run.checkpoints.iterdir() if p.name.startswith(".")]
        status = run_cli("pipeline.status", str(out), cwd=tmp_path, env={"COLUMNS": "2000"}, check=True).stdout
        assert "No space left on device: free space, then submit again to resume" in status

        subprocess.run(["mount", "-o", "remount,size=65536k", str(disk)], check=True)  # space freed
        again = run_cli("pipeline.run", str(run.path), cwd=tmp_path, timeout=900)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        log = run.log.read_text()
        assert "resuming it from its last checkpoint" in log and f"resuming from {last} at epoch 2/3" in log
        assert log.count("training resnet20") == 1
        sa = torch.load(unbroken.models / "trained.pt", weights_only=True)["state_dict"]
        sb = torch.load(run.models / "trained.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        ma, mb = unbroken.read_metrics("train"), run.read_metrics("train")
        for key in ("train_loss", "train_acc_best", "val_loss", "val_acc_best", "test_acc"):
            assert ma[key] == mb[key], key
        assert run.status() == "done"


@contextlib.contextmanager
def _loop_fs(where: Path, mkfs: list[str], size_mb: int, options: str = ""):
    """A real filesystem in a sparse image file, loop-mounted at ``where`` (needs root, as in CI)."""
    if os.geteuid() != 0 or shutil.which(mkfs[0]) is None:
        pytest.skip(f"needs root and {mkfs[0]} (CI has both: .ci/run installs it)")
    image = where.with_suffix(".img")
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    where.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-o", f"loop{',' + options if options else ''}", str(image), str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount here (a container without loop devices?): {mounted.stderr.strip()}")
    try:
        yield where, image
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)
        image.unlink(missing_ok=True)


def _training_job(tmp_path: Path, root: Path, out: Path, epochs: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", *tiny(root, f"train.epochs={epochs}", "measure.enabled=false")]
        + ["--out", str(out)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _first_checkpoint(job: subprocess.Popen, out: Path) -> Path:
    """last.pt of the job's run once its first epoch is saved (and loadable)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and job.poll() is None:
        found = list(out.glob("*/checkpoints/last.pt"))
        if found:
            with contextlib.suppress(Exception):
                torch.load(found[0], weights_only=True)
                return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint under {out}: {job.communicate()[0][-3000:]}")


@pytest.mark.slow
def test_quota_exceeded_during_training_says_so_and_resumes_once_raised(tmp_path, synthetic_root):
    """A real quota: a btrfs qgroup limit on the subvolume holding the runs, lowered under the job after
    its first checkpoint, as when a shared group quota fills up. Write fails with EDQUOT."""
    with _loop_fs(tmp_path / "quota", ["mkfs.btrfs", "-q"], 160) as (mnt, _):
        subprocess.run(["btrfs", "quota", "enable", str(mnt)], check=True, capture_output=True)
        subprocess.run(["btrfs", "subvolume", "create", str(mnt / "home")], check=True, capture_output=True)
        out = mnt / "home" / "runs"
        job = _training_job(tmp_path, synthetic_root, out, epochs=3)
        last = _first_checkpoint(job, out)
        limit_kb = 256 + (last.stat().st_size >> 10) // 2  # what is used now + less than one more checkpoint
        os.sync()  # qgroup show counts what is committed
        shown = subprocess.run(["btrfs", "qgroup", "show", "--raw", str(mnt)], capture_output=True, text=True)
        referenced = max(int(line.split()[1]) for line in shown.stdout.splitlines() if line.startswith("0/"))
        limit_kb += referenced >> 10
        subprocess.run(["btrfs", "qgroup", "limit", f"{limit_kb}k", str(mnt / "home")], check=True)
        stdout = job.communicate(timeout=600)[0]
        assert job.returncode == 1, stdout[-3000:]
        (run,) = list_runs(out)
        record = run.read_metrics("train")
        assert record is not None, stdout[:6000]
        assert record["status"] == "failed" and record["resume"] is True, record
        assert record["error"].endswith("Disk quota exceeded") and str(run.path) in record["error"], record
        assert "Disk quota exceeded" in next(line for line in stdout.splitlines() if "failed" in line)
        assert torch.load(last, weights_only=True)["epoch"] >= 1  # the last good checkpoint is intact
        status = run_cli("pipeline.status", str(out), cwd=tmp_path, env={"COLUMNS": "2000"}, check=True).stdout
        assert "Disk quota exceeded: free space, then submit again to resume" in status

        subprocess.run(["btrfs", "qgroup", "limit", "none", str(mnt / "home")], check=True)  # quota raised
        saved = torch.load(last, weights_only=True)["epoch"]
        again = run_cli("pipeline.run", str(run.path), cwd=tmp_path, timeout=900)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert "resuming it from its last checkpoint" in run.log.read_text() and run.status() == "done"
        assert saved >= 1


@pytest.mark.slow
def test_a_filesystem_gone_read_only_under_a_training_stops_it_and_a_rerun_resumes(tmp_path, synthetic_root):
    """A real read-only filesystem: ext4 forced read-only by an error (``errors=remount-ro``, the kernel's
    trigger_fs_error), with the job's files open, as a storage fault does on a cluster. Nothing can be
    written, not even a failure record: the job says why on its output and exits 1, the last checkpoint is
    intact, and once the filesystem is repaired a rerun resumes from it."""
    with _loop_fs(tmp_path / "ro", ["mkfs.ext4", "-q"], 64, "errors=remount-ro") as (mnt, image):
        out = mnt / "runs"
        job = _training_job(tmp_path, synthetic_root, out, epochs=3)
        last = _first_checkpoint(job, out)
        device = Path(
            subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mnt)], capture_output=True, text=True).stdout.strip()
        )
        Path(f"/sys/fs/ext4/{device.name}/trigger_fs_error").write_text("test: storage fault")
        stdout = job.communicate(timeout=600)[0]
        assert job.returncode == 1, stdout[-3000:]
        assert "Read-only file system" in stdout and "Traceback" not in stdout.split("failed", 1)[0], stdout[-3000:]
        assert "--- Logging error ---" not in stdout, stdout[-3000:]  # one line about the log, not one per record
        (run,) = list_runs(out)
        saved = torch.load(last, weights_only=True)["epoch"]
        assert saved >= 1
        subprocess.run(["umount", str(mnt)], check=True)
        subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True)  # the repair
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
        status = run_cli("pipeline.status", str(out), cwd=tmp_path, env={"COLUMNS": "2000"}, check=True).stdout
        assert run.id in status
        again = run_cli("pipeline.run", str(run.path), cwd=tmp_path, timeout=900)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert f"resuming from {last} at epoch {saved + 1}/3" in run.log.read_text()
        assert run.status() == "done"


def test_a_sweep_submitted_again_resumes_a_run_that_failed_writing(tmp_path):
    from pipeline.submit.expand import expand_sweep, read_sweep
    from pipeline.submit.plan import plan, write_run

    spec = read_sweep(
        write(
            tmp_path / "s.yaml",
            f"name: s\nbase: [{BASE}]\nset: {{model.name: resnet20}}\ngrid:\n  optim.lr: [0.1, 0.2]\n",
        )
    )
    runs = expand_sweep(spec, cwd=tmp_path)
    sweep_dir = tmp_path / "runs" / "s"
    full, broken = (write_run(sweep_dir, spec, r) for r in runs)
    failed = {"status": "failed", "stage": "train", "error": "/x/last.pt: No space left on device"}
    full.write_metrics("train", {**failed, "resume": True})
    broken.write_metrics("train", failed)  # any other failure: not retried on its own
    for rerun in (None, "failed"):
        actions = {d.run.id: d.action for d in plan(runs, sweep_dir, rerun, set())}
        assert actions[full.id] == "resume"  # never "rerun": that would start it afresh
        assert actions[broken.id] == ("skip-failed" if rerun is None else "rerun")


def test_a_disk_already_full_stops_the_job_at_once_naming_the_run_folder(tmp_path, synthetic_root):
    from pipeline.run import prepare_single

    with _tmpfs(tmp_path / "disk", 8192) as disk:  # room for a checkpoint once the filler is gone
        args = tiny(synthetic_root, "train.epochs=1", "measure.enabled=false")
        run = prepare_single(Path(args[0]), args[1:], disk / "runs")
        filler = disk / "filler"
        with open(filler, "wb") as f:  # fill the disk to the last block
            try:
                while True:
                    f.write(bytes(64 * 1024))
                    f.flush()
            except OSError:
                pass
        r = run_cli("pipeline.run", str(run.path), cwd=tmp_path, timeout=900)
        assert r.returncode == 1
        assert f"cannot write in {run.path}: [Errno 28] No space left on device" in r.stdout, r.stdout + r.stderr
        assert "training resnet20" not in r.stdout  # nothing was computed only to be lost
        assert not run.checkpoints.exists() and run.read_metrics("train") is None

        filler.unlink()
        again = run_cli("pipeline.run", str(run.path), cwd=tmp_path, timeout=900)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert run.status() == "done" and not (run.path / ".space-reserve").exists()

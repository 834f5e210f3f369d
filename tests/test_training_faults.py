"""Faults during training, injected for real (real processes, real files, a real small tmpfs):

- a diverging run (NaN/inf loss) stops within ``train.nan_check_steps`` steps of its first non-finite
  loss, in training and in the pruning and QAT fine-tunes, and its record says where;
- a full disk during training: the previous checkpoint is intact, the run is failed with the path and
  "No space left on device", and running it again after space is freed resumes it bitwise;
- a corrupt latest checkpoint: the run resumes from the previous one with a warning naming the file,
  status shows it, and the final model equals an unbroken run's.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data import DeviceLoader, Split
from pipeline.models import build_model
from pipeline.rundir import RunDir, list_runs
from tests.conftest import MEASURE_FAST_ARGS, REPO, run_cli

BASE = REPO / "configs/base.yaml"


def tiny(root: Path, *extra: str) -> list[str]:
    """pipeline.run arguments of a ResNet-20 run on the tiny synthetic data: 400 train images, batch 25
    (20 steps per epoch: 600 images less 100 for validation)."""
    return [
        str(BASE),
        "model.name=resnet20",
        "data.name=synthetic",
        f"data.root={root}",
        "data.val_size=100",
        "train.threads=1",
        "train.batch_size=25",
        "train.device=cpu",
        "output.log_every=1000",
        "schedule.name=constant",
        *MEASURE_FAST_ARGS,
        *extra,
    ]


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
    from pipeline.train import train_one_epoch

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
    from pipeline.train import train_one_epoch

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

"""The whole path on this machine, for real: sweep file -> submitit local executor -> training on
synthetic CIFAR-format files -> run folders, TensorBoard events -> collect's table."""

from __future__ import annotations

import csv
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from pipeline.rundir import RunDir, list_runs
from tests.conftest import kill_9_when, MEASURE_FAST_ARGS, REPO, run_cli, tiny_args

TINY = ["data.val_size=100", "train.epochs=2", "train.batch_size=50", "output.log_every=1000", *MEASURE_FAST_ARGS]


def sweep(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli("pipeline.sweep", *args, cwd=cwd, timeout=900)


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, synthetic_root):
    """The demo: one ResNet-20 unpruned, 70% unstructured and 50% structured, each then int8, all measured."""
    out = tmp_path / "runs"
    r = sweep(
        str(REPO / "sweeps/quickstart.yaml"),
        "--cluster",
        "local",
        "--wait",
        "--out",
        str(out),
        f"data.root={synthetic_root}",
        "data.train_size=0",
        *TINY,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    runs = list_runs(out / "quickstart")
    assert len(runs) == 3
    manifest = json.loads((out / "quickstart/manifest.json").read_text())
    assert set(manifest["runs"]) == {run.id for run in runs}
    by_method = {run.read_meta()["swept"]["prune.method"]: run for run in runs}
    assert set(by_method) == {"none", "unstructured", "structured"}
    for method, run in by_method.items():
        assert run.status() == "done", run.stage_statuses()
        m = run.read_metrics("train")
        assert m["status"] == "done" and m["epochs"] == 2
        assert m["test_acc"] > 0.3, m  # 10 classes: chance is 0.1
        for key in ("train_loss", "train_acc_best", "val_loss", "val_acc_best", "test_top5", "images_per_s"):
            assert m[key] is not None, key
        # the three runs share one training (pipeline.share): its checkpoint, log and event files are in
        # the store, reached through shared.json, train.log and tb/train
        trained = RunDir(run.shared_store() or run.path)
        assert (trained.checkpoints / "last.pt").exists() and trained.log.read_text().count("epoch 2/2") == 1
        assert (run.path / "train.log").read_text() == trained.log.read_text()
        assert (run.models / "pruned.pt").exists() == (method != "none")
        assert run.read_metrics("quantize")["test_acc"] > 0.3 and (run.models / "int8.pt2").exists()
        names = [e["name"] for e in run.read_metrics("measure")["models"]]
        assert names == (["trained", "int8"] if method == "none" else ["trained", "pruned", "int8"])
        # real TensorBoard event files, read back
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run.tensorboard / "train"))
        acc.Reload()
        val = acc.Scalars("val/acc")
        assert [e.step for e in val] == [1, 2]
        assert max(e.value for e in val) == pytest.approx(m["val_acc_best"])
        assert {"train/loss", "train/acc", "val/loss", "lr", "images_per_s"} <= set(acc.Tags()["scalars"])
    assert by_method["unstructured"].read_metrics("prune")["sparsity"] == pytest.approx(0.7, abs=1e-3)
    structured = by_method["structured"].read_metrics("prune")
    assert structured["params"] < structured["params_before"]

    c = run_cli("pipeline.collect", str(out / "quickstart"), cwd=tmp_path)
    assert c.returncode == 0, c.stderr
    table = (out / "quickstart/results.md").read_text().split("\n\n")[0].splitlines()  # the runs table
    assert table[0].startswith(
        "| run | prune | sparsity | training loss | train best acc | val loss | "
        "val best acc | test loss | test acc | removed | pruned acc | int8 acc | fp32 size | int8 size |"
    )
    assert len(table) == 2 + 3 and all(line.endswith("| done |") for line in table[2:])
    assert table[0] in c.stdout
    with open(out / "quickstart/results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {row["run"] for row in rows} == {run.id for run in runs}
    for row in rows:
        run = next(r for r in runs if r.id == row["run"])
        assert float(row["test_acc"]) == run.read_metrics("train")["test_acc"]
        assert float(row["int8_test_acc"]) == run.read_metrics("quantize")["test_acc"]
        assert int(row["int8_bytes"]) == (run.models / "int8.pt2").stat().st_size

    # submitting the same sweep again skips every finished run
    again = sweep(
        str(REPO / "sweeps/quickstart.yaml"),
        "--cluster",
        "local",
        "--wait",
        "--out",
        str(out),
        f"data.root={synthetic_root}",
        "data.train_size=0",
        *TINY,
        cwd=tmp_path,
    )
    assert again.returncode == 0 and "0 of 3 runs submitted" in again.stdout, again.stdout


def _final_state(run: RunDir) -> dict[str, torch.Tensor]:
    return torch.load(run.checkpoints / "last.pt", map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow
def test_resume_after_kill_9_matches_unbroken_run(tmp_path, synthetic_root):
    # what is compared is the training
    args = tiny_args(synthetic_root, changes={"train.epochs": 3, "train.batch_size": 25, "measure.enabled": False})
    unbroken = run_cli("pipeline.run", *args, "--out", str(tmp_path / "a"), cwd=tmp_path, check=True)
    assert "done" in unbroken.stdout

    out_b = tmp_path / "b"
    seen = kill_9_when(args, out_b, tmp_path, lambda p: p["epoch"] == 1, after_s=0.5, timeout=300)  # into epoch 2
    assert seen["epoch"] < 3
    (run_b,) = list_runs(out_b)
    assert run_b.read_metrics("train") is None  # really interrupted
    resumed = run_cli("pipeline.run", str(run_b.path), cwd=tmp_path, check=True)
    assert "done" in resumed.stdout and "resuming from" in run_b.log.read_text()

    (run_a,) = list_runs(tmp_path / "a")
    assert run_a.id == run_b.id
    ma, mb = run_a.read_metrics("train"), run_b.read_metrics("train")
    for key in ("train_loss", "train_acc_best", "val_loss", "val_acc_best", "test_acc", "test_top5"):
        assert ma[key] == mb[key], key
    sa, sb = _final_state(run_a), _final_state(run_b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_diverging_run_stops_cleanly_beside_a_healthy_one(tmp_path, synthetic_root):
    spec = tmp_path / "diverge.yaml"
    spec.write_text(f"""
name: diverge
base: [{REPO / "configs/base.yaml"}]
set: {{model.name: resnet20, data.name: synthetic, data.root: {synthetic_root}, schedule.name: constant}}
grid:
  optim.lr: [0.05, 1.0e+6]
""")
    out = tmp_path / "runs"
    r = sweep(str(spec), "--cluster", "local", "--wait", "--out", str(out), *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    by_lr = {json.loads(run.meta.read_text())["swept"]["optim.lr"]: run for run in list_runs(out / "diverge")}
    healthy, bad = by_lr[0.05].read_metrics("train"), by_lr[1e6].read_metrics("train")
    assert healthy["status"] == "done" and healthy["test_acc"] is not None
    assert bad["status"] == "diverged" and bad["diverged_epoch"] == 1 and bad["test_acc"] is None
    assert "diverged" in by_lr[1e6].log.read_text()
    c = run_cli("pipeline.collect", str(out / "diverge"), cwd=tmp_path, check=True)
    assert "diverged (epoch 1)" in c.stdout


def test_failed_run_is_reported_skipped_and_rerun_on_request(tmp_path, synthetic_root):
    data = tmp_path / "later"  # the data is not there yet: the run fails
    spec = tmp_path / "fail.yaml"
    spec.write_text(f"""
name: fail
base: [{REPO / "configs/base.yaml"}]
set: {{model.name: resnet20, data.name: synthetic, data.root: {data}, share.train: false}}
""")  # a training of its own, in the run folder (shared trainings: tests/test_share_sweep.py)
    out = tmp_path / "runs"
    # what is tested is the bookkeeping of attempts: the shortest training that writes every file
    short = [*TINY, "data.train_size=100", "train.epochs=1", "measure.enabled=false"]
    r = sweep(str(spec), "--cluster", "local", "--wait", "--out", str(out), *short, cwd=tmp_path)
    assert r.returncode == 1 and "failed" in r.stdout
    (run,) = list_runs(out / "fail")
    m = run.read_metrics("train")
    assert m["status"] == "failed" and "FileNotFoundError" in m["error"] and m["log"] == str(run.log)
    c = run_cli("pipeline.collect", str(out / "fail"), cwd=tmp_path, check=True)
    assert f"failed (log {run.log})" in c.stdout

    again = sweep(str(spec), "--cluster", "local", "--out", str(out), *short, cwd=tmp_path)
    assert again.returncode == 0 and "skip-failed" in again.stdout and "0 of 1 runs submitted" in again.stdout

    data.symlink_to(synthetic_root)
    rerun = sweep(
        str(spec), "--cluster", "local", "--wait", "--rerun", "failed", "--out", str(out), *short, cwd=tmp_path
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert run.read_metrics("train")["status"] == "done"
    (archived,) = (run.path / "archive").iterdir()  # the failed attempt is kept, not deleted
    assert json.loads((archived / "metrics/train.json").read_text())["status"] == "failed"
    assert (archived / "run.log").exists()

    # --rerun all: the finished attempt moves aside too, its TensorBoard files packed out of TensorBoard's
    # sight (an unpacked copy inside the sweep folder would show as one more run)
    events = sorted(p.name for p in run.tensorboard.iterdir())
    rerun = sweep(str(spec), "--cluster", "local", "--wait", "--rerun", "all", "--out", str(out), *short, cwd=tmp_path)
    assert rerun.returncode == 0 and run.read_metrics("train")["status"] == "done"
    second = max((run.path / "archive").iterdir())
    with tarfile.open(second / "tb.tar") as tar:
        assert sorted(Path(n).name for n in tar.getnames() if n != "tb") == events
    assert not list((run.path / "archive").rglob("*tfevents*"))


def test_debug_cluster_runs_in_the_sweep_process(tmp_path, synthetic_root):
    """--cluster debug: submitit's in-process executor (breakpoints work); it runs when waited for."""
    spec = tmp_path / "dbg.yaml"
    spec.write_text(
        f"name: dbg\nbase: [{REPO / 'configs/base.yaml'}]\n"
        f"set: {{model.name: resnet20, data.name: synthetic, data.root: {synthetic_root}}}\n"
    )
    r = sweep(str(spec), "--cluster", "debug", "--out", str(tmp_path / "runs"), *TINY, "train.epochs=1", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = list_runs(tmp_path / "runs/dbg")
    assert run.read_metrics("train")["status"] == "done"
    assert "epoch 1/1" in r.stdout  # the training log went to this process's output

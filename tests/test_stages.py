"""The compression stages through the real job entry point (``python -m pipeline.run``) on tiny synthetic
data: train -> prune -> quantize -> measure, every model saved and loadable in a fresh process, exact
resume of a pruning fine-tune after kill -9, a failed prune stage that costs no training, bad settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.rundir import RunDir, list_runs
from pipeline.run import prepare_single
from tests.conftest import kill_9_when, REPO, run_cli, tiny_args

BASE = REPO / "configs/base.yaml"


def tiny(root: Path, *extra: str) -> list[str]:
    return tiny_args(root, *extra, changes={"train.device": "cpu"})


def run_job(tmp_path: Path, root: Path, *extra: str, out: str = "runs") -> RunDir:
    r = run_cli("pipeline.run", *tiny(root, *extra), "--out", str(tmp_path / out), cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "torch.ao.quantization" not in r.stdout + r.stderr  # no deprecated path, no warning about it
    (run,) = list_runs(tmp_path / out)
    return run


FRESH_ACCURACY = """
import json, sys, torch
from pipeline.models.files import load_model
from pipeline.config import from_run_file
from pipeline.stages.loop import evaluate
from pipeline.stages.setup import make_loaders
run = sys.argv[1]
cfg = from_run_file(run + "/config.yaml")
_, _, _, test = make_loaders(cfg, torch.device("cpu"))
out = {}
for name in sys.argv[2:]:
    path = run + "/models/" + name
    if name.endswith(".pt2"):
        from pipeline.compress.quantize import load_int8
        model = load_int8(path)
    else:
        model, _ = load_model(path)
        model = model.to(memory_format=torch.channels_last)
    out[name] = evaluate(model, test)["acc"]
print(json.dumps(out))
"""


def fresh_accuracies(run: RunDir, *names: str) -> dict[str, float]:
    """Test accuracy of model files, each loaded in a new process (weights only / exported program)."""
    r = subprocess.run(
        [sys.executable, "-c", FRESH_ACCURACY, str(run.path), *names],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_unstructured_finetune_then_int8_then_measure(tmp_path, synthetic_root):
    run = run_job(
        tmp_path,
        synthetic_root,
        "prune.method=unstructured",
        "prune.sparsity=0.5",
        "prune.epochs=2",
        "prune.frequency=2",
        "prune.end=0.5",
        "prune.lr=0.01",
        "quant.method=int8",
        "quant.calib_batches=2",
        "measure.memory=true",
    )
    assert run.status() == "done"
    train, prune, quant, meas = (run.read_metrics(s) for s in ("train", "prune", "quantize", "measure"))
    assert train["status"] == prune["status"] == quant["status"] == meas["status"] == "done"
    for record in (train, prune, quant, meas):  # each stage's wall and CPU time (user + system)
        assert 0 < record["cpu_s"] <= record["wall_s"] * ((os.cpu_count() or 1) + 1), record
    # the final sparsity is the target over the pruned tensors, to one weight per tensor
    n_tensors = len(prune["sparsity_layers"])
    assert abs(prune["sparsity"] - 0.5) < n_tensors / prune["params"]
    assert prune["nonzero_params"] < 0.6 * prune["params"] and prune["epochs"] == 2
    targets = [e["target"] for e in prune["sparsity_log"]]
    assert targets == sorted(targets) and targets[-1] == 0.5
    for name in ("trained.pt", "pruned.pt", "int8.pt2"):
        assert (run.models / name).is_file(), name
    # each model loads in a fresh process and scores what its stage recorded
    acc = fresh_accuracies(run, "trained.pt", "pruned.pt", "int8.pt2")
    assert acc["trained.pt"] == train["test_acc"] and acc["pruned.pt"] == prune["test_acc"]
    assert acc["int8.pt2"] == quant["test_acc"]
    assert quant["source"] == "models/pruned.pt" and quant["raw"] < 0.65 * (run.models / "trained.pt").stat().st_size
    # measure: one entry per model, the same figures side by side
    by_name = {e["name"]: e for e in meas["models"]}
    assert set(by_name) == {"trained", "pruned", "int8"}
    assert by_name["pruned"]["nonzero_parameters"] < 0.6 * by_name["trained"]["nonzero_parameters"]
    assert by_name["int8"]["file_bytes"] == (run.models / "int8.pt2").stat().st_size
    assert by_name["trained"]["test_top1"] == pytest.approx(train["test_acc"])
    # int8 without its compiled package (measure.compile=false here) is not timed: no speed, no memory
    assert by_name["int8"]["runtime"] == "eager" and "not timed" in by_name["int8"]["skipped"]
    timed = [e for e in meas["models"] if e["name"] != "int8"]
    assert all(e["peak_memory_b1_bytes"] >= 0 and e["memory_method"] for e in timed)
    # TensorBoard: the fine-tune's epochs and the sparsity of every mask update, read back
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc_tb = EventAccumulator(str(run.tensorboard / "prune" / "sparsity"))
    acc_tb.Reload()
    assert [e.value for e in acc_tb.Scalars("sparsity/target")] == pytest.approx(targets)
    assert any(t.startswith("sparsity/layer/") for t in acc_tb.Tags()["scalars"])
    ft = EventAccumulator(str(run.tensorboard / "prune"))
    ft.Reload()
    assert [e.step for e in ft.Scalars("val/acc")] == [1, 2]
    # collect's table and CSV carry the compressed models' figures
    c = run_cli("pipeline.collect", str(run.path.parent), cwd=tmp_path, check=True)
    assert "int8 acc" in c.stdout and "| done |" in c.stdout and "CPU time" in c.stdout
    assert "CPU time of every stage" in (run.path.parent / "results.md").read_text()


@pytest.mark.slow
def test_structured_prune_then_qat(tmp_path, synthetic_root):
    run = run_job(
        tmp_path,
        synthetic_root,
        "model.shortcut=B",
        "prune.method=structured",
        "prune.sparsity=0.5",
        "prune.epochs=1",
        "quant.method=qat",
        "quant.epochs=1",
        "measure.enabled=false",
    )
    prune, quant = run.read_metrics("prune"), run.read_metrics("quantize")
    assert prune["params"] < 0.5 * prune["params_before"] and prune["macs"] < 0.5 * prune["macs_before"]
    assert prune["widths"]["layer3.0.conv1"][1] < prune["widths"]["layer3.0.conv1"][0]
    assert quant["method"] == "qat" and quant["qat_epochs"] == 1 and quant["status"] == "done"
    acc = fresh_accuracies(run, "pruned.pt", "int8.pt2")
    assert acc["pruned.pt"] == prune["test_acc"] and acc["int8.pt2"] == quant["test_acc"]
    assert (run.checkpoints / "qat.pt").is_file()
    assert torch.load(run.checkpoints / "qat.pt", weights_only=True)["epoch"] == 1


def test_pruning_inside_training_follows_the_polynomial_schedule(tmp_path, synthetic_root):
    run = run_job(
        tmp_path,
        synthetic_root,
        "train.epochs=2",
        "prune.method=unstructured",
        "prune.during=train",
        "prune.schedule=polynomial",
        "prune.sparsity=0.6",
        "prune.frequency=2",
        "prune.begin=0.0",
        "prune.end=0.6",
        "measure.enabled=false",
    )
    train, prune = run.read_metrics("train"), run.read_metrics("prune")
    assert abs(train["sparsity"] - 0.6) < 1e-3 and prune["during"] == "train"
    assert prune["sparsity"] == pytest.approx(train["sparsity"])
    log = train["sparsity_log"]
    assert log[0]["target"] == 0.0 and log[-1]["target"] == pytest.approx(0.6)
    assert all(a["target"] <= b["target"] for a, b in zip(log, log[1:]))
    assert all(abs(e["overall"] - e["target"]) < 1e-3 for e in log)  # measured follows the schedule
    assert not (run.models / "pruned.pt").exists()  # the trained model is the pruned one
    assert (run.tensorboard / "sparsity").is_dir()


def _pruned_state(run: RunDir) -> dict[str, torch.Tensor]:
    return torch.load(run.models / "pruned.pt", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_kill_9_during_pruning_finetune_resumes_bitwise(tmp_path, synthetic_root):
    extra = [
        "prune.method=unstructured",
        "prune.sparsity=0.5",
        "prune.epochs=3",
        "prune.frequency=3",
        "prune.end=0.7",
        "measure.enabled=false",
    ]
    unbroken = run_job(tmp_path, synthetic_root, *extra, out="a")
    out_b = tmp_path / "b"
    # into the second fine-tune epoch
    kill_9_when(tiny(synthetic_root, *extra), out_b, tmp_path, lambda p: p.get("stage") == "prune" and p["epoch"] == 1)
    (run_b,) = list_runs(out_b)
    assert run_b.read_metrics("train")["status"] == "done" and run_b.read_metrics("prune") is None
    run_cli("pipeline.run", str(run_b.path), cwd=tmp_path, check=True, timeout=900)
    assert "prune: resuming from" in run_b.log.read_text()
    assert run_b.log.read_text().count("training resnet20") == 1  # the training was not redone
    sa, sb = _pruned_state(unbroken), _pruned_state(run_b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert unbroken.read_metrics("prune")["test_acc"] == run_b.read_metrics("prune")["test_acc"]


@pytest.mark.slow
def test_failed_prune_stage_keeps_the_training_and_rerun_failed_redoes_only_it(tmp_path, synthetic_root):
    args = tiny(synthetic_root, "prune.method=unstructured", "prune.epochs=1", "measure.enabled=false")
    run = prepare_single(Path(args[0]), args[1:], tmp_path / "runs")
    run.checkpoints.mkdir(parents=True)
    (run.checkpoints / "prune.pt").write_bytes(b"not a checkpoint")  # e.g. a disk that lost a block
    r = run_cli("pipeline.run", str(run.path), cwd=tmp_path)
    assert r.returncode == 1
    train, prune = run.read_metrics("train"), run.read_metrics("prune")
    assert train["status"] == "done" and prune["status"] == "failed" and "prune.pt" in prune["error"]
    trained_bytes = (run.models / "trained.pt").read_bytes()
    assert run.status() == "failed" and run.failed_stage() == "prune"
    c = run_cli("pipeline.collect", str(run.path.parent), cwd=tmp_path, check=True)
    assert "failed (prune stage;" in c.stdout
    s = run_cli("pipeline.status", str(run.path.parent), cwd=tmp_path, check=True)
    assert "prune stage failed" in s.stdout

    again = run_cli("pipeline.run", str(run.path), cwd=tmp_path)  # not retried on its own, and says why
    assert again.returncode == 1 and "--rerun failed" in again.stdout and "prune.pt" in again.stdout

    fixed = run_cli("pipeline.run", str(run.path), "--rerun", "failed", cwd=tmp_path, check=True, timeout=900)
    assert "done" in fixed.stdout and run.read_metrics("prune")["status"] == "done"
    assert run.read_metrics("train") == train and (run.models / "trained.pt").read_bytes() == trained_bytes
    assert run.log.read_text().count("training resnet20") == 1
    (archived,) = (run.path / "archive").iterdir()
    assert (archived / "checkpoints/prune.pt").read_bytes() == b"not a checkpoint"  # kept, not deleted
    assert json.loads((archived / "metrics/prune.json").read_text())["status"] == "failed"


@pytest.mark.parametrize(
    "override, key",
    [
        ("prune.sparsity=1.0", "prune.sparsity"),
        ("prune.sparsity=-0.1", "prune.sparsity"),
        ("prune.method=magnitude", "prune.method"),
        ("prune.importance=taylor", "prune.importance"),
        ("quant.method=int4", "quant.method"),
        ("prune.schedule=cubic", "prune.schedule"),
    ],
)
def test_bad_compression_settings_exit_2_before_anything_is_written(tmp_path, override, key):
    r = run_cli(
        "pipeline.run", str(BASE), "prune.method=unstructured", override, "--out", str(tmp_path / "runs"), cwd=tmp_path
    )
    assert r.returncode == 2 and key in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["quant.method=qat", "quant.epochs=0"], "quant.epochs", "must be >= 1"),
        (["prune.method=unstructured", "prune.begin=0.8", "prune.end=0.5"], "prune.begin", "must not be after"),
        (["prune.method=structured", "prune.during=train"], "prune.during", "finetune"),
    ],
)
def test_inconsistent_compression_settings_exit_2(tmp_path, overrides, key, words):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: s\nbase: [{BASE}]\n")
    r = run_cli(
        "pipeline.sweep", str(spec), *overrides, "--out", str(tmp_path / "runs"), "--cluster", "local", cwd=tmp_path
    )
    assert r.returncode == 2 and key in r.stderr and words in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()


def test_default_config_compresses_nothing():
    cfg = load_config([BASE])
    assert cfg.prune.method == "none" and cfg.quant.method == "none" and cfg.measure.enabled

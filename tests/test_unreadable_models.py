"""A model file an earlier stage made that cannot be read any more (truncated, garbled, gone) is repaired
by ``--rerun failed``: the stage that finds it marks the stage that made it failed, naming the file, so
the rerun makes it again (a shared training is moved aside and trained once more), instead of redoing
only the finding stage, which would fail the same way. Real files, real jobs (local executor), tiny data."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.models.files import UnreadableModel, load_model, save_model
from pipeline.rundir import RunDir, list_runs, model_file_problem
from tests.conftest import run_cli, tiny_args
from tests.test_share_sweep import TRAINING_STARTED, sweep, sweep_file


def truncate(path: Path) -> None:
    """Cut the file in half (a copy that stopped midway, a full disk outside the pipeline's writes)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble_head(path: Path) -> None:
    """Overwrite the first member's header: the archive's directory at the end still reads, so only
    loading the file finds it (the login node's cheap look cannot)."""
    data = bytearray(path.read_bytes())
    data[:64] = bytes(64)
    path.write_bytes(bytes(data))


def trainings_started(out: Path) -> int:
    """Trainings started from scratch in the shared stores, those moved aside into archive/ included."""
    return sum(p.read_text().count(TRAINING_STARTED) for p in (out / ".shared" / "train").rglob("run.log"))


# --------------------------------------------------------------------------------------------------
# The loader's one error
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    from pipeline.models import build_model

    path = tmp_path / "models" / "trained.pt"
    save_model(path, build_model("resnet20", 10), {"name": "resnet20", "num_classes": 10})
    return path


def garble_middle(path: Path) -> None:
    """Bytes of a tensor overwritten: torch.load reads such a file without a word (wrong weights)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (truncate, "not a whole zip archive"),
        (garble_middle, "fails its checksum (garbled)"),
        (garble_head, "fails its checksum (garbled)"),
        (lambda p: p.write_bytes(b""), "empty (0 bytes)"),
        (lambda p: p.unlink(), "missing"),
        (lambda p: torch.save({"weights": 1}, p), "not a pipeline-model/1 file"),
        (lambda p: torch.save({"format": "pipeline-model/1", "arch": {}, "state_dict": {}}, p), "fit no"),
    ],
)
def test_load_model_raises_one_typed_error_naming_the_file(model_file, damage, reason):
    load_model(model_file)  # whole, it loads
    damage(model_file)
    with pytest.raises(UnreadableModel) as e:
        load_model(model_file)
    assert isinstance(e.value, ValueError) and e.value.path == model_file
    assert str(model_file) in str(e.value) and reason in str(e.value), str(e.value)


def test_the_login_nodes_look_is_cheap_and_torch_free(model_file):
    assert model_file_problem(model_file) is None and model_file_problem(model_file, whole=True) is None
    garble_head(model_file)
    assert model_file_problem(model_file) is None  # the directory at the end still reads
    assert "garbled" in (model_file_problem(model_file, whole=True) or "")
    truncate(model_file)
    assert "not a whole zip archive" in (model_file_problem(model_file) or "")
    assert zipfile.is_zipfile(model_file) is False


# --------------------------------------------------------------------------------------------------
# int8.pt2 found unreadable by measure: quantize is redone
# --------------------------------------------------------------------------------------------------


def tiny(root: Path, *extra: str) -> list[str]:
    return tiny_args(root, *extra, changes={"train.device": "cpu"})


def test_unreadable_int8_program_fails_quantize_and_rerun_failed_makes_it_again(tmp_path, synthetic_root):
    out = tmp_path / "runs"
    args = tiny(synthetic_root, "quant.method=int8", "quant.calib_batches=2")
    run_cli("pipeline.run", *args, "--out", str(out), cwd=tmp_path, check=True, timeout=900)
    (run,) = list_runs(out)
    quantized = run.read_metrics("quantize")
    int8 = run.models / "int8.pt2"
    whole = int8.read_bytes()
    truncate(int8)  # e.g. copied back from scratch by a tool that stopped midway
    run.metrics_path("measure").unlink()  # measure not done yet (a job killed while measuring)

    r = run_cli("pipeline.run", str(run.path), cwd=tmp_path, timeout=900)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    measure, quantize = run.read_metrics("measure"), run.read_metrics("quantize")
    assert measure["status"] == "failed" and f"model file {int8} cannot be loaded" in measure["error"]
    assert "the quantize stage that made it is marked failed" in measure["hint"]
    assert (
        quantize["status"] == "failed"
        and str(int8) in quantize["error"]
        and "found by the measure" in quantize["error"]
    )
    assert quantize["test_acc"] == quantized["test_acc"]  # its figures are kept in the record
    assert run.status() == "failed" and run.failed_stage() == "quantize"
    s = run_cli("pipeline.status", str(out), cwd=tmp_path, check=True)
    assert "quantize stage failed" in s.stdout

    fixed = run_cli("pipeline.run", str(run.path), "--rerun", "failed", cwd=tmp_path, timeout=900)
    assert fixed.returncode == 0, fixed.stdout[-3000:] + fixed.stderr[-3000:]
    assert run.status() == "done" and run.read_metrics("quantize")["test_acc"] == quantized["test_acc"]
    assert model_file_problem(int8, whole=True) is None and len(int8.read_bytes()) == len(whole)
    assert run.log.read_text().count("training resnet20") == 1  # the training was kept
    (archived,) = (run.path / "archive").iterdir()  # the broken file and both failure records kept aside
    assert (archived / "models/int8.pt2").stat().st_size == len(whole) // 2
    assert (archived / "metrics/quantize.json").is_file() and (archived / "metrics/measure.json").is_file()


# --------------------------------------------------------------------------------------------------
# A shared training's trained.pt: found by a later sweep's pruning (job) or by the plan (login node)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_unreadable_shared_training_is_trained_again_once_by_rerun_failed(tmp_path, synthetic_root):
    path = sweep_file(tmp_path, synthetic_root, name="share")
    out = tmp_path / "runs"
    r = sweep(path, out, "--wait")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    first = list_runs(out / "share")
    (store,) = (out / ".shared" / "train").iterdir()
    trained = store / "models" / "trained.pt"

    # 1. garbled where only loading sees it: the plan reuses it, the new runs' pruning finds it
    garble_head(trained)
    r = sweep(path, out, "--wait", "prune.sparsity=0.7")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    new = [run for run in list_runs(out / "share") if run not in first]
    assert len(new) == 2 and sorted(run.status() for run in new) == ["blocked", "blocked"]
    record = RunDir(store).read_metrics("train")
    assert record["status"] == "failed" and f"{trained} is unreadable" in record["error"]
    assert all(run.status() == "done" for run in first)  # finished runs stay finished
    status = run_cli("pipeline.status", str(out / "share"), check=True)
    assert "3 done, 0 failed, 2 blocked" in status.stdout
    collect = run_cli("pipeline.collect", str(out / "share"), "--no-plots", check=True)
    table = (out / "share" / "results.md").read_text()
    assert table.count("| done |") == 3 and table.count("| blocked |") == 2
    assert collect.stdout.count(f"its training failed ({trained} is unreadable") == 2
    first_row = next(line for line in table.splitlines() if line.startswith(f"| {first[0].id} "))
    assert f"{record['test_acc']:.2%}" in first_row  # the training's figures still stand in finished runs
    dry = sweep(path, out, "--dry-run", "--rerun", "failed", "prune.sparsity=0.7")
    assert "reuses training" not in dry.stdout and f"trains {store.name}" in dry.stdout, dry.stdout
    r = sweep(path, out, "--wait", "--rerun", "failed", "prune.sparsity=0.7")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert all(run.status() == "done" for run in list_runs(out / "share"))
    assert trainings_started(out) == 2 and model_file_problem(trained, whole=True) is None
    assert list((store / "archive").glob("*/models/trained.pt"))  # the broken file kept aside

    # 2. truncated: the plan itself sees it and neither reuses it nor submits runs that need it
    truncate(trained)
    dry = sweep(path, out, "--dry-run", "prune.sparsity=0.3")
    assert dry.returncode == 0 and "reuses training" not in dry.stdout
    assert dry.stdout.count("skip-blocked") == 2 and "use --rerun failed" in dry.stdout
    r = sweep(path, out, "--wait", "--rerun", "failed", "prune.sparsity=0.3")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 training(s)" in r.stdout and trainings_started(out) == 3
    assert len(list_runs(out / "share")) == 7 and all(run.status() == "done" for run in list_runs(out / "share"))
    loaded, _ = load_model(trained)
    assert isinstance(loaded, nn.Module)

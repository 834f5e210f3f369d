"""The studies' sweep files run end to end on tiny synthetic data through command-line overrides."""

from __future__ import annotations

import pytest

from pipeline.collect import collect
from pipeline.rundir import list_runs
from tests.conftest import MEASURE_FAST_ARGS, REPO, run_cli

TINY = ["data.name=synthetic", "data.val_size=50", "data.train_size=64", "train.epochs=1", "train.device=cpu",
        "train.eval_batch_size=256", "output.log_every=1000", *MEASURE_FAST_ARGS]


@pytest.mark.parametrize("sweep, n_runs, model", [("optimizers", 5, "preact_resnet164"),
                                                  ("batch_workers", 7, "preact_resnet164"),
                                                  ("fast", 3, "resnet9")])
def test_study_sweep_runs_on_tiny_data(tmp_path, synthetic_root, sweep, n_runs, model):
    out = tmp_path / "runs"
    r = run_cli("pipeline.sweep", str(REPO / f"sweeps/{sweep}.yaml"), "--cluster", "local", "--wait", "--out",
                str(out), f"data.root={synthetic_root}", *TINY, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = list_runs(out / sweep)
    assert len(runs) == n_runs
    for run in runs:
        m = run.read_metrics("train")
        assert m["status"] == "done", (run.id, m)
        assert m["params"] > 1_500_000 and f"training {model}" in run.log.read_text()
    md, _ = collect(out / sweep)
    assert md.count("| done |") == n_runs
    if sweep == "fast":
        assert "fp16 is a GPU setting; training in fp32 on the CPU" in runs[0].log.read_text()
        assert runs[0].read_metrics("train")["precision"] == "fp16"
    if sweep == "batch_workers":
        workers = {run.read_meta()["swept"]["train.num_workers"] for run in runs}
        assert workers == {0, 4, 8}

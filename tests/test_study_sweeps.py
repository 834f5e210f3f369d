"""The studies' sweep files run end to end on tiny synthetic data through command-line overrides."""

from __future__ import annotations

import pytest

from pipeline.collect import collect
from pipeline.rundir import list_runs
from tests.conftest import MEASURE_FAST_ARGS, REPO, run_cli

TINY = [
    "data.name=synthetic",
    "data.val_size=50",
    "data.train_size=64",
    "train.epochs=1",
    "train.device=cpu",
    "train.eval_batch_size=256",
    "output.log_every=1000",
    *MEASURE_FAST_ARGS,
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "sweep, n_runs, model, params, extra",
    [
        ("optimizers", 5, "preact_resnet164", 1_500_000, ()),
        # the study's model runs above; here what this sweep adds: batch sizes, 2 to 6 DataLoader workers
        ("batch_workers", 8, "resnet20", 250_000, ("model.name=resnet20",)),
        ("fast", 3, "resnet9", 1_500_000, ()),
    ],
)
def test_study_sweep_runs_on_tiny_data(tmp_path, synthetic_root, sweep, n_runs, model, params, extra):
    out = tmp_path / "runs"
    r = run_cli(
        "pipeline.sweep",
        str(REPO / f"sweeps/{sweep}.yaml"),
        "--cluster",
        "local",
        "--wait",
        "--out",
        str(out),
        f"data.root={synthetic_root}",
        *TINY,
        *extra,
        cwd=tmp_path,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    runs = list_runs(out / sweep)
    assert len(runs) == n_runs
    for run in runs:
        m = run.read_metrics("train")
        assert m["status"] == "done", (run.id, m)
        # a training's lines are in its shared store's log, linked from the run as train.log (pipeline.share)
        assert m["params"] > params and f"training {model}" in (run.path / "train.log").read_text()
    md, _ = collect(out / sweep)
    if sweep == "fast":  # three seeds of one setting: one row, mean ± std over the three
        assert md.count("| 3 done |") == 1 and " ± " in md
    else:
        assert md.count("| done |") == n_runs
    if sweep == "fast":
        assert "fp16 is a GPU setting; training in fp32 on the CPU" in (runs[0].path / "train.log").read_text()
        assert runs[0].read_metrics("train")["precision"] == "fp16"
        # the study's time to 94% is on the test split, evaluated after every epoch
        assert all("test_acc" in row for run in runs for row in run.read_metrics("train")["history"])
        c = run_cli("pipeline.collect", str(out / sweep), "--no-plots", "--target-acc", "0.1", cwd=tmp_path, check=True)
        assert "time to 10% test" in c.stdout
    if sweep == "batch_workers":  # train.epochs=1 folds the 100-epoch final run into its 50-epoch twin
        workers = {run.read_meta()["swept"]["train.num_workers"] for run in runs}
        assert workers == {2, 4, 6}


def test_batch_workers_sweep_is_the_studys_own_runs(tmp_path):
    """Nine runs exactly as study 1 lists them: (optimizer, workers, batch, weight decay, epochs)."""
    from pipeline.submit.expand import expand_sweep, read_sweep

    runs = expand_sweep(read_sweep(REPO / "sweeps/batch_workers.yaml"), cwd=tmp_path)
    got = [
        (
            r.cfg["optim"]["name"],
            r.cfg["train"]["num_workers"],
            r.cfg["train"]["batch_size"],
            r.cfg["optim"]["weight_decay"],
            r.cfg["train"]["epochs"],
        )
        for r in runs
    ]
    assert got == [
        ("sgd", 2, 64, 5e-4, 50),
        ("nesterov", 2, 64, 5e-4, 50),
        ("nesterov", 4, 128, 5e-4, 50),
        ("nesterov", 2, 256, 5e-4, 50),
        ("nesterov", 2, 128, 1e-4, 50),
        ("nesterov", 4, 128, 1e-4, 50),
        ("nesterov", 4, 256, 1e-4, 50),
        ("nesterov", 6, 128, 1e-4, 50),
        ("nesterov", 4, 128, 1e-4, 100),
    ]
    for r in runs:
        assert r.cfg["model"]["name"] == "preact_resnet164" and r.cfg["optim"]["lr"] == 0.1
        assert r.cfg["optim"]["momentum"] == 0.9 and r.cfg["data"]["loader"] == "dataloader"


# The compression studies on tiny data: command-line overrides win over the sweep's own axes, so
# model.name=resnet20 and data.name=synthetic fold the model and data-set axes (each ResNet and GoogLeNet
# is pruned, quantized and reloaded in tests/test_prune.py and tests/test_quantize.py).
COMPRESS_TINY = [
    *TINY,
    "model.name=resnet20",
    "prune.epochs=1",
    "prune.frequency=1",
    "quant.calib_batches=1",
    "slurm.tasks_per_node=1",
    "slurm.gpus_per_node=0",
    "train.batch_size=32",
    "schedule.warmup_epochs=0",
    "prune.warmup_epochs=0",
]


@pytest.mark.parametrize(
    "sweep, n_runs, fold", [("sparsity", 2, ["prune.sparsity=0.7"]), ("mixed_precision", 2, []), ("compression", 3, [])]
)
def test_compression_study_sweep_runs_on_tiny_data(tmp_path, synthetic_root, sweep, n_runs, fold):
    out = tmp_path / "runs"
    r = run_cli(
        "pipeline.sweep",
        str(REPO / f"sweeps/{sweep}.yaml"),
        "--cluster",
        "local",
        "--wait",
        "--out",
        str(out),
        f"data.root={synthetic_root}",
        *COMPRESS_TINY,
        *fold,
        cwd=tmp_path,
        timeout=1200,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = list_runs(out / sweep)
    assert len(runs) == n_runs
    for run in runs:
        assert run.status() == "done", (run.id, run.stage_statuses())
        quant = run.read_metrics("quantize")
        assert quant["method"] == "int8" and (run.models / "int8.pt2").is_file()
        names = {e["name"] for e in run.read_metrics("measure")["models"]}
        prune = run.read_metrics("prune")
        if sweep == "sparsity":  # pruned while training, to the swept final sparsity
            assert prune["during"] == "train" and prune["sparsity"] == pytest.approx(prune["sparsity_target"], abs=1e-3)
            assert names == {"trained", "int8"}
        elif sweep == "compression":
            assert names == ({"trained", "int8"} if prune["method"] == "none" else {"trained", "pruned", "int8"})
            assert quant["source"] == ("models/trained.pt" if prune["method"] == "none" else "models/pruned.pt")
    md, _ = collect(out / sweep)
    assert md.count("| done |") == n_runs and "int8 acc" in md
    if sweep == "mixed_precision":
        assert {run.read_metrics("train")["precision"] for run in runs} == {"fp32", "fp16"}
    if sweep == "compression":  # the three compressions share one training (the folded GoogLeNet's)
        assert "1 training(s)" in r.stdout, r.stdout[-3000:]
        (store,) = list((out / ".shared" / "train").iterdir())
        assert {run.shared_store() for run in runs} == {store}
        started = [p.read_text().count("INFO training resnet20") for p in [store / "run.log", *(x.log for x in runs)]]
        assert started == [1, 0, 0, 0], started  # in the store's log only, not repeated in the owner's

"""collect's table shapes, failures section, plots and comparisons, from hand-built run folders
(tests/report_runs.py): no training, real files, the real CLI where the flags matter."""

from __future__ import annotations

import csv
import json
import struct

import pytest

from pipeline.collect import Options, build, collect
from pipeline.report import plots
from pipeline.report.failures import Classified, failure
from pipeline.report.records import read_record
from pipeline.report.writers import markdown
from pipeline.rundir import RunDir, atomic_write_json
from tests.conftest import run_cli
from tests.report_runs import entry, finish, history, make_sweep, swept, train_record


def table_rows(md: str, first_cell_title: str = "run") -> list[dict[str, str]]:
    """The first markdown table of ``md`` whose first column is ``first_cell_title``, as dicts."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_cell_title} |"))
    header = [c.strip() for c in lines[start].strip("|").split(" | ")]
    out = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        out.append(dict(zip(header, [c.strip() for c in ln[1:-1].split(" | ")])))
    return out


# --------------------------------------------------------------------------------------------------
# study 1: runs table, best marking, group-by, sort, columns, seeds, time
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def study1(tmp_path):
    sweep_dir, runs = make_sweep(
        tmp_path, "grid: {train.batch_size: [64, 128], optim.weight_decay: [1.0e-4, 5.0e-4]}\n", name="bw"
    )
    figures = {  # (batch, wd) -> (val best acc, test loss, test acc)
        (64, 1e-4): (0.80, 0.60, 0.79),
        (64, 5e-4): (0.86, 0.50, 0.85),
        (128, 1e-4): (0.83, 0.55, 0.82),
        (128, 5e-4): (0.81, 0.58, 0.80),
    }
    for run in runs:
        s = swept(run)
        val, test_loss, test = figures[s["train.batch_size"], s["optim.weight_decay"]]
        finish(run, train_record(val_acc_best=val, test_loss=test_loss, test_acc=test, train_time_s=100.0 * val))
    return sweep_dir, runs


def test_runs_table_marks_the_best_value_of_each_column_and_shows_test_loss(study1):
    sweep_dir, _ = study1
    md, _ = collect(sweep_dir, Options(plots=False))
    rows = table_rows(md)
    assert "Training time (train and fine-tunes): 0:05:30 over 4 run(s), on CPUs." in md
    assert list(rows[0]) == [
        "run",
        "batch_size",
        "weight_decay",
        "training loss",
        "train best acc",
        "val loss",
        "val best acc",
        "test loss",
        "test acc",
        "train time",
        "status",
    ]
    best = next(r for r in rows if r["batch_size"] == "64" and r["weight_decay"] == "0.0005")
    assert (
        best["val best acc"] == "**86.00%**" and best["test acc"] == "**85.00%**" and best["test loss"] == "**0.5000**"
    )
    assert best["train time"] == "86.0 s"  # not bold: the shortest time is the best one
    fastest = next(r for r in rows if r["batch_size"] == "64" and r["weight_decay"] == "0.0001")
    assert fastest["train time"] == "**80.0 s**"
    assert sum("**" in r["val best acc"] for r in rows) == 1
    assert all("**" not in r["training loss"] for r in rows)  # equal in every row: nothing marked
    # a GPU run: GPU time = wall time x GPUs, per run and for the sweep
    run = next(r for r in study1[1] if swept(r) == {"train.batch_size": 128, "optim.weight_decay": 1e-4})
    run.write_metrics("train", {**run.read_metrics("train"), "device": "cuda:0", "world_size": 2})
    md, _ = collect(sweep_dir, Options(plots=False))
    gpu = next(r for r in table_rows(md) if r["run"] == run.id)
    assert gpu["GPU time"] == "166.0 s" and "GPU time 0:02:46" in md


def test_group_by_sort_and_columns(study1, tmp_path):
    sweep_dir, _ = study1
    rep = build(
        [sweep_dir], Options(group_by="optim.weight_decay", sort="test acc", columns=["batch_size", "test acc"])
    )
    assert [t.title for t in rep.runs] == ["optim.weight_decay = 0.0001", "optim.weight_decay = 0.0005"]
    first, second = (markdown(t) for t in rep.runs)
    assert [r["test acc"] for r in table_rows(first)] == ["**82.00%**", "79.00%"]  # best first
    assert [r["batch_size"] for r in table_rows(second)] == ["64", "128"]
    assert list(table_rows(first)[0]) == ["run", "batch_size", "test acc"]
    # the CLI: sort ascending with --reverse, and bad flags stop before anything is written
    r = run_cli("pipeline.collect", str(sweep_dir), "--sort", "val_acc_best", "--reverse", "--no-plots", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [x["val best acc"].strip("*") for x in table_rows(r.stdout)] == ["80.00%", "81.00%", "83.00%", "86.00%"]
    (sweep_dir / "results.md").unlink()
    for flags, message in [
        (
            ["--group-by", "optim.lr"],
            "--group-by: 'optim.lr' is not a swept key. Allowed values: train.batch_size, optim.weight_decay",
        ),
        (["--sort", "accuracy"], "--sort: 'accuracy' is not a column. Allowed values: run, batch_size"),
        (["--columns", "test acc,nope"], "--columns: 'nope' is not a column"),
        (["--table", "wide"], "--table: 'wide' is not allowed. Allowed values: auto, runs, models"),
        (["--target-acc", "94"], "--target-acc: 94.0 is out of range"),
    ]:
        bad = run_cli("pipeline.collect", str(sweep_dir), *flags, cwd=tmp_path)
        assert bad.returncode == 2 and message in bad.stderr, (flags, bad.stderr)
        assert not (sweep_dir / "results.md").exists()


def test_seeds_become_mean_std_and_n(tmp_path):
    sweep_dir, runs = make_sweep(tmp_path, "grid: {train.seed: [0, 1, 2], optim.lr: [0.1, 0.2]}\n", name="fast")
    for run in runs:
        s = swept(run)
        acc = {0: 0.93, 1: 0.94, 2: 0.95}[s["train.seed"]] - (0.1 if s["optim.lr"] == 0.2 else 0.0)
        if s == {"train.seed": 2, "optim.lr": 0.2}:
            run.write_metrics("train", {"status": "failed", "error": "RuntimeError: boom"})
            continue
        finish(run, train_record(test_acc=acc, history=history([acc - 0.2, acc], seconds_per_epoch=5.0)))
    md, text = collect(sweep_dir, Options(plots=False, target_acc=0.9))
    rows = {r["lr"]: r for r in table_rows(md)}
    assert rows["0.1"]["test acc"] == "**94.00% ± 1.00**" and rows["0.1"]["n"] == "3"
    assert rows["0.1"]["seed"] == "0, 1, 2" and rows["0.1"]["run"] == "3 runs" and rows["0.1"]["status"] == "3 done"
    assert rows["0.2"]["test acc"] == "83.50% ± 0.71" and rows["0.2"]["n"] == "2"
    assert rows["0.2"]["status"] == "2 done, 1 failed"
    assert rows["0.1"]["time to 90% val"] == "10.0 s ± 0.0 s"  # epoch 2 of every seed: 10 s of training
    assert rows["0.2"]["time to 90% val"] == ""  # never reached
    assert len(list(csv.DictReader(text.splitlines()))) == 6  # the CSV keeps one row per run
    per_seed = build([sweep_dir], Options(seeds=False)).runs[0]
    assert len(per_seed.rows) == 6


def test_a_mean_over_fewer_seeds_than_finished_says_how_many(tmp_path):
    """Time to a target that one seed of three never reached: the mean of the two, marked "2 of 3"."""
    sweep_dir, runs = make_sweep(tmp_path, "grid: {train.seed: [0, 1, 2]}\n", name="fast")
    for run, accs in zip(runs, ([0.5, 0.95], [0.92, 0.96], [0.5, 0.6])):
        finish(run, train_record(test_acc=accs[-1], history=history(accs, seconds_per_epoch=5.0)))
    md, _ = collect(sweep_dir, Options(plots=False, target_acc=0.9))
    (row,) = table_rows(md)
    assert row["time to 90% val"].strip("*") == "7.5 s ± 3.5 s (2 of 3)" and row["n"] == "3"
    assert "(" not in row["test acc"]  # every seed has a test accuracy


def test_time_to_target_reads_the_test_accuracy_when_every_epoch_logged_it(tmp_path):
    sweep_dir, runs = make_sweep(tmp_path, "grid: {train.seed: [0, 1]}\n", name="fast")
    for run in runs:
        rows = history([0.91, 0.95, 0.96], seconds_per_epoch=4.0)  # val reaches 90% at epoch 1
        for row, test_acc in zip(rows, [0.85, 0.89, 0.93]):  # test only at epoch 3
            row["test_acc"] = test_acc
        finish(run, train_record(test_acc=0.93, history=rows))
    md, _ = collect(sweep_dir, Options(plots=False, target_acc=0.9, seeds=False))
    assert [r["time to 90% test"] for r in table_rows(md)] == ["12.0 s", "12.0 s"]

    rows = history([0.91, 0.95], seconds_per_epoch=4.0)  # one run without test accuracies: its val is read
    finish(runs[1], train_record(test_acc=0.93, history=rows))
    md, _ = collect(sweep_dir, Options(plots=False, target_acc=0.9, seeds=False))
    assert sorted(r["time to 90% val or test"].strip("*") for r in table_rows(md)) == ["12.0 s", "4.0 s"]


# --------------------------------------------------------------------------------------------------
# study 3: one block per training, deltas, reduction factors, --flat
# --------------------------------------------------------------------------------------------------


def compression_sweep(tmp_path, name="c", seeds=(0,)):
    body = (
        f"grid: {{train.seed: {list(seeds)}}}\n"
        "set: {prune.sparsity: 0.2, quant.method: int8}\n"
        "variants:\n  - {prune.method: none}\n  - {prune.method: unstructured}\n  - {prune.method: structured}\n"
    )
    sweep_dir, runs = make_sweep(tmp_path, body, name=name)
    for run in runs:
        method = swept(run)["prune.method"]
        # the structured run's job ran on a busier machine: each of its timings twice the others'
        slow = 2.0 if method == "structured" else 1.0
        base = entry("trained", 0.7704, 0.95, 6_200_000, 25_000_000, 10.0 * slow, memory=400_000_000)
        int8 = {
            "none": entry("int8", 0.7650, 0.94, 6_150_000, 7_000_000, 5.0),
            "unstructured": entry("int8", 0.7500, 0.93, 6_150_000, 7_000_000, 5.0, nonzero=4_900_000),
            "structured": entry("int8", 0.7300, 0.92, 4_000_000, 4_500_000, 3.0 * slow),
        }[method]
        models = [base, int8]
        prune = {"status": "done", "method": "none"}
        if method != "none":
            pruned = {
                "unstructured": entry("pruned", 0.7250, 0.93, 6_200_000, 25_000_000, 10.0, nonzero=4_960_000),
                "structured": entry("pruned", 0.7150, 0.91, 4_000_000, 14_000_000, 5.5 * slow),
            }[method]
            models.insert(1, pruned)
            prune = {
                "status": "done",
                "method": method,
                "during": "finetune",
                "sparsity": 0.2,
                "sparsity_target": 0.2,
                "test_acc": pruned["test_top1"],
            }
        cuda = {**base, "name": "trained-cuda", "device": "cuda", "self_cuda_ms_per_batch": 2.5}
        finish(
            run,
            train_record(test_acc=0.7704, test_top5=0.95),
            prune=prune,
            quantize={"status": "done", "method": "int8", "test_acc": int8["test_top1"]},
            measure={"status": "done", "models": [*models, cuda]},
        )
    return sweep_dir, runs


def test_compression_block_per_training_with_deltas_and_factors(tmp_path):
    sweep_dir, runs = compression_sweep(tmp_path)
    md, _ = collect(sweep_dir, Options(plots=False))
    assert md.index("| run |") < md.index("## Models")  # the runs table first, then the block
    blocks = md.split("## Models\n\n")[1]
    assert blocks.count("### training ") == 1  # three runs, one training
    rows = table_rows(blocks, "model")
    by_model = {r["model"]: r for r in rows}
    assert list(by_model) == [
        "base",
        "int8",
        "structured 20%",
        "structured 20% + int8",
        "unstructured 20%",
        "unstructured 20% + int8",
    ]
    base, unstructured = by_model["base"], by_model["unstructured 20%"]
    assert base["top-1 error"] == "22.96%" and base["smaller"] == "" and base["file size"] == "25.00 MB"
    assert base["CUDA ms/batch"] == "2.50" and base["memory"] == "400.00 MB"  # CUDA time from the trained-cuda entry
    assert unstructured["top-1 error"] == "27.50% (+4.54)" and unstructured["top-5 error"] == "7.00% (+2.00)"
    assert unstructured["non-zero"] == "4,960,000" and unstructured["parameters"] == "6,200,000"
    structured = by_model["structured 20%"]
    # 25/14 MB; 20/11 ms: against the base model timed in the same job, not the block's base row (10 ms)
    assert structured["smaller"] == "×1.8" and structured["faster"] == "×1.8"
    assert float(structured["ms/img"]) == 11.0
    assert (
        by_model["structured 20% + int8"]["smaller"] == "×5.6" and by_model["structured 20% + int8"]["faster"] == "×3.3"
    )
    with open(sweep_dir / "models.csv") as f:
        raw = {r["model"]: r for r in csv.DictReader(f)}
    assert float(raw["unstructured 20%"]["top1_error_delta"]) == pytest.approx(0.0454)
    assert float(raw["structured 20%"]["size_factor"]) == pytest.approx(25 / 14)
    data = json.loads((sweep_dir / "results.json").read_text())
    assert len(data["models"]) == 1 and len(data["models"][0]["rows"]) == 6 and data["not_finished"] == []


def test_flat_models_and_two_trainings(tmp_path):
    sweep_dir, _ = compression_sweep(tmp_path, seeds=(0, 1))
    rep = build([sweep_dir], Options(table="models"))
    assert [t.title.split(" (")[1] for t in rep.models] == ["train.seed=0)", "train.seed=1)"]
    flat = build([sweep_dir], Options(table="models", flat=True)).models
    assert len(flat) == 1 and len(flat[0].rows) == 12
    assert {r["training"] for r in flat[0].rows} == {t.title.split()[1] for t in rep.models}
    assert build([sweep_dir], Options(table="runs")).models == []


# --------------------------------------------------------------------------------------------------
# failures and progress
# --------------------------------------------------------------------------------------------------


def test_every_kind_of_unfinished_run_with_its_reason(tmp_path):
    sweep_dir, runs = make_sweep(tmp_path, "grid: {optim.lr: [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09]}\n")
    by_lr = {swept(r)["optim.lr"]: r for r in runs}
    done, diverged, failed, timeout, requeued, oom, cancelled, running, pending = (by_lr[x / 100] for x in range(1, 10))
    finish(done, train_record())
    hist = history([0.3, 0.4])
    diverged.write_metrics(
        "train", train_record("diverged", diverged_epoch=3, history=hist, train_loss=hist[-1]["train_loss"])
    )
    finish(
        failed,
        train_record(),
        prune={
            "status": "failed",
            "error": "Traceback (most recent call last):\n  ...\nValueError: bad shapes\n",
            "log": str(failed.log),
        },
    )
    failed.log.write_text("prune failed\n")
    for run, text in [
        (timeout, "slurmstepd: error: *** JOB 12 ON node1 CANCELLED AT 2026-12-01T10:00:00 DUE TO TIME LIMIT ***\n"),
        (requeued, "time limit near and slurm.max_requeues=3 requeues used: not requeued; submit the sweep again\n"),
        (oom, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"),
        (cancelled, "slurmstepd: error: *** JOB 13 ON node1 CANCELLED AT 2026-12-01T10:00:00 ***\n"),
    ]:
        atomic_write_json(run.progress, {"stage": "train", "epoch": 4, "epochs": 50, "elapsed_s": 40.0})
        run.log.write_text("epoch 4/50\n" + text)
    atomic_write_json(running.progress, {"stage": "prune", "epoch": 2, "epochs": 10, "elapsed_s": 60.0})

    md, _ = collect(sweep_dir, Options(plots=False))
    section = md.split("## Not finished\n\n")[1].split("\n\n")[0].splitlines()
    line = {
        lr: next(ln for ln in section if f"optim.lr={lr}" in ln) for lr in (0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.09)
    }
    assert len(section) == 8 and not any("optim.lr=0.01)" in ln for ln in section)
    assert "**diverged**: epoch 3: loss not finite; last finite loss 1.0000 (epoch 2)" in line[0.02]
    # the record's own last finite loss (the step before), as the training writes it: also when the
    # first epoch diverged and no epoch finished
    for epoch, step, history_rows, said in [(1, 5, [], "step 4 of epoch 1"), (3, 1, hist, "the step before")]:
        record = train_record("diverged", diverged_epoch=epoch, diverged_step=step, last_finite_loss=2.3026)
        diverged.write_metrics("train", {**record, "train_loss": None, "history": history_rows})
        said_now = failure(read_record(diverged, "s"), Classified("diverged")).reason
        assert said_now == f"epoch {epoch}: loss not finite; last finite loss 2.3026 ({said})", said_now
    assert f"**failed**: prune stage: ValueError: bad shapes (log {failed.log})" in line[0.03]
    assert "**timed out**: train epoch 4/50" in line[0.04] and str(timeout.log) in line[0.04]
    assert "**requeued too often**" in line[0.05]
    assert "**out of memory**" in line[0.06]
    assert "**cancelled**" in line[0.07]
    assert "**pending**: not submitted yet" in line[0.09]
    # no job alive for the half-done one here: stopped; with a live job (the classifier says running)
    # it shows where it is and the time left (60 s for 2 of 10 epochs: 240 s to go)
    rec = read_record(running, "s")
    assert failure(rec, Classified("running")).reason == "prune epoch 2/10, about 0:04:00 left"
    assert failure(rec, Classified("pending", "PENDING", job_id="77")).reason == "in the queue as job 77 (PENDING)"
    # the hook for runs waiting on a failed training (another module decides; collect shows it)
    blocked = failure(
        read_record(pending, "s"), Classified("blocked", reason="waits on training 1234abcd, which failed")
    )
    assert blocked.state == "blocked" and "1234abcd" in blocked.reason


def test_corrupt_metrics_and_config_are_named_and_the_rest_is_shown(tmp_path):
    sweep_dir, runs = make_sweep(tmp_path, "grid: {optim.lr: [0.1, 0.2, 0.3]}\n")
    good, bad_metrics, bad_config = runs
    for run in runs:
        finish(run, train_record())
    bad_metrics.metrics_path("measure").write_text('{"status": "done", "mod')
    bad_config.config.write_bytes(b"model: {name: [unclosed\n\x00")
    # odd values inside a well-formed record: a gap in the learning curve, no crash
    m = good.read_metrics("train")
    good.write_metrics(
        "train", {**m, "history": [{"epoch": 1, "val_acc": "n/a", "train_loss": None}, {"epoch": 2, "val_acc": 0.5}]}
    )
    r = run_cli("pipeline.collect", str(sweep_dir), cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "warning" not in r.stderr, r.stderr
    assert (sweep_dir / "plots/learning_curves.png").is_file()
    md = (sweep_dir / "results.md").read_text()
    assert f"{bad_metrics.metrics_path('measure')} is unreadable" in md
    assert f"**unreadable**: {bad_config.config} is unreadable" in md
    assert sum(r["status"] == "done" for r in table_rows(md)) == 2


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_series_and_png_files(tmp_path):
    sweep_dir, runs = compression_sweep(tmp_path)
    for run in runs:  # learning curves and a sparsity schedule
        m = run.read_metrics("train")
        run.write_metrics("train", {**m, "history": history([0.5, 0.6, 0.7])})
    unstructured = next(r for r in runs if swept(r)["prune.method"] == "unstructured")
    p = unstructured.read_metrics("prune")
    log = [{"step": 10, "target": 0.1, "overall": 0.099}, {"step": 20, "target": 0.2, "overall": 0.2}]
    unstructured.write_metrics("prune", {**p, "sparsity_log": log})
    rep = build([sweep_dir], Options())

    size = plots.accuracy_series(rep.records, "file_bytes")
    points = {(pt.label, pt.x, round(pt.y, 2)) for pt in size}
    assert len(size) == 6  # the shared base once, then each run's pruned and int8 models
    assert ("base", 25.0, 77.04) in points and ("structured 20%", 14.0, 71.5) in points
    front = [size[i].label for i in plots.pareto_front(size)]
    assert front == ["structured 20% + int8", "int8", "base"]  # 4.5 MB 73%, 7 MB 76.5%, 25 MB 77.04%
    latency = plots.accuracy_series(rep.records, "latency_b1_ms")
    assert sorted(pt.x for pt in latency) == [5.0, 5.0, 6.0, 10.0, 10.0, 11.0]  # as timed (structured: slower job)

    by, curves = plots.learning_series(rep.keys, rep.records)
    assert len(curves) == 1 and curves[0].x == [1.0, 2.0, 3.0] and curves[0].y == pytest.approx([50, 60, 70])
    spars = plots.sparsity_series(rep.records)
    assert len(spars) == 1 and spars[0].x == [10.0, 20.0] and spars[0].y == pytest.approx([10, 20])
    assert spars[0].extra["measured"] == pytest.approx([9.9, 20.0])

    collect(sweep_dir)
    names = sorted(p.name for p in (sweep_dir / "plots").iterdir())
    assert names == ["accuracy_vs_latency.png", "accuracy_vs_size.png", "learning_curves.png", "sparsity.png"]
    for name in names:
        assert png_size(sweep_dir / "plots" / name) == (800, 500)
    assert "![accuracy_vs_size](plots/accuracy_vs_size.png)" in (sweep_dir / "results.md").read_text()


def test_learning_curves_coloured_by_the_swept_value(study1):
    sweep_dir, runs = study1
    for run in runs:
        m = run.read_metrics("train")
        run.write_metrics("train", {**m, "history": history([0.2, m["val_acc_best"]])})
    rep = build([sweep_dir], Options())
    by, curves = plots.learning_series(rep.keys, rep.records)
    assert by == "train.batch_size" and sorted(c.colour_value for c in curves) == [64, 64, 128, 128]
    assert {c.label for c in curves} == {
        f"batch_size={b}, weight_decay={w}" for b in (64, 128) for w in ("0.0001", "0.0005")
    }
    r = run_cli("pipeline.collect", str(sweep_dir), "--no-plots", cwd=sweep_dir)
    assert r.returncode == 0 and not (sweep_dir / "plots").exists()


# --------------------------------------------------------------------------------------------------
# comparing sweeps
# --------------------------------------------------------------------------------------------------


def test_two_sweeps_in_one_table_with_a_sweep_column(tmp_path):
    a, runs_a = make_sweep(tmp_path, "grid: {optim.lr: [0.1, 0.2]}\n", name="a")
    b, runs_b = make_sweep(tmp_path, "grid: {optim.name: [sgd, adam]}\n", name="b")
    for run in runs_a + runs_b:
        finish(run, train_record())
    runs_b[0].write_metrics("train", {"status": "failed", "error": "RuntimeError: x"})
    out = tmp_path / "report" / "compare.md"
    r = run_cli("pipeline.collect", str(a), str(b), "--out", str(out), "--no-plots", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = table_rows(out.read_text())
    assert list(rows[0])[:4] == ["run", "sweep", "lr", "optim"]
    assert sorted(r["sweep"] for r in rows) == ["a", "a", "b", "b"]
    assert {r["lr"] for r in rows if r["sweep"] == "b"} == {"0.1"}  # not swept there: its config's value
    assert f"`b/{runs_b[0].id}`" in out.read_text()
    assert (tmp_path / "report/compare.csv").is_file() and (tmp_path / "report/compare.json").is_file()
    assert not (a / "results.md").exists() and not (b / "results.md").exists()


def test_sweeps_of_one_name_are_told_apart_and_one_folder_twice_is_refused(tmp_path):
    (tmp_path / "june").mkdir()
    (tmp_path / "july").mkdir()
    a, runs_a = make_sweep(tmp_path / "june", "grid: {optim.lr: [0.1, 0.2]}\n", name="opt")
    b, runs_b = make_sweep(tmp_path / "july", "grid: {optim.lr: [0.1, 0.2]}\n", name="opt")
    for run in runs_a + runs_b:
        finish(run, train_record())
    out = tmp_path / "compare.md"
    r = run_cli("pipeline.collect", str(a), str(b), "--out", str(out), "--no-plots", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = table_rows(out.read_text())
    assert sorted(r["sweep"] for r in rows) == ["july/runs/opt"] * 2 + ["june/runs/opt"] * 2
    assert f"--logdir_spec june/runs/opt:{a},july/runs/opt:{b}" in r.stdout  # TensorBoard's names differ too

    again = run_cli("pipeline.collect", str(a), str(tmp_path / "june/runs/../runs/opt"), "--no-plots", cwd=tmp_path)
    assert again.returncode == 2 and "same folder" in again.stderr and "sweep_dir" in again.stderr
    assert not (tmp_path / "comparison.md").exists()


# --------------------------------------------------------------------------------------------------
# the README's demo tables
# --------------------------------------------------------------------------------------------------


def test_readme_demo_tables_have_the_columns_collect_prints(tmp_path):
    """The demo's runs table and models block in README.md, in shape: collect on the quickstart sweep's
    run folders (records by hand, with every figure the demo's stages write) prints the same columns."""
    from pipeline.submit.expand import expand_sweep, read_sweep
    from pipeline.submit.plan import write_run
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text().splitlines()
    wanted = [ln for ln in readme if ln.startswith(("| run | prune |", "| model | run |"))]
    assert len(wanted) == 2, wanted
    spec = read_sweep(REPO / "sweeps/quickstart.yaml")
    sweep_dir = tmp_path / "runs/quickstart"
    for r in expand_sweep(spec, {"data.root": str(tmp_path / "data")}, cwd=tmp_path):
        run = write_run(sweep_dir, spec, r)
        method = r.swept["prune.method"]
        models = [entry("trained", 0.917, 0.999, 269_722, 1_122_489, 3.0, memory=None)]
        prune = {"status": "done", "method": "none"}
        if method != "none":
            prune = {
                "status": "done",
                "method": method,
                "during": "finetune",
                "sparsity": 0.7,
                "sparsity_target": 0.7,
                "test_acc": 0.9,
            }
            models.append(entry("pruned", 0.9, 0.999, 135_754, 581_271, 2.0, memory=None))
        models.append(entry("int8", 0.91, 0.999, 135_234, 337_083, 5.0, memory=None))
        finish(
            run,
            train_record(train_time_s=20.0, cpu_s=35.0, history=history([0.5, 0.9, 0.9])),  # as every stage records
            prune=prune,
            quantize={"status": "done", "method": "int8", "test_acc": 0.91, "raw": 337_083},
            measure={"status": "done", "models": models},
        )
    r = run_cli("pipeline.collect", str(sweep_dir), "--no-plots", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    printed = [ln for ln in r.stdout.splitlines() if ln.startswith(("| run |", "| model |"))]
    assert printed == wanted


def test_pruned_while_training_is_its_own_training(tmp_path):
    """Study 2: the sparsity schedule runs inside the training, so each target is a training of its own
    (one block each), whose trained model is the pruned one."""
    body = "set: {prune.method: unstructured, prune.during: train, quant.method: int8}\ngrid: {prune.sparsity: [0.6, 0.7]}\n"
    sweep_dir, runs = make_sweep(tmp_path, body)
    for run in runs:
        target = swept(run)["prune.sparsity"]
        prune = {
            "status": "done",
            "method": "unstructured",
            "during": "train",
            "sparsity": target,
            "sparsity_target": target,
        }
        finish(
            run,
            train_record(),
            prune=prune,
            quantize={"status": "done", "method": "int8", "test_acc": 0.8},
            measure={
                "status": "done",
                "models": [
                    entry("trained", 0.84, 0.99, 1000, 1_120_000, 3.0),
                    entry("int8", 0.8, 0.99, 1000, 470_000, 2.0),
                ],
            },
        )
    rep = build([sweep_dir], Options())
    assert [t.title.split(" (")[1] for t in rep.models] == ["prune.sparsity=0.6)", "prune.sparsity=0.7)"]
    assert [r["model"] for r in rep.models[1].rows] == ["unstructured 70% while training", "unstructured 70% + int8"]
    assert rep.models[1].rows[1]["top1_error_delta"] == pytest.approx(0.04)


def test_terminal_gets_a_rich_table_and_labels_are_kept_apart(study1, tmp_path):
    sweep_dir, _ = study1
    r = run_cli("pipeline.collect", str(sweep_dir), "--format", "rich", "--no-plots", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| run |" not in r.stdout and "┃ run" in r.stdout and "86.00%" in r.stdout
    assert "| run |" in (sweep_dir / "results.md").read_text()  # the file is markdown either way
    near = [plots.Point("a", 1.0, 90.0, "r"), plots.Point("b", 1.1, 90.01, "r"), plots.Point("c", 5.0, 50.0, "r")]
    assert plots.label_offsets(near) == [(6, 4), (6, -12), (6, 4)]


def test_collect_with_plots_never_imports_torch(tmp_path):
    """The login-node rule with every output on: tables, plots (matplotlib), HParams."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    sweep_dir, runs = compression_sweep(tmp_path)
    for run in runs:
        run.write_metrics("train", {**run.read_metrics("train"), "history": history([0.5, 0.6])})
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['pipeline.collect', {str(sweep_dir)!r}]\n"
        "try:\n"
        "    runpy.run_module('pipeline.collect', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('MODULES', ','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split("MODULES", 1)[1].strip() == ""
    assert len(list((sweep_dir / "plots").glob("*.png"))) == 3  # no sparsity log here: three plots


def test_a_shared_training_counts_once_in_the_time_line_and_is_marked_shared_per_run(tmp_path):
    """Three runs share one 83 s training (links into the real store layout); a fourth trains itself."""
    from pipeline import share

    sweep_dir, runs = make_sweep(
        tmp_path,
        "variants:\n  - {prune.method: none}\n  - {prune.method: unstructured}\n"
        "  - {prune.method: structured}\n  - {train.seed: 7}\n",
        name="sh",
    )
    store = share.train_store(sweep_dir, "k1")
    shared_runs = [r for r in runs if swept(r).get("train.seed") is None]
    for run in shared_runs:
        share.link_training(run, store, {"data": {}, "model": {}, "optim": {}, "schedule": {}, "train": {}})
    RunDir(store).write_metrics("train", train_record(train_time_s=83.0, cpu_s=160.0))
    prune = {"status": "done", "method": "unstructured", "train_time_s": 10.0, "cpu_s": 20.0}
    for run in shared_runs:
        for stage in ("prune", "quantize", "measure"):
            run.write_metrics(stage, prune if stage == "prune" else {"status": "done", "method": "none"})
    (own,) = [r for r in runs if r not in shared_runs]
    finish(own, train_record(train_time_s=50.0, cpu_s=90.0))
    md, _ = collect(sweep_dir, Options(plots=False, table="runs"))
    # 83 (once) + 3 x 10 (each run's fine-tune) + 50 = 163 s; CPU: 160 (once) + 3 x 20 + 90 = 310 s
    assert (
        "Training time (train and fine-tunes): 0:02:43 over 4 run(s); 1 training(s) shared by 3 runs, "
        "each counted once, on CPUs; CPU time of every stage 0:05:10." in md
    ), md
    rows = {r["run"]: r for r in table_rows(md)}
    for run in shared_runs:
        assert rows[run.id]["train time"].replace("*", "") == "83.0 s (shared)", rows[run.id]
        assert rows[run.id]["CPU time"].replace("*", "") == "180.0 s (shared)", rows[run.id]
    assert "shared" not in rows[own.id]["train time"] and rows[own.id]["CPU time"] == "**90.0 s**"


def test_a_run_whose_shared_training_failed_elsewhere_is_blocked(tmp_path):
    """pipeline.share: two runs reach one training through links; it failed in its owner's job. The
    owner is listed as failed, the other as blocked, naming the owner and the error."""
    from pipeline import share
    from pipeline.report.records import gather

    sweep_dir, runs = make_sweep(tmp_path, "variants: [{prune.method: none}, {prune.method: unstructured}]\n")
    owner, follower = runs
    import yaml

    tree = yaml.safe_load(owner.config.read_text())  # the resolved config, as the sweep shares it
    store = share.train_store(sweep_dir, share.training_key(tree))
    for run in runs:
        share.link_training(run, store, tree)
    share.write_owner(store, owner, "local", "1")
    atomic_write_json(store / "metrics" / "train.json", {"status": "failed", "error": "Traceback\nRuntimeError: boom"})
    _, records = gather(sweep_dir)
    assert {r.id: r.status for r in records} == {owner.id: "failed", follower.id: "blocked"}
    md, _ = collect(sweep_dir, Options(plots=False))
    line = next(ln for ln in md.splitlines() if ln.startswith(f"- `{follower.id}`"))
    assert "**blocked**" in line and owner.id in line and "boom" in line
    assert next(r for r in table_rows(md) if r["run"] == follower.id)["status"] == "blocked"

"""collect's table from run folders in every state: finished, diverged, failed, running, pending."""

from __future__ import annotations

import csv

from pipeline.collect import collect
from pipeline.rundir import atomic_write_json
from pipeline.submit.expand import expand_sweep, read_sweep
from pipeline.submit.plan import write_run
from tests.conftest import finished, run_cli, write_done


def make_sweep(tmp_path, repo):
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(
        f"name: s\nbase: [{repo / 'configs/base.yaml'}]\ngrid: {{optim.name: [adam, adamw, nesterov, sgd, adagrad]}}\n"
    )
    spec = read_sweep(spec_path)
    runs = {r.cfg.optim.name: write_run(tmp_path / "runs/s", spec, r) for r in expand_sweep(spec, cwd=tmp_path)}
    return tmp_path / "runs/s", runs


def test_table_shows_numbers_for_finished_runs_and_status_for_the_rest(tmp_path, repo):
    sweep_dir, runs = make_sweep(tmp_path, repo)
    write_done(runs["sgd"], finished("done"))
    runs["adam"].write_metrics("train", finished("diverged", diverged_epoch=2, test_acc=None))
    runs["adamw"].write_metrics("train", {"status": "failed", "error": "RuntimeError: boom"})
    atomic_write_json(runs["nesterov"].progress, {"epoch": 1, "epochs": 3, "val_acc_best": 0.5})
    md, text = collect(sweep_dir)
    lines = md.split("\n\n")[0].splitlines()  # the runs table comes first
    assert lines[0] == (
        "| run | optim | training loss | train best acc | val loss | val best acc | test acc | status |"
    )
    by_optim = {line.split(" | ")[1]: line for line in lines[2:]}
    # equal figures in every row that has one: nothing to mark as best
    assert by_optim["sgd"].endswith("| 0.1235 | 95.12% | 0.5000 | 88.12% | 87.31% | done |")
    assert by_optim["adam"].endswith("| 0.1235 | 95.12% | 0.5000 | 88.12% |  | diverged (epoch 2) |")
    assert by_optim["adamw"].endswith(f"|  |  |  |  |  | failed (log {runs['adamw'].log}) |")
    assert by_optim["nesterov"].endswith("|  |  |  |  |  | running (epoch 1/3) |")
    assert by_optim["adagrad"].endswith("|  |  |  |  |  | pending |")
    rows = {r["optim.name"]: r for r in csv.DictReader(text.splitlines())}
    assert float(rows["sgd"]["test_acc"]) == 0.8731 and rows["adagrad"]["status"] == "pending"
    assert rows["adamw"]["status"] == "failed"  # the CSV holds the state word
    assert (sweep_dir / "results.md").read_text() == md and (sweep_dir / "results.csv").read_text() == text
    # every run not done is listed below with its reason
    section = md.split("## Not finished\n\n")[1].split("\n\n")[0].splitlines()
    assert len(section) == 4 and not any(runs["sgd"].id in line for line in section)


def test_collect_cli_errors_exit_2(tmp_path):
    r = run_cli("pipeline.collect", str(tmp_path / "nope"), cwd=tmp_path)
    assert r.returncode == 2 and "is not a folder" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli("pipeline.collect", str(tmp_path / "empty"), cwd=tmp_path)
    assert r.returncode == 2 and "holds no run folders" in r.stderr


def test_bad_files_in_one_run_do_not_hide_the_sweep(tmp_path, repo):
    """A binary or truncated stage record, a meta.json that is a list, a progress.json without epochs:
    that run is reported (a corrupt record as a failed stage naming the file), the others are shown."""
    sweep_dir, runs = make_sweep(tmp_path, repo)
    write_done(runs["sgd"], finished("done"))
    runs["adam"].metrics_path("train").parent.mkdir(parents=True)
    runs["adam"].metrics_path("train").write_bytes(b"\x00\xff\x13binary")
    write_done(runs["adamw"], finished("done"))
    runs["adamw"].metrics_path("quantize").write_text('{"status": "do')  # truncated
    runs["nesterov"].meta.write_text("[1, 2]")
    runs["adagrad"].progress.write_text('{"stage": "train"}')
    md, _ = collect(sweep_dir)
    assert md.count("| done |") == 1 and md.count("failed (") == 2, md
    assert runs["adam"].read_metrics("train")["error"].startswith(str(runs["adam"].metrics_path("train")))
    assert "quantize stage" in next(line for line in md.splitlines() if line.startswith(f"| {runs['adamw'].id}"))
    s = run_cli("pipeline.status", str(sweep_dir), cwd=tmp_path)
    assert s.returncode == 0 and "Traceback" not in s.stderr, s.stderr

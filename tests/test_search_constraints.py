"""search.constraints (issue 18, "With search"): parsing and bad input, the val_acc_drop figure from a
run's records, and real Optuna studies run by the real worker loop with a fake trial (no training):
a trial past a bound is finished but infeasible, never best, never on the Pareto front."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState

from pipeline.config import ConfigError
from pipeline.report.records import read_record
from pipeline.rundir import RunDir
from pipeline.search.figures import Outcome, val_acc_drop
from pipeline.search.spec import parse_search
from pipeline.search.study import open_study
from pipeline.search.worker import ATTR_FIGURES, Assignment, RunFolderRunner, feasible, run_worker

BASE: dict[str, Any] = {
    "trials": 12,
    "objective": {"train_time_s": "min"},
    "params": {"optim.lr": {"low": 1e-3, "high": 1.0, "log": True}},
    "constraints": {"val_acc_drop": {"max": 1.0}},
}


def spec_of(**kw: Any):
    return parse_search({**BASE, **kw}, "sweep.yaml")


@pytest.mark.parametrize(
    ("constraints", "key", "says"),
    [
        ({"val_acc_dorp": {"max": 1.0}}, "search.constraints.val_acc_dorp", "val_acc_drop"),
        ({"val_acc_drop": {}}, "search.constraints.val_acc_drop", "min and/or max"),
        ({"val_acc_drop": {"below": 1}}, "search.constraints.val_acc_drop.below", "min, max"),
        ({"val_acc_drop": {"min": 2, "max": 1}}, "search.constraints.val_acc_drop", "min must not exceed max"),
        ({"val_acc_drop": {"max": "one"}}, "search.constraints.val_acc_drop.max", "finite number"),
        ([1], "search.constraints", "mapping"),
    ],
)
def test_bad_constraints_name_file_key_and_allowed(constraints, key, says):
    with pytest.raises(ConfigError) as e:
        spec_of(constraints=constraints)
    assert e.value.key == key and "sweep.yaml" in str(e.value) and says in str(e.value)


def test_constraints_parse_with_aliases_and_both_bounds():
    spec = spec_of(constraints={"int8_ms": {"max": 5}, "val_acc_drop": {"min": -1, "max": 1.0}})
    assert spec.constraints["int8_latency_ms"].max == 5
    assert spec.constraints["val_acc_drop"].violations("d", 1.5) == {"d <= 1": 0.5, "d >= -1": -2.5}


def write_run(path: Path, stages: dict[str, dict[str, Any]]) -> RunDir:
    (path / "metrics").mkdir(parents=True)
    (path / "config.yaml").write_text("model: {name: resnet20}\n")
    for stage, record in stages.items():
        (path / "metrics" / f"{stage}.json").write_text(json.dumps({"status": "done", **record}))
    return RunDir(path)


def test_val_acc_drop_reads_int8_else_pruned_against_the_trained_model(tmp_path):
    train = {"history": [{"val_acc": 0.80}, {"val_acc": 0.90}]}
    prune = {"method": "structured", "val_acc": 0.885, "budget": {"reference_val_acc": 0.90, "val_acc": 0.885}}
    quant = {"method": "int8", "budget": {"reference_val_acc": 0.885, "val_acc": 0.87}}
    both = read_record(write_run(tmp_path / "a", {"train": train, "prune": prune, "quantize": quant}), "s")
    assert val_acc_drop(both) == pytest.approx(3.0)  # int8 against the trained model, not the pruned one
    pruned = read_record(write_run(tmp_path / "b", {"train": train, "prune": prune, "quantize": {}}), "s")
    assert val_acc_drop(pruned) == pytest.approx(1.5)
    int8 = {"method": "int8", "budget": {"reference_val_acc": 0.9, "val_acc": 0.896}}
    only = read_record(write_run(tmp_path / "c", {"train": train, "quantize": int8}), "s")
    assert val_acc_drop(only) == pytest.approx(0.4)
    unbudgeted = read_record(write_run(tmp_path / "d", {"train": train, "quantize": {"method": "int8"}}), "s")
    assert val_acc_drop(unbudgeted) is None


class BudgetRunner(RunFolderRunner):
    """A trial that trains nothing: a larger learning rate is faster (smaller train_time_s and latency)
    and loses more accuracy (val_acc_drop = 10 x lr points), so the fastest trials break the budget."""

    def resolve(self, params: dict[str, Any]) -> str:
        return f"run{params['optim.lr']:.12f}"

    def run(self, a: Assignment) -> Outcome:
        lr = float(a.params["optim.lr"])
        figures = {"train_time_s": 100.0 - 50 * lr, "val_acc_best": 0.9 - 0.1 * lr, "val_acc_drop": 10 * lr}
        return Outcome.done([figures[o] for o in self.objectives], {c: figures[c] for c in self.constraints})


def run_study(tmp_path: Path, spec) -> Any:
    sweep = tmp_path / "sweep"
    run_worker(spec, sweep, 0, BudgetRunner(sweep, spec.objectives, list(spec.constraints)))
    study = open_study(spec, sweep, create=False)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == spec.trials
    return study, done


@pytest.mark.parametrize("method", ["tpe", "random"])
def test_an_infeasible_trial_is_finished_but_never_best(tmp_path, method):
    study, done = run_study(tmp_path, spec_of(method=method))
    infeasible = [t for t in done if not feasible(t)]
    assert infeasible and all(t.user_attrs[ATTR_FIGURES]["val_acc_drop"] > 1.0 for t in infeasible)
    assert all(t.constraints == {"val_acc_drop <= 1": pytest.approx(10 * t.params["optim.lr"] - 1)} for t in done)
    best = study.best_trial
    assert feasible(best) and best.values[0] == min(t.values[0] for t in done if feasible(t))
    assert min(t.values[0] for t in done) < best.values[0]  # the fastest trial broke the budget
    assert all(feasible(t) for t in study.best_trials)


def test_pareto_front_holds_feasible_trials_only(tmp_path):
    spec = spec_of(method="nsga2", objective={"val_acc_best": "max", "train_time_s": "min"})
    study, done = run_study(tmp_path, spec)
    assert any(not feasible(t) for t in done)
    front = study.best_trials
    assert front and all(feasible(t) for t in front)


def test_trials_table_and_budget_plot_show_feasibility(tmp_path):
    from pipeline.search.report import StudyView, _summary, plot_budget, trial_rows
    from pipeline.search.study import progress

    spec = spec_of()
    study, done = run_study(tmp_path, spec)
    view = StudyView("search", "", list(study.trials), set(), dict(spec.objective), dict(spec.constraints))
    headers, rows = trial_rows(view)
    assert headers[-3:] == ["val_acc_drop", "feasible", "run"]
    feasibility = {row[0]: row[headers.index("feasible")] for row in rows}
    assert {n: v for n, v in feasibility.items()} == {str(t.number): "yes" if feasible(t) else "no" for t in done}

    class Record:
        pass

    record = Record()
    record.spec = spec  # type: ignore[attr-defined]
    line = _summary("search", progress(study, spec), record)  # type: ignore[arg-type]
    assert f"trial {study.best_trial.number}," in line and feasible(study.best_trial)
    path = plot_budget(view, done, tmp_path)
    assert path.name == "search_budget.png" and path.stat().st_size > 0


def test_a_searched_setting_may_supply_what_the_fixed_settings_need_and_the_dry_run_shows_the_bounds(tmp_path):
    """prune.sparsity: auto needs prune.max_drop; when the search samples prune.max_drop, the fixed settings
    are checked with it filled in (a sweep file written as the README's example passes), and the dry run
    prints the constraints beside the space."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    sweep_file = tmp_path / "budget_search.yaml"
    sweep_file.write_text(
        f"name: budget_search\nbase: [{repo}/configs/base.yaml]\n"
        "set: {data.name: synthetic, model.name: resnet20, train.epochs: 2, prune.method: structured,"
        " prune.sparsity: auto, quant.method: int8, quant.max_drop: 0.5}\n"
        "search:\n  method: tpe\n  trials: 4\n  workers: 2\n  objective: {int8_latency_ms: min}\n"
        "  constraints: {val_acc_drop: {max: 1.0}}\n  params:\n    prune.max_drop: [0.25, 0.5, 0.75]\n"
    )
    cmd = [sys.executable, "-m", "pipeline.sweep", str(sweep_file), "--dry-run", "--cluster", "local"]
    r = subprocess.run([*cmd, "--out", str(tmp_path / "runs")], capture_output=True, text=True, cwd=repo)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "constraints: val_acc_drop <= 1.0" in r.stdout and "prune.max_drop=0.25" in r.stdout
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    # without the search supplying it, the same fixed settings are refused, naming the key
    sweep_file.write_text(sweep_file.read_text().replace("prune.max_drop: [0.25, 0.5, 0.75]", "optim.lr: [0.1, 0.2]"))
    r = subprocess.run([*cmd, "--out", str(tmp_path / "runs")], capture_output=True, text=True, cwd=repo)
    assert r.returncode == 2 and "prune.max_drop" in r.stderr

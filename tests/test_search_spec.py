"""The ``search:`` section: the issue's example parses; every bad input of the issue (and a few more) is
a ConfigError naming the file, the key and what is allowed, which the commands turn into exit code 2;
values the search can give are checked against the schema with the sweep's own layers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline import console as cli
from pipeline.config import Composer, ConfigError, Layer
from pipeline.search.spec import Choice, EarlyStop, Range, check_space, parse_search

SRC = "sweeps/lr_search.yaml"


def example() -> dict:
    return {
        "method": "tpe",
        "trials": 64,
        "workers": 8,
        "objective": {"val_acc_best": "max"},
        "params": {
            "optim.lr": {"low": 1.0e-3, "high": 0.5, "log": True},
            "optim.weight_decay": {"low": 1.0e-5, "high": 1.0e-3, "log": True},
            "optim.name": ["sgd", "nesterov", "adam"],
            "train.batch_size": [64, 128, 256],
        },
        "early_stop": {"method": "asha", "min_epochs": 3, "reduction": 3},
        "seed": 0,
    }


def with_(**changes) -> dict:
    doc = example()
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def refused(doc, *fragments: str) -> str:
    """The message of the ConfigError ``doc`` raises; it names the file and every fragment; the
    commands' handler exits 2 on it."""
    with pytest.raises(ConfigError) as info:
        parse_search(doc, SRC)
    message = str(info.value)
    assert message.startswith(SRC + ": search"), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    with pytest.raises(SystemExit) as code, cli.exit_on_config_error():
        parse_search(doc, SRC)
    assert code.value.code == 2
    return message


def test_the_issues_example_parses():
    spec = parse_search(example(), SRC)
    assert (spec.method, spec.trials, spec.workers, spec.seed, spec.storage) == ("tpe", 64, 8, 0, None)
    assert spec.objective == {"val_acc_best": "max"}
    assert spec.params["optim.lr"] == Range(1.0e-3, 0.5, log=True)
    assert spec.params["optim.name"] == Choice(("sgd", "nesterov", "adam"))
    assert spec.params["train.batch_size"] == Choice((64, 128, 256))
    assert spec.early_stop == EarlyStop("asha", min_epochs=3, reduction=3)
    assert spec.failure_limit == 64


def test_ranges_take_the_settings_type():
    spec = parse_search(
        with_(
            params={
                "train.epochs": {"low": 2, "high": 8, "step": 2},  # an int setting: whole numbers
                "optim.momentum": {"low": 0.8, "high": 0.95, "step": 0.05},
                "prune.sparsity": {"low": 0.1, "high": 0.9},
            },
            early_stop={"method": "median", "min_epochs": 2},
        ),
        SRC,
    )
    assert spec.params["train.epochs"] == Range(2, 8, step=2, integer=True)
    assert spec.params["optim.momentum"] == Range(0.8, 0.95, step=0.05)
    assert spec.early_stop == EarlyStop("median", min_epochs=2)


@pytest.mark.parametrize(
    "doc, fragments",
    [
        (with_(method="bayes"), ["search.method", "'bayes' is not allowed", "random, tpe, nsga2"]),
        (with_(early_stop={"method": "ashaa"}), ["search.early_stop.method", "Did you mean 'asha'", "median"]),
        (
            with_(params={"optim.lrr": {"low": 0.1, "high": 1}}),
            ["search.params.optim.lrr: unknown key", "Did you mean 'optim.lr'", "Allowed keys in 'optim'"],
        ),
        (with_(params={"optim.lr": {"low": 0.5, "high": 0.1}}), ["search.params.optim.lr", "low 0.5 >= high 0.1"]),
        (with_(params={"optim.lr": {"low": 0.1, "high": 0.1}}), ["search.params.optim.lr", "low must be below high"]),
        (
            with_(params={"optim.weight_decay": {"low": 0.0, "high": 0.1, "log": True}}),
            ["search.params.optim.weight_decay.low", "log: true needs low > 0", "got 0.0"],
        ),
        (with_(params={"optim.name": []}), ["search.params.optim.name", "empty list of choices"]),
        (
            with_(objective={"val_accuracy": "max"}),
            ["search.objective.val_accuracy", "names no figure", "val_acc_best (metrics/train.json val_acc_best)"],
        ),
        (
            with_(objective={"val_acc_best": "maximize"}),
            ["search.objective.val_acc_best", "'maximize' is not allowed: min or max"],
        ),
        (with_(trials=0), ["search.trials", "whole number >= 1, got 0"]),
        (with_(workers=0), ["search.workers", "whole number >= 1, got 0"]),
        (with_(trials=True), ["search.trials", "got True"]),
    ],
    ids=[
        "unknown-method",
        "unknown-pruner",
        "unknown-key",
        "low-above-high",
        "low-equals-high",
        "log-nonpositive",
        "empty-choice",
        "unknown-figure",
        "bad-direction",
        "no-trials",
        "no-workers",
        "bool-trials",
    ],
)
def test_every_bad_input_of_the_issue(doc, fragments):
    refused(doc, *fragments)


@pytest.mark.parametrize(
    "doc, fragments",
    [
        (with_(trial=3), ["search.trial", "Did you mean 'trials'"]),
        (with_(params=None), ["search.params", "missing"]),
        (with_(params={"optim.name": {"low": 1, "high": 2}}), ["optim.name", "is a str setting", "list of choices"]),
        (with_(params={"slurm.time_min": [60, 120]}), ["search.params.slurm.time_min", "left out of the run id"]),
        (with_(params={"slurm.tasks_per_node": [1, 2]}), ["search.params.slurm.tasks_per_node", "fixed when the"]),
        (with_(params={"optim.betas": [[0.9, 0.99]]}), ["search.params.optim.betas", "list setting"]),
        (with_(params={"optim.name": ["sgd", "sgd"]}), ["search.params.optim.name", "given twice"]),
        (with_(params={"train.epochs": {"low": 1.5, "high": 4}}), ["train.epochs", "whole-number bounds"]),
        (with_(params={"optim.lr": {"low": 0.1, "high": 1, "lg": True}}), ["optim.lr.lg", "Did you mean 'log'"]),
        (
            with_(params={"optim.lr": {"low": 0.1, "high": 1.0, "step": 0.4}}),
            ["optim.lr.step", "whole number of steps"],
        ),
        (
            with_(params={"optim.lr": {"low": 0.1, "high": 1.0, "log": True, "step": 0.1}}),
            ["optim.lr.step", "cannot be combined with log"],
        ),
        (
            with_(objective={"val_acc_best": "max", "int8_ms": "min"}),
            ["search.early_stop.method", "several objectives use early_stop: none"],
        ),
        (with_(objective={"int8_ms": "min"}), ["search.early_stop.method", "known only at the end of a run"]),
        (with_(early_stop={"method": "asha", "reduction": 1}), ["search.early_stop.reduction", ">= 2"]),
        (with_(early_stop={"method": "median", "reduction": 3}), ["search.early_stop.reduction", "unknown key"]),
        (with_(storage="sqlite:///study.db"), ["search.storage", "SQLite"]),
        (with_(storage="db.example"), ["search.storage", "database URL"]),
    ],
    ids=[
        "unknown-search-key",
        "missing-params",
        "range-on-text",
        "not-in-run-id",
        "worker-resources",
        "list-setting",
        "duplicate-choice",
        "fractional-int",
        "unknown-range-key",
        "step-not-dividing",
        "step-with-log",
        "early-stop-several-objectives",
        "early-stop-final-figure",
        "reduction-one",
        "key-of-another-pruner",
        "sqlite",
        "not-a-url",
    ],
)
def test_more_bad_inputs(doc, fragments):
    refused(doc, *fragments)


def test_objective_aliases_and_several_objectives():
    spec = parse_search(with_(objective={"val_acc_best": "max", "int8_ms": "min"}, early_stop=None), SRC)
    assert spec.objective == {"val_acc_best": "max", "int8_latency_ms": "min"}


def composer(**fixed) -> Composer:
    return Composer([Layer("configs/base.yaml", {"train.epochs": 10, **fixed})])


def test_values_outside_the_schema_are_refused_before_anything_runs():
    spec = parse_search(with_(params={"optim.momentum": {"low": 0.5, "high": 1.5}}), SRC)
    with pytest.raises(ConfigError) as info:
        check_space(spec, composer())
    message = str(info.value)
    assert message.startswith(f"{SRC}: search.params.optim.momentum: the value 1.5 does not fit the schema")
    assert "must be <= 1.0" in message

    spec = parse_search(with_(params={"optim.name": ["sgd", "lamb"]}), SRC)
    with pytest.raises(ConfigError, match=r"search.params.optim.name: the value 'lamb'.*Allowed values: sgd"):
        check_space(spec, composer())
    check_space(parse_search(example(), SRC), composer())  # the issue's example fits


def test_an_objective_the_fixed_settings_never_record_is_refused():
    spec = parse_search(with_(objective={"int8_test_acc": "max"}), SRC)
    with pytest.raises(ConfigError, match=r"search.objective.int8_test_acc: is not recorded with quant.method='none'"):
        check_space(spec, composer())
    check_space(spec, composer(**{"quant.method": "int8"}))
    searched = parse_search(with_(objective={"int8_test_acc": "max"}, params={"quant.method": ["none", "int8"]}), SRC)
    check_space(searched, composer())  # some sampled runs quantize


def test_login_node_modules_import_no_torch(repo):
    code = (
        "import sys\n"
        "import pipeline.search.spec, pipeline.search.figures, pipeline.search.journal\n"
        "assert 'optuna' not in sys.modules, 'spec and figures must not import optuna'\n"
        "import pipeline.search.study, pipeline.search.worker\n"
        "assert 'torch' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(repo)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, env=env)
    assert r.returncode == 0, r.stderr


def test_a_run_folders_outcome(tmp_path):
    from conftest import write_done

    from pipeline.rundir import RunDir
    from pipeline.search.figures import STOPPED, Outcome, outcome_from_run

    def run(name: str, train: dict | None) -> RunDir:
        rd = RunDir(tmp_path / name)
        rd.path.mkdir()
        rd.config.write_text("data: {}\nmodel: {}\noptim: {}\ntrain: {}\n")
        if train is not None:
            rd.write_metrics("train", train)
        return rd

    write_done(run("done", None), {"status": "done", "val_acc_best": 0.75, "train_time_s": 12.0})
    assert outcome_from_run(tmp_path / "done", ["val_acc_best", "train_time_s"]) == Outcome.done([0.75, 12.0])
    missing = outcome_from_run(tmp_path / "done", ["int8_latency_ms"])
    assert missing is not None and missing.status == "failed" and "models[int8].latency_b1_ms" in missing.reason
    run("stopped", {"status": STOPPED, "epochs": 3})
    assert outcome_from_run(tmp_path / "stopped", ["val_acc_best"]) == Outcome.stopped(3)
    run("diverged", {"status": "diverged", "error": "loss nan"})
    failed = outcome_from_run(tmp_path / "diverged", ["val_acc_best"])
    assert failed is not None and failed.status == "failed" and "diverged in its train stage (loss nan" in failed.reason
    run("disk-full", {"status": "failed", "resume": True, "error": "No space left on device"})
    assert outcome_from_run(tmp_path / "disk-full", ["val_acc_best"]) is None  # resumed, not an end
    run("running", None)
    assert outcome_from_run(tmp_path / "running", ["val_acc_best"]) is None
    assert outcome_from_run(tmp_path / "absent", ["val_acc_best"]) is None


def test_a_range_bound_written_1e_5_is_a_number():
    # YAML 1.1 (PyYAML) reads 1e-5, with no dot, as text; grids accept it, so a search range does too
    from pipeline.config import load_yaml

    doc = load_yaml("trials: 2\nobjective: {val_acc_best: max}\nparams: {optim.weight_decay: {low: 1e-5, high: 1e-2}}")
    spec = parse_search(doc, "s.yaml")
    assert spec.params["optim.weight_decay"] == Range(1e-5, 1e-2)

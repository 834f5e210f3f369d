"""Search sweeps through the commands, for real: `pipeline.sweep` validates a `search:` section before
anything is written, prints it on a dry run, and submits its workers (the local executor, and the local
Slurm cluster); trials are ordinary run folders trained on tiny synthetic data, some stopped early by
ASHA; a trial that diverges fails and the study goes on; a killed worker's trial is resumed by the
resubmitted sweep, which ends with exactly `trials`; status and collect show the study, and name a
garbled journal while still listing the run folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.rundir import RunDir
from tests.conftest import REPO, run_cli

TINY = [
    "model.name=resnet20",
    "data.name=synthetic",
    "data.val_size=50",
    "data.train_size=64",
    "train.device=cpu",
    "train.threads=1",
    "train.eval_batch_size=256",
    "output.log_every=1000",
    "quant.method=none",
    "measure.enabled=false",
]

SEARCH = """\
name: s
base: [{base}]
set: {{model.name: resnet20}}
search:
  method: {method}
  trials: {trials}
  workers: {workers}
  objective: {objective}
  params: {params}
  early_stop: {early_stop}
  seed: {seed}
"""


def write_search(tmp_path: Path, **kw: object) -> Path:
    values = {
        "base": REPO / "configs/base.yaml",
        "method": "tpe",
        "trials": 4,
        "workers": 2,
        "objective": "{val_acc_best: max}",
        "params": "{optim.lr: {low: 1.0e-3, high: 0.5, log: true}, optim.name: [sgd, adam]}",
        "early_stop": "{method: none}",
        "seed": 0,
        **kw,
    }
    path = tmp_path / "s.yaml"
    path.write_text(SEARCH.format(**values))
    return path


def sweep(tmp_path: Path, spec: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return run_cli("pipeline.sweep", str(spec), "--out", str(tmp_path / "runs"), *args, cwd=tmp_path, timeout=timeout)


def study_states(sweep_dir: Path, env: dict[str, str] | None = None) -> dict[str, int]:
    """Trial states of the study, read by Optuna from the journal (in a process of its own)."""
    code = (
        "import json, sys; from pipeline.search.files import read_record; from pipeline.search.study import open_study\n"
        "rec = read_record(sys.argv[1]); out = {}\n"
        "for t in open_study(rec.spec, sys.argv[1], 'search', create=False).get_trials():\n"
        "    out[t.state.name] = out.get(t.state.name, 0) + 1\n"
        "print(json.dumps(out))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(sweep_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# --------------------------------------------------------------------------------------------------
# Bad input, storage, dry run: nothing written
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, key, allowed",
    [
        ({"method": "bayes"}, "search.method", "random, tpe, nsga2"),
        ({"early_stop": "{method: bohb}"}, "search.early_stop.method", "none, median, asha, hyperband"),
        ({"params": "{optim.lrr: {low: 0.1, high: 1.0}}"}, "search.params.optim.lrr", "optim.lr"),
        ({"params": "{optim.lr: {low: 0.5, high: 0.1}}"}, "search.params.optim.lr", "low must be below high"),
        ({"params": "{optim.lr: {low: 0.0, high: 0.1, log: true}}"}, "search.params.optim.lr.low", "low > 0"),
        ({"params": "{optim.name: []}"}, "search.params.optim.name", "at least one value"),
        ({"objective": "{val_accuracy: max}"}, "search.objective.val_accuracy", "val_acc_best"),
        ({"objective": "{val_acc_best: maximise}"}, "search.objective.val_acc_best", "min or max"),
        ({"trials": 0}, "search.trials", ">= 1"),
        ({"workers": 0}, "search.workers", ">= 1"),
    ],
)
def test_bad_search_input_exits_2_naming_file_key_and_allowed_values(tmp_path, change, key, allowed):
    spec = write_search(tmp_path, **change)
    r = sweep(tmp_path, spec, "--cluster", "local", timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    err = " ".join(r.stderr.split())
    assert str(spec) in err and key in err and allowed in err, err
    assert not (tmp_path / "runs").exists()


def test_searched_key_that_is_also_a_grid_axis_is_refused(tmp_path):
    spec = write_search(tmp_path)
    spec.write_text(spec.read_text() + "grid: {optim.name: [sgd, adam]}\n")
    r = sweep(tmp_path, spec, "--cluster", "local", timeout=120)
    assert r.returncode == 2 and "search.params.optim.name" in r.stderr and "grid axis" in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "override, key", [("slurm.tasks_per_node=2", "slurm.tasks_per_node"), ("slurm.nodes=2", "slurm.nodes")]
)
def test_several_ranks_per_worker_are_refused_naming_the_key(tmp_path, override, key):
    spec = write_search(tmp_path)
    for extra in ([], ["--dry-run"]):
        r = sweep(tmp_path, spec, "--cluster", "local", override, "train.batch_size=128", *extra, timeout=120)
        assert r.returncode == 2, r.stdout + r.stderr
        err = " ".join(r.stderr.split())
        assert str(spec) in err and key in err and "one process" in err and "Allowed with search: 1" in err, err
        assert not (tmp_path / "runs").exists()


def test_storage_url_that_does_not_answer_exits_3_with_nothing_submitted(tmp_path):
    spec = write_search(tmp_path)
    # a port nothing listens on: the server does not answer
    spec.write_text(spec.read_text() + "  storage: mysql+pymysql://user:secret@127.0.0.1:9/optuna\n")
    r = sweep(tmp_path, spec, "--cluster", "local", timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "secret" not in r.stderr and "127.0.0.1:9" in r.stderr, r.stderr
    assert not list((tmp_path / "runs").rglob("jobs.json")) and not list((tmp_path / "runs").rglob("*/config.yaml"))


def test_dry_run_prints_space_method_trials_workers_header_and_first_configs_writing_nothing(tmp_path):
    spec = write_search(tmp_path, method="random", trials=6, workers=3)
    r = sweep(tmp_path, spec, "--dry-run", "--cluster", "slurm", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "method random, 6 trials, 3 workers" in out, out
    assert "optim.lr: float in [0.001, 0.5], log" in out and "optim.name: one of sgd, adam" in out, out
    assert "#SBATCH --array=0-2" in out, out
    sampled = [line for line in out.splitlines() if line.strip().startswith("trial ")]
    assert len(sampled) == 5 and all("-> run " in line for line in sampled), out
    assert not (tmp_path / "runs").exists()
    again = sweep(tmp_path, spec, "--dry-run", "--cluster", "slurm", timeout=120)
    assert [x for x in again.stdout.splitlines() if "trial " in x] == sampled  # the seed fixes them


# --------------------------------------------------------------------------------------------------
# Runs of real trials (local executor)
# --------------------------------------------------------------------------------------------------


def test_diverging_trial_fails_with_its_reason_and_the_study_goes_on(tmp_path, synthetic_root):
    # random, seed 0, one worker: trial 0 samples lr 0.05, trial 1 lr 1e6 (diverges), trial 2 lr 0.05
    # again: the same config as trial 0, so the same run, told trial 0's result without training
    spec = write_search(tmp_path, method="random", trials=2, workers=1, params="{optim.lr: [0.05, 1.0e+6]}")
    args = ["--cluster", "local", "--wait", f"data.root={synthetic_root}", *TINY]
    args += ["train.epochs=2", "data.train_size=0", "schedule.name=constant", "train.batch_size=50"]
    r = sweep(tmp_path, spec, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    sweep_dir = tmp_path / "runs/s"
    assert study_states(sweep_dir) == {"COMPLETE": 2, "FAIL": 1}
    runs = sorted(p.parent.name for p in sweep_dir.glob("*/config.yaml"))
    assert len(runs) == 2  # two trials, one run
    c = run_cli("pipeline.collect", str(sweep_dir), cwd=tmp_path)
    assert c.returncode == 0, c.stderr
    assert "| 1 | failed: run " in c.stdout and "diverged" in c.stdout, c.stdout
    assert "(same run as trial 0)" in c.stdout, c.stdout
    # --rerun failed: the failed trial is asked again with its values (it diverges again)
    rerun = sweep(tmp_path, spec, "--rerun", "failed", *args)
    assert rerun.returncode == 0 and "1 failed trial(s) enqueued again" in rerun.stdout, rerun.stdout + rerun.stderr
    assert study_states(sweep_dir) == {"COMPLETE": 2, "FAIL": 2}


def _wait_for(predicate, timeout: float = 300, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(poll)


def test_kill_9_of_the_workers_then_resubmit_ends_with_exactly_trials(tmp_path, synthetic_root):
    spec = write_search(tmp_path, trials=4, workers=2)
    args = ["--cluster", "local", "--parallel", "2", f"data.root={synthetic_root}", "train.epochs=3", *TINY]
    r = sweep(tmp_path, spec, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    sweep_dir = tmp_path / "runs/s"
    # a second submission while the workers run: refused, nothing submitted twice
    second = sweep(tmp_path, spec, *args)
    assert second.returncode == 2 and "the search is running" in second.stderr, second.stdout + second.stderr
    jobs = json.loads((sweep_dir / "search/jobs.json").read_text())["search"]
    assert len(jobs) == 2
    _wait_for(lambda: any(sweep_dir.glob("*/progress.json")))
    workers = [json.loads(p.read_text())["pid"] for p in (sweep_dir / "search/workers/search").glob("*.json")]
    for pid in [*workers, *(int(job["job"]) for job in jobs.values())]:  # the workers and their controllers
        os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers))
    again = sweep(tmp_path, spec, "--wait", *args)
    assert again.returncode == 0, again.stdout + again.stderr
    states = study_states(sweep_dir)
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 4 and "RUNNING" not in states, states
    st = run_cli("pipeline.status", str(sweep_dir), cwd=tmp_path)
    assert "0 running" in st.stdout and "0 to go (of 4)" in st.stdout and "best so far: trial" in st.stdout, st.stdout

    # a garbled journal: named by status and collect, which still list the run folders
    journal = sweep_dir / "search/journal.log"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join([lines[0], "{this is not json\n", *lines[1:]]))
    st = run_cli("pipeline.status", str(sweep_dir), cwd=tmp_path)
    assert st.returncode == 0 and str(journal) in " ".join(st.stdout.split()), st.stdout + st.stderr
    runs = [p.parent.name for p in sweep_dir.glob("*/config.yaml")]
    assert runs and all(rid in st.stdout for rid in runs), st.stdout
    c = run_cli("pipeline.collect", str(sweep_dir), cwd=tmp_path)
    assert c.returncode == 0 and str(journal) in " ".join(c.stdout.split()), c.stdout + c.stderr
    assert all(rid in c.stdout for rid in runs), c.stdout


# --------------------------------------------------------------------------------------------------
# sweeps/search.yaml on the local Slurm cluster
# --------------------------------------------------------------------------------------------------

NO_TORCH = (
    "import sys, runpy; sys.modules['torch'] = None  # any import of torch fails\n"
    "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')"
)


def login_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A login-node command run where torch cannot be imported."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_search_yaml_runs_8_trials_with_2_workers_on_slurm_some_stopped_early(tmp_path, synthetic_root):
    text = (REPO / "sweeps/search.yaml").read_text()
    text = text.replace("base: [configs/base.yaml]", f"base: [{REPO / 'configs/base.yaml'}]")
    text = text.replace("cluster: greene-rtx8000", "cluster: local").replace("trials: 48", "trials: 8")
    spec = tmp_path / "search.yaml"
    spec.write_text(text.replace("workers: 8", "workers: 2"))
    out = tmp_path / "runs"
    args = [str(spec), "--cluster", "slurm", "--out", str(out), "--wait", f"data.root={synthetic_root}"]
    r = login_command("pipeline.sweep", *args, "train.epochs=4", *TINY, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 worker(s) submitted to slurm" in r.stdout, r.stdout
    sweep_dir = out / "search"
    states = study_states(sweep_dir)
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 8 and set(states) <= {"COMPLETE", "PRUNED"}, states
    assert states.get("PRUNED", 0) >= 1, states  # ASHA stops trials at epoch 3 (of 4)
    assert len(list(sweep_dir.glob("*/config.yaml"))) == 8
    st = login_command("pipeline.status", str(sweep_dir), cwd=tmp_path)
    assert st.returncode == 0 and "stopped early" in st.stdout and "best so far: trial" in st.stdout, st.stdout
    c = login_command("pipeline.collect", str(sweep_dir), "--format", "markdown", cwd=tmp_path)
    assert c.returncode == 0, c.stdout + c.stderr
    assert "stopped early (epoch 3)" in c.stdout and "| failed" not in c.stdout.split("## Search")[-1], c.stdout
    assert (sweep_dir / "plots/search_history.png").is_file() and (sweep_dir / "plots/search_params.png").is_file()
    stopped = [
        m for m in sweep_dir.glob("*/metrics/train.json") if json.loads(m.read_text())["status"] == "stopped early"
    ]
    for m in stopped:  # keeps its checkpoint and metrics, costs nothing more (no later stage ran)
        run = m.parent.parent
        trained_in = RunDir(run).shared_store("train") or run  # (train once: in <out>/.shared/train/<key>/)
        assert (trained_in / "checkpoints/last.pt").is_file() and not (run / "metrics/prune.json").exists()


def _trials_table(markdown: str) -> tuple[list[str], list[list[str]]]:
    """collect's trials table (the one under '## Search'): headers, rows."""
    lines = [ln for ln in markdown.split("## Search: ", 1)[1].splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
    return split[0], split[2:]


def test_two_objectives_give_a_pareto_front_in_status_and_collect(tmp_path, synthetic_root):
    # more epochs: better accuracy, more time; NSGA-II trades them off
    spec = write_search(
        tmp_path,
        method="nsga2",
        trials=4,
        workers=2,
        objective="{val_acc_best: max, train_time_s: min}",
        params="{train.epochs: {low: 1, high: 4}, optim.lr: {low: 0.01, high: 0.2, log: true}}",
    )
    args = ["--cluster", "local", "--parallel", "2", "--wait", f"data.root={synthetic_root}", *TINY]
    r = sweep(tmp_path, spec, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    sweep_dir = tmp_path / "runs/s"
    assert study_states(sweep_dir) == {"COMPLETE": 4}
    st = run_cli("pipeline.status", str(sweep_dir), cwd=tmp_path)
    assert st.returncode == 0 and "Pareto front: trials" in st.stdout, st.stdout + st.stderr
    c = run_cli("pipeline.collect", str(sweep_dir), "--format", "markdown", cwd=tmp_path)
    assert c.returncode == 0, c.stdout + c.stderr
    headers, rows = _trials_table(c.stdout)
    acc, secs, front = (headers.index(h) for h in ("val_acc_best", "train_time_s", "Pareto front"))
    points = {row[0]: (float(row[acc]), float(row[secs]), row[front] == "yes") for row in rows}
    assert len(points) == 4 and any(on for _, _, on in points.values()), c.stdout
    for trial, (a, s, on) in points.items():  # on the front exactly when no other trial dominates it
        dominated = any(a2 >= a and s2 <= s and (a2, s2) != (a, s) for t2, (a2, s2, _) in points.items() if t2 != trial)
        assert on == (not dominated), (trial, points)
    # which trial is best for each objective, said in status and collect
    for out in (st.stdout, c.stdout):
        text = " ".join(out.split())
        assert "best val_acc_best: trial" in text and "best train_time_s: trial" in text, out


def test_trials_that_differ_only_in_pruning_share_one_training(tmp_path, synthetic_root):
    spec = write_search(
        tmp_path,
        method="random",
        trials=3,
        workers=2,
        objective="{pruned_test_acc: max}",
        params="{prune.sparsity: {low: 0.2, high: 0.8}}",
    )
    spec.write_text(
        spec.read_text().replace("{model.name: resnet20}", "{model.name: resnet20, prune.method: unstructured}")
    )
    args = ["--cluster", "local", "--parallel", "2", "--wait", f"data.root={synthetic_root}", *TINY]
    r = sweep(tmp_path, spec, *args, "train.epochs=2", "prune.epochs=1")
    assert r.returncode == 0, r.stdout + r.stderr
    sweep_dir = tmp_path / "runs/s"
    assert study_states(sweep_dir) == {"COMPLETE": 3}
    runs = [RunDir(p.parent) for p in sweep_dir.glob("*/config.yaml")]
    assert len(runs) == 3
    stores = {run.shared_store("train") for run in runs}
    (store,) = stores  # one training for the three trials
    assert store is not None and json.loads((store / "metrics/train.json").read_text())["status"] == "done"
    reused = [run for run in runs if "reuses the shared training" in run.log.read_text()]
    assert len(reused) == 2, [run.log.read_text() for run in runs]
    assert all(run.read_metrics("prune")["status"] == "done" for run in runs)  # each pruned itself
    assert len({run.read_metrics("prune")["sparsity"] for run in runs}) == 3

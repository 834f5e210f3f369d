"""The search worker protocol with real processes on one real journal file (tests/search_fake_worker.py:
the real worker loop, a fake trial instead of training): several workers end with exactly ``trials``
trials, early stopping stops some, a worker killed with SIGKILL mid-trial has its trial adopted under
the same number, failures are recorded and replaced, two trials of one config train once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from pipeline.search.figures import STOPPED
from pipeline.search.spec import parse_search
from pipeline.search.study import open_study
from pipeline.search.worker import ATTR_FAILURE, ATTR_RUN, ATTR_SAME_AS, WorkerBusy, run_worker

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "search_fake_worker.py"

SEARCH = """\
search:
  method: {method}
  trials: {trials}
  workers: {workers}
  objective: {{val_acc_best: max}}
  params:
    optim.lr: {{low: 1.0e-4, high: 1.0, log: true}}
    optim.name: [sgd, nesterov, adam]
  early_stop: {early_stop}
  seed: 3
"""


def write_search(tmp_path: Path, **kw) -> Path:
    values = {"method": "tpe", "trials": 8, "workers": 2, "early_stop": "{method: none}", **kw}
    path = tmp_path / "sweep.yaml"
    path.write_text(SEARCH.format(**values))
    return path


def start(sweep: Path, search: Path, worker: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(sweep), str(search), str(worker), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[dict]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"worker exited {p.returncode}\n{stderr}"
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def load(sweep: Path, search: Path) -> optuna.Study:
    from pipeline.config import read_yaml

    spec = parse_search(read_yaml(search)["search"], search)
    return open_study(spec, sweep, create=False)


def states(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def wait_for(path_glob: tuple[Path, str], timeout: float = 120) -> Path:
    folder, pattern = path_glob
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"nothing matched {folder}/{pattern} within {timeout} s")


def test_eight_worker_processes_end_with_exactly_the_trials(tmp_path):
    sweep, search = tmp_path / "sweep", write_search(tmp_path, trials=24, workers=8)
    summaries = finish([start(sweep, search, w, "--epochs", "4") for w in range(8)])
    study = load(sweep, search)
    assert states(study) == {"COMPLETE": 24}
    claimed = [t[0] for s in summaries for t in s["trials"]]
    assert sorted(claimed) == list(range(24))  # every trial claimed by exactly one worker
    assert all(how == "asked" for s in summaries for _, how, _ in s["trials"])
    for t in study.trials:
        assert t.user_attrs[ATTR_RUN] and (sweep / t.user_attrs[ATTR_RUN] / "metrics/train.json").exists()
        assert t.values is not None and 0 < t.values[0] < 1
    for w in range(8):  # each worker left saying it holds nothing
        assert json.loads((sweep / "search/workers/search" / f"{w}.json").read_text())["trial"] is None


def test_early_stopping_stops_some_trials_and_the_study_still_has_its_trials(tmp_path):
    sweep = tmp_path / "sweep"
    search = write_search(tmp_path, trials=16, workers=4, early_stop="{method: asha, min_epochs: 1, reduction: 3}")
    finish([start(sweep, search, w, "--epochs", "9") for w in range(4)])
    study = load(sweep, search)
    counts = states(study)
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 16 and set(counts) <= {"COMPLETE", "PRUNED"}
    assert counts.get("PRUNED", 0) >= 1, counts
    for t in study.get_trials(states=(TrialState.PRUNED,)):
        train = json.loads((sweep / t.user_attrs[ATTR_RUN] / "metrics/train.json").read_text())
        assert train["status"] == STOPPED and train["epochs"] == max(t.intermediate_values) < 9
        if t.user_attrs.get(ATTR_SAME_AS) is None:
            assert t.value == t.intermediate_values[max(t.intermediate_values)]  # ranked by its last epoch
    for t in study.get_trials(states=(TrialState.COMPLETE,)):  # only the rungs went to the study
        assert t.user_attrs.get(ATTR_SAME_AS) is not None or sorted(t.intermediate_values) == [1, 3, 9]


@pytest.mark.parametrize("same_index", [False, True], ids=["other-worker-adopts", "same-index-resumes"])
def test_worker_killed_mid_trial_has_its_trial_taken_over(tmp_path, same_index):
    sweep, search = tmp_path / "sweep", write_search(tmp_path, trials=5, workers=1)
    victim = start(sweep, search, 0, "--epochs", "6", "--hang-at", "4")
    marker = wait_for((sweep, "hang.*"))
    number, run_id = marker.read_text().split()
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert states(load(sweep, search)).get("RUNNING") == 1

    successor = finish([start(sweep, search, 0 if same_index else 1, "--epochs", "6")])[0]
    study = load(sweep, search)
    assert states(study) == {"COMPLETE": 5}  # exactly the trials: the killed one was not replaced
    first = successor["trials"][0]
    assert first[:2] == [int(number), "resumed" if same_index else "adopted"]
    epochs = [line.split() for line in (sweep / run_id / "epochs.log").read_text().splitlines()]
    assert [int(e) for _, _, e in epochs] == [1, 2, 3, 4, 5, 6]  # resumed after epoch 3, nothing redone
    assert {pid for pid, _, _ in epochs} == {str(victim.pid), str(successor["pid"])}
    assert study.trials[int(number)].user_attrs[ATTR_RUN] == run_id


def test_failed_trials_are_recorded_and_replaced(tmp_path):
    sweep, search = tmp_path / "sweep", write_search(tmp_path, method="random", trials=8, workers=2)
    search.write_text(search.read_text() + "  max_failed: 40\n")
    finish([start(sweep, search, w, "--fail-name", "adam", "--invalid-name", "nesterov") for w in range(2)])
    study = load(sweep, search)
    counts = states(study)
    assert counts["COMPLETE"] == 8 and counts.get("FAIL", 0) >= 1, counts
    for t in study.get_trials(states=(TrialState.FAIL,)):
        reason = t.user_attrs[ATTR_FAILURE]
        if t.params["optim.name"] == "adam":
            assert "diverged" in reason
        else:
            assert t.params["optim.name"] == "nesterov" and "invalid" in reason and "optim.name" in reason
    assert all(t.params["optim.name"] == "sgd" for t in study.get_trials(states=(TrialState.COMPLETE,)))


def test_a_config_that_always_fails_stops_at_max_failed(tmp_path):
    sweep, search = tmp_path / "sweep", tmp_path / "sweep.yaml"
    search.write_text(
        "search: {trials: 10, workers: 2, max_failed: 3, objective: {val_acc_best: max}, "
        "params: {optim.name: [adam]}}\n"
    )
    summaries = finish([start(sweep, search, w, "--fail-name", "adam") for w in range(2)])
    failed = states(load(sweep, search))["FAIL"]
    # no trial is asked once 3 have failed; one already running in the other worker then still ends
    assert set(states(load(sweep, search))) == {"FAIL"} and 3 <= failed <= 3 + 1
    assert sum(len(s["trials"]) for s in summaries) == failed


def test_two_trials_of_one_config_train_once(tmp_path):
    """A space of two configs and 6 trials: every later trial of a config is told the run's result."""
    sweep, search = tmp_path / "sweep", tmp_path / "sweep.yaml"
    search.write_text(
        "search: {method: random, trials: 6, workers: 2, objective: {val_acc_best: max}, "
        "params: {optim.name: [sgd, adam]}}\n"
    )
    finish([start(sweep, search, w, "--epoch-s", "0.05") for w in range(2)])
    study = load(sweep, search)
    assert states(study) == {"COMPLETE": 6}
    runs = {t.user_attrs[ATTR_RUN] for t in study.trials}
    assert len(runs) == 2
    for run_id in runs:  # each run trained once: six epochs, one trial number
        epochs = [line.split() for line in (sweep / run_id / "epochs.log").read_text().splitlines()]
        assert len(epochs) == 6 and len({n for _, n, _ in epochs}) == 1
    for t in study.trials:
        first = min(u.number for u in study.trials if u.user_attrs[ATTR_RUN] == t.user_attrs[ATTR_RUN])
        assert t.user_attrs.get(ATTR_SAME_AS) == (None if t.number == first else first)
        assert t.values == study.trials[first].values


def test_a_twin_waiting_for_a_killed_worker_trains_the_run_itself(tmp_path):
    """Worker 0 trains the only config and is killed mid-run while worker 1's trial of the same config
    waits for it: worker 1 takes the run folder over (resuming it), then adopts trial 0, told the result."""
    sweep, search = tmp_path / "sweep", tmp_path / "sweep.yaml"
    search.write_text("search: {trials: 3, workers: 2, objective: {val_acc_best: max}, params: {optim.name: [sgd]}}\n")
    first = start(sweep, search, 0, "--hang-at", "3")
    _, run_id = wait_for((sweep, "hang.*")).read_text().split()
    second = start(sweep, search, 1)
    deadline = time.monotonic() + 120
    while ATTR_RUN not in (study := load(sweep, search)).trials[-1].user_attrs or len(study.trials) < 2:
        assert time.monotonic() < deadline, "worker 1 never claimed a trial"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    (summary,) = finish([second])
    study = load(sweep, search)
    assert states(study) == {"COMPLETE": 3}
    assert [how for _, how, _ in summary["trials"]] == ["asked", "adopted", "asked"]
    epochs = [line.split() for line in (sweep / run_id / "epochs.log").read_text().splitlines()]
    assert [int(e) for _, _, e in epochs] == [1, 2, 3, 4, 5, 6]  # trained once, resumed after epoch 2
    assert [n for _, n, _ in epochs] == ["0", "0", "1", "1", "1", "1"]
    assert study.trials[0].user_attrs[ATTR_SAME_AS] == 1 and study.trials[2].user_attrs[ATTR_SAME_AS] == 1


def test_pareto_front_with_two_objectives(tmp_path):
    """NSGA-II on accuracy (max) against training time (min), in this process."""
    sys.path.insert(0, str(REPO / "tests"))
    from search_fake_worker import FakeRunner

    spec = parse_search(
        {
            "method": "nsga2",
            "trials": 10,
            "objective": {"val_acc_best": "max", "train_time_s": "min"},
            "params": {"optim.lr": {"low": 1e-4, "high": 1.0, "log": True}},
        },
        "sweep.yaml",
    )

    class Args:
        epochs, epoch_s, hang_at, fail_name, invalid_name = 3, 0.0, 0, "", ""

    sweep = tmp_path / "sweep"
    run_worker(spec, sweep, 0, FakeRunner(sweep, spec.objectives, Args()))  # type: ignore[arg-type]
    study = open_study(spec, sweep, create=False)
    assert len(study.trials) == 10 and [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    front = study.best_trials
    assert front and all(t.state == TrialState.COMPLETE for t in front)
    best_acc = max(t.values[0] for t in study.trials)
    assert any(t.values[0] == best_acc for t in front)


def test_a_live_worker_index_is_not_started_twice(tmp_path):
    """Two submissions of one search at once: the second worker 0 refuses while the first one lives."""
    sweep, search = tmp_path / "sweep", write_search(tmp_path, trials=2, workers=1)
    holder = start(sweep, search, 0, "--hang-at", "2")
    try:
        wait_for((sweep, "hang.*"))
        from pipeline.config import read_yaml

        spec = parse_search(read_yaml(search)["search"], search)
        with pytest.raises(WorkerBusy, match="worker 0 of this search is already running"):
            run_worker(spec, sweep, 0, None)  # type: ignore[arg-type]  # refused before any trial is run
    finally:
        holder.kill()
        holder.communicate(timeout=60)

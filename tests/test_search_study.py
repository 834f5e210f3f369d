"""The study: a round trip through the journal file, samplers and pruners from the spec, the seed's
reproducibility with one worker (and the dry run's preview of it), journal faults (a cut last record,
a garbled line), a storage URL that does not answer, and the URL path on a real MariaDB server."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from pipeline import console as cli
from pipeline.config import ConfigError
from pipeline.search.journal import CUT_SUFFIX, JournalCorrupt, check_journal
from pipeline.search.spec import check_not_sqlite, parse_search
from pipeline.search.study import (
    expand_storage,
    StorageUnreachable,
    ask,
    exit_on_storage_down,
    journal_path,
    judged,
    make_pruner,
    make_sampler,
    open_storage,
    open_study,
    preview,
)
from pipeline.search.worker import run_worker
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from search_fake_worker import FakeRunner  # noqa: E402


def spec_of(**changes):
    doc = {
        "method": "tpe",
        "trials": 6,
        "objective": {"val_acc_best": "max"},
        "params": {"optim.lr": {"low": 1e-4, "high": 1.0, "log": True}, "optim.name": ["sgd", "nesterov", "adam"]},
        "seed": 7,
        **changes,
    }
    return parse_search(doc, "sweep.yaml")


class Args:
    epochs, epoch_s, hang_at, fail_name, invalid_name = 3, 0.0, 0, "", ""


def run_one_worker(spec, sweep: Path, worker: int = 0):
    return run_worker(spec, sweep, worker, FakeRunner(sweep, spec.objectives, Args()))  # type: ignore[arg-type]


def test_study_round_trip_on_the_journal(tmp_path):
    spec = spec_of(early_stop={"method": "median", "min_epochs": 1})
    study = open_study(spec, tmp_path)
    for i in range(3):
        trial = ask(study, spec, 0)
        trial.report(0.1 * i, 1)
        trial.set_user_attr("run_id", f"run{i}")
        if i < 2:
            study.tell(trial, 0.5 + i / 10)
    again = open_study(spec, tmp_path, create=False)  # a fresh storage: replayed from the file
    assert journal_path(tmp_path).is_file()
    assert [t.state for t in again.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING]
    assert [t.params for t in again.trials] == [t.params for t in study.trials]
    assert [t.user_attrs["run_id"] for t in again.trials] == ["run0", "run1", "run2"]
    assert again.trials[2].intermediate_values == {1: 0.2}
    assert again.best_value == pytest.approx(0.6)
    assert isinstance(again.pruner, optuna.pruners.MedianPruner)
    assert open_study(spec, tmp_path).trials == again.trials  # created again: loaded, not duplicated


def test_samplers_and_pruners_from_the_spec():
    assert isinstance(make_sampler(spec_of(method="random"), 1), optuna.samplers.RandomSampler)
    assert isinstance(make_sampler(spec_of(method="tpe"), 1), optuna.samplers.TPESampler)
    assert isinstance(make_sampler(spec_of(method="nsga2"), 1), optuna.samplers.NSGAIISampler)
    assert isinstance(make_pruner(spec_of().early_stop), optuna.pruners.NopPruner)
    hyperband = spec_of(early_stop={"method": "hyperband", "min_epochs": 1, "reduction": 3}).early_stop
    assert isinstance(make_pruner(hyperband, max_epochs=27), optuna.pruners.HyperbandPruner)


def pruned_at(spec, values_by_trial: list[list[float]]) -> list[int | None]:
    """For each trial in turn (reporting epochs 1, 2, ...): the epoch the pruner stopped it, or None."""
    study = optuna.create_study(direction="maximize", pruner=make_pruner(spec.early_stop))
    out: list[int | None] = []
    for values in values_by_trial:
        trial, stopped = study.ask(), None
        for epoch, value in enumerate(values, start=1):
            trial.report(value, epoch)
            if trial.should_prune():
                stopped = epoch
                break
        study.tell(trial, state=TrialState.PRUNED) if stopped else study.tell(trial, max(values))
        out.append(stopped)
    return out


def test_asha_and_median_judge_no_trial_before_min_epochs():
    good, bad = [0.5, 0.6, 0.7, 0.8], [0.1, 0.1, 0.1, 0.1]
    asha = spec_of(early_stop={"method": "asha", "min_epochs": 3, "reduction": 2})
    assert pruned_at(asha, [good, good, bad]) == [None, None, 3]
    median = spec_of(early_stop={"method": "median", "min_epochs": 2, "startup_trials": 1})
    assert pruned_at(median, [good, bad]) == [None, 2]


def test_only_the_epochs_a_pruner_judges_are_written_to_the_study():
    def epochs(**early) -> list[int]:
        return [e for e in range(1, 31) if judged(spec_of(early_stop=early).early_stop, e)]

    assert epochs(method="asha", min_epochs=3, reduction=3) == [3, 9, 27]
    assert epochs(method="hyperband", min_epochs=2, reduction=2) == [2, 4, 8, 16]
    assert epochs(method="median", min_epochs=28) == [28, 29, 30]
    assert epochs(method="none") == []


@pytest.mark.parametrize("method", ["random", "tpe"])
def test_one_worker_same_seed_same_configs(tmp_path, method):
    spec = spec_of(method=method, trials=14)  # past TPE's 10 random start-up trials

    def sampled(folder: Path, s) -> list[dict]:
        run_one_worker(s, folder)
        return [t.params for t in open_study(s, folder, create=False).trials]

    first, second = sampled(tmp_path / "a", spec), sampled(tmp_path / "b", spec)
    assert first == second and len(first) == 14
    assert sampled(tmp_path / "c", spec_of(method=method, trials=14, seed=8)) != first
    shown = preview(spec)
    assert shown == first[: len(shown)] and len(shown) == 5  # what --dry-run shows is what runs first


def test_the_preview_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(preview(spec_of(method="random"))) == 5
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Journal faults
# --------------------------------------------------------------------------------------------------


def test_a_cut_last_record_is_dropped_said_and_kept_aside(tmp_path, caplog):
    """A writer killed mid-append leaves a last line without its newline. Readers say so and leave it;
    the next writer moves it to journal.log.cut, so its own records do not land on the cut line (where
    Optuna would read both as one garbled record and fail from there on)."""
    spec = spec_of(trials=3)
    run_one_worker(spec, tmp_path)
    path = journal_path(tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole[:-12])  # the last record (the last trial's result) loses its end
    cut = whole[whole.rfind(b"\n", 0, len(whole) - 1) + 1 : -12]

    seen = check_journal(path)
    assert seen.cut_bytes == len(cut) and "cut short" in seen.note and str(path) in seen.note
    assert path.read_bytes() == whole[:-12]  # a reader changes nothing
    reader = open_study(spec, tmp_path, create=False, storage=open_storage(spec, tmp_path, write=False))
    assert [t.state for t in reader.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING]

    with caplog.at_level("WARNING", logger="pipeline.search"):
        run_one_worker(spec_of(trials=5), tmp_path)
    assert f"{path}: its last record was cut short" in caplog.text and "journal.log.cut" in caplog.text
    assert Path(str(path) + CUT_SUFFIX).read_bytes() == cut + b"\n"
    assert check_journal(path).cut_bytes == 0
    after = open_study(spec, tmp_path, create=False)
    # the trial whose result was cut was adopted and told its result from its run folder, untrained
    assert [t.state for t in after.trials] == [TrialState.COMPLETE] * 5
    assert after.trials[2].values == reader.trials[2].values or after.trials[2].values is not None


@pytest.mark.parametrize(
    "bad, why",
    [
        (b'{"op_code": 4, "worker\x00\xff\xfe binary', "binary bytes"),
        (b'{"op_code": 4, "worker_id": "x", "stu', "not a JSON record"),
        (b'{"hello": "world"}', "not an Optuna journal record"),
    ],
    ids=["binary", "torn", "foreign"],
)
def test_a_garbled_journal_is_named_with_its_line(tmp_path, bad, why):
    spec = spec_of(trials=2)
    run_one_worker(spec, tmp_path)
    path = journal_path(tmp_path)
    lines = path.read_bytes().split(b"\n")
    lines[3] = bad
    path.write_bytes(b"\n".join(lines))
    for write in (False, True):  # status/collect read, workers write: both are told which file and line
        with pytest.raises(JournalCorrupt) as info:
            open_storage(spec, tmp_path, write=write)
        message = str(info.value)
        assert message.startswith(f"{path}: line 4 of {len(lines) - 1} is garbled: {why}")
        assert "run folders are intact" in message and info.value.path == path
    with pytest.raises(SystemExit) as code, cli.exit_on_config_error():
        open_study(spec, tmp_path)
    assert code.value.code == 2


def test_a_garbled_last_line_is_named_too(tmp_path):
    """Optuna alone skips a bad last complete line silently, then fails once a record follows it."""
    spec = spec_of(trials=1)
    run_one_worker(spec, tmp_path)
    path = journal_path(tmp_path)
    path.write_bytes(path.read_bytes() + b"\x00\x00\x00\x00\n")  # an NFS client crash leaves NUL blocks
    with pytest.raises(JournalCorrupt, match="is garbled: not a JSON record"):
        open_study(spec, tmp_path)


# --------------------------------------------------------------------------------------------------
# Database storage
# --------------------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_storage_url_that_does_not_answer_is_its_own_error(tmp_path, capsys):
    port = closed_port()
    spec = spec_of(storage=f"mysql+pymysql://searcher:s3cret@127.0.0.1:{port}/study")
    with pytest.raises(StorageUnreachable) as info:
        open_study(spec, tmp_path)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "does not answer" in message and "try again later" in message
    assert "s3cret" not in message
    assert not isinstance(info.value, ConfigError)  # not bad input: the commands exit 3, not 2
    assert list(tmp_path.iterdir()) == []  # nothing written
    with pytest.raises(SystemExit) as code, exit_on_storage_down():
        open_study(spec, tmp_path)
    assert code.value.code == 3
    err = capsys.readouterr().err
    assert "error:" in err and "does not answer" in err and "s3cret" not in err


def test_a_storage_url_naming_no_driver_is_bad_input(tmp_path):
    spec = spec_of(storage="mysql+nosuchdriver://u:pw@127.0.0.1/db")
    with pytest.raises(ConfigError, match=r"sweep.yaml: search.storage: cannot use mysql\+nosuchdriver://u:\*\*\*@"):
        open_study(spec, tmp_path)


def _mariadb_defaults() -> Path | None:
    """my.cnf of the local cluster's MariaDB (tests/slurm/start.sh), from the marker of slurm.conf."""
    try:
        first = Path("/etc/slurm/slurm.conf").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    if "state_dir=" not in first:
        return None
    path = Path(first.split("state_dir=", 1)[1].strip()) / "etc" / "my.cnf"
    return path if path.is_file() else None


def _socket_of(mycnf: Path) -> str:
    for line in mycnf.read_text().splitlines():
        if line.strip().startswith("socket="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"no socket= line in {mycnf}")


@pytest.fixture
def mariadb_url(slurm_cluster):
    """A database and a user of its own on the cluster's MariaDB (created as root through its socket,
    dropped afterwards); the URL reaches it with PyMySQL through the unix socket (networking is off)."""
    mycnf = _mariadb_defaults()
    if mycnf is None:
        pytest.fail("the local Slurm cluster's MariaDB (tests/slurm/start.sh) was not found")
    name, password = f"search_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex

    def sql(text: str) -> None:
        subprocess.run(["mariadb", f"--defaults-file={mycnf}", "-e", text], check=True, capture_output=True)

    sql(
        f"CREATE DATABASE {name}; CREATE USER '{name}'@'localhost' IDENTIFIED BY '{password}'; "
        f"GRANT ALL ON {name}.* TO '{name}'@'localhost';"
    )
    try:
        yield f"mysql+pymysql://{name}:{password}@localhost/{name}?unix_socket={_socket_of(mycnf)}"
    finally:
        sql(f"DROP DATABASE IF EXISTS {name}; DROP USER IF EXISTS '{name}'@'localhost';")


@pytest.mark.slurm
def test_a_database_that_refuses_is_bad_input_not_try_again(tmp_path, mariadb_url):
    wrong = mariadb_url.replace("@localhost", "x@localhost", 1)  # the password with one more letter
    with pytest.raises(
        ConfigError, match=r"search.storage: mysql\+pymysql://search_\w+:\*\*\*@.*refused: Access denied"
    ):
        open_study(spec_of(storage=wrong), tmp_path)
    password = mariadb_url.split(":")[2].split("@")[0]
    with pytest.raises(ConfigError) as info:
        open_study(spec_of(storage=wrong), tmp_path)
    assert password not in str(info.value)


@pytest.mark.slurm
def test_the_url_path_on_mariadb(tmp_path, mariadb_url):
    """Two worker processes on a MariaDB study: exactly the trials, and no journal file written."""
    search = tmp_path / "sweep.yaml"
    search.write_text(
        "search:\n  trials: 6\n  workers: 2\n  objective: {val_acc_best: max}\n"
        "  params: {optim.lr: {low: 1.0e-4, high: 1.0, log: true}}\n"
        "  early_stop: {method: median, min_epochs: 2}\n"
        f"  storage: {json.dumps(mariadb_url)}\n"
    )
    sweep = tmp_path / "sweep"
    spec = parse_search({**__import__("yaml").safe_load(search.read_text())["search"]}, search)
    open_study(spec, sweep)  # created on the login node before workers start (the tables once)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    worker = str(REPO / "tests" / "search_fake_worker.py")
    procs = [
        subprocess.Popen([sys.executable, worker, str(sweep), str(search), str(w)], env=env, stderr=subprocess.PIPE)
        for w in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    study = open_study(spec, sweep, create=False)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 6
    assert len(study.trials) == 6 and not journal_path(sweep).exists()
    assert all(math.isfinite(t.value) for t in study.trials if t.state == TrialState.COMPLETE)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_search_sweep_on_mariadb_through_the_commands(tmp_path, mariadb_url, synthetic_root):
    """sweep (--cluster local), status and collect with search.storage naming the MariaDB database, its
    password given as $SEARCH_DB_PASSWORD: in no file of the sweep folder, nor in what the commands print."""
    from tests.test_search_sweep import TINY, study_states, write_search

    password = mariadb_url.split(":")[2].split("@")[0]
    spec = write_search(tmp_path, method="random", trials=3, workers=2)
    url = mariadb_url.replace(f":{password}@", ":$SEARCH_DB_PASSWORD@", 1)
    spec.write_text(spec.read_text() + f"  storage: {json.dumps(url)}\n")
    args = ["--cluster", "local", "--parallel", "2", "--wait", f"data.root={synthetic_root}", "train.epochs=1", *TINY]
    env = {"SEARCH_DB_PASSWORD": password}
    sweep_dir = tmp_path / "runs/s"
    unset = run_cli("pipeline.sweep", str(spec), "--out", str(tmp_path / "runs"), *args, cwd=tmp_path)
    assert unset.returncode == 2 and "search.storage" in unset.stderr and "$SEARCH_DB_PASSWORD" in unset.stderr
    assert not sweep_dir.exists(), "written before the storage was checked"
    r = run_cli("pipeline.sweep", str(spec), "--out", str(tmp_path / "runs"), *args, cwd=tmp_path, env=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "storage mysql+pymysql://" in r.stdout and password not in r.stdout
    assert study_states(sweep_dir, env=env) == {"COMPLETE": 3}
    assert len(list(sweep_dir.glob("*/config.yaml"))) == 3 and not journal_path(sweep_dir).exists()
    st = run_cli("pipeline.status", str(sweep_dir), cwd=tmp_path, env=env)
    assert st.returncode == 0 and "0 to go (of 3)" in st.stdout and "best so far: trial" in st.stdout, st.stdout
    c = run_cli("pipeline.collect", str(sweep_dir), "--format", "markdown", cwd=tmp_path, env=env)
    assert c.returncode == 0 and "## Search: study search: 3 finished" in c.stdout, c.stdout + c.stderr
    for path in sweep_dir.rglob("*"):
        assert not path.is_file() or password.encode() not in path.read_bytes(), path
    assert password not in st.stdout + c.stdout


def test_storage_urls_read_variables_from_the_environment():
    env = {"PW": "p@ss/w:rd", "HOST": "db.example.org", "URL": "postgresql://u:x@h/db", "LITE": "sqlite:///x.db"}
    expand = lambda url: expand_storage(url, "sweep.yaml", env)  # noqa: E731
    assert expand("mysql+pymysql://u:$PW@${HOST}/db") == "mysql+pymysql://u:p%40ss%2Fw%3Ard@db.example.org/db"
    assert expand("$URL") == "postgresql://u:x@h/db"  # a whole URL is not encoded
    assert expand("mysql+pymysql://u:pw@h/db?x=$HOST") == "mysql+pymysql://u:pw@h/db?x=db.example.org"
    with pytest.raises(ConfigError, match=r"sweep.yaml: search.storage: names \$NOPE, which is not set"):
        expand("mysql+pymysql://u:$NOPE@h/db")
    assert spec_of(storage="$URL").storage == "$URL"
    with pytest.raises(ConfigError, match=r"search.storage: must be a database URL"):
        spec_of(storage="URL")
    with pytest.raises(ConfigError, match=r"search.storage: SQLite locks fail"):
        check_not_sqlite(expand("$LITE"), "s.yaml")


def test_a_started_search_keeps_its_objectives_and_space(tmp_path):
    spec = spec_of(trials=2)
    run_one_worker(spec, tmp_path)
    assert len(open_study(spec_of(trials=4, seed=1, workers=3), tmp_path).trials) == 2  # more trials: fine
    other_space = spec_of(params={"optim.lr": {"low": 1e-3, "high": 1.0, "log": True}})
    with pytest.raises(ConfigError, match=r"sweep.yaml: search.params: differs from the params of the study"):
        open_study(other_space, tmp_path)
    with pytest.raises(ConfigError, match=r"search.objective: differs .*journal.log"):
        open_study(spec_of(objective={"val_loss": "min"}), tmp_path, create=False)


def test_readers_create_nothing_before_the_search_starts(tmp_path):
    from pipeline.search.study import NoStudy

    with pytest.raises(NoStudy, match="the search has not started"):
        open_study(spec_of(), tmp_path, create=False)
    assert list(tmp_path.iterdir()) == []
    open_study(spec_of(), tmp_path, "one")
    with pytest.raises(NoStudy, match="no study 'other'"):
        open_study(spec_of(), tmp_path, "other", create=False)


def test_progress_says_where_the_study_stands(tmp_path):
    from pipeline.search.study import progress

    spec = spec_of(trials=4, early_stop={"method": "asha", "min_epochs": 1, "reduction": 3})
    run_one_worker(spec, tmp_path)
    study = open_study(spec_of(trials=6), tmp_path, create=False)
    trial = ask(study, spec, 1)  # one running
    now = progress(study, spec_of(trials=6))
    assert now.counts.ended == 4 and now.counts.running == 1 and now.to_go == 1
    assert now.counts.done == len(study.get_trials(states=(TrialState.COMPLETE,)))
    (best,) = now.best
    assert best.value == max(t.value for t in study.get_trials(states=(TrialState.COMPLETE,)))
    assert (tmp_path / best.user_attrs["run_id"] / "metrics/train.json").exists()
    study.tell(trial, state=TrialState.FAIL)
    assert progress(study, spec_of(trials=6)).to_go == 2


def test_an_enqueued_trial_is_served_beyond_the_budget(tmp_path):
    """What --rerun failed will do: the failed trial's values, enqueued, run once more."""
    spec = spec_of(trials=2)
    run_one_worker(spec, tmp_path)
    study = open_study(spec, tmp_path, create=False)
    again = {"optim.lr": 0.01, "optim.name": "adam"}
    study.enqueue_trial(again, user_attrs={"rerun_of": 1})
    summary = run_one_worker(spec, tmp_path)
    assert [(n, how, state) for n, how, state in summary.trials] == [(2, "asked", "COMPLETE")]
    trial = open_study(spec, tmp_path, create=False).trials[2]
    assert trial.params == again and trial.user_attrs["rerun_of"] == 1


@pytest.mark.parametrize("early", ["median", "hyperband"])
def test_every_pruner_runs_with_ask_and_tell(tmp_path, early):
    spec = spec_of(trials=6, early_stop={"method": early, "min_epochs": 1})
    summary = run_one_worker(spec, tmp_path)
    assert len(summary.trials) == 6 and summary.counts.ended == 6
    study = open_study(spec, tmp_path, create=False)
    assert type(study.pruner).__name__ == {"median": "MedianPruner", "hyperband": "HyperbandPruner"}[early]
    assert all(t.intermediate_values for t in study.trials)  # epochs reached the study

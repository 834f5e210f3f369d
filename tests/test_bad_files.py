"""Every file that status and collect (tables, plots, TensorBoard HParams) read from run folders, fed
binary, truncated, empty, wrong-type and wrong-encoding content: the real command-line tools exit 0,
name the file and still show every other run (README: "What survives what").

One sweep holds a run per (file, content kind), each in the state that makes the readers open that
file (a running run's progress.json, a stopped run's ending.json, a blocked run's trainer.json), plus
two intact runs; status and collect run once over all of it. manifest.json, one per sweep, gets a
sweep of its own per kind."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.rundir import RunDir, atomic_write_json
from tests.conftest import run_cli
from tests.report_runs import entry, finish, history, make_sweep, swept, train_record

KINDS = ("binary", "truncated", "empty", "list", "string", "latin-1", "utf-16")
RUN_FILES = (
    "config.yaml",
    "meta.json",
    "metrics/train.json",
    "metrics/prune.json",
    "metrics/quantize.json",
    "metrics/measure.json",
    "progress.json",
    "shared.json",
    "key.json",
    "trainer.json",
    "owner.json",
    "ending.json",
)
CASES = [(f, k) for f in RUN_FILES for k in KINDS]
INTACT = 2  # runs with every file intact: shown with their figures whatever the others hold

# A string where a number (or a mapping, where the file's numbers sit in one) is expected: the changed
# keys of each file's intact content
STRING_FOR_NUMBER: dict[str, dict[str, Any]] = {
    "meta.json": {"swept": "optim.lr=0.1"},
    "metrics/train.json": {"test_acc": "high", "epochs": "three", "history": "all of them"},
    "metrics/prune.json": {"sparsity": "half"},
    "metrics/quantize.json": {"test_acc": "high"},
    "metrics/measure.json": {"models": "int8"},
    "progress.json": {"epoch": "three", "elapsed_s": "long"},
    "shared.json": {"train": "the store"},
    "key.json": {"key": 12},
    "trainer.json": {"run": 17, "run_id": ["x"]},
    "owner.json": {"pid": "1234", "started": "yesterday"},
    "ending.json": {"time": "now", "reason": 5},
    "manifest.json": {"runs": "all"},
}


def bad_content(name: str, intact: bytes, kind: str) -> bytes:
    text = intact.decode()
    if kind == "binary":
        return b"\x00\xffPK\x03\x04\x89\x13binary\x00\xfe"
    if kind == "truncated":
        return intact[: len(intact) // 2]
    if kind == "empty":
        return b""
    if kind == "list":
        return b"- data\n- model\n" if name.endswith(".yaml") else b"[1, 2, 3]\n"
    if kind == "latin-1":
        if name.endswith(".yaml"):
            return ("# réglé à la main\n" + text).encode("latin-1")
        return json.dumps({**json.loads(text), "note": "réglé"}, ensure_ascii=False).encode("latin-1")
    if kind == "utf-16":
        return text.encode("utf-16")
    assert kind == "string"
    if name.endswith(".yaml"):  # a section that is a string where its mapping of settings is
        return text.replace("optim:\n", "optim: fast\nold_optim:\n").encode()
    return json.dumps({**json.loads(text), **STRING_FOR_NUMBER[name]}).encode()


def measure_record() -> dict[str, Any]:
    return {
        "status": "done",
        "models": [
            entry("trained", 0.80, 0.97, 270_000, 1_100_000, 3.0),
            entry("int8", 0.79, 0.96, 270_000, 310_000, 1.5),
        ],
    }


def finish_all(run: RunDir) -> None:
    finish(
        run,
        train_record(history=history([0.5, 0.7, 0.85]), train_time_s=30.0),
        quantize={"status": "done", "method": "int8", "test_acc": 0.83, "raw": 310_000, "gzip": 150_000},
        measure=measure_record(),
    )


def share_training(run: RunDir, record: dict[str, Any], owner: str) -> Path:
    """Move ``run``'s training into a shared store of its own (the layout pipeline.share writes), the
    training made by run ``owner``."""
    store = run.path.parent.parent / ".shared" / "train" / f"key-{run.id}"
    RunDir(store).write_metrics("train", record)
    atomic_write_json(store / "key.json", {"key": store.name, "stage": "train", "settings": {"data": {}}})
    atomic_write_json(
        store / "trainer.json",
        {"run": str(run.path.parent / owner), "run_id": owner, "cluster": "slurm", "job_id": None, "since": 1.0},
    )
    run.metrics_path("train").unlink(missing_ok=True)
    run.metrics_path("train").parent.mkdir(exist_ok=True)
    os.symlink(os.path.relpath(store / "metrics/train.json", run.metrics_dir), run.metrics_path("train"))
    atomic_write_json(
        run.path / "shared.json", {"train": {"key": store.name, "store": os.path.relpath(store, run.path)}}
    )
    return store


def dead_owner() -> dict[str, Any]:
    """An owner.json whose job is gone (no process has PID 0)."""
    return {"pid": 0, "started": 1, "host": socket.gethostname(), "boot_id": "", "job": "", "since": time.time()}


def prepare(run: RunDir, name: str) -> Path:
    """``run`` in the state that makes status and collect read ``name``; returns that file's path."""
    if name in ("progress.json", "owner.json", "ending.json"):  # started, not finished, no job alive
        atomic_write_json(run.progress, {"epoch": 1, "epochs": 3, "val_acc_best": 0.5, "elapsed_s": 10.0})
        if name == "owner.json":
            atomic_write_json(run.path / "owner.json", dead_owner())
        if name == "ending.json":
            reason = "stopped on SIGTERM (preempted, requeued or cancelled by Slurm)"
            atomic_write_json(run.path / "ending.json", {"state": "stopped", "reason": reason, "time": 1.0})
        return run.path / name
    if name == "trainer.json":  # blocked: the training it shares failed in another run
        store = share_training(run, {"status": "failed", "error": "RuntimeError: boom"}, owner="0wner")
        return store / name
    finish_all(run)
    if name == "config.yaml":  # written by an older sweep file: the swept value is read from config.yaml
        atomic_write_json(run.meta, {**run.read_meta(), "swept": {}})
    if name in ("shared.json", "key.json"):
        store = share_training(run, run.read_metrics("train") or {}, owner=run.id)
        return (store if name == "key.json" else run.path) / name
    return run.path / name


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """(sweep folder, {case: (run, bad file)}, intact runs, status output, collect output)."""
    tmp = tmp_path_factory.mktemp("hostile")
    lrs = [round(0.001 * (i + 1), 3) for i in range(len(CASES) + INTACT)]
    sweep_dir, runs = make_sweep(tmp, f"grid: {{optim.lr: {lrs}}}\n")
    by_lr = {swept(r)["optim.lr"]: r for r in runs}
    runs = [by_lr[lr] for lr in lrs]
    cases = {}
    for (name, kind), run in zip(CASES, runs):
        path = prepare(run, name)
        path.write_bytes(bad_content(name, path.read_bytes(), kind))
        cases[name, kind] = (run, path)
    intact = runs[len(CASES) :]
    for run in intact:
        finish_all(run)
    status = run_cli("pipeline.status", str(sweep_dir), cwd=tmp)
    collect = run_cli("pipeline.collect", str(sweep_dir), "--format", "markdown", cwd=tmp)
    return sweep_dir, cases, intact, status, collect


@pytest.mark.parametrize(("name", "kind"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_a_bad_file_is_named_and_every_other_run_shown(hostile, name, kind):
    sweep_dir, cases, intact, status, collect = hostile
    run, path = cases[name, kind]
    for tool, r in (("status", status), ("collect", collect)):
        assert r.returncode == 0 and "Traceback" not in r.stderr, f"{tool}:\n{r.stderr[-3000:]}"
        assert str(path) in r.stdout, f"{tool} does not name {path}:\n{r.stdout[-6000:]}"
        for other in [*(c[0] for c in cases.values()), *intact]:
            assert other.id in r.stdout, f"{tool} does not show run {other.id}"
    md = (sweep_dir / "results.md").read_text()
    rows = [line for line in md.split("\n\n")[0].splitlines() if line.startswith("| ")]
    for good in intact:  # the intact runs keep their figures
        (row,) = [line for line in rows if line.startswith(f"| {good.id} |")]
        assert "84.00%" in row and row.endswith("| done |"), row
        assert (good.tensorboard / "events.out.tfevents.0.pipeline-hparams").is_file()


def manifest_sweep(tmp: Path, kind: str) -> tuple[Path, list[RunDir]]:
    sweep_dir, runs = make_sweep(tmp, "grid: {optim.lr: [0.1, 0.2]}\n", name=f"m-{kind}")
    finish_all(runs[0])
    atomic_write_json(runs[1].progress, {"epoch": 1, "epochs": 3, "val_acc_best": 0.5, "elapsed_s": 10.0})
    path = sweep_dir / "manifest.json"
    atomic_write_json(path, {"runs": {runs[1].id: {"cluster": "slurm", "job_id": "999999999"}}, "history": []})
    path.write_bytes(bad_content("manifest.json", path.read_bytes(), kind))
    return sweep_dir, runs


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_manifest_is_named_and_every_run_shown(tmp_path, kind):
    sweep_dir, runs = manifest_sweep(tmp_path, kind)
    before = (sweep_dir / "manifest.json").read_bytes()
    for tool, *flags in (("pipeline.status",), ("pipeline.collect", "--format", "markdown")):
        r = run_cli(tool, str(sweep_dir), *flags, cwd=tmp_path)
        assert r.returncode == 0 and "Traceback" not in r.stderr, f"{tool}:\n{r.stderr[-3000:]}"
        assert str(sweep_dir / "manifest.json") in r.stdout, f"{tool}:\n{r.stdout}"
        assert all(run.id in r.stdout for run in runs), r.stdout
    assert (sweep_dir / "manifest.json").read_bytes() == before  # readers never move or rewrite it


# --------------------------------------------------------------------------------------------------
# folders that hold a config.yaml but are no runs
# --------------------------------------------------------------------------------------------------

JUNK = {
    "list": b"- a\n- b\n",
    "word": b"hello\n",
    "number": b"42\n",
    "binary": b"\x00\x01\x02\xff",
    "foreign": b"name: not a run\nsteps: 3\n",
}


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path below ``folder`` with its bytes (None for folders)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def test_folders_whose_config_is_no_run_config_are_named_and_left_untouched(tmp_path):
    sweep_dir, runs = make_sweep(tmp_path, "grid: {optim.lr: [0.1, 0.2]}\n")
    finish_all(runs[0])  # the other stays pending
    for name, content in JUNK.items():
        (sweep_dir / f"junk-{name}").mkdir()
        (sweep_dir / f"junk-{name}" / "config.yaml").write_bytes(content)
    before = {name: tree(sweep_dir / f"junk-{name}") for name in JUNK}
    status = run_cli("pipeline.status", str(sweep_dir), cwd=tmp_path)
    collect = run_cli("pipeline.collect", str(sweep_dir), "--format", "markdown", cwd=tmp_path)
    for tool, r in (("status", status), ("collect", collect)):
        assert r.returncode == 0 and "Traceback" not in r.stderr, f"{tool}:\n{r.stderr}"
        for name in JUNK:
            assert f"{sweep_dir / f'junk-{name}'} holds nothing else of a run" in r.stdout, f"{tool}:\n{r.stdout}"
        assert all(run.id in r.stdout for run in runs)
    assert "2 runs: 1 pending, 0 running, 1 done" in status.stdout  # the junk is no pending run
    md = (sweep_dir / "results.md").read_text()
    assert not any(line.startswith("| junk-") for line in md.splitlines())
    assert "**pending**: not submitted yet" in md and md.count("**pending**") == 1
    assert {name: tree(sweep_dir / f"junk-{name}") for name in JUNK} == before  # nothing written into them
    assert (runs[0].tensorboard / "events.out.tfevents.0.pipeline-hparams").is_file()

    only_junk = tmp_path / "runs" / "junk"
    (only_junk / "a").mkdir(parents=True)
    (only_junk / "a" / "config.yaml").write_bytes(JUNK["list"])
    r = run_cli("pipeline.collect", str(only_junk), cwd=tmp_path)
    assert r.returncode == 2 and "holds no run folders" in r.stderr and "holds nothing else of a run" in r.stderr
    assert tree(only_junk) == {"a": None, "a/config.yaml": JUNK["list"]}

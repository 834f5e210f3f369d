"""Train once, compress many (pipeline.share): stage keys, the shared store and its links, who trains.

The end-to-end sweeps (local executor, real processes) are in tests/test_share_sweep.py."""

from __future__ import annotations

import copy
import os
import zipfile
from pathlib import Path

from omegaconf import OmegaConf

from pipeline import share
from pipeline.config import load_config, run_id, tree_run_id
from pipeline.jobs.procs import ProcessIdentity
from pipeline.rundir import SHARED_TRAIN_LINKS, RunDir, atomic_write_json


def tree(*overrides: str) -> dict:
    return OmegaConf.to_container(load_config([], list(overrides)), resolve=True)


def test_training_key_ignores_exactly_the_settings_training_does_not_read():
    base = tree()
    k = share.stage_keys(base)
    for other in (
        tree("prune.method=unstructured"),
        tree("prune.method=structured", "prune.sparsity=0.3"),
        tree("quant.method=int8"),
        tree("slurm.time_min=5", "slurm.partition=gpu"),
        tree("measure.compile=false"),
        tree("output.log_every=3"),
        tree("share.train=false"),
    ):
        assert share.training_key(other) == k["train"]
    for other in (
        tree("optim.lr=0.05"),
        tree("train.seed=1"),
        tree("model.name=resnet32"),
        tree("data.val_size=10"),
        tree("schedule.name=step"),
        tree("slurm.tasks_per_node=2"),  # more ranks: other weights
        tree("prune.method=unstructured", "prune.during=train"),  # pruning inside training
    ):
        assert share.training_key(other) != k["train"]


def test_prune_and_quantize_keys_chain_on_the_earlier_stage():
    a = share.stage_keys(tree("prune.method=unstructured", "quant.method=int8"))
    b = share.stage_keys(tree("prune.method=unstructured", "quant.method=fp16"))
    c = share.stage_keys(tree("prune.method=unstructured", "quant.method=int8", "optim.lr=0.05"))
    assert a["prune"] == b["prune"] and a["quantize"] != b["quantize"]
    assert c["prune"] != a["prune"] and c["quantize"] != a["quantize"]
    # a stage that does nothing does not depend on its other settings
    none1 = share.stage_keys(tree("prune.sparsity=0.2"))
    none2 = share.stage_keys(tree("prune.sparsity=0.7"))
    assert none1["prune"] == none2["prune"]


def test_training_key_ignores_evaluation_batch_and_unused_workers_and_keeps_stored_keys():
    base = share.stage_keys(tree())
    assert base == {"train": "996293938cc0", "prune": "b581e6a7290a", "quantize": "c48702943dce"}  # as stored before
    assert share.training_key(tree("train.eval_batch_size=64")) == base["train"]
    assert share.training_key(tree("data.loader=device", "train.num_workers=0")) == base["train"]
    workers = tree("data.loader=dataloader", "train.num_workers=2")  # worker seeding draws the augmentations
    assert share.training_key(workers) != share.training_key(tree("data.loader=dataloader", "train.num_workers=4"))
    during = ("prune.method=unstructured", "prune.during=train")  # the fine-tune settings of a pruning in training
    assert share.training_key(tree(*during, "prune.epochs=3", "prune.importance=l1")) == share.training_key(
        tree(*during)
    )
    assert share.training_key(tree(*during, "prune.sparsity=0.7")) != share.training_key(tree(*during))
    structured = share.stage_keys(tree("prune.method=structured", "quant.method=int8"))
    assert structured == {"train": "996293938cc0", "prune": "b7319bda10e5", "quantize": "e1c35b5f8d5c"}
    # a stage's settings that do nothing at its method do not split its key
    assert share.stage_keys(tree("prune.method=structured", "quant.method=int8", "prune.scope=layer")) == structured
    assert share.stage_keys(tree("prune.method=structured", "quant.method=int8", "quant.lr=0.5")) == structured


def test_share_section_does_not_change_run_ids():
    cfg = load_config([], [])
    off = load_config([], ["share.train=false"])
    assert run_id(cfg) == run_id(off)
    legacy = OmegaConf.to_container(cfg, resolve=True)
    legacy.pop("share")  # a config.yaml written before the section existed keeps its id
    assert tree_run_id(legacy) == run_id(cfg)


def test_links_are_relative_and_survive_moving_the_output_root(tmp_path):
    t = tree()
    out = tmp_path / "out"
    run = RunDir(out / "sweep" / "abc")
    run.path.mkdir(parents=True)
    store = share.train_store(out / "sweep", share.training_key(t))
    share.link_training(run, store, t)
    assert run.shared_store() == store
    assert run.read_metrics("train") is None and run.status() == "pending"  # dangling link: not yet
    for rel in SHARED_TRAIN_LINKS:
        assert (run.path / rel).is_symlink() and not os.path.isabs(os.readlink(run.path / rel))
    atomic_write_json(store / "metrics" / "train.json", {"status": "done", "test_acc": 0.5})
    assert run.read_metrics("train")["test_acc"] == 0.5
    os.rename(out, tmp_path / "moved")
    moved = RunDir(tmp_path / "moved" / "sweep" / "abc")
    assert moved.read_metrics("train")["test_acc"] == 0.5
    assert moved.shared_store() == tmp_path / "moved" / ".shared" / "train" / store.name
    # a write by the run replaces its link and leaves the shared record alone
    moved.write_metrics("train", {"status": "failed"})
    assert RunDir(moved.shared_store()).read_metrics("train")["status"] == "done"


def test_archive_removes_links_and_keeps_the_shared_result(tmp_path):
    t = tree()
    run = RunDir(tmp_path / "out" / "sweep" / "abc")
    run.path.mkdir(parents=True)
    store = share.train_store(run.path.parent, share.training_key(t))
    share.link_training(run, store, t)
    atomic_write_json(store / "metrics" / "train.json", {"status": "done"})
    (store / "models").mkdir()
    with zipfile.ZipFile(store / "models" / "trained.pt", "w") as weights:  # a model file is a zip archive
        weights.writestr("data.pkl", b"weights")
    kept = (store / "models" / "trained.pt").read_bytes()
    run.write_metrics("prune", {"status": "done"})
    dest = run.archive()
    assert dest is not None and (dest / "metrics" / "prune.json").is_file()
    assert not any((dest / rel).is_symlink() for rel in SHARED_TRAIN_LINKS)
    assert (store / "models" / "trained.pt").read_bytes() == kept
    assert share.store_record(store)["status"] == "done"


def _owner_and_follower(tmp_path: Path) -> tuple[RunDir, RunDir, Path]:
    """Two run folders linked to one shared training store (not trained)."""
    t = tree()
    sweep = tmp_path / "out" / "sweep"
    owner, follower = RunDir(sweep / "own"), RunDir(sweep / "fol")
    store = share.train_store(sweep, share.training_key(t))
    for r in (owner, follower):
        r.path.mkdir(parents=True)
        share.link_training(r, store, t)
    return owner, follower, store


def test_a_shared_model_file_that_is_visibly_broken_is_not_reused(tmp_path):
    """The login node's look at a done shared training's trained.pt (torch-free): a truncated or empty
    file reads as a failed training naming it, so no run reuses it; a whole one (or none: the job that
    needs it decides) leaves the record as it is."""
    t = tree()
    sweep = tmp_path / "out" / "sweep"
    store = share.train_store(sweep, share.training_key(t))
    atomic_write_json(store / "metrics" / "train.json", {"status": "done", "test_acc": 0.5})
    assert share.store_record(store)["status"] == "done"  # no model file: left to the job
    model = store / "models" / "trained.pt"
    model.parent.mkdir()
    with zipfile.ZipFile(model, "w") as weights:
        weights.writestr("data.pkl", b"weights" * 100)
    assert share.store_record(store)["status"] == "done"
    model.write_bytes(model.read_bytes()[:300])
    record = share.store_record(store)
    assert record["status"] == "failed" and f"{model} is unreadable" in record["error"] and record["test_acc"] == 0.5
    assert share.assign([(RunDir(sweep / "x"), t, False)], sweep)["x"].role == "train"  # not "reuse"
    assert RunDir(store).read_metrics("train")["status"] == "done"  # the look writes nothing


def test_blocked_by_names_the_owner_and_the_error(tmp_path):
    owner, follower, store = _owner_and_follower(tmp_path)
    share.write_owner(store, owner, "local", "1")
    atomic_write_json(store / "metrics" / "train.json", {"status": "failed", "error": "RuntimeError: boom"})
    assert owner.status() == "failed" and owner.blocked_by() is None
    assert follower.status() == "blocked"
    assert follower.blocked_by() == ("own", "RuntimeError: boom")


def test_assign_one_owner_per_training_key(tmp_path):
    sweep = tmp_path / "out" / "sweep"
    a = tree("prune.method=none")
    b = tree("prune.method=unstructured")
    c = tree("prune.method=structured", "model.shortcut=B")  # another architecture: its own training
    d = copy.deepcopy(a)
    d["share"]["train"] = False
    rows = []
    for name, t in (("a", a), ("b", b), ("c", c), ("d", d)):
        (sweep / name).mkdir(parents=True)
        rows.append((RunDir(sweep / name), t, False))
    got = share.assign(rows, sweep)
    assert got["a"].role == "train" and got["c"].role == "train" and "d" not in got
    assert got["b"].role == "follow" and got["b"].owner == "a" and got["b"].after_job is None
    # recorded: everyone reuses it
    atomic_write_json(got["a"].store / "metrics" / "train.json", {"status": "done"})
    again = share.assign(rows, sweep)
    assert again["a"].role == again["b"].role == "reuse"


def test_assign_follows_an_earlier_owner_job_still_alive(tmp_path):
    sweep = tmp_path / "out" / "second"
    t = tree()
    first = RunDir(tmp_path / "out" / "first" / "x")
    store = share.train_store(sweep, share.training_key(t))
    share.write_owner(store, first, "local", str(os.getpid()))  # this process: alive
    (sweep / "y").mkdir(parents=True)
    got = share.assign([(RunDir(sweep / "y"), t, False)], sweep, "local")
    assert got["y"].role == "follow" and got["y"].owner == "x" and got["y"].after_job == str(os.getpid())
    share.write_owner(store, first, "local", "999999999")  # no such process: the new run trains
    assert share.assign([(RunDir(sweep / "y"), t, False)], sweep, "local")["y"].role == "train"


def test_a_run_that_trained_in_its_own_folder_keeps_its_training(tmp_path):
    sweep = tmp_path / "out" / "sweep"
    run = RunDir(sweep / "old")
    run.write_metrics("train", {"status": "done"})
    assert share.has_own_training(run)
    assert share.assign([(run, tree(), False)], sweep) == {}
    assert share.assign([(run, tree(), True)], sweep)["old"].role == "train"  # --rerun all archives it first


def test_store_root_is_beside_the_sweep_folders(tmp_path):
    assert share.store_root(tmp_path / "runs" / "s") == tmp_path / "runs" / ".shared"
    assert Path(share.train_store(tmp_path / "runs" / "s", "k")).parts[-3:] == (".shared", "train", "k")


def test_study_3_sweep_plans_one_googlenet_training(tmp_path):
    from tests.conftest import REPO, run_cli

    r = run_cli(
        "pipeline.sweep",
        str(REPO / "sweeps/compression.yaml"),
        "--dry-run",
        "--cluster",
        "local",
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert "1 training(s) in all" in r.stdout and r.stdout.count("waits for") == 2
    # each run's stages: the unpruned one has no prune stage to run, the pruned ones prune in the store
    stages = [line for line in r.stdout.splitlines() if "trains" in line or "waits for" in line]
    assert len(stages) == 3 and all(line.rstrip(" │").endswith("runs quantize, measure") for line in stages), stages
    assert sum("prunes " in line for line in stages) == 2
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_status_shows_a_shared_prunings_progress_while_it_runs(tmp_path):
    """The run's progress.json links to its training's; a shared fine-tune's epochs are in the pruning's
    store, and status shows those (torch-free: hand-written records in the real layout)."""
    from pipeline.jobs import states as status

    t = tree("prune.method=unstructured")
    sweep = tmp_path / "out" / "sweep"
    run = RunDir(sweep / "r1")
    run.path.mkdir(parents=True)
    atomic_write_json(run.meta, {"id": "r1", "swept": {}})
    run.config.write_text("x: 1\n")
    train = share.train_store(sweep, share.training_key(t))
    prune = share.stage_store(sweep, "prune", share.stage_key(t, "prune"))
    share.link_training(run, train, t)
    share.link_stage(run, "prune", prune, t)
    atomic_write_json(train / "metrics" / "train.json", {"status": "done"})
    atomic_write_json(train / "progress.json", {"epoch": 3, "epochs": 3, "stage": "train"})
    atomic_write_json(prune / "progress.json", {"epoch": 1, "epochs": 2, "stage": "prune"})
    (state,) = status.run_states(sweep)
    assert state.epoch == "prune 1/2"
    atomic_write_json(prune / "metrics" / "prune.json", {"status": "done"})
    (state,) = status.run_states(sweep)
    assert state.epoch == "3/3"  # the pruning is over: the run's own progress again


def test_a_follower_in_its_owners_job_slot_does_not_wait_for_its_own_job(tmp_path, monkeypatch):
    """A local job slot runs several runs one after another. If the owner's turn ended without a record
    (it crashed before training), the next run of the same job must take the training over: waiting for
    the owner's job, which is this very job, would never end."""
    import subprocess
    import threading

    owner, follower, store = _owner_and_follower(tmp_path)
    job = subprocess.Popen(["sleep", "60"])  # the owner's job (a local job's id is its controller's PID)
    try:
        # with the job's identity, as a submission records it (a PID alone names no process: see procs.py)
        share.write_owner(store, owner, "local", str(job.pid), ProcessIdentity.of(job.pid).record())
        assert share.owner_active(share.read_owner(store))
        monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "1")  # the follower runs in another job: it waits
        result: list = []
        waiter = threading.Thread(
            target=lambda: result.append(share.wait_for_owner(follower, store, poll_s=0.01)), daemon=True
        )
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not result
        atomic_write_json(store / "metrics" / "train.json", {"status": "done"})  # its owner's training ends
        waiter.join(10)
        assert not waiter.is_alive() and result == [{"status": "done"}]
        (store / "metrics" / "train.json").unlink()
        monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", str(job.pid))  # the follower is in the owner's job slot
        result.clear()
        waiter = threading.Thread(
            target=lambda: result.append(share.wait_for_owner(follower, store, poll_s=0.01)), daemon=True
        )
        waiter.start()
        waiter.join(5)
        assert not waiter.is_alive() and result == [None]  # at once: it takes the training over
    finally:
        job.kill()
        job.wait()

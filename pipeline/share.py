"""Train once, compress many: the key of each stage's result, and the shared store of trainings.

A stage's key is a hash of exactly the settings its result depends on:

- train: data, model, optim, schedule, train, the number of ranks (slurm.nodes x tasks_per_node), and
  prune when pruning runs inside training (``prune.during: train``);
- prune: the training key and the prune settings (only the method when it is ``none``);
- quantize: the prune key and the quant settings (only the method when it is ``none``).

measure is per run. Runs of equal training keys share one training, stored once under the output root::

    <out>/.shared/train/<key>/
        key.json        the key and the settings it hashes (for people)
        trainer.json    the run that does the training, its cluster and job id (written at submission)
        metrics/train.json, models/trained.pt, checkpoints/last.pt, progress.json, tb/, run.log

and runs of equal prune keys (a pruning fine-tune, ``prune.during: finetune``, of a shared training)
share one pruning the same way, in ``<out>/.shared/prune/<key>/`` (metrics/prune.json, models/pruned.pt,
checkpoints/prune.pt, tb/prune, run.log, key.json, trainer.json: the run that prunes; and
models/trained.pt, a link to the training it starts from).

and reached from every run folder through ``shared.json`` and relative symlinks
(:data:`pipeline.rundir.SHARED_TRAIN_LINKS`), so collect, status and TensorBoard see the training as
each run's own. A later sweep in the same ``--out`` finds it there. No file locks: on Slurm one owner job
trains and the other runs wait for it through a job dependency; locally a follower waits for the owner's
record (:func:`wait_for_owner`). Torch-free: sweep, status and collect import it on login nodes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.config import settled
from pipeline.rundir import (
    SHARED_LINKS,
    SHARED_POINTER,
    UNREADABLE_OUTPUT,
    RunDir,
    atomic_write_json,
    model_file_problem,
    read_json,
    resumable,
)

STORE = ".shared"
TRAIN_SECTIONS = ("data", "model", "optim", "schedule", "train")
OWNER_GRACE_S = 120.0  # a trainer.json without a job id yet (the sweep is still submitting) counts as alive
POLL_S = 2.0

log = logging.getLogger("pipeline.share")


def _hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def training_settings(tree: Mapping[str, Any]) -> dict[str, Any]:
    """What a run's training result depends on, from its resolved config (a plain nested dict).

    Settings that change nothing (:func:`pipeline.config.inert_settings`: ``train.eval_batch_size``,
    ``train.num_workers`` with the device loader, the fine-tune's settings of a pruning inside training)
    count at their default value rather than being left out: the keys of trainings stored before, made
    with those settings at their defaults, stay the same; a training made with other values is done
    once more under the new key."""
    tree = settled(tree)
    out: dict[str, Any] = {s: tree[s] for s in TRAIN_SECTIONS}
    # what is evaluated after each epoch does not change the weights (nan_check_steps stays in: keys
    # of trainings already stored must not change)
    out["train"] = {k: v for k, v in (out["train"] or {}).items() if k != "test_every_epoch"}
    slurm = tree.get("slurm") or {}
    out["ranks"] = {k: slurm.get(k, 1) for k in ("nodes", "tasks_per_node")}  # DDP changes the weights
    prune = tree.get("prune") or {}
    if prune.get("method", "none") != "none" and prune.get("during") == "train":
        out["prune"] = prune  # the sparsity schedule runs inside the training loop
    return out


def _method_only(section: Mapping[str, Any]) -> Mapping[str, Any]:
    # a stage that does nothing depends on none of its other settings
    return {"method": "none"} if section.get("method", "none") == "none" else section


def stage_keys(tree: Mapping[str, Any]) -> dict[str, str]:
    """{"train", "prune", "quantize"} -> key of that stage's result."""
    train = _hash(training_settings(tree))
    tree = settled(tree)  # a stage's settings that do nothing at its method: at their defaults
    prune = _hash({"train": train, "prune": _method_only(tree.get("prune") or {})})
    quantize = _hash({"prune": prune, "quant": _method_only(tree.get("quant") or {})})
    return {"train": train, "prune": prune, "quantize": quantize}


def training_key(tree: Mapping[str, Any]) -> str:
    return stage_keys(tree)["train"]


def sharing_on(tree: Mapping[str, Any]) -> bool:
    return bool((tree.get("share") or {}).get("train", True))


def prune_sharing_on(tree: Mapping[str, Any]) -> bool:
    """Whether the run's pruning is shared: its training is, and it prunes the trained model and fine-tunes
    it (pruning inside training is part of the training's key; method none costs nothing)."""
    prune = tree.get("prune") or {}
    return (
        sharing_on(tree)
        and bool((tree.get("share") or {}).get("prune", True))
        and prune.get("method", "none") != "none"
        and prune.get("during", "finetune") == "finetune"
    )


def stage_key(tree: Mapping[str, Any], stage: str) -> str:
    return stage_keys(tree)[stage]


def stage_sharing_on(tree: Mapping[str, Any], stage: str) -> bool:
    return sharing_on(tree) if stage == "train" else prune_sharing_on(tree)


def store_root(sweep_dir: Path) -> Path:
    """The shared store of every sweep under the same output root (``<out>/<sweep>`` -> ``<out>/.shared``)."""
    return Path(os.path.normpath(Path(sweep_dir).absolute().parent / STORE))


def train_store(sweep_dir: Path, key: str) -> Path:
    return store_root(sweep_dir) / "train" / key


def stage_store(sweep_dir: Path, stage: str, key: str) -> Path:
    """``<out>/.shared/<stage>/<key>`` (stage train or prune)."""
    return store_root(sweep_dir) / stage / key


OWN_FILES = {
    "train": ("metrics/train.json", "models/trained.pt", "checkpoints/last.pt"),
    "prune": ("metrics/prune.json", "models/pruned.pt", "checkpoints/prune.pt"),
}


def has_own_training(run: RunDir) -> bool:
    """Whether the run trained (or began training) in its own folder: it keeps that training, nothing of
    it is replaced by a link."""
    return has_own_stage(run, "train")


def has_own_stage(run: RunDir, stage: str) -> bool:
    return any((run.path / rel).exists() and not (run.path / rel).is_symlink() for rel in OWN_FILES[stage])


def store_record(store: Path, stage: str = "train") -> dict[str, Any] | None:
    """The shared stage's record (metrics/<stage>.json), None while there is none. A done record whose
    model file is there but visibly broken (empty, truncated: a cheap look at the file, no torch) reads
    as failed, naming the file: no run reuses it, and ``--rerun failed`` makes it again. (A missing file
    is left to the job that needs it, which marks the stage failed the same way.)"""
    record = RunDir(store).read_metrics(stage)
    if record is None or record.get("status") != "done":
        return record
    model = OWN_FILES[stage][1]
    problem = model_file_problem(store / model) if (store / model).exists() else None
    if problem is None:
        return record
    error = f"{store / model} is unreadable ({problem}); --rerun failed makes it again"
    return {**record, "status": "failed", "error": error, UNREADABLE_OUTPUT: model}


def link_training(run: RunDir, store: Path, tree: Mapping[str, Any]) -> None:
    """Point the run at the shared training in ``store``: shared.json and the relative symlinks (made
    before the training exists; a link that dangles reads as "not yet"). Idempotent. A file the run
    wrote itself is never replaced (a fine-tune's progress.json replaces its link, and stays)."""
    link_stage(run, "train", store, tree)


def link_stage(run: RunDir, stage: str, store: Path, tree: Mapping[str, Any]) -> None:
    """:func:`link_training` for ``stage`` (train or prune). A shared pruning's store also gets
    models/trained.pt, a link to the shared training it prunes (the run must share that training)."""
    store.mkdir(parents=True, exist_ok=True)
    if not (store / "key.json").exists():
        settings: Any = training_settings(tree)
        if stage == "prune":
            settings = {"train": training_key(tree), "prune": tree.get("prune")}
        atomic_write_json(store / "key.json", {"key": store.name, "stage": stage, "settings": settings})
    if stage == "prune":
        trained = run.shared_store("train")
        if trained is None:
            raise ValueError(f"run {run.id}: a shared pruning needs its training shared too")
        _link(store / "models" / "trained.pt", trained / "models" / "trained.pt")
    pointer = read_json(run.path / SHARED_POINTER)
    pointer = dict(pointer) if isinstance(pointer, dict) else {}
    wanted_pointer = {**pointer, stage: {"key": store.name, "store": os.path.relpath(store, run.path.absolute())}}
    if pointer != wanted_pointer:
        atomic_write_json(run.path / SHARED_POINTER, wanted_pointer)
    for rel, target in SHARED_LINKS[stage].items():
        _link(run.path / rel, store / target)


def _link(link: Path, target: Path) -> None:
    """A relative symlink ``link`` -> ``target``; a file that is not a link is left as it is."""
    wanted = os.path.relpath(target, link.parent.absolute())
    if link.is_symlink():
        if os.readlink(link) == wanted:
            return
        link.unlink()
    elif link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(wanted, link)


def unlink_training(run: RunDir) -> None:
    """Undo :func:`link_training` (share.train=false): the run trains in its own folder from now on (and
    prunes there too)."""
    run.unlink_shared()
    (run.path / SHARED_POINTER).unlink(missing_ok=True)


def unlink_pruning(run: RunDir) -> None:
    """Undo a shared pruning's links only (share.prune=false): the run prunes in its own folder."""
    run.unlink_shared(("prune",))
    pointer = read_json(run.path / SHARED_POINTER)
    if isinstance(pointer, dict) and "prune" in pointer:
        atomic_write_json(run.path / SHARED_POINTER, {k: v for k, v in pointer.items() if k != "prune"})


def read_owner(store: Path) -> dict[str, Any] | None:
    owner = read_json(store / "trainer.json")
    return owner if isinstance(owner, dict) else None


def write_owner(
    store: Path, run: RunDir, cluster: str, job_id: str | None, entry: Mapping[str, Any] | None = None
) -> None:
    """``entry``: the job's manifest record (a local job's identity beyond its process id)."""
    atomic_write_json(
        store / "trainer.json",
        {
            "run": str(run.path.absolute()),
            "run_id": run.id,
            "cluster": cluster,
            "job_id": job_id,
            "entry": dict(entry or {}),
            "since": time.time(),
        },
    )


def is_owner(run: RunDir, owner: Mapping[str, Any] | None) -> bool:
    return owner is not None and os.path.normpath(str(owner.get("run", ""))) == os.path.normpath(run.path.absolute())


def owner_active(owner: Mapping[str, Any] | None) -> bool:
    """Whether the owner's job may still do the training (queued or running)."""
    if owner is None:
        return False
    job_id = owner.get("job_id")
    if not job_id:
        return time.time() - float(owner.get("since", 0)) < OWNER_GRACE_S
    from pipeline.launch import job_is_active

    entry = owner.get("entry")
    return job_is_active(
        str(owner.get("cluster", "")), str(job_id), entry if isinstance(entry, dict) and entry else None
    )


def _owner_ran_before_me(run: RunDir, owner: Mapping[str, Any] | None) -> bool:
    """The owner is another run of this very job (a local job slot runs its runs one after another): it
    has had its turn and ended without a record, so waiting for its job would wait for this one."""
    if owner is None or owner.get("run_id") == run.id or not owner.get("job_id"):
        return False
    mine = {str(os.getpid()), os.environ.get("SUBMITIT_LOCAL_JOB_ID", ""), os.environ.get("SLURM_JOB_ID", "")}
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        mine.add(f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}")
    return str(owner["job_id"]) in mine - {""}


def wait_for_owner(run: RunDir, store: Path, poll_s: float = POLL_S, stage: str = "train") -> dict[str, Any] | None:
    """Wait while another run's job is doing the shared stage and has not recorded it (or is resuming it
    after a failed write); the record then (None, or the resumable failure, when the owner stopped
    without a result: this run may take the stage over)."""
    said = False
    while True:
        record = store_record(store, stage)
        owner = read_owner(store)
        pending = record is None or resumable(record)  # a stage that failed writing is resumed by its owner
        if not pending or is_owner(run, owner) or not owner_active(owner) or _owner_ran_before_me(run, owner):
            return record
        if not said:
            log.info("run %s: waiting for the shared %s %s (run %s)", run.id, stage, store, (owner or {}).get("run_id"))
            said = True
        time.sleep(poll_s)


@dataclass
class Share:
    """How one submitted run gets its training."""

    key: str
    store: Path
    role: str  # train (the owner) | follow (waits for the owner) | reuse (already trained)
    owner: str | None = None  # run id of the owner (follow)
    after_job: str | None = None  # follow an owner submitted earlier: its job id
    owner_cluster: str | None = None

    stage: str = "train"

    def describe(self) -> str:
        what = "training" if self.stage == "train" else "pruning"
        if self.role == "reuse":
            return f"reuses {what} {self.key}"
        if self.role == "train":
            return f"{'trains' if self.stage == 'train' else 'prunes'} {self.key}"
        return f"waits for {self.owner} ({what} {self.key})"


def assign(
    runs: Sequence[tuple[RunDir, Mapping[str, Any], bool]],
    sweep_dir: Path,
    cluster: str | None = None,
    stage: str = "train",
) -> dict[str, Share]:
    """For runs to submit, ``(run folder, resolved config, whether its own result of ``stage`` is
    archived first)`` in sweep order: run id -> :class:`Share` for those whose ``stage`` (train or prune)
    is shared. Per key the first run does it, unless it is already recorded (all reuse it) or a job from
    an earlier submission is doing it (all follow that job). A failed record is the caller's to archive
    or report."""
    out: dict[str, Share] = {}
    owners: dict[str, Share] = {}
    for run, tree, redone in runs:
        if not stage_sharing_on(tree, stage) or (has_own_stage(run, stage) and not redone):
            continue
        key = stage_key(tree, stage)
        store = stage_store(sweep_dir, stage, key)
        if key in owners:
            first = owners[key]
            role = "reuse" if first.role == "reuse" else "follow"
            owner = first.owner if first.role == "follow" else run_owner_id(first, out)
            out[run.id] = Share(key, store, role, owner, first.after_job, first.owner_cluster, stage)
            continue
        record = store_record(store, stage)
        earlier = read_owner(store)
        if record is not None and record.get("status") != "failed":
            share = Share(key, store, "reuse", stage=stage)
        elif (
            record is None
            and earlier is not None
            and not is_owner(run, earlier)
            and _owner_job_active(earlier, cluster)
        ):
            share = Share(
                key,
                store,
                "follow",
                str(earlier.get("run_id")),
                str(earlier.get("job_id")),
                str(earlier.get("cluster")),
                stage,
            )
        else:
            share = Share(key, store, "train", stage=stage)
        owners[key] = share
        out[run.id] = share
    return out


def run_owner_id(first: Share, out: Mapping[str, Share]) -> str | None:
    """The run id of the owner share ``first`` (the run it was assigned to)."""
    return next((rid for rid, s in out.items() if s is first), None)


def _owner_job_active(owner: Mapping[str, Any], cluster: str | None) -> bool:
    # a job id is only worth depending on from the same scheduler
    if not owner.get("job_id"):
        return False
    return (cluster is None or owner.get("cluster") == cluster) and owner_active(owner)

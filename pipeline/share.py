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

and reached from every run folder through ``shared.json`` (written at submission) and relative symlinks
(:data:`pipeline.rundir.SHARED_TRAIN_LINKS`, made by the run's job when it starts: thousands of runs
submit in seconds; until then readers find the record through ``shared.json``), so collect, status and
TensorBoard see the training as each run's own. A later sweep in the same ``--out`` finds it there.
Who trains is claimed at submission by creating trainer.json with ``link()`` (:func:`claim`): of two
sweeps submitted at the same moment, one trains and the other waits. No file locks: on Slurm one owner
job trains and the other runs wait for it through a job dependency; locally a follower waits for the
owner's record (:func:`wait_for_owner`). Torch-free: sweep, status and collect import it on login nodes.
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
from pipeline.jobs.alive import job_is_active, this_job
from pipeline.jobs.manifest import manifest_path, read_manifest
from pipeline.jobs.procs import ProcessIdentity
from pipeline.rundir import (
    SHARED_LINKS,
    SHARED_POINTER,
    UNREADABLE_OUTPUT,
    RunDir,
    atomic_write_json,
    atomic_write_text,
    link_exclusive,
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
    if not run.path.is_dir():  # (a new run: most of a large new sweep)
        return False
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
    """:func:`link_training` for ``stage`` (train or prune), as the run's job does when it starts. A
    shared pruning's store also gets models/trained.pt, a link to the shared training it prunes (the
    run must share that training)."""
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
    point_to_stores(run, {stage: store})
    for rel, target in SHARED_LINKS[stage].items():
        _link(run.path / rel, store / target)


def point_to_stores(run: RunDir, stores: Mapping[str, Path], fsync: bool = True) -> Path | None:
    """``shared.json``: where each shared stage (train, prune) of the run lives; what submission writes.
    The links are the job's to make (:func:`link_stage`); links left from a store the run no longer
    uses are removed, so that readers go through the pointer. Returns the file when it was written
    (``fsync=False``: the caller syncs it with others), None when it already said so."""
    pointer = read_json(run.path / SHARED_POINTER)
    pointer = dict(pointer) if isinstance(pointer, dict) else {}
    wanted = {**pointer, **pointer_entries(run.path, stores)}
    if pointer == wanted:
        return None
    moved = [s for s in stores if isinstance(pointer.get(s), dict) and pointer[s].get("store") != wanted[s]["store"]]
    if moved:
        run.unlink_shared(tuple(moved))
    path = run.path / SHARED_POINTER
    atomic_write_text(path, json.dumps(wanted, indent=2) + "\n", fsync=fsync)
    return path


def pointer_entries(run_path: Path, stores: Mapping[str, Path]) -> dict[str, dict[str, str]]:
    """shared.json's entries for ``stores`` (stage -> store) of the run folder ``run_path``: relative
    paths, so that moving the whole output folder keeps them valid."""
    here = Path(run_path).absolute()
    return {stage: {"key": store.name, "store": os.path.relpath(store, here)} for stage, store in stores.items()}


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


OWNER_RECORD = "trainer.json"


def read_owner(store: Path) -> dict[str, Any] | None:
    owner = read_json(store / OWNER_RECORD)
    return owner if isinstance(owner, dict) else None


def owner_record(
    run: RunDir,
    cluster: str,
    job_id: str | None,
    entry: Mapping[str, Any] | None = None,
    submission: str | None = None,
) -> dict[str, Any]:
    """trainer.json's content. ``entry``: the job's manifest record (a local job's identity beyond its
    process id). A local job that records itself (its job id is this process) gets this process's
    identity: a PID alone would name whatever process has that number later. A claim made at
    submission has no job id but the submission's token, which the owner's sweep manifest gives the
    job it queued (:func:`owner_job`)."""
    entry = dict(entry or {})
    if cluster == "local" and job_id == str(os.getpid()) and "started" not in entry:
        me = ProcessIdentity.of(os.getpid())
        if me is not None:
            entry.update(started=me.started, host=me.host, boot_id=me.boot_id)
    record = {
        "run": str(run.path.absolute()),
        "run_id": run.id,
        "cluster": cluster,
        "job_id": job_id,
        "entry": entry,
        "since": time.time(),
    }
    return {**record, "submission": submission} if submission else record


def write_owner(
    store: Path,
    run: RunDir,
    cluster: str,
    job_id: str | None,
    entry: Mapping[str, Any] | None = None,
    fsync: bool = True,
) -> None:
    """Record ``run`` (and its job) as the one doing the shared stage in ``store`` (see :func:`owner_record`)."""
    text = json.dumps(owner_record(run, cluster, job_id, entry), indent=2, default=str) + "\n"
    atomic_write_text(store / OWNER_RECORD, text, fsync=fsync)


def take_over(store: Path, run: RunDir) -> None:
    """Record ``run``, done by this process, as the one doing the shared stage in ``store`` (after an owner
    that stopped without a result, or a failed stage redone by hand): its Slurm job, else this very
    process (a local job's training, or one started by hand; :func:`owner_record` names it beyond its PID)."""
    cluster, job = this_job()
    if cluster != "slurm":
        cluster, job = "local", str(os.getpid())
    write_owner(store, run, cluster, job)


def claim(
    store: Path, run: RunDir, cluster: str, submission: str, seen: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """Make ``run`` the owner of the shared stage in ``store`` before its job is submitted, atomically:
    trainer.json is created with ``link()`` (NFS-safe, as the submission lock), so of several sweeps
    submitted at the same moment exactly one gets it. A record already there is replaced when it is
    this run's, unchanged since planning found it dead (``seen``), or dead now; it is moved aside with
    one ``rename()`` that only one claimant wins. Returns None when ``run`` owns the stage now, else
    the record of the live owner that does it (the caller follows it). ``submission``: a token of this
    submission, which the manifest gives the run's job once it is queued (:func:`owner_job`).

    Not fsynced: the caller syncs the file system once before submitting (:func:`pipeline.submit.plan.sync_files`)."""
    store.mkdir(parents=True, exist_ok=True)
    path = store / OWNER_RECORD
    text = json.dumps(owner_record(run, cluster, None, submission=submission), indent=2) + "\n"
    for _ in range(10):
        if link_exclusive(text, path, fsync=False):
            return None
        current = read_owner(store)
        if current is None and not path.exists():
            continue  # moved aside by another claimant meanwhile: try again
        if current is not None and not is_owner(run, current) and current != seen and owner_active(current):
            return current
        _move_aside(path, current)
    raise OSError(f"{path}: could not claim it (other submissions keep replacing it)")


def _move_aside(path: Path, judged: Mapping[str, Any] | None) -> None:
    """Remove the owner record ``judged`` replaceable, unless another claimant replaced it meanwhile."""
    aside = path.with_name(f"{path.name}.{os.getpid()}.{time.monotonic_ns()}.aside")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    moved = read_json(aside)
    if (moved if isinstance(moved, dict) else None) != judged:
        try:  # a fresh claim, not the record judged: put it back
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


def is_owner(run: RunDir, owner: Mapping[str, Any] | None) -> bool:
    return owner is not None and os.path.normpath(str(owner.get("run", ""))) == os.path.normpath(run.path.absolute())


def owner_active(owner: Mapping[str, Any] | None) -> bool:
    """Whether the owner's job may still do the training (queued or running). A claim whose job is not
    queued yet is a submission still under way (:data:`OWNER_GRACE_S`)."""
    if owner is None:
        return False
    job = owner_job(owner)
    if job is None:
        return time.time() - _number(owner.get("since")) < OWNER_GRACE_S
    run = owner.get("run")
    return job_is_active(*job, Path(run).parent if isinstance(run, str) and run else None)


def owner_job(owner: Mapping[str, Any]) -> tuple[str, str, dict[str, Any] | None] | None:
    """(cluster, job id, its manifest entry) of the owner's job: from the record (a job records itself),
    or for a claim made at submission, the job that submission queued for the run, from the owner's
    sweep manifest (found by the claim's token; read once per change of that file). None while
    there is none."""
    job_id = owner.get("job_id")
    if job_id:
        entry = owner.get("entry")
        return str(owner.get("cluster", "")), str(job_id), entry if isinstance(entry, dict) and entry else None
    run, token = owner.get("run"), owner.get("submission")
    if not isinstance(run, str) or not run or not token:
        return None
    found = _manifest_runs(Path(run).parent).get(str(owner.get("run_id")))
    if found is None or found.get("submission") != token:
        return None
    return found["cluster"], found["job_id"], found


_MANIFESTS: dict[Path, tuple[tuple[int, int], dict[str, dict[str, Any]]]] = {}


def _manifest_runs(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """The ``runs`` of a sweep's manifest, parsed again only when the file changed (thousands of owner
    records may name one sweep)."""
    try:
        st = manifest_path(sweep_dir).stat()
    except OSError:
        return {}
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _MANIFESTS.get(sweep_dir)
    if cached is None or cached[0] != stamp:
        cached = _MANIFESTS[sweep_dir] = (stamp, read_manifest(sweep_dir)["runs"])
    return cached[1]


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _owner_ran_before_me(run: RunDir, owner: Mapping[str, Any] | None) -> bool:
    """The owner is another run of this very job (a local job slot runs its runs one after another): it
    has had its turn and ended without a record, so waiting for its job would wait for this one."""
    job = owner_job(owner) if owner is not None else None
    if owner is None or owner.get("run_id") == run.id or job is None:
        return False
    mine = {str(os.getpid()), this_job()[1]}
    return job[1] in mine - {""}


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
    after_job: str | None = None  # follow an owner of another submission: its job id (None: not queued yet)
    foreign: bool = False  # follow: the owner is a run of another submission (this or another sweep)
    stage: str = "train"
    seen: dict[str, Any] | None = None  # train: the owner record planning found (and judged replaceable)
    record: dict[str, Any] | None = None  # the stage's record in the store when planned

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
    an earlier submission is doing it, or a submission under way claimed it (all follow that run). A
    failed record is the caller's to archive or report."""
    out: dict[str, Share] = {}
    owners: dict[str, Share] = {}
    stages = store_root(sweep_dir) / stage  # (once: thousands of runs)
    for run, tree, redone in runs:
        if not stage_sharing_on(tree, stage) or (not redone and has_own_stage(run, stage)):
            continue
        key = stage_key(tree, stage)
        if key in owners:
            first = owners[key]
            role = "reuse" if first.role == "reuse" else "follow"
            owner = first.owner if first.role == "follow" else run_owner_id(first, out)
            foreign = first.foreign and role == "follow"
            out[run.id] = Share(key, first.store, role, owner, first.after_job, foreign, stage, record=first.record)
            continue
        share = _first_share(run, stages / key, key, cluster, stage)
        owners[key] = share
        out[run.id] = share
    return out


def _first_share(run: RunDir, store: Path, key: str, cluster: str | None, stage: str) -> Share:
    """The share of the first run of ``key`` in a submission, from what the store records."""
    if not store.is_dir():  # (a new key: most of a large new sweep)
        return Share(key, store, "train", stage=stage)
    record = store_record(store, stage)
    earlier = read_owner(store)
    if record is not None and record.get("status") != "failed":
        return Share(key, store, "reuse", stage=stage, record=record)
    if record is None and earlier is not None and not is_owner(run, earlier) and _owner_job_active(earlier, cluster):
        job = owner_job(earlier)
        return Share(key, store, "follow", str(earlier.get("run_id")), job[1] if job else None, True, stage)
    return Share(key, store, "train", stage=stage, seen=earlier, record=record)


def run_owner_id(first: Share, out: Mapping[str, Share]) -> str | None:
    """The run id of the owner share ``first`` (the run it was assigned to)."""
    return next((rid for rid, s in out.items() if s is first), None)


def _owner_job_active(owner: Mapping[str, Any], cluster: str | None) -> bool:
    # a job id is only worth depending on from the same scheduler; a claim without one yet is a
    # submission under way (its job id follows in seconds)
    return (cluster is None or owner.get("cluster") == cluster) and owner_active(owner)


def owner_job_id(store: Path) -> str | None:
    """The job id of the owner of ``store`` (None while its submission has not queued it)."""
    owner = read_owner(store)
    job = owner_job(owner) if owner is not None else None
    return job[1] if job else None

"""What a submission does with each run (new, resume, rerun, skip), who does each shared stage, and the
run folders written before anything is submitted. Torch-free."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline import share as sharing
from pipeline.jobs import alive, manifest, owner
from pipeline.jobs.procs import ProcessIdentity
from pipeline.rundir import (
    FINAL_STATUSES,
    SHARED_POINTER,
    STALE_TEMPORARY_S,
    RunDir,
    atomic_write_text,
    clean_stale_temporaries,
    read_json,
    syncfs,
)
from pipeline.submit.expand import PlannedRun, SweepSpec


@dataclass
class Decision:
    run: PlannedRun
    action: str  # new | resume | rerun | skip-done | skip-failed | skip-blocked | skip-active
    note: str = ""
    from_stage: str | None = None  # rerun: the first stage redone (None: all of them)
    share: sharing.Share | None = None  # how a submitted run gets a shared training (None: its own)
    share_prune: sharing.Share | None = None  # how it gets a shared pruning (None: prunes itself or not at all)

    def shares(self) -> list[sharing.Share]:
        return [s for s in (self.share, self.share_prune) if s is not None]


SUBMITTED = ("new", "resume", "rerun")


def plan(runs: Sequence[PlannedRun], sweep_dir: Path, rerun: str | None, active_ids: set[str]) -> list[Decision]:
    decisions = []
    for r in runs:
        rd = RunDir(sweep_dir / r.id)
        if not rd.config.exists():
            decisions.append(Decision(r, "new"))
            continue
        status = rd.status()
        if r.id in active_ids:
            decisions.append(Decision(r, "skip-active", "job still queued or running"))
        elif rerun == "all":
            decisions.append(Decision(r, "rerun", f"was {status}"))
        elif status == "failed" and (failed_write := rd.resumable_failure()) is not None:
            # a write failed (full disk, quota, read-only) and its checkpoint is intact: resume it
            decisions.append(
                Decision(
                    r, "resume", f"{failed_write.get('stage', 'a')} stage failed writing: {failed_write.get('error')}"
                )
            )
        elif rerun == "failed" and status == "failed":
            stage = rd.failed_stage()
            decisions.append(
                Decision(
                    r,
                    "rerun",
                    f"{stage} failed; redo from it" if stage else "was failed",
                    from_stage=None if stage == "train" else stage,
                )
            )
        elif rerun == "failed" and status == "blocked":
            decisions.append(Decision(r, "rerun", "its shared training failed; redo it", from_stage=None))
        elif status == "blocked":
            owner, why = rd.blocked_by() or ("?", "")
            decisions.append(Decision(r, "skip-blocked", f"blocked by {owner}: {why}; use --rerun failed"))
        elif status in FINAL_STATUSES:
            decisions.append(Decision(r, "skip-done", status))
        elif status == "failed":
            decisions.append(Decision(r, "skip-failed", "use --rerun failed"))
        else:
            decisions.append(Decision(r, "resume", status))
    return decisions


def plan_sharing(decisions: Sequence[Decision], sweep_dir: Path, rerun: str | None, cluster: str | None = None) -> None:
    """Decide, per submitted run whose training (and pruning) is shared, whether it does that stage,
    follows another run's job or reuses a recorded result (``Decision.share``, ``Decision.share_prune``;
    reads, writes nothing). A run whose shared stage failed (in another run or sweep) is not submitted
    unless ``rerun`` is "failed": it is blocked."""
    todo = [d for d in decisions if d.action in SUBMITTED]
    rows = [(RunDir(sweep_dir / d.run.id), d.run.config, d.action == "rerun" and d.from_stage is None) for d in todo]
    shares = sharing.assign(rows, sweep_dir, cluster)
    for d in todo:
        sh = shares.get(d.run.id)
        if sh is None:
            continue
        if _blocked(d, sh, rerun):
            continue
        d.share = sh
    # a shared pruning only for runs whose training is shared (its store links the shared trained model)
    todo = [d for d in todo if d.share is not None and d.action in SUBMITTED]
    rows = [
        (RunDir(sweep_dir / d.run.id), d.run.config, d.action == "rerun" and d.from_stage in (None, "prune"))
        for d in todo
    ]
    shares = sharing.assign(rows, sweep_dir, cluster, stage="prune") if rows else {}
    for d in todo:
        sh = shares.get(d.run.id)
        if sh is not None and d.action in SUBMITTED and not _blocked(d, sh, rerun):
            d.share_prune = sh


def _blocked(d: Decision, sh: sharing.Share, rerun: str | None) -> bool:
    """Mark ``d`` skip-blocked when the shared stage it needs failed and this is no --rerun failed."""
    record = sh.record
    if sharing.resumable(record):
        return False  # it failed writing: its owner resumes it from the checkpoint, the others wait again
    if record is not None and record.get("status") == "failed" and rerun != "failed":
        owner = (sharing.read_owner(sh.store) or {}).get("run_id", "another run")
        what = "training" if sh.stage == "train" else "pruning"
        d.action, d.note = "skip-blocked", f"blocked by {owner}: its {what} failed; use --rerun failed"
        d.share = d.share_prune = None
        return True
    return False


def follow_order(to_submit: Sequence[Decision]) -> dict[int, int | str]:
    """For :func:`pipeline.submit.launch.submit`'s ``after``: index of each run that waits for a shared stage
    -> index of its owner in ``to_submit``, or the job id of an owner of another submission ("" while
    that submission has not queued it: locally the run waits for the record in its job). A run that
    waits for a shared pruning waits for that (whose owner in turn waits for, or did, the training)."""
    owner_index = {d.run.id: i for i, d in enumerate(to_submit)}
    after: dict[int, int | str] = {}
    for i, d in enumerate(to_submit):
        sh = d.share_prune if d.share_prune is not None and d.share_prune.role == "follow" else d.share
        if sh is None or sh.role != "follow":
            continue
        if sh.foreign:
            after[i] = sh.after_job or ""
        elif sh.owner in owner_index:
            after[i] = owner_index[sh.owner]
    return after


def claim_shared(
    decisions: Sequence[Decision], sweep_dir: Path, rerun: str | None, cluster: str, submission: str
) -> list[Path]:
    """Claim every shared stage this submission does (:func:`pipeline.share.claim`), before any job is
    submitted. A stage that another submission claimed at the same moment is followed instead: the
    sharing is planned again (those runs now wait for that submission's owner). Returns the owner
    records written (not yet synced)."""
    claimed: set[tuple[str, Path]] = set()
    for _ in range(5):
        lost = False
        for d in decisions:
            for sh in d.shares() if d.action in SUBMITTED else ():
                if sh.role != "train" or (d.run.id, sh.store) in claimed:
                    continue
                if sharing.claim(sh.store, RunDir(sweep_dir / d.run.id), cluster, submission, sh.seen) is None:
                    claimed.add((d.run.id, sh.store))
                else:
                    lost = True
        if not lost:
            return [store / sharing.OWNER_RECORD for _, store in claimed]
        for d in decisions:
            d.share = d.share_prune = None
        plan_sharing(decisions, sweep_dir, rerun, cluster)
    raise OSError(f"{sweep_dir}: the shared stores keep being claimed by other submissions; submit again")


def waiting_for_unqueued(to_submit: Sequence[Decision]) -> set[str]:
    """Run ids that follow another submission's owner not queued yet (its claim has no job id), and
    those that follow them in this submission."""
    out = {
        d.run.id for d in to_submit if any(sh.role == "follow" and sh.foreign and not sh.after_job for sh in d.shares())
    }
    grew = bool(out)
    while grew:
        grew = False
        for d in to_submit:
            if d.run.id not in out and any(sh.role == "follow" and sh.owner in out for sh in d.shares()):
                out.add(d.run.id)
                grew = True
    return out


def trainings(decisions: Sequence[Decision], sweep_dir: Path) -> int:
    """How many trainings submitting ``decisions`` does: one per shared training key that is trained,
    plus each submitted run that trains in its own folder and has not finished doing so."""
    keys = {d.share.key for d in decisions if d.share is not None and d.share.role == "train"}
    own = 0
    for d in decisions:
        if d.action not in SUBMITTED or d.share is not None:
            continue
        record = RunDir(sweep_dir / d.run.id).read_metrics("train")
        redone = d.action == "rerun" and d.from_stage is None
        own += redone or record is None or record.get("status") != "done"
    return len(keys) + own


def write_run(sweep_dir: Path, spec: SweepSpec, r: PlannedRun, unsynced: list[Path] | None = None) -> RunDir:
    """Write config.yaml and meta.json; an existing identical config is left as it is.

    Each file replaces its target atomically. With ``unsynced``, the files are not fsynced one by one
    but listed there, for one :func:`sync_files` over a whole sweep."""
    rd = RunDir(sweep_dir / r.id)
    text = r.yaml
    if not rd.config.exists() or rd.config.read_text() != text:
        # Same id means the same result-relevant settings: only slurm.* / output.* can differ here.
        _write(rd.config, text, unsynced)
    meta = _meta(spec, r)
    if read_json(rd.meta) != meta:
        _write(rd.meta, json.dumps(meta, indent=2, sort_keys=False, default=str) + "\n", unsynced)
    return rd


def _meta(spec: SweepSpec, r: PlannedRun) -> dict[str, Any]:
    return {"id": r.id, "sweep": spec.name, "sweep_file": str(spec.path), "swept": r.swept}


NEW_RUN_SUFFIX = ".new"  # a run folder being made: .<run id>.<8 hex>.new in the sweep folder


def write_new_run(sweep_dir: Path, spec: SweepSpec, d: Decision, unsynced: list[Path]) -> RunDir | None:
    """A run folder that does not exist yet, made whole: config.yaml, meta.json and shared.json are
    written into a hidden folder that is then renamed into place (one rename instead of one per file:
    submitting thousands of runs is mostly file creation). Readers never see it half-made, and a kill
    leaves only the hidden folder, removed by a later submission. None when the folder exists after
    all (the caller writes its files one by one)."""
    rd = RunDir(sweep_dir / d.run.id)
    tmp = sweep_dir / f".{d.run.id}.{uuid.uuid4().hex[:8]}{NEW_RUN_SUFFIX}"
    files = {"config.yaml": d.run.yaml, "meta.json": json.dumps(_meta(spec, d.run), indent=2, default=str) + "\n"}
    if d.shares():
        pointer = sharing.pointer_entries(rd.path, {sh.stage: sh.store for sh in d.shares()})
        files[SHARED_POINTER] = json.dumps(pointer, indent=2) + "\n"
    os.mkdir(tmp)
    name = ""
    try:
        for name, text in files.items():
            with os.fdopen(os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as f:
                f.write(text)
        name = ""
        os.rename(tmp, rd.path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not name and (isinstance(e, (FileExistsError, IsADirectoryError)) or e.errno == errno.ENOTEMPTY):
            return None  # made meanwhile
        if name:  # a full disk, say: name the file (write() names none), not its temporary folder
            e.filename = str(rd.path / name)
        raise
    unsynced += [rd.path / name for name in files]
    return rd


def clean_stale_new_runs(sweep_dir: Path, older_than_s: float = STALE_TEMPORARY_S) -> None:
    """Remove the hidden folders of :func:`write_new_run` that a killed submission left."""
    try:
        entries = list(os.scandir(sweep_dir))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(NEW_RUN_SUFFIX) and entry.is_dir(follow_symlinks=False):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime > older_than_s:
                    shutil.rmtree(entry.path)
            except OSError:
                continue


def write_runs(sweep_dir: Path, spec: SweepSpec, decisions: Sequence[Decision]) -> list[Path]:
    """The run folders of ``decisions`` (results of reruns archived, ``shared.json`` of those sharing a
    stage), on disk before anything is submitted; returns the files written, not yet synced (one
    :func:`sync_files` for them all). Temporaries that killed earlier writes left in them (and in the
    sweep folder) are removed. A shared stage's links are made by the run's job when it starts."""
    unsynced: list[Path] = []
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for d in decisions:
        for sh in d.shares():
            if sh.role == "train" and sh.record is not None and sh.record.get("status") == "failed":
                if not sharing.resumable(sh.record):  # (one that failed writing is resumed, not redone)
                    RunDir(sh.store).archive()  # --rerun failed: the failed stage goes aside, kept
        new = d.action == "new" and not (sweep_dir / d.run.id).exists()
        if new and write_new_run(sweep_dir, spec, d, unsynced) is not None:
            continue
        rd = write_run(sweep_dir, spec, d.run, unsynced)
        clean_stale_temporaries(rd.path)
        if d.action == "rerun":
            rd.archive(d.from_stage)
        if d.shares() and (pointer := sharing.point_to_stores(rd, {sh.stage: sh.store for sh in d.shares()}, False)):
            unsynced.append(pointer)
        if d.share is None and not sharing.sharing_on(d.run.config) and rd.shared_store() is not None:
            sharing.unlink_training(rd)  # share.train=false: from now on it trains in its own folder
        elif (
            d.share_prune is None
            and rd.shared_store("prune") is not None
            and not sharing.prune_sharing_on(d.run.config)
        ):
            sharing.unlink_pruning(rd)  # share.prune=false: from now on it prunes in its own folder
    clean_stale_temporaries(sweep_dir)
    clean_stale_new_runs(sweep_dir)
    return unsynced


def _write(path: Path, text: str, unsynced: list[Path] | None) -> None:
    atomic_write_text(path, text, fsync=unsynced is None)
    if unsynced is not None:
        unsynced.append(path)


def sync_files(paths: Sequence[Path], threads: int = 8) -> None:
    """Make files written without fsync durable before their jobs are submitted: one ``syncfs`` per file
    system holding them (one journal commit, or on NFS the client's writes committed to the server),
    else one fsync per file, in parallel (each waits for a commit, and concurrent ones share it)."""
    folders: dict[Path, None] = dict.fromkeys(p.parent for p in paths)
    devices: dict[int, Path] = {}
    for folder in folders:
        devices.setdefault(os.stat(folder).st_dev, folder)
    if all(syncfs(folder) for folder in devices.values()):
        return

    def sync(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    if len(paths) < 2 * threads:
        for p in paths:
            sync(p)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(sync, paths))


ENDED_STATUSES = ("done", "diverged", "failed", "stopped early")


def active_run_ids(sweep_dir: Path, only: Sequence[str] | None = None) -> set[str]:
    """Runs of this sweep (of ``only``, when given) whose last job is still queued or running, or that a
    live job owns (so they are not submitted twice). A local job that has already ended a run (its
    folder records done, diverged or failed) no longer holds that run, even while the job goes on or is
    still exiting. Raises :class:`pipeline.jobs.slurm.SlurmUnreachable` when Slurm cannot say."""
    entries = manifest.read_manifest(sweep_dir)["runs"]
    if only is not None:
        entries = {rid: e for rid, e in entries.items() if rid in set(only)}
    jobs = {rid: (e["cluster"], e["job_id"]) for rid, e in entries.items()}
    active = alive.active_jobs(list(jobs.values()), {e["job_id"]: e for e in entries.values()}, sweep_dir)
    out = set()
    for rid, job in jobs.items():
        if job in active and not (job[0] == "local" and RunDir(sweep_dir / rid).status() in ENDED_STATUSES):
            out.add(rid)
    if only is None:
        owned = [RunDir(p.parent) for p in sweep_dir.glob(f"*/{owner.OWNER_FILE}")]
    else:
        owned = [RunDir(sweep_dir / rid) for rid in only if (sweep_dir / rid / owner.OWNER_FILE).exists()]
    return out | {r.id for r in owned if owner.live_owner(r) is not None and r.status() not in ENDED_STATUSES}


def wait_for_exiting_jobs(sweep_dir: Path, run_ids: Sequence[str], timeout_s: float = 60.0) -> list[str]:
    """Wait until no live job owns the folders of ``run_ids`` (jobs that recorded their run's end and are
    exiting: :func:`active_run_ids` no longer counts them), so a resubmitted job does not find its folder
    still held. Returns the runs still held after ``timeout_s``."""

    def held_here(rid: str) -> bool:  # a job on another host is Slurm's to end before the new one starts
        record = owner.live_owner(RunDir(sweep_dir / rid))
        ident = ProcessIdentity.from_record(record) if record is not None else None
        return ident is not None and ident.on_this_machine()

    held = [rid for rid in run_ids if held_here(rid)]
    deadline = time.monotonic() + timeout_s
    while held and time.monotonic() < deadline:
        time.sleep(0.05)
        held = [rid for rid in held if held_here(rid)]
    return held

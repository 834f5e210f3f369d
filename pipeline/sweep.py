"""``python -m pipeline.sweep SWEEP.yaml [key=value ...]``: expand a sweep file into runs, write their
folders, submit them, print what was submitted and exit.

A sweep file::

    name: optimizers            # folder name [A-Za-z0-9._-]; runs go to <out>/optimizers/<run id>/
    base: [configs/base.yaml]   # config files merged in order
    cluster: greene-rtx8000     # optional: configs/cluster/<name>.yaml, the slurm.* settings
    set: {train.epochs: 50}     # fixed overrides for every run
    grid: {optim.name: [sgd, adam]}               # cartesian product
    zip: {optim.lr: [0.1, 0.01], optim.weight_decay: [1.0e-4, 5.0e-4]}  # varied together
    variants: [{model.name: resnet20}, {model.name: resnet44}]        # each combined with grid x zip

Order of precedence, lowest first: schema defaults, base files, cluster profile, set, variant, grid,
zip, command-line overrides (which win, so runs they make identical are kept once). Torch-free: this
runs on login nodes.
"""

from __future__ import annotations

import argparse
import errno
import functools
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf
from rich.markup import escape

from pipeline import console as cli
from pipeline.jobs import manifest
from pipeline.config import (
    COMMAND_LINE,
    Composer,
    ConfigError,
    Layer,
    check_keys,
    file_layer,
    flatten,
    from_tree,
    inert_settings,
    parse_overrides,
    read_yaml,
    tree_run_id,
    tree_to_yaml,
    unflatten,
)
from pipeline import share as sharing
from pipeline.rundir import (
    SHARED_POINTER,
    STALE_TEMPORARY_S,
    RunDir,
    atomic_write_text,
    clean_stale_temporaries,
    read_json,
    syncfs,
)

if TYPE_CHECKING:
    from rich.console import Console

    from pipeline.launch import Submission

SWEEP_KEYS = ("name", "description", "base", "cluster", "set", "grid", "zip", "variants")
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
CLUSTERS = ("auto", "local", "debug", "slurm")
RERUN = ("failed", "all")
# Runs one sweep file may expand to (before identical ones are merged). Checked before expanding: the plan
# of a 10^8-point grid alone takes gigabytes; a study that big is several sweep files.
MAX_RUNS = 100_000
# Exit code when Slurm does not answer (before or during submission): nothing is wrong with the input,
# try again later. Bad input, a refused sbatch request and a running second submission exit 2.
EXIT_SLURM_DOWN = 3


@dataclass
class SweepSpec:
    path: Path
    name: str
    base: list[Path]
    cluster: Path | None = None
    set: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    zip: dict[str, list[Any]] = field(default_factory=dict)
    variants: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""


@dataclass
class PlannedRun:
    """One run of a sweep: its id, the swept values and the resolved config as a plain nested dict (the
    DictConfig, ``cfg``, is built on first use: a sweep of thousands of runs never needs most of them)."""

    id: str
    swept: dict[str, Any]
    config: dict[str, Any]
    _cfg: DictConfig | None = field(default=None, repr=False, compare=False)
    # other points of the sweep that gave this same run (same id), each with why (:func:`merge_reason`)
    merged: list[tuple[dict[str, Any], str]] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.config, DictConfig):
            self._cfg, self.config = self.config, OmegaConf.to_container(self.config, resolve=True)

    @property
    def cfg(self) -> DictConfig:
        if self._cfg is None:
            self._cfg = from_tree(self.config)
        return self._cfg

    @property
    def yaml(self) -> str:
        """config.yaml's text: what ``to_yaml(self.cfg)`` gives."""
        return tree_to_yaml(self.config)


def _find(ref: str, sweep_path: Path, key: str) -> Path:
    """A path named in a sweep file: relative to the sweep file's folder, else to its parent (so
    sweeps/x.yaml can say configs/base.yaml from any directory), else to the current directory, else
    to the project's own folder (its configs/ and cluster profiles)."""
    p = Path(ref).expanduser()
    project = Path(__file__).resolve().parent.parent
    candidates = [p] if p.is_absolute() else [sweep_path.parent / p, sweep_path.parent.parent / p, p, project / p]
    for c in candidates:
        if c.is_file():
            return c
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is not None:
        raise ConfigError(sweep_path, f"'{ref}' is a folder ({folder}), not a config file: name a YAML file.", key=key)
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(sweep_path, f"file '{ref}' not found (looked at {tried}).", key=key)


def read_sweep(path: str | Path) -> SweepSpec:
    """Parse and check a sweep file; every problem is a ConfigError naming the file and key."""
    path = Path(path)
    doc = read_yaml(path)
    if not isinstance(doc, dict):
        raise ConfigError(path, "a sweep file must be a mapping with keys " + ", ".join(SWEEP_KEYS))
    for key in doc:
        if key not in SWEEP_KEYS:
            from pipeline.config import _suggest

            raise ConfigError(
                path,
                f"unknown top-level key.{_suggest(str(key), SWEEP_KEYS)} Allowed keys: {', '.join(SWEEP_KEYS)}.",
                key=str(key),
            )
    name = doc.get("name")
    if not isinstance(name, str) or not SAFE_NAME.match(name) or name in (".", ".."):
        raise ConfigError(path, f"must be a folder name of letters, digits, '.', '_' or '-', got {name!r}.", key="name")
    base = doc.get("base", [])
    if isinstance(base, str):
        base = [base]
    if not isinstance(base, list) or not all(isinstance(b, str) for b in base):
        raise ConfigError(path, "must be a list of config file paths.", key="base")
    spec = SweepSpec(
        path=path, name=name, base=[_find(b, path, "base") for b in base], description=str(doc.get("description") or "")
    )
    cluster = doc.get("cluster")
    if cluster is not None:
        if not isinstance(cluster, str) or not cluster:
            raise ConfigError(path, "must be a cluster profile name or a file path.", key="cluster")
        ref = cluster if cluster.endswith((".yaml", ".yml")) else f"configs/cluster/{cluster}.yaml"
        spec.cluster = _find(ref, path, "cluster")

    for section in ("set", "grid", "zip"):
        value = doc.get(section) or {}
        if not isinstance(value, dict):
            raise ConfigError(path, "must be a mapping of dotted keys.", key=section)
        flat = flatten(value, source=f"{path} ({section})")
        check_keys(flat, f"{path} ({section})")
        setattr(spec, section, flat)
    for section in ("grid", "zip"):
        for key, values in getattr(spec, section).items():
            if not isinstance(values, list) or not values:
                raise ConfigError(path, f"must be a non-empty list of values, got {values!r}.", key=f"{section}.{key}")
    lengths = {k: len(v) for k, v in spec.zip.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(
            path,
            "zip axes must have equal lengths, got " + ", ".join(f"{k}: {n}" for k, n in lengths.items()) + ".",
            key="zip",
        )
    variants = doc.get("variants") or []
    if not isinstance(variants, list) or not all(isinstance(v, dict) and v for v in variants):
        raise ConfigError(path, "must be a list of non-empty mappings of dotted keys.", key="variants")
    spec.variants = [flatten(v, source=f"{path} (variants[{i}])") for i, v in enumerate(variants)]
    for i, v in enumerate(spec.variants):
        check_keys(v, f"{path} (variants[{i}])")
    axes = [set(spec.grid), set(spec.zip)]
    if axes[0] & axes[1]:
        raise ConfigError(path, "a key may not be both in grid and zip.", key=sorted(axes[0] & axes[1])[0])
    return spec


def count_runs(spec: SweepSpec) -> int:
    """Runs the sweep expands to before identical configs are merged: grid product x zip length x variants
    (computed from the lengths alone, nothing expanded)."""
    n_zip = len(next(iter(spec.zip.values()))) if spec.zip else 1
    return math.prod(len(v) for v in spec.grid.values()) * n_zip * max(1, len(spec.variants))


def check_size(spec: SweepSpec) -> None:
    """Refuse a sweep of more than :data:`MAX_RUNS` runs before anything is expanded."""
    n = count_runs(spec)
    if n > MAX_RUNS:
        grid = " x ".join(str(len(v)) for v in spec.grid.values()) or "1"
        n_zip = len(next(iter(spec.zip.values()))) if spec.zip else 1
        raise ConfigError(
            spec.path,
            f"expands to {n:,} runs (grid {grid}, zip {n_zip}, variants "
            f"{max(1, len(spec.variants))}), more than the limit of {MAX_RUNS:,} runs per sweep "
            "(pipeline.sweep.MAX_RUNS); split it into several sweep files.",
            key="grid",
        )


def expand_sweep(spec: SweepSpec, overrides: dict[str, Any] | None = None, cwd: Path | None = None) -> list[PlannedRun]:
    """Every run of the sweep, composed and validated; identical configs are kept once.

    Same configs, ids and errors as composing every run's layers with ``compose()``, through a
    :class:`Composer` (the shared layers are composed once). More than :data:`MAX_RUNS` runs is a
    ConfigError, raised before anything is expanded."""
    check_size(spec)
    layers = [file_layer(b) for b in spec.base]
    if spec.cluster is not None:
        layers.append(file_layer(spec.cluster))
    if spec.set:
        layers.append(Layer(f"{spec.path} (set)", spec.set))
    last = [Layer(COMMAND_LINE, dict(overrides))] if overrides else []
    composer = Composer(layers)
    base = cwd or Path.cwd()
    roots: dict[str, str] = {}

    grid_points = [dict(zip(spec.grid, values)) for values in itertools.product(*spec.grid.values())]
    n_zip = len(next(iter(spec.zip.values()))) if spec.zip else 1
    zip_points = [{k: v[i] for k, v in spec.zip.items()} for i in range(n_zip)]
    variants = spec.variants or [{}]

    runs: list[PlannedRun] = []
    seen: dict[str, PlannedRun] = {}
    for vi, variant in enumerate(variants):
        for g in grid_points:
            for z in zip_points:
                extra = [
                    Layer(f"{spec.path} (variants[{vi}])", variant),
                    Layer(f"{spec.path} (grid)", g),
                    Layer(f"{spec.path} (zip)", z),
                ]
                flat = composer.compose_flat([x for x in extra if x.values] + last)
                root = flat["data.root"]
                if root not in roots:
                    roots[root] = _absolute_root(root, base)
                flat["data.root"] = roots[root]
                tree = unflatten(flat)
                rid = tree_run_id(tree)
                swept = {k: flat[k] for k in {**variant, **g, **z}}
                if rid in seen:  # the same run as an earlier point: kept once, and said why
                    seen[rid].merged.append((swept, merge_reason(seen[rid].config, tree)))
                    continue
                seen[rid] = PlannedRun(rid, swept, tree)
                runs.append(seen[rid])
    return runs


def merge_reason(kept: dict[str, Any], other: dict[str, Any]) -> str:
    """Why the resolved config ``other`` gives the same run as ``kept``: the settings they differ in,
    each with why it is not part of the run id."""
    a, b = flatten(kept), flatten(other)
    differ = [k for k in a if a[k] != b.get(k)]
    if not differ:
        return "the same settings (a value given twice, or set again by a later layer or the command line)"
    inert = inert_settings(kept)
    why = []
    for key in differ:
        if key in inert:
            why.append(f"{key} {inert[key]}")
        else:
            why.append(
                f"{key} is not part of the run id (how a run is scheduled or logged, not its result): "
                f"the run has {key}={cli.fmt(a[key])}"
            )
    return "; ".join(why)


MERGES_SHOWN = 10  # merge notes printed before "... more" (--all prints every one)


def merge_notes(runs: Sequence[PlannedRun], show_all: bool = False) -> list[str]:
    """One line per sweep point that gave the same run as an earlier one: which, and why."""
    notes = [
        f"{_point_text(point)} is the same run as {_point_text(r.swept)} ({r.id}): {why}; it runs once"
        for r in runs
        for point, why in r.merged
    ]
    if show_all or len(notes) <= MERGES_SHOWN:
        return notes
    return [
        *notes[:MERGES_SHOWN],
        f"... {len(notes) - MERGES_SHOWN} more points merged the same way (--all lists every one)",
    ]


def _point_text(swept: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {cli.fmt(v)}" for k, v in swept.items()) + "}" if swept else "the sweep's one point"


def check_gpus(spec: SweepSpec, runs: Sequence[PlannedRun], cluster: str) -> None:
    """Refuse ``train.device=cuda`` in runs that would get no GPU, before anything is written: on Slurm
    runs whose ``slurm.gpus_per_node`` is 0 (the job would fail at its start), on the local and debug
    executors a machine where no GPU is visible (read from CUDA_VISIBLE_DEVICES and nvidia-smi, as the
    local executor does; torch is not imported here)."""
    wants = [r for r in runs if r.config["train"]["device"] == "cuda"]
    if cluster == "slurm":
        wants = [r for r in wants if not r.config["slurm"]["gpus_per_node"]]
        where = "slurm.gpus_per_node is 0"
        fix = "set slurm.gpus_per_node (and slurm.gpu_type where the cluster names GPU types)"
        fix += (
            f" in the cluster profile ({spec.cluster})" if spec.cluster else " in the sweep's set: or a cluster profile"
        )
    elif wants:
        from pipeline.launch import _visible_gpu_count

        if _visible_gpu_count():
            return
        where = f"the {cluster} executor runs jobs on this machine, where no GPU is visible"
        fix = "submit to Slurm (--cluster slurm) with slurm.gpus_per_node set"
    if wants:
        ids = ", ".join(r.id for r in wants[:5]) + (f" and {len(wants) - 5} more" if len(wants) > 5 else "")
        raise ConfigError(
            spec.path,
            f"'cuda' needs a GPU, but {len(wants)} run(s) ({ids}) would get none: {where}. "
            f"Allowed: {fix}; or train.device=auto (cuda when there is a GPU) or cpu.",
            key="train.device",
        )


def check_out(out: Path, sweep_dir: Path, write: bool) -> None:
    """``--out`` must be a folder or not exist yet, with a path that job scripts and array_runs.txt (one
    path a line) can hold, and, when run folders are to be written, in a place that takes them: checked
    before anything is written."""
    absolute = sweep_dir.absolute()
    if any(ord(c) < 32 or ord(c) == 127 for c in str(absolute)):
        raise ConfigError(
            COMMAND_LINE,
            f"{str(out)!r} contains a newline or another control character: run "
            "folder paths go into job scripts and array_runs.txt, one a line.",
            key="--out",
        )
    existing = next(p for p in (absolute, *absolute.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise ConfigError(
            COMMAND_LINE, f"'{existing}' exists and is not a folder: cannot hold {sweep_dir}/.", key="--out"
        )
    if write:
        try:  # what will be done first: a folder made in the deepest existing one (mkdtemp: no name clash)
            os.rmdir(tempfile.mkdtemp(prefix=".pipeline-write-test-", dir=existing))
        except OSError as e:
            raise ConfigError(COMMAND_LINE, f"cannot write in '{existing}': {e.strerror}.", key="--out") from None


def _absolute_root(root: str, base: Path) -> str:
    """``absolutize_paths`` for data.root given as a string."""
    p = Path(os.path.expanduser(str(root)))
    return root if p.is_absolute() else str((base / p).resolve())


# --------------------------------------------------------------------------------------------------
# Writing run folders and deciding what to submit
# --------------------------------------------------------------------------------------------------


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
        elif status in ("done", "diverged"):
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
    """For :func:`pipeline.launch.submit`'s ``after``: index of each run that waits for a shared stage
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


def _record_submitting(sweep_dir: Path, cluster: str, submission: str, token: str, run_ids: list[str]) -> None:
    manifest.record_submitting(sweep_dir, cluster, token, run_ids, submission)


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


OWNER_QUEUED_WAIT_S = 60.0  # how long a follower waits for another submission to queue the owner's job


def _submit_later(
    submission: Submission, later: Sequence[Decision], launch_runs: Callable[[Sequence[Decision]], Submission]
) -> None:
    """Submit the runs that follow an owner another submission is queueing, once its job id is in the
    owner record (a submission under way records it within seconds); those whose owner was not queued
    within :data:`OWNER_QUEUED_WAIT_S` are listed as not submitted."""
    from pipeline.launch import Rejected

    pending = [sh for d in later for sh in d.shares() if sh.role == "follow" and sh.foreign and not sh.after_job]
    deadline = time.monotonic() + OWNER_QUEUED_WAIT_S
    while pending and time.monotonic() < deadline:
        time.sleep(0.2)
        for sh in pending:
            sh.after_job = sharing.owner_job_id(sh.store)
        pending = [sh for sh in pending if not sh.after_job]
    unqueued = waiting_for_unqueued(later)
    ready = [d for d in later if d.run.id not in unqueued]
    if ready:
        more = launch_runs(ready)
        submission.job_ids.update(more.job_ids)
        submission.job_records.update(more.job_records)
        submission.jobs.extend(more.jobs)
        submission.rejected.extend(more.rejected)
    if unqueued:
        owners = sorted({str(sh.owner) for sh in pending})
        reason = (
            f"not tried: the run(s) doing the shared stage they wait for ({', '.join(owners)}) belong to another "
            f"submission that did not queue them within {OWNER_QUEUED_WAIT_S:.0f} s"
        )
        submission.rejected.append(Rejected(sorted(unqueued), reason))


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


def update_manifest(
    sweep_dir: Path, cluster: str, job_ids: dict[str, str], job_records: dict[str, dict[str, Any]] | None = None
) -> Path:
    """<sweep>/manifest.json maps run id -> the latest job id (older ones are kept in history), with what
    else identifies the job (``job_records``, by job id: a local job's process start time); written
    atomically. Called once per array, as soon as sbatch answers (see :mod:`pipeline.jobs.manifest`)."""
    return manifest.record_submitted(sweep_dir, cluster, job_ids, job_records=job_records)


ENDED_STATUSES = ("done", "diverged", "failed")


def active_run_ids(sweep_dir: Path, only: Sequence[str] | None = None) -> set[str]:
    """Runs of this sweep (of ``only``, when given) whose last job is still queued or running, or that a
    live job owns (so they are not submitted twice). A local job that has already ended a run (its
    folder records done, diverged or failed) no longer holds that run, even while the job goes on or is
    still exiting. Raises :class:`pipeline.jobs.slurm.SlurmUnreachable` when Slurm cannot say."""
    from pipeline import launch
    from pipeline.jobs import owner

    entries = manifest.read_manifest(sweep_dir)["runs"]
    if only is not None:
        entries = {rid: e for rid, e in entries.items() if rid in set(only)}
    jobs = {rid: (e["cluster"], e["job_id"]) for rid, e in entries.items()}
    active = launch.active_jobs(list(jobs.values()), {e["job_id"]: e for e in entries.values()}, sweep_dir)
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
    from pipeline.jobs import owner
    from pipeline.jobs.procs import ProcessIdentity

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


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sweep", type=Path, help="sweep YAML file")
    p.add_argument("overrides", nargs="*", help="key=value settings applied to every run")
    p.add_argument("--dry-run", action="store_true", help="show the runs (and sbatch header); write nothing")
    p.add_argument(
        "--cluster",
        default="auto",
        help="auto | local | debug | slurm (default auto: slurm when a controller answers, else local)",
    )
    p.add_argument("--out", type=Path, default=Path("runs"), help="results folder (default runs/)")
    p.add_argument(
        "--rerun",
        default=None,
        help="failed | all: start those runs again from scratch (old results are moved to <run>/archive/)",
    )
    p.add_argument("--all", action="store_true", help="list every run (long plans show the first and last)")
    p.add_argument(
        "--no-submit", action="store_true", help="write the run folders, submit nothing (for sbatch/array.sh)"
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="return when the runs have finished, also those an earlier submission's jobs still run",
    )
    p.add_argument("--parallel", type=int, default=1, help="local executor: runs at a time (default 1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    console = cli.console()
    with cli.exit_on_config_error():
        if args.cluster not in CLUSTERS:
            raise ConfigError(
                COMMAND_LINE,
                f"'{args.cluster}' is not allowed. Allowed values: {', '.join(CLUSTERS)}.",
                key="--cluster",
            )
        if args.rerun is not None and args.rerun not in RERUN:
            raise ConfigError(
                COMMAND_LINE, f"'{args.rerun}' is not allowed. Allowed values: {', '.join(RERUN)}.", key="--rerun"
            )
        if args.parallel < 1:
            raise ConfigError(COMMAND_LINE, f"must be >= 1, got {args.parallel}.", key="--parallel")
        spec = read_sweep(args.sweep)
        runs = expand_sweep(spec, parse_overrides(args.overrides))
        sweep_dir = args.out / spec.name
        check_out(args.out, sweep_dir, write=not args.dry_run)
    for note in merge_notes(runs, show_all=args.all):
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)

    if args.dry_run:
        from pipeline import launch

        cluster = launch.resolve_cluster(args.cluster)
        try:
            check_gpus(spec, runs, cluster)
        except ConfigError as e:  # the plan is still worth seeing; a submission would stop here
            console.print(
                f"[yellow]warning:[/] {escape(str(e))} (a submission would stop here, exit 2)", soft_wrap=True
            )
        with cli.exit_on_os_error():
            decisions = plan(runs, sweep_dir, args.rerun, set())
            plan_sharing(decisions, sweep_dir, args.rerun, cluster)
        cli.print_plan(console, spec, decisions, dry_run=True, show_all=args.all)
        console.print(f"{trainings(decisions, sweep_dir)} training(s) in all")
        if cluster == "slurm":
            for header in launch.sbatch_headers(sweep_dir, [d.run.config for d in decisions], spec.name):
                console.print(header, markup=False, highlight=False)
        return 0

    if not args.no_submit:  # (plain sbatch/array.sh arrays ask for their resources in their own header)
        with cli.exit_on_config_error():
            check_gpus(spec, runs, _cluster_for(args, sweep_dir)[0])

    from pipeline.submit.lock import LockHeld, SubmitLock

    # One submitter per sweep at a time: two would both see every run as not queued and both submit it.
    lock = SubmitLock(sweep_dir, on_recover=lambda message: console.print(f"[yellow]{message}[/]"))
    try:
        with cli.exit_on_os_error():
            lock.acquire()
    except LockHeld as e:
        cli.console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        return cli.EXIT_USAGE
    try:
        if args.no_submit:
            return _write_only(args, console, spec, runs, sweep_dir)
        code, submission, cluster = _submit(args, console, spec, runs, sweep_dir)
    finally:
        lock.release()
    if code != 0 or submission is None:
        return code
    from pipeline import launch

    if args.wait or cluster == "debug":  # debug jobs run in this process, when waited for
        console.print("waiting for the runs to finish")
        # also for those an earlier submission's jobs still run (skip-active): --wait waits for every run
        statuses = launch.wait(submission, console, still_active=functools.partial(active_run_ids, sweep_dir))
        failed = [rid for rid, s in statuses.items() if s in ("failed", "blocked")]
        if failed:
            console.print(
                f"[red]{len(failed)} run(s) failed or blocked:[/] "
                + ", ".join(f"{rid} (log {sweep_dir / rid / 'run.log'})" for rid in failed)
            )
            return 1
    return 0


def _write_only(
    args: argparse.Namespace, console: Console, spec: SweepSpec, runs: list[PlannedRun], sweep_dir: Path
) -> int:
    """``--no-submit``: the run folders and array_runs.txt, for sbatch/array.sh."""
    with cli.exit_on_os_error():
        decisions = plan(runs, sweep_dir, args.rerun, set())
        sync_files(write_runs(sweep_dir, spec, decisions))
        # array task i of sbatch/array.sh runs line i+1: exactly this sweep file's runs, in its order
        atomic_write_text(
            sweep_dir / "array_runs.txt", "".join(f"{(sweep_dir / d.run.id).resolve()}\n" for d in decisions)
        )
    cli.print_plan(console, spec, decisions, show_all=args.all)
    console.print(
        f"{len(decisions)} run folders in {sweep_dir}/ (listed in array_runs.txt); submit them "
        f"as a plain array with\n  sbatch --array=0-{len(decisions) - 1} sbatch/array.sh {sweep_dir}"
    )
    return 0


def _cluster_for(args: argparse.Namespace, sweep_dir: Path) -> tuple[str, str | None]:
    """(the cluster to submit to, why submitting now is impossible or None). A sweep whose manifest
    names Slurm jobs is not silently moved to the local executor by ``auto`` when the controller is down."""
    from pipeline.jobs import slurm as slurm_cli

    if args.cluster == "auto":
        if slurm_cli.controller_answers():
            return "slurm", None
        if any(c == "slurm" for c, _ in manifest.run_jobs(sweep_dir).values()):
            return "slurm", (
                "the Slurm controller does not answer (scontrol ping) and this sweep's manifest names Slurm "
                "jobs; nothing was submitted: try again when Slurm answers, or pass --cluster local to train here"
            )
        return "local", None
    if args.cluster == "slurm" and not slurm_cli.controller_answers():
        return "slurm", "the Slurm controller does not answer (scontrol ping); nothing was submitted: try again later"
    return args.cluster, None


def _submit(
    args: argparse.Namespace, console: Console, spec: SweepSpec, runs: list[PlannedRun], sweep_dir: Path
) -> tuple[int, Submission | None, str]:
    """Plan, write the run folders and submit, recording each array in the manifest as soon as it is
    queued; returns (exit code, submission, cluster)."""
    from pipeline import launch
    from pipeline.jobs import slurm as slurm_cli

    cluster, impossible = _cluster_for(args, sweep_dir)
    try:
        if impossible is None:
            for note in manifest.resolve_submitting(sweep_dir, slurm_cli.queued_comments):
                console.print(f"[yellow]{note}[/]")
        active = active_run_ids(sweep_dir) if impossible is None else set()
    except slurm_cli.SlurmUnreachable as e:
        impossible = f"{e}; cannot tell which runs are queued, so nothing was submitted: try again later"
    if impossible is not None:
        cli.console(stderr=True).print(f"[bold red]error:[/] {escape(impossible)}", soft_wrap=True)
        return EXIT_SLURM_DOWN, None, cluster
    with cli.exit_on_os_error():  # before anything is submitted
        decisions = plan(runs, sweep_dir, args.rerun, active)
        plan_sharing(decisions, sweep_dir, args.rerun, cluster)
        to_submit = [d for d in decisions if d.action in SUBMITTED]
        still_held = wait_for_exiting_jobs(sweep_dir, [d.run.id for d in to_submit])
        if still_held:
            cli.console(stderr=True).print(
                f"[bold red]error:[/] runs {', '.join(still_held)} are still held by jobs that recorded their "
                "end but have not exited (see <run>/owner.json); nothing was submitted: try again shortly",
                soft_wrap=True,
            )
            return cli.EXIT_USAGE, None, cluster
        unsynced = write_runs(sweep_dir, spec, to_submit)
        # before submitting (a follower that starts first waits for the owner); the owner's job is
        # found later through the manifest entry that carries this submission's token
        submission_token = uuid.uuid4().hex[:16]
        unsynced += claim_shared(decisions, sweep_dir, args.rerun, cluster, submission_token)
        to_submit = [d for d in decisions if d.action in SUBMITTED]
        sync_files(unsynced)

    def record(job_ids: dict[str, str], token: str | None, job_records: dict[str, dict[str, Any]]) -> None:
        try:
            manifest.record_submitted(sweep_dir, cluster, job_ids, token, job_records, submission_token)
        except OSError as e:
            # queued but not recorded: say which jobs, since a rerun cannot know them
            cli.console(stderr=True).print(
                f"[bold red]error:[/] jobs queued but {sweep_dir / 'manifest.json'} could not be written "
                f"({escape(e.strerror or str(e))}): " + ", ".join(f"{r}={j}" for r, j in job_ids.items()),
                soft_wrap=True,
            )
            raise

    def launch_runs(ds: Sequence[Decision]) -> Submission:
        return launch.submit(
            [RunDir(sweep_dir / d.run.id) for d in ds],
            [d.run.config for d in ds],
            cluster=cluster,
            sweep_dir=sweep_dir,
            name=spec.name,
            parallel=args.parallel,
            after=follow_order(ds),
            on_submitting=functools.partial(_record_submitting, sweep_dir, cluster, submission_token),
            on_submitted=record,
        )

    # On Slurm a run that follows another submission's owner needs its job id: those go out last
    later = waiting_for_unqueued(to_submit) if cluster == "slurm" else set()
    with cli.exit_on_os_error():
        submission = launch_runs([d for d in to_submit if d.run.id not in later])
        if later:
            _submit_later(submission, [d for d in to_submit if d.run.id in later], launch_runs)
        for rej in submission.rejected:
            manifest.record_rejected(sweep_dir, cluster, rej.run_ids, rej.reason, rej.token)
    submission.elsewhere = [RunDir(sweep_dir / d.run.id) for d in decisions if d.action == "skip-active"]
    shown = {**submission.job_ids, **{rid: "not submitted" for rej in submission.rejected for rid in rej.run_ids}}
    cli.print_plan(console, spec, decisions, job_ids=shown, cluster=cluster, show_all=args.all)
    n_rejected = sum(len(rej.run_ids) for rej in submission.rejected)
    console.print(
        f"[bold]{len(to_submit) - n_rejected}[/] of {len(decisions)} runs submitted to [bold]{cluster}[/] "
        f"({trainings(decisions, sweep_dir)} training(s)); results in {sweep_dir}/"
    )
    if not submission.rejected:
        return 0, submission, cluster
    err = cli.console(stderr=True)
    for rej in submission.rejected:
        err.print(
            f"[bold red]not submitted:[/] {len(rej.run_ids)} run(s) ({', '.join(rej.run_ids)}): {escape(rej.reason)}",
            soft_wrap=True,
        )
    err.print(
        f"{len(submission.job_ids)} run(s) queued and recorded in {sweep_dir / 'manifest.json'}; "
        "once the cause is fixed, the same command submits only the runs not queued."
    )
    unreachable = any(rej.unreachable for rej in submission.rejected)
    return (EXIT_SLURM_DOWN if unreachable else cli.EXIT_USAGE), submission, cluster


if __name__ == "__main__":
    sys.exit(main())

"""A sweep file read and expanded into runs, every run composed and validated, before anything is written.

A sweep file::

    name: optimizers            # folder name [A-Za-z0-9._-]; runs go to <out>/optimizers/<run id>/
    base: [configs/base.yaml]   # config files merged in order
    cluster: greene-rtx8000     # optional: configs/cluster/<name>.yaml, the slurm.* settings
    set: {train.epochs: 50}     # fixed overrides for every run
    grid: {optim.name: [sgd, adam]}               # cartesian product
    zip: {optim.lr: [0.1, 0.01], optim.weight_decay: [1.0e-4, 5.0e-4]}  # varied together
    variants: [{model.name: resnet20}, {model.name: resnet44}]        # each combined with grid x zip

Order of precedence, lowest first: schema defaults, base files, cluster profile, set, variant, grid,
zip, command-line overrides (which win, so runs they make identical are kept once). Torch-free.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from pipeline import console as cli
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
    read_yaml,
    tree_run_id,
    tree_to_yaml,
    unflatten,
)
from pipeline.submit.launch import visible_gpu_count

SWEEP_KEYS = ("name", "description", "base", "cluster", "set", "grid", "zip", "variants", "search")


SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


# Runs one sweep file may expand to (before identical ones are merged). Checked before expanding: the plan
# of a 10^8-point grid alone takes gigabytes; a study that big is several sweep files.
MAX_RUNS = 100_000


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
    # a search: each run of grid x zip x variants is one study's fixed settings. ``search_doc`` is the
    # section as written; the search command parses it into ``search`` (pipeline.search.spec.SearchSpec:
    # submit/ imports nothing of search/, which is built on it)
    search_doc: Any = None
    search: Any = None


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
    project = Path(__file__).resolve().parents[2]
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
    _check_top_level(path, doc)
    name = doc.get("name")
    if not isinstance(name, str) or not SAFE_NAME.match(name) or name in (".", ".."):
        raise ConfigError(path, f"must be a folder name of letters, digits, '.', '_' or '-', got {name!r}.", key="name")
    spec = SweepSpec(path=path, name=name, base=_base_files(path, doc), description=str(doc.get("description") or ""))
    spec.cluster = _cluster_file(path, doc)
    spec.set, spec.grid, spec.zip = (_section(path, doc, section) for section in ("set", "grid", "zip"))
    _check_axes(path, spec)
    spec.variants = _variants(path, doc)
    axes = [set(spec.grid), set(spec.zip)]
    if axes[0] & axes[1]:
        raise ConfigError(path, "a key may not be both in grid and zip.", key=sorted(axes[0] & axes[1])[0])
    spec.search_doc = doc.get("search")
    return spec


def _check_top_level(path: Path, doc: Any) -> None:
    """A mapping of the sweep file's own keys only."""
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


def _base_files(path: Path, doc: dict[str, Any]) -> list[Path]:
    """The config files of ``base:`` (one path or a list), found (:func:`_find`)."""
    base = doc.get("base", [])
    if isinstance(base, str):
        base = [base]
    if not isinstance(base, list) or not all(isinstance(b, str) for b in base):
        raise ConfigError(path, "must be a list of config file paths.", key="base")
    return [_find(b, path, "base") for b in base]


def _cluster_file(path: Path, doc: dict[str, Any]) -> Path | None:
    """The file of ``cluster:`` (a profile name in configs/cluster/ or a YAML path), or None."""
    cluster = doc.get("cluster")
    if cluster is None:
        return None
    if not isinstance(cluster, str) or not cluster:
        raise ConfigError(path, "must be a cluster profile name or a file path.", key="cluster")
    ref = cluster if cluster.endswith((".yaml", ".yml")) else f"configs/cluster/{cluster}.yaml"
    return _find(ref, path, "cluster")


def _section(path: Path, doc: dict[str, Any], section: str) -> dict[str, Any]:
    """``set``, ``grid`` or ``zip`` as a dotted dict of schema keys."""
    value = doc.get(section) or {}
    if not isinstance(value, dict):
        raise ConfigError(path, "must be a mapping of dotted keys.", key=section)
    flat = flatten(value, source=f"{path} ({section})")
    check_keys(flat, f"{path} ({section})")
    return flat


def _check_axes(path: Path, spec: SweepSpec) -> None:
    """Every grid and zip axis a non-empty list; the zip axes of one length."""
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


def _variants(path: Path, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """``variants``: a list of non-empty mappings, each as a dotted dict of schema keys."""
    variants = doc.get("variants") or []
    if not isinstance(variants, list) or not all(isinstance(v, dict) and v for v in variants):
        raise ConfigError(path, "must be a list of non-empty mappings of dotted keys.", key="variants")
    flat = [flatten(v, source=f"{path} (variants[{i}])") for i, v in enumerate(variants)]
    for i, v in enumerate(flat):
        check_keys(v, f"{path} (variants[{i}])")
    return flat


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
            "(pipeline.submit.expand.MAX_RUNS); split it into several sweep files.",
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
    if spec.search is not None:  # the fixed values are checked with the searched settings filled in
        last.insert(0, Layer(f"{spec.path} (search.params)", spec.search.representative()))
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
        if visible_gpu_count():
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

"""The one configuration schema, and loading it from YAML files and ``key=value`` overrides.

Every setting lives in a dataclass below with its type, default and unit. Files and overrides are
merged onto the schema through omegaconf; anything that does not fit (an unknown key, a wrong type,
a value out of range, an unknown choice) raises :class:`ConfigError`, which names the source (file or
command line), the dotted key and what is allowed. The command-line tools turn it into exit code 2.

This module must stay free of torch: the login-node commands import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.budget_config import LATER_KEYS, budget_problems, inert_budget, origin
from pipeline.models import MODEL_NAMES, NORMS, SHORTCUTS

COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """A setting that does not fit the schema; ``str()`` is the message shown to the user."""

    def __init__(self, source: str | os.PathLike, message: str, key: str | None = None):
        self.source = str(source)
        self.key = key
        where = f"{self.source}: {key}" if key else self.source
        super().__init__(f"{where}: {message}")


def _choice(default: str, *choices: str) -> Any:
    return field(default=default, metadata={"choices": tuple(choices)})


def _num(
    default: float | int, *, min: float | None = None, max: float | None = None, min_exclusive: bool = False
) -> Any:
    return field(default=default, metadata={"min": min, "max": max, "min_exclusive": min_exclusive})


# What may reach an sbatch line: submitit writes these values into the #SBATCH header of a shell script.
SBATCH_WORD = r"^[A-Za-z0-9._-]*$"
SBATCH_CONSTRAINT = r"^[A-Za-z0-9._,&|!\[\]*:-]*$"


def _sbatch(pattern: str, allowed: str) -> Any:
    return field(default="", metadata={"pattern": pattern, "allowed": allowed})


_WORD = "letters, digits, '.', '_' and '-'"


# --------------------------------------------------------------------------------------------------
# The schema. Units are in the comments; fixed dotted names are relied on by tests and users.
# --------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    name: str = _choice("cifar10", "cifar10", "cifar100", "synthetic")
    # Folder holding cifar-10-batches-py/, cifar-100-python/ or synthetic-batches-py/. A relative path
    # is taken from the directory the sweep is launched in and stored absolute in each run's config.
    root: str = "data"
    val_size: int = _num(5000, min=1)  # images held out of the train files for validation
    split_seed: int = _num(0, min=0)  # seed of the train/val split (independent of train.seed)
    train_size: int = _num(0, min=0)  # cap on training images after the split; 0 = all
    augment: bool = True  # pad-4 random crop + horizontal flip of training images
    loader: str = _choice("device", "device", "dataloader")  # device: one tensor on the device, batched
    # augmentation; dataloader: torch DataLoader with train.num_workers processes (the conventional path)


@dataclass
class ModelConfig:
    name: str = _choice("resnet20", *MODEL_NAMES)
    shortcut: str = _choice("A", *SHORTCUTS)  # CIFAR ResNets: A = zero-pad, B = 1x1 conv projection
    norm: str = _choice("batch", *NORMS)  # batch: BatchNorm (the papers); group: GroupNorm, per image


@dataclass
class OptimConfig:
    name: str = _choice("nesterov", "sgd", "nesterov", "adagrad", "adadelta", "adam", "adamw")
    lr: float = _num(0.1, min=0.0, min_exclusive=True)  # peak learning rate (per optimizer step)
    momentum: float = _num(0.9, min=0.0, max=1.0)  # sgd / nesterov only
    weight_decay: float = _num(1e-4, min=0.0)  # L2 coefficient (decoupled for adamw)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam / adamw
    eps: float = _num(1e-8, min=0.0, min_exclusive=True)  # adam / adamw / adagrad / adadelta
    grad_clip: float = _num(0.0, min=0.0)  # max global gradient norm; 0 = off


@dataclass
class ScheduleConfig:
    name: str = _choice("cosine", "constant", "step", "cosine", "onecycle")
    warmup_epochs: float = _num(0.0, min=0.0)  # linear warm-up from 0 before the schedule, epochs
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # step: fractions of training
    gamma: float = _num(0.1, min=0.0, min_exclusive=True)  # step: lr factor at each milestone
    min_lr_ratio: float = _num(0.0, min=0.0, max=1.0)  # cosine / onecycle: final lr / peak lr
    pct_start: float = _num(0.25, min=0.0, max=1.0)  # onecycle: fraction of training rising


@dataclass
class TrainConfig:
    epochs: int = _num(100, min=1)  # full passes over the training split
    batch_size: int = _num(128, min=1)  # images per optimizer step, summed over all ranks
    eval_batch_size: int = _num(512, min=1)  # images per forward pass in evaluation
    num_workers: int = _num(4, min=0)  # DataLoader processes (data.loader=dataloader only)
    seed: int = _num(0, min=0)  # model init, shuffling and augmentation
    device: str = _choice("auto", "auto", "cpu", "cuda")  # auto = cuda when available
    precision: str = _choice("fp32", "fp32", "fp16", "bf16")  # autocast dtype; fp16 adds a GradScaler
    channels_last: bool = True  # NHWC memory format (faster on CPU and tensor cores)
    compile: bool = False  # torch.compile the model (minutes of start-up)
    label_smoothing: float = _num(0.0, min=0.0, max=1.0)  # cross-entropy target smoothing
    threads: int = _num(0, min=0)  # torch CPU threads; 0 = SLURM_CPUS_PER_TASK or default
    sync_bn: bool = True  # data-parallel on GPUs: BatchNorm statistics over all ranks
    # steps between checks for a NaN/inf loss (each check is one host sync on a GPU); a diverged run
    # stops within this many steps of its first non-finite loss
    nan_check_steps: int = _num(8, min=1)
    # also evaluate the test split after every training epoch (history's test_acc): collect's time to a
    # target accuracy then reads the test accuracy, as the fast study reports it; costs one test pass an epoch
    test_every_epoch: bool = False


PRUNE_METHODS = ("none", "unstructured", "structured")
QUANT_METHODS = ("none", "int8", "qat", "fp16")
LR_SCHEDULES = ("constant", "step", "cosine", "onecycle")


@dataclass
class PruneConfig:
    # none | unstructured (magnitude, per weight; zeros give no speed with dense kernels, but compress)
    # | structured (whole channels removed with torch-pruning: fewer parameters and MACs, faster)
    method: str = _choice("none", *PRUNE_METHODS)
    sparsity: Any = 0.5  # final fraction of weights (unstructured) or of channels per layer (structured)
    # removed, in [0, 1); or auto: the largest pruning within prune.max_drop (docs/budget-design.md)
    initial_sparsity: float = _num(0.0, min=0.0, max=1.0)  # unstructured, polynomial: sparsity at begin
    schedule: str = _choice("polynomial", "constant", "polynomial")  # unstructured: constant = the final
    # sparsity from the first pruning step on; polynomial = Zhu & Gupta 2017, rising from
    # initial_sparsity to sparsity between begin and end
    power: float = _num(3.0, min=0.0, min_exclusive=True)  # exponent of the polynomial schedule
    begin: float = _num(0.0, min=0.0, max=1.0)  # first pruning update, fraction of the pruning steps
    end: float = _num(0.75, min=0.0, max=1.0)  # last pruning update (final sparsity from here on)
    frequency: int = _num(100, min=1)  # optimizer steps between mask updates
    during: str = _choice("finetune", "train", "finetune")  # train: the schedule runs inside the training
    # stage from scratch; finetune: the prune stage starts from the trained model and fine-tunes
    scope: str = _choice("global", "global", "layer")  # unstructured: one magnitude threshold over all
    # pruned tensors, or the same sparsity in each
    dense_first_last: bool = True  # leave the first conv and the classifier unpruned
    importance: str = _choice("l2", "l1", "l2")  # structured: channel importance, L1 or L2 magnitude
    round_to: int = _num(8, min=1)  # structured: kept channels a multiple of this (fast
    # kernels); on 16-channel layers 8 can remove far more than the ratio: the real widths are reported
    iterative_steps: int = _num(1, min=1)  # structured: prune in this many steps (importance
    # recomputed after each), all before fine-tuning
    epochs: int = _num(10, min=0)  # finetune: fine-tuning epochs after pruning
    lr: float = _num(0.01, min=0.0, min_exclusive=True)  # finetune: peak learning rate (optim.name's
    # optimizer, momentum and weight decay)
    lr_schedule: str = _choice("cosine", *LR_SCHEDULES)  # finetune: learning-rate schedule
    warmup_epochs: float = _num(0.0, min=0.0)  # finetune: linear warm-up, epochs
    # sparsity auto: points of validation top-1 the fine-tuned model may lose against the trained one
    max_drop: Optional[float] = None
    max_attempts: int = _num(4, min=1)  # auto: fine-tunes the search may spend (uniform comparison: +1)
    sensitivity_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # auto, structured:
    # ratios each channel group is pruned alone at (no fine-tune) to rank the groups
    sensitivity_batches: int = _num(4, min=1)  # auto, structured: validation batches per sensitivity point
    compare_uniform: bool = True  # auto, structured: fine-tune one uniform ratio at the chosen MACs too


@dataclass
class QuantConfig:
    # none | int8 (post-training static int8: torch.export + torchao PT2E, x86 inductor quantizer, CPU
    # inference) | qat (quantization-aware fine-tuning, then int8) | fp16 (half weights, GPU inference)
    method: str = _choice("none", *QUANT_METHODS)
    calib_batches: int = _num(16, min=1)  # int8: un-augmented training batches for calibration
    epochs: int = _num(2, min=0)  # qat: fine-tuning epochs with fake quantization (>= 1)
    lr: float = _num(1e-3, min=0.0, min_exclusive=True)  # qat: peak learning rate (cosine to 0)
    # int8/qat: points of validation top-1 int8 may cost; over it, the costliest layers stay fp32
    max_drop: Optional[float] = None
    ranking: str = _choice("sqnr", "sqnr", "accuracy")  # max_drop: how layers are ranked for fp32
    max_fp32_layers: Optional[int] = None  # max_drop: stop after this many layers in fp32 (>= 1)


@dataclass
class MeasureConfig:
    enabled: bool = True  # measure every model of the run (metrics/measure.json)
    latency_repeats: int = _num(50, min=1)  # batch-1 forwards timed per model (median reported)
    throughput_batch: int = _num(256, min=1)  # images per forward for throughput
    throughput_repeats: int = _num(5, min=1)  # large-batch forwards timed per model (median)
    warmup: int = _num(3, min=1)  # untimed forwards first, per model and batch size
    compile: bool = True  # int8 timed as users run it: compiled once by the quantize stage into
    # models/int8.so.pt2 (AOTInductor, ~15-60 s); false: no package, int8 not timed. fp32 is timed eager
    memory: bool = True  # peak inference memory, each model in a fresh process
    threads: int = _num(0, min=0)  # CPU threads; 0 = as for training


@dataclass
class ShareConfig:
    # Runs whose training settings (data, model, optim, schedule, train, and prune when it runs inside
    # training) are equal train once: the result lives in <out>/.shared/train/<key>/ and each run folder
    # links to it. false: the run trains in its own folder (a benchmark baseline; a private retraining).
    train: bool = True
    # Runs of one shared training whose prune settings are equal (a fine-tune, prune.during: finetune)
    # prune once: <out>/.shared/prune/<key>/. false: the run prunes in its own folder.
    prune: bool = True


@dataclass
class SlurmConfig:
    partition: str = _sbatch(SBATCH_WORD, _WORD)  # empty = the cluster's default partition
    account: str = _sbatch(SBATCH_WORD, _WORD)
    qos: str = _sbatch(SBATCH_WORD, _WORD)
    constraint: str = _sbatch(SBATCH_CONSTRAINT, _WORD + " and the operators , & | ! [ ] * :")  # node features
    nodes: int = _num(1, min=1)
    tasks_per_node: int = _num(1, min=1)  # > 1 = one data-parallel rank per task
    gpus_per_node: int = _num(0, min=0)
    gpu_type: str = _sbatch(SBATCH_WORD, _WORD)  # gres type, e.g. rtx8000 or v100; empty = any
    cpus_per_task: int = _num(2, min=1)
    mem_gb: float = _num(8.0, min=0.001)  # memory per node, GB; sbatch gets whole MB, and
    # --mem=0 would mean all of the node's memory: at least 1 MB
    time_min: int = _num(120, min=1)  # time limit per job, minutes
    array_parallelism: int = _num(64, min=1)  # array tasks running at once (shared out when a
    # sweep is split into several arrays by the cluster's MaxArraySize)
    max_requeues: int = _num(3, min=0)  # requeues after time limit or preemption
    # Shell lines run before the job (module load, conda activate ...). Shell by design, written into
    # the job script unchecked: they run with the user's own rights, like a hand-written sbatch file.
    setup: list[str] = field(default_factory=list)


@dataclass
class OutputConfig:
    tensorboard: bool = True  # scalars per epoch under <run>/tb/
    log_every: int = _num(50, min=1)  # optimizer steps between log lines


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    share: ShareConfig = field(default_factory=ShareConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# Settings that only say where or how a run is scheduled or logged: they do not change its result, so
# they are left out of the run id (a longer time limit must resume a run, not start a new one).
ID_EXCLUDED_SECTIONS = ("slurm", "output")
# Sections that change a run's results but were once left out of the id: only their settings that differ
# from the default are hashed, so runs made before (with every such setting at its default) keep their ids.
# measure: its settings change the figures measured (measure.json), though not the models.
ID_NON_DEFAULT_SECTIONS = ("measure",)
# Sections added later that also change no result: dropped from the hash altogether (an empty entry
# would change every existing run id). share: where a training is done, not what it gives.
ID_DROPPED_SECTIONS = ("share",)
ID_INCLUDED_SLURM_KEYS = ("nodes", "tasks_per_node")  # the number of ranks does change the result
# Single keys of result sections that change only when a run notices something, not what it computes
ID_EXCLUDED_KEYS = (("train", "nan_check_steps"), ("train", "test_every_epoch"))


# --------------------------------------------------------------------------------------------------
# Schema introspection
# --------------------------------------------------------------------------------------------------


def schema_fields() -> dict[str, dataclasses.Field]:
    """Every leaf of the schema by dotted key."""
    out: dict[str, dataclasses.Field] = {}

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default), key + ".")
            else:
                out[key] = f

    walk(Config, "")
    return out


_FIELDS = schema_fields()
_SPLIT_KEYS: dict[str, tuple[str, str]] = {k: (k.split(".")[0], k.split(".")[-1]) for k in _FIELDS if k.count(".") == 1}
_SECTIONS = {k.split(".", 1)[0] for k in _FIELDS}


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _shape_message(key: str, value: Any = None) -> str | None:
    """Why ``key`` cannot be set, when it is a section (``optim``) or reaches inside a setting
    (``optim.lr.x``); None when it is merely unknown."""
    inside = [k for k in _FIELDS if k.startswith(key + ".")]
    if inside:
        example = (
            " ".join(f"{k}={v}" for k, v in flatten(value, key + ".").items())
            if isinstance(value, Mapping) and value
            else f"{inside[0]}=..."
        )
        return (
            f"is a section, not a setting: give its keys one at a time (on the command line: {example}). "
            f"Allowed keys in '{key}': {', '.join(inside)}."
        )
    parts = key.split(".")
    for n in range(1, len(parts)):
        leaf = ".".join(parts[:n])
        if leaf in _FIELDS:
            return f"'{leaf}' is a setting, not a section: it has no key '{'.'.join(parts[n:])}'."
    return None


def check_keys(tree: Mapping[str, Any], source: str | os.PathLike) -> None:
    """Fail on any key (nested or dotted) that is not in the schema."""
    for key in flatten(tree):
        if key in _FIELDS:
            continue
        shape = _shape_message(key)
        if shape:
            raise ConfigError(source, shape, key=key)
        section = key.split(".", 1)[0]
        if section not in _SECTIONS:
            raise ConfigError(
                source,
                f"unknown section '{section}'.{_suggest(section, sorted(_SECTIONS))} "
                f"Allowed sections: {', '.join(sorted(_SECTIONS))}.",
                key=key,
            )
        in_section = [k for k in _FIELDS if k.startswith(section + ".")]
        raise ConfigError(
            source,
            f"unknown key.{_suggest(key, in_section)} Allowed keys in '{section}': {', '.join(in_section)}.",
            key=key,
        )


def flatten(tree: Mapping[str, Any], prefix: str = "", source: str | os.PathLike | None = None) -> dict[str, Any]:
    """{"a": {"b": 1}, "c.d": 2} -> {"a.b": 1, "c.d": 2}; lists are leaves. With ``source`` (a file), a
    key given both dotted and nested (``optim.lr`` and ``optim: {lr: ...}``) is a ConfigError: one of the
    two would silently replace the other."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        inner = flatten(v, key + ".", source) if isinstance(v, Mapping) and key not in _FIELDS else {key: v}
        if source is not None and not out.keys().isdisjoint(inner):
            raise ConfigError(
                source,
                "given twice, once as a dotted key and once nested in a mapping (one "
                "would silently replace the other); keep one.",
                key=next(x for x in inner if x in out),
            )
        out.update(inner)
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b": 1, "c.d": 2} -> {"a": {"b": 1}, "c": {"d": 2}}."""
    out: dict[str, Any] = {}
    for key, v in flat.items():
        split = _SPLIT_KEYS.get(key)
        if split is not None:  # a schema key: section.leaf
            section = out.get(split[0])
            if section is None:
                section = out[split[0]] = {}
            section[split[1]] = v
            continue
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives one key twice (plain YAML keeps the last silently)."""

    def __init__(self, key: Any, first: yaml.Mark, again: yaml.Mark):
        self.key = key
        self.where = (
            f"on lines {first.line + 1} and {again.line + 1}"
            if first.line != again.line
            else f"on line {first.line + 1} (columns {first.column + 1} and {again.column + 1})"
        )
        super().__init__(None, None, f"duplicate key {key!r} {self.where}", again)


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: a second ``set:`` or ``optim.lr``
    would otherwise replace the first without a word. Merge keys (``<<``) may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=False)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # unhashable: the base class reports it
                continue
            if first is not key_node.start_mark:
                raise DuplicateKeyError(key, first, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with :class:`StrictLoader` (duplicate keys refused)."""
    return yaml.load(text, Loader=StrictLoader)


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a UTF-8 YAML file; a missing, unreadable or binary file, another encoding or a syntax error
    becomes a ConfigError naming the file (not a traceback)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(p, "file not found")
    if not p.is_file():
        raise ConfigError(
            p,
            "is a folder, not a YAML file"
            if p.is_dir()
            else "is not a regular file (a device, pipe or socket), not a YAML file",
        )
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(p, f"cannot read the file: {e.strerror or e}") from None
    if b"\0" in data:
        raise ConfigError(
            p, "holds NUL bytes (a binary file, or UTF-16 text): config and sweep files must be UTF-8 YAML"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            p,
            f"not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}): a binary file or "
            "another encoding such as latin-1; save it as UTF-8",
        ) from None
    try:
        return load_yaml(text)
    except DuplicateKeyError as e:
        raise ConfigError(
            p,
            f"given twice in one mapping, {e.where} (the second would silently replace the first); keep one.",
            key=str(e.key),
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(p, f"YAML syntax error{where}: {problem}") from None


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=3", "optim.betas=[0.9,0.99]"]`` -> dotted dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(COMMAND_LINE, f"'{item}' is not of the form key=value")
        try:
            out[key] = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


@dataclass
class Layer:
    """One source of settings: its name (file path or 'command line') and a dotted dict."""

    source: str
    values: dict[str, Any]


def file_layer(path: str | os.PathLike) -> Layer:
    tree = read_yaml(path)
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(path, f"expected a mapping of settings, got {type(tree).__name__}")
    return Layer(str(path), flatten(tree, source=path))


def compose(layers: Sequence[Layer]) -> DictConfig:
    """Merge layers in order onto the schema and validate; raises ConfigError naming the source."""
    cfg = OmegaConf.structured(Config)
    provenance: dict[str, str] = {}
    _apply(cfg, layers, provenance)
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(
            provenance.get(str(key), "config"), f"cannot resolve: {e.msg if hasattr(e, 'msg') else e}", key=key
        ) from None
    cfg = OmegaConf.structured(Config)
    cfg.merge_with(container)
    validate(cfg, provenance)
    return cfg


def as_dict(cfg: DictConfig, resolve: bool = False) -> dict[str, Any]:
    """A config as plain nested dicts (what flatten and the run id read)."""
    out = OmegaConf.to_container(cfg, resolve=resolve)
    assert isinstance(out, dict)
    return {str(k): v for k, v in out.items()}


def _apply(cfg: DictConfig, layers: Sequence[Layer], provenance: dict[str, str]) -> None:
    """Set each layer's values into ``cfg`` in order (type-checked, unresolved), noting their source."""
    for layer in layers:
        check_keys(layer.values, layer.source)
        for key, value in layer.values.items():
            if key not in _FIELDS:  # a whole section given a mapping (optim={lr: 0.5}): keys one at a time
                raise ConfigError(layer.source, _shape_message(key, value) or "unknown key.", key=key)
            if _is_missing_marker(value):
                raise ConfigError(layer.source, _missing_message(key), key=key)
            try:
                OmegaConf.update(cfg, key, value, merge=False)
            except OmegaConfBaseException as e:
                raise ConfigError(layer.source, _type_message(key, value, e), key=key) from None
            provenance[key] = layer.source


def _is_missing_marker(value: Any) -> bool:
    """omegaconf's '???' (a value still to be given), alone or in a list: merged onto the schema it
    silently stands for the default, or reaches a job script as text."""
    if isinstance(value, (list, tuple)):
        return any(_is_missing_marker(v) for v in value)
    return isinstance(value, str) and value == "???"


def _missing_message(key: str) -> str:
    choices = _FIELDS[key].metadata.get("choices")
    allowed = f" Allowed values: {', '.join(choices)}." if choices else ""
    return f"'???' (omegaconf's marker of a missing value) is not a value: give the setting.{allowed}"


def _check_finite(flat: Mapping[str, Any], provenance: Mapping[str, str]) -> None:
    """Refuse nan and +-inf in every numeric setting: range checks pass nan (every comparison is False)
    and inf where there is no upper bound."""
    for key, value in flat.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            what = "only finite numbers" if values is value else "a finite number"
            raise ConfigError(provenance.get(key, "defaults"), f"must be {what}, got {value}.", key=key)


def _type_message(key: str, value: Any, err: OmegaConfBaseException) -> str:
    f = _FIELDS[key]
    expected = getattr(f.type, "__name__", str(f.type))
    return f"expected a value of type {expected}, got {value!r}"


def _rules() -> list[tuple[str, tuple[str, ...] | None, Any, Any, bool, re.Pattern | None, str]]:
    """(key, choices, min, max, min_exclusive, pattern, allowed) per schema leaf, in schema order."""
    out = []
    for key, f in _FIELDS.items():
        m = f.metadata
        pattern = re.compile(m["pattern"]) if m.get("pattern") else None
        out.append(
            (
                key,
                m.get("choices"),
                m.get("min"),
                m.get("max"),
                bool(m.get("min_exclusive")),
                pattern,
                m.get("allowed", ""),
            )
        )
    return out


_RULES = _rules()


def validate(cfg: DictConfig, provenance: Mapping[str, str] | None = None) -> None:
    """Choices, ranges and cross-field rules; the error names the source that set the bad key."""
    validate_flat(flatten(as_dict(cfg)), provenance)


def validate_flat(
    flat: Mapping[str, Any], provenance: Mapping[str, str] | None = None, leaves: Iterable[str] | None = None
) -> None:
    """:func:`validate` on a complete dotted dict of typed values (every schema key, as composed).
    ``leaves``: the only keys whose own rules (finite, choices, range, pattern) need checking, the
    others' values having passed them already; the cross-field rules are always checked."""
    provenance = provenance or {}
    only = None if leaves is None else set(leaves)
    _check_finite(flat if only is None else {k: v for k, v in flat.items() if k in only}, provenance)
    for key, *rules in _RULES if only is None else (r for r in _RULES if r[0] in only):
        problem = _leaf_problem(flat[key], *rules)
        if problem is not None:
            raise ConfigError(provenance.get(key, "defaults"), problem, key=key)
    # cross-field rules, in this order: the first problem found is the one reported
    for check in (_optim_problem, _schedule_problem, _budget_problem, _prune_problem, _quant_problem, _ranks_problem):
        found = check(flat)
        if found is not None:
            key, msg = found
            raise ConfigError(provenance.get(origin(key, msg), "defaults"), msg, key=key)


def _leaf_problems(flat: Mapping[str, Any]) -> bool:
    """Whether any value of ``flat`` breaks its own rules (finite, choices, range, pattern)."""
    try:
        _check_finite(flat, {})
    except ConfigError:
        return True
    return any(_leaf_problem(flat[key], *rules) is not None for key, *rules in _RULES)


def _leaf_problem(
    value: Any,
    choices: tuple[str, ...] | None,
    lo: Any,
    hi: Any,
    lo_excl: bool,
    pattern: re.Pattern | None,
    allowed: str,
) -> str | None:
    """What is wrong with one schema leaf's value by its own rules (choices, range, sbatch pattern)."""
    if choices and value not in choices:
        return f"'{value}' is not allowed.{_suggest(str(value), choices)} Allowed values: {', '.join(choices)}."
    if lo is not None and (value < lo or (lo_excl and value == lo)):
        op = ">" if lo_excl else ">="
        return f"must be {op} {lo}, got {value}."
    if hi is not None and value > hi:
        return f"must be <= {hi}, got {value}."
    if pattern is not None and not pattern.fullmatch(str(value)):
        return f"{value!r} cannot be passed to sbatch: only {allowed} are allowed (pattern {pattern.pattern})."
    return None


# A cross-field check returns (dotted key to blame, message) for the first problem it finds, else None.
_Problem = tuple[str, str] | None


def _optim_problem(flat: Mapping[str, Any]) -> _Problem:
    if len(flat["optim.betas"]) != 2 or not all(0 <= b < 1 for b in flat["optim.betas"]):
        return "optim.betas", f"must be two numbers in [0, 1), got {flat['optim.betas']}."
    return None


def _schedule_problem(flat: Mapping[str, Any]) -> _Problem:
    ms = flat["schedule.milestones"]
    if any(not 0 < m < 1 for m in ms) or list(ms) != sorted(ms):
        return "schedule.milestones", f"must be increasing fractions of training in (0, 1), got {list(ms)}."
    if flat["schedule.warmup_epochs"] >= flat["train.epochs"]:
        return "schedule.warmup_epochs", f"must be shorter than train.epochs ({flat['train.epochs']})."
    return None


def _budget_problem(flat: Mapping[str, Any]) -> _Problem:
    """prune.sparsity (a fraction or auto) and the accuracy-budget settings (pipeline.budget_config)."""
    return next(iter(budget_problems(flat)), None)


def _prune_problem(flat: Mapping[str, Any]) -> _Problem:
    if flat["prune.initial_sparsity"] >= 1:  # prune.sparsity (a fraction or auto): _budget_problem
        return "prune.initial_sparsity", (
            f"must be in [0, 1) (a fraction of the weights removed), got {flat['prune.initial_sparsity']}."
        )
    if flat["prune.method"] == "none":
        return None
    if flat["prune.begin"] > flat["prune.end"]:
        return "prune.begin", (
            f"must not be after prune.end ({flat['prune.end']}): both are fractions of "
            f"the pruning steps, got {flat['prune.begin']}."
        )
    if (
        flat["prune.method"] == "unstructured"
        and flat["prune.schedule"] == "polynomial"
        and flat["prune.sparsity"] != "auto"
        and flat["prune.initial_sparsity"] > flat["prune.sparsity"]
    ):
        return "prune.initial_sparsity", (
            f"must not exceed prune.sparsity ({flat['prune.sparsity']}), got {flat['prune.initial_sparsity']}."
        )
    if flat["prune.method"] == "structured" and flat["prune.during"] == "train":
        return "prune.during", (
            "structured pruning removes channels from a trained model: allowed value "
            "with prune.method=structured: finetune."
        )
    if (
        flat["prune.during"] == "finetune"
        and flat["prune.warmup_epochs"]
        and flat["prune.warmup_epochs"] >= flat["prune.epochs"]
    ):
        return "prune.warmup_epochs", f"must be shorter than prune.epochs ({flat['prune.epochs']})."
    return None


def _quant_problem(flat: Mapping[str, Any]) -> _Problem:
    if flat["quant.method"] != "qat":
        return None
    if flat["slurm.nodes"] * flat["slurm.tasks_per_node"] > 1:
        return "quant.method", (
            "qat fine-tunes an exported program in one process: use slurm.nodes=1 and "
            "slurm.tasks_per_node=1 with it, or quant.method=int8."
        )
    if flat["quant.epochs"] < 1:
        return "quant.epochs", (
            f"quant.method=qat fine-tunes with fake quantization: must be >= 1, got {flat['quant.epochs']}."
        )
    return None


def _ranks_problem(flat: Mapping[str, Any]) -> _Problem:
    ranks = flat["slurm.nodes"] * flat["slurm.tasks_per_node"]
    if flat["train.batch_size"] % ranks:
        return "train.batch_size", (
            f"must be divisible by the number of data-parallel ranks "
            f"(slurm.nodes x slurm.tasks_per_node = {ranks}), got {flat['train.batch_size']}."
        )
    return None


def load_config(
    files: Sequence[str | os.PathLike] = (), overrides: Sequence[str] | Mapping[str, Any] = ()
) -> DictConfig:
    """Schema defaults <- each file in order <- ``key=value`` overrides."""
    layers = [file_layer(f) for f in files]
    over = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    if over:
        layers.append(Layer(COMMAND_LINE, dict(over)))
    return compose(layers)


def absolutize_paths(cfg: DictConfig, base: Path) -> DictConfig:
    """Make location settings absolute (relative to ``base``) so a job on another node finds them."""
    root = Path(os.path.expanduser(str(cfg.data.root)))
    if not root.is_absolute():
        cfg.data.root = str((base / root).resolve())
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, sort_keys=False)


def from_run_file(path: str | os.PathLike) -> DictConfig:
    """Load a resolved run config written by :func:`to_yaml` (validated again: files can be edited)."""
    return load_config([path])


def run_id(cfg: DictConfig) -> str:
    """A short, stable hash of everything that can change a run's result."""
    return tree_run_id(as_dict(cfg, resolve=True))


def tree_run_id(tree: Mapping[str, Any]) -> str:
    """:func:`run_id` of a resolved config given as a plain nested dict (``tree`` is not changed).
    Settings that do nothing in this run (:func:`inert_settings`) count at their default value."""
    tree = settled(tree)
    for section in ID_NON_DEFAULT_SECTIONS:
        if isinstance(tree.get(section), Mapping):
            tree[section] = {k: v for k, v in tree[section].items() if v != _DEFAULTS.get(f"{section}.{k}")}
    for section in ID_EXCLUDED_SECTIONS:
        kept = {k: tree[section][k] for k in ID_INCLUDED_SLURM_KEYS} if section == "slurm" else {}
        tree[section] = kept
    for section, key in ID_EXCLUDED_KEYS:
        if isinstance(tree.get(section), Mapping) and key in tree[section]:
            tree[section] = {k: v for k, v in tree[section].items() if k != key}
    for section in ID_DROPPED_SECTIONS:
        tree.pop(section, None)
    blob = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


# --------------------------------------------------------------------------------------------------
# Settings that do nothing in a run (given its other settings)
# --------------------------------------------------------------------------------------------------

_DEFAULTS: dict[str, Any] = {
    k: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default for k, f in _FIELDS.items()
}
_PRUNE_UNSTRUCTURED_ONLY = (
    "initial_sparsity",
    "schedule",
    "power",
    "begin",
    "end",
    "frequency",
    "scope",
    "dense_first_last",
)
_PRUNE_STRUCTURED_ONLY = ("importance", "round_to", "iterative_steps")
_PRUNE_FINETUNE_ONLY = ("epochs", "lr", "lr_schedule", "warmup_epochs")


# the settings that decide which others do nothing (inert_settings depends on these alone)
_DECIDING = (
    "data.loader",
    "prune.method",
    "prune.schedule",
    "prune.during",
    "quant.method",
    "measure.enabled",
    "prune.sparsity",
    "quant.max_drop",
)
_INERT: dict[tuple[Any, ...], dict[str, str]] = {}


def inert_settings(tree: Mapping[str, Any]) -> dict[str, str]:
    """The settings that change nothing in a run with these values, dotted key -> why (a phrase that
    follows the key: "prune.sparsity does nothing with prune.method=none"). They are left out of
    the run id and of the stage keys: a grid over one of them gives one run, not several equal ones.
    (The dict returned is shared: do not change it.)"""
    deciding = tuple(_value(tree, key) for key in _DECIDING)
    if deciding not in _INERT:
        _INERT[deciding] = _inert_settings(dict(zip(_DECIDING, deciding)))
    return _INERT[deciding]


def _inert_settings(flat: Mapping[str, Any]) -> dict[str, str]:
    out = {"train.eval_batch_size": "does not change results (each image's output is the same in any batch)"}
    if flat["data.loader"] == "device":
        out["train.num_workers"] = "does nothing with data.loader=device (no worker processes)"
    out.update(_inert_prune(flat))
    out.update({k: v for k, v in inert_budget(flat).items() if k not in out})
    if flat["quant.max_drop"] is not None:  # qat within a budget calibrates its PTQ search
        out.pop("quant.calib_batches", None)
    quant = flat["quant.method"]
    unused = {"none": ("calib_batches", "epochs", "lr"), "int8": ("epochs", "lr"), "qat": ("calib_batches",)}
    for leaf in unused.get(quant, ("calib_batches", "epochs", "lr")):
        out[f"quant.{leaf}"] = f"does nothing with quant.method={quant}"
    if not flat["measure.enabled"]:
        for key in _FIELDS:
            if key.startswith("measure.") and key != "measure.enabled":
                out[key] = "does nothing with measure.enabled=false"
    return out


def _value(tree: Mapping[str, Any], key: str) -> Any:
    """A dotted key of a nested config; its default where the tree lacks it (a config written before
    the key existed)."""
    section, leaf = key.split(".")
    return (tree.get(section) or {}).get(leaf, _DEFAULTS[key])


def _inert_prune(flat: Mapping[str, Any]) -> dict[str, str]:
    method = flat["prune.method"]
    if method == "none":
        keys = [k for k in _FIELDS if k.startswith("prune.") and k != "prune.method"]
        return dict.fromkeys(keys, "does nothing with prune.method=none")
    out = {}
    for leaf in _PRUNE_STRUCTURED_ONLY if method == "unstructured" else _PRUNE_UNSTRUCTURED_ONLY:
        out[f"prune.{leaf}"] = f"does nothing with prune.method={method}"
    if method == "unstructured" and flat["prune.schedule"] == "constant":
        for leaf in ("initial_sparsity", "power"):
            out[f"prune.{leaf}"] = "does nothing with prune.schedule=constant"
    if flat["prune.during"] == "train":
        for leaf in _PRUNE_FINETUNE_ONLY:
            out[f"prune.{leaf}"] = "does nothing with prune.during=train (no fine-tune)"
    return out


def settled(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a resolved config (a plain nested dict) with every :func:`inert_settings` key at its
    default value: what run ids and stage keys hash. At the default, nothing changes: the ids and keys
    of runs made before, whose inert settings had their default values, stay the same. Keys added later
    (``LATER_KEYS``) are left out at their default, so older ids and keys stay too. ``tree`` is not
    changed; a section is copied only where something in it changes."""
    out = dict(tree)
    for section, inert, later in _settle_plan(tree):
        node = out.get(section)
        if not isinstance(node, Mapping):
            continue
        changed: dict[str, Any] | None = None
        for leaf, default in inert:
            if leaf in node and node[leaf] != default:
                changed = dict(node) if changed is None else changed
                changed[leaf] = default
        for leaf, default in later:
            now = node if changed is None else changed
            if leaf in now and now[leaf] == default:
                changed = dict(node) if changed is None else changed
                del changed[leaf]
        if changed is not None:
            out[section] = changed
    return out


_SETTLE_PLANS: dict[
    tuple[Any, ...], tuple[tuple[str, tuple[tuple[str, Any], ...], tuple[tuple[str, Any], ...]], ...]
] = {}


def _settle_plan(
    tree: Mapping[str, Any],
) -> tuple[tuple[str, tuple[tuple[str, Any], ...], tuple[tuple[str, Any], ...]], ...]:
    """Per section: the (leaf, default) pairs :func:`settled` sets to their default (the inert settings)
    and those it leaves out at their default (``LATER_KEYS``). Depends only on the deciding settings."""
    deciding = tuple(_value(tree, key) for key in _DECIDING)
    plan = _SETTLE_PLANS.get(deciding)
    if plan is None:
        inert: dict[str, list[tuple[str, Any]]] = {}
        later: dict[str, list[tuple[str, Any]]] = {}
        for key in inert_settings(tree):
            section, leaf = key.split(".")
            inert.setdefault(section, []).append((leaf, _DEFAULTS[key]))
        for key in LATER_KEYS:
            section, leaf = key.split(".")
            later.setdefault(section, []).append((leaf, _DEFAULTS[key]))
        plan = tuple((s, tuple(inert.get(s, ())), tuple(later.get(s, ()))) for s in {**inert, **later})
        _SETTLE_PLANS[deciding] = plan
    return plan


def from_tree(tree: Mapping[str, Any]) -> DictConfig:
    """The DictConfig of a resolved config given as a plain nested dict (as :func:`compose` returns it)."""
    cfg = OmegaConf.structured(Config)
    cfg.merge_with(tree)
    return cfg


def _value_key(value: Any) -> tuple[str, type]:
    # repr tells 1, 1.0, True and '1' apart, which == and hash() do not
    return repr(value), type(value)


_YAML_LINES: dict[tuple[str, str, type], str] = {}
_YAML_SECTIONS: dict[tuple[str, str], str] = {}


def tree_to_yaml(tree: Mapping[str, Mapping[str, Any]]) -> str:
    """:func:`to_yaml` of a resolved config given as a plain nested dict (sections of leaves, in schema
    order), text for text. Each ``key: value`` block is emitted once by omegaconf's own YAML dumper and
    reused: in a block mapping a leaf's text depends only on its key, value and indentation. A section
    seen before (same leaves, same values by ``repr``, which tells 1, 1.0, True and '1' apart) is reused
    whole: the runs of a sweep differ in a few sections."""
    parts = []
    for section, leaves in tree.items():
        key = (section, repr(leaves))
        text = _YAML_SECTIONS.get(key)
        if text is None:
            text = _YAML_SECTIONS[key] = _section_yaml(section, leaves)
        parts.append(text)
    return "".join(parts)


def _section_yaml(section: str, leaves: Mapping[str, Any]) -> str:
    if not leaves:
        return OmegaConf.to_yaml({section: {}})
    parts = [f"{section}:\n"]
    for leaf, value in leaves.items():
        key = (f"{section}.{leaf}", *_value_key(value))
        text = _YAML_LINES.get(key)
        if text is None:
            text = OmegaConf.to_yaml({section: {leaf: value}}).split("\n", 1)[1]
            _YAML_LINES[key] = text
        parts.append(text)
    return "".join(parts)


_ENV_INTERPOLATION = re.compile(r"\$\{oc\.env:[^${}]*\}")


def _needs_full_compose(value: Any) -> bool:
    """Values the fast path of :class:`Composer` does not handle: interpolations, '???', mappings."""
    if isinstance(value, str):
        return "${" in value or value == "???"
    if isinstance(value, (list, tuple)):
        return any(_needs_full_compose(v) for v in value)
    return isinstance(value, Mapping)


class Composer:
    """:func:`compose` for many configs that share their first layers (a sweep: base files, cluster
    profile, ``set``), without building an omegaconf config per run.

    The shared layers are composed once. Each later value is type-checked and converted by omegaconf
    once per (key, value) and cached, then set into a copy of the shared dotted dict, which goes through
    the same :func:`validate_flat` as :func:`compose`, so a run gets the same values and the same errors
    (same source, key and message, raised in the same order) as ``compose(shared + layers)``. Cases this
    cannot reproduce exactly (interpolations other than ``${oc.env:...}``, '???') take :func:`compose`.
    """

    def __init__(self, shared: Sequence[Layer]):
        self.shared = list(shared)
        cfg = OmegaConf.structured(Config)
        self._provenance: dict[str, str] = {}
        _apply(cfg, self.shared, self._provenance)
        self._flat: dict[str, Any] | None = None
        raw = flatten(as_dict(cfg, resolve=False))
        # Interpolations are resolved after the last layer; only environment lookups are known not to
        # depend on what later layers set. Anything else, or a failure, is left to compose() per run.
        if not any(
            _needs_full_compose(_ENV_INTERPOLATION.sub("", v) if isinstance(v, str) else v) for v in raw.values()
        ):
            try:
                cfg = from_tree(as_dict(cfg, resolve=True))
                self._flat = flatten(as_dict(cfg))
            except OmegaConfBaseException:
                self._flat = None
        self._scratch = cfg  # values are converted by setting them here: any schema-typed config will do
        self._shared_bad = self._flat is None or _leaf_problems(self._flat)
        self._converted: dict[tuple[str, str, type], Any] = {}

    def _convert(self, key: str, value: Any, source: str) -> Any:
        """``value`` as omegaconf stores it in ``key`` (e.g. 1 -> 1.0 for a float); a ConfigError if it
        does not fit the key's type."""
        ck = (key, *_value_key(value))
        if ck in self._converted:
            return self._converted[ck]
        try:
            OmegaConf.update(self._scratch, key, value, merge=False)
        except OmegaConfBaseException as e:
            raise ConfigError(source, _type_message(key, value, e), key=key) from None
        out = OmegaConf.select(self._scratch, key)
        if isinstance(out, (DictConfig, ListConfig)):
            out = OmegaConf.to_container(out)
        self._converted[ck] = out
        return out

    def compose_flat(self, layers: Sequence[Layer]) -> dict[str, Any]:
        """The validated dotted dict (schema order) of ``compose(shared + layers)``."""
        if self._flat is None or any(_needs_full_compose(v) for layer in layers for v in layer.values.values()):
            return flatten(as_dict(compose(self.shared + list(layers))))
        flat = dict(self._flat)
        provenance = dict(self._provenance)
        for layer in layers:
            check_keys(layer.values, layer.source)
            for key, value in layer.values.items():
                flat[key] = self._convert(key, value, layer.source)
                provenance[key] = layer.source
        # the shared values' own rules are checked once (when they all pass); each run's, for its own values
        validate_flat(flat, provenance, None if self._shared_bad else {k for layer in layers for k in layer.values})
        return {k: list(v) if isinstance(v, list) else v for k, v in flat.items()}

"""A sweep file's ``search:`` section, parsed and checked. Torch-free and optuna-free (login node)::

    search:
      method: tpe                 # random | tpe | nsga2
      trials: 64                  # finished or stopped trials in all, whatever the number of workers
      workers: 8                  # array tasks running trials at once
      objective: {val_acc_best: max}          # figure: min | max; several for a Pareto front
      params:
        optim.lr: {low: 1.0e-3, high: 0.5, log: true}   # float (or int), linear or log, optional step
        optim.name: [sgd, nesterov, adam]                # choices
      early_stop: {method: asha, min_epochs: 3, reduction: 3}   # none | median | asha | hyperband
      seed: 0                     # the sampler's seed (reproducible with one worker)
      storage: mysql+pymysql://user:pw@host/db   # optional: a database instead of the journal file
      max_failed: 64              # optional: stop asking once this many trials failed (default: trials)
      constraints: {val_acc_drop: {max: 1.0}}   # optional: figure: {min?, max?}; a trial outside is infeasible

Every problem is a :class:`pipeline.config.ConfigError` naming the file, the key under ``search`` and
what is allowed; the commands turn it into exit code 2 before anything is written or submitted.
"""

from __future__ import annotations

import math
import re
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from pipeline.config import (
    ID_DROPPED_SECTIONS,
    ID_EXCLUDED_KEYS,
    ID_EXCLUDED_SECTIONS,
    ID_INCLUDED_SLURM_KEYS,
    Composer,
    ConfigError,
    Layer,
    _suggest,
    check_keys,
    schema_fields,
)
from pipeline.search.figures import ALIASES, FIGURES, figure, figures_text

METHODS = ("random", "tpe", "nsga2")
DIRECTIONS = ("min", "max")
SEARCH_KEYS = (
    "method",
    "trials",
    "workers",
    "objective",
    "params",
    "early_stop",
    "seed",
    "storage",
    "max_failed",
    "constraints",
)
BOUND_KEYS = ("min", "max")
RANGE_KEYS = ("low", "high", "log", "step", "int")
# early_stop keys by method (each also takes "method")
EARLY_STOP_KEYS: dict[str, tuple[str, ...]] = {
    "none": (),
    "median": ("min_epochs", "startup_trials"),
    "asha": ("min_epochs", "reduction"),
    "hyperband": ("min_epochs", "reduction", "max_epochs"),
}
CHOICE_TYPES = (str, int, float, bool, type(None))  # what Optuna stores as a categorical value


@dataclass(frozen=True)
class Range:
    """A numeric interval; ``integer`` samples whole numbers (always so for an int setting)."""

    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False

    def bounds(self) -> tuple[Any, Any]:
        return (int(self.low), int(self.high)) if self.integer else (self.low, self.high)


@dataclass(frozen=True)
class Choice:
    values: tuple[Any, ...]


Param = Range | Choice


@dataclass(frozen=True)
class EarlyStop:
    method: str = "none"
    min_epochs: int = 1  # no trial is stopped before this epoch (median: warm-up; asha/hyperband: first rung)
    reduction: int = 3  # asha/hyperband: 1/reduction of the trials go on at each rung
    startup_trials: int = 5  # median: trials that run to the end before any is stopped
    max_epochs: int | None = None  # hyperband: the longest trial, epochs (None: train.epochs)


@dataclass(frozen=True)
class Bound:
    """A constraint on a figure: the trial is feasible when ``min <= value <= max`` (either may be absent)."""

    min: float | None = None
    max: float | None = None

    def violations(self, name: str, value: float) -> dict[str, float]:
        """Optuna's constraint values, one per bound: feasible when <= 0 (how far past the bound otherwise)."""
        out = {}
        if self.max is not None:
            out[f"{name} <= {self.max:g}"] = value - self.max
        if self.min is not None:
            out[f"{name} >= {self.min:g}"] = self.min - value
        return out


@dataclass(frozen=True)
class SearchSpec:
    source: str  # the sweep file, for messages
    trials: int
    objective: dict[str, str]  # figure name (aliases resolved) -> min | max, in the file's order
    params: dict[str, Param]  # dotted schema key -> range or choices, in the file's order
    method: str = "tpe"
    workers: int = 1
    early_stop: EarlyStop = field(default_factory=EarlyStop)
    seed: int = 0
    storage: str | None = None  # a database URL; None: the journal file in the sweep folder
    max_failed: int | None = None  # None: as many as trials
    constraints: dict[str, Bound] = field(default_factory=dict)  # figure -> bounds (aliases resolved)

    @property
    def failure_limit(self) -> int:
        return self.trials if self.max_failed is None else self.max_failed

    @property
    def objectives(self) -> list[str]:
        return list(self.objective)

    def representative(self) -> dict[str, Any]:
        """One value of every searched setting (a range's low end, a list's first choice): set on top of a
        sweep point before it is checked, so that a setting the fixed values need (``prune.max_drop`` with
        ``prune.sparsity: auto``) may come from the search; each trial overrides it with its own value."""
        return {k: (p.bounds()[0] if isinstance(p, Range) else p.values[0]) for k, p in self.params.items()}


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


def _fail(source: str, key: str, message: str) -> ConfigError:
    return ConfigError(source, message, key=f"search.{key}" if key else "search")


def _int(source: str, key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(source, key, f"must be a whole number >= {low}, got {value!r}.")
    return value


def _unknown(source: str, key: str, given: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for k in given:
        if k not in allowed:
            raise _fail(
                source,
                f"{key}.{k}" if key else str(k),
                f"unknown key.{_suggest(str(k), allowed)} Allowed keys: {', '.join(allowed)}.",
            )


def parse_search(doc: Any, source: str | os.PathLike) -> SearchSpec:
    """The ``search:`` mapping of a sweep file as a :class:`SearchSpec` (not yet checked against the
    runs' configs: :func:`check_space` does that with the sweep's composed layers)."""
    src = str(source)
    if not isinstance(doc, Mapping):
        raise _fail(src, "", f"must be a mapping with keys {', '.join(SEARCH_KEYS)}, got {doc!r}.")
    _unknown(src, "", doc, SEARCH_KEYS)
    for required in ("trials", "objective", "params"):
        if required not in doc:
            raise _fail(src, required, "missing: a search needs trials, objective and params.")
    method = doc.get("method", "tpe")
    if method not in METHODS:
        raise _fail(
            src, "method", f"{method!r} is not allowed.{_suggest(str(method), METHODS)} Allowed: {', '.join(METHODS)}."
        )
    objective = parse_objective(doc["objective"], src)
    early = parse_early_stop(doc.get("early_stop"), src)
    check_early_stop(early, objective, src)
    max_failed = doc.get("max_failed")
    return SearchSpec(
        source=src,
        method=method,
        trials=_int(src, "trials", doc["trials"], 1),
        workers=_int(src, "workers", doc.get("workers", 1), 1),
        objective=objective,
        params=parse_params(doc["params"], src),
        early_stop=early,
        seed=_int(src, "seed", doc.get("seed", 0), 0),
        storage=parse_storage(doc.get("storage"), src),
        max_failed=None if max_failed is None else _int(src, "max_failed", max_failed, 0),
        constraints=parse_constraints(doc.get("constraints"), src),
    )


def _figure_name(src: str, key: str, name: Any) -> str:
    fig = figure(str(name))
    if fig is None:
        raise _fail(
            src,
            key,
            f"names no figure a run records.{_suggest(str(name), [*FIGURES, *ALIASES])} Allowed figures (read "
            f"from): {figures_text()}.",
        )
    return fig.name


def parse_constraints(doc: Any, src: str) -> dict[str, Bound]:
    """``{figure: {min?, max?}}``: at least one bound each, numbers, min <= max."""
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise _fail(
            src,
            "constraints",
            f"must be a mapping of figure: {{min?, max?}} (e.g. {{val_acc_drop: {{max: 1.0}}}}), got {doc!r}.",
        )
    out: dict[str, Bound] = {}
    for name, bounds in doc.items():
        key = f"constraints.{name}"
        fig = _figure_name(src, key, name)
        if not isinstance(bounds, Mapping) or not bounds:
            raise _fail(src, key, f"must give a bound, min and/or max (e.g. {{max: 1.0}}), got {bounds!r}.")
        _unknown(src, key, bounds, BOUND_KEYS)
        values = {k: _number(src, f"{key}.{k}", v) for k, v in bounds.items()}
        if "min" in values and "max" in values and values["min"] > values["max"]:
            raise _fail(src, key, f"min must not exceed max, got min {values['min']!r} > max {values['max']!r}.")
        if fig in out:
            raise _fail(src, key, f"names {fig} a second time.")
        out[fig] = Bound(values.get("min"), values.get("max"))
    return out


def parse_objective(doc: Any, src: str) -> dict[str, str]:
    if not isinstance(doc, Mapping) or not doc:
        raise _fail(
            src, "objective", f"must be a mapping of figure: min|max (e.g. {{val_acc_best: max}}), got {doc!r}."
        )
    out: dict[str, str] = {}
    for name, direction in doc.items():
        fig_name = _figure_name(src, f"objective.{name}", name)
        if direction not in DIRECTIONS:
            raise _fail(src, f"objective.{name}", f"direction {direction!r} is not allowed: min or max.")
        if fig_name in out:
            raise _fail(src, f"objective.{name}", f"names {fig_name} a second time.")
        out[fig_name] = direction
    return out


def parse_params(doc: Any, src: str) -> dict[str, Param]:
    if not isinstance(doc, Mapping) or not doc:
        raise _fail(src, "params", f"must be a non-empty mapping of dotted setting: range or choices, got {doc!r}.")
    fields = schema_fields()
    out: dict[str, Param] = {}
    for key, value in doc.items():
        key = str(key)
        check_param_key(key, src)
        check_searchable(key, src)
        kind = _kind(fields[key])
        out[key] = (
            parse_choice(key, value, kind, src) if isinstance(value, list) else parse_range(key, value, kind, src)
        )
    return out


def check_param_key(key: str, src: str) -> None:
    """The schema's own check of a dotted key ("did you mean"), named as a key under search.params."""
    try:
        check_keys({key: None}, src)
    except ConfigError as e:
        raise _fail(src, f"params.{key}", str(e).removeprefix(f"{src}: {e.key}: ")) from None


def check_searchable(key: str, src: str) -> None:
    """Refuse settings left out of the run id (every value would give the same run folder) and the
    slurm section (the workers' resources are fixed when their array is submitted)."""
    section, _, leaf = key.partition(".")
    if section == "slurm" and leaf in ID_INCLUDED_SLURM_KEYS:
        raise _fail(
            src,
            f"params.{key}",
            "cannot be searched: every trial runs in a worker whose nodes and tasks were fixed when the "
            "array was submitted; set it in set:, or make it a grid axis (one study per value).",
        )
    excluded = section in ID_DROPPED_SECTIONS or (section, leaf) in ID_EXCLUDED_KEYS
    if excluded or section in ID_EXCLUDED_SECTIONS:
        raise _fail(
            src,
            f"params.{key}",
            "does not change a run's result (it is left out of the run id), so every value would be the "
            "same run: search settings of data, model, optim, schedule, train, prune or quant.",
        )


def _kind(field: Any) -> str:
    """The setting's type as text; a setting typed Any that holds a number by default (prune.sparsity: a
    fraction or ``auto``) searches as that number's type."""
    kind = str(field.type)
    default = getattr(field, "default", None)
    if kind in ("Any", "typing.Any") and isinstance(default, (int, float)) and not isinstance(default, bool):
        return type(default).__name__
    return kind


def parse_choice(key: str, values: list[Any], kind: str, src: str) -> Choice:
    where = f"params.{key}"
    if not values:
        raise _fail(src, where, "an empty list of choices: give at least one value.")
    if kind.startswith("list"):
        raise _fail(src, where, f"is a list setting ({kind}): only single-valued settings can be searched.")
    seen: set[tuple[str, type]] = set()
    for v in values:
        if not isinstance(v, CHOICE_TYPES):
            raise _fail(src, where, f"choice {v!r} is not a single value (text, number, true/false or null).")
        if (repr(v), type(v)) in seen:
            raise _fail(src, where, f"choice {v!r} is given twice.")
        seen.add((repr(v), type(v)))
    return Choice(tuple(values))


def _number(src: str, where: str, value: Any) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as text; the schema's own values accept it
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(src, where, f"must be a finite number, got {value!r}.")
    return value


def parse_range(key: str, doc: Any, kind: str, src: str) -> Range:
    where = f"params.{key}"
    if not isinstance(doc, Mapping):
        raise _fail(src, where, f"must be a range {{low, high, log?, step?, int?}} or a list of choices, got {doc!r}.")
    _unknown(src, where, doc, RANGE_KEYS)
    if kind not in ("int", "float"):
        raise _fail(src, where, f"is a {kind} setting: a range needs an int or float setting; give a list of choices.")
    if "low" not in doc or "high" not in doc:
        raise _fail(src, where, "a range needs both low and high.")
    low, high = _number(src, f"{where}.low", doc["low"]), _number(src, f"{where}.high", doc["high"])
    flags = {}
    for flag in ("log", "int"):
        flags[flag] = doc.get(flag, False)
        if not isinstance(flags[flag], bool):
            raise _fail(src, f"{where}.{flag}", f"must be true or false, got {flags[flag]!r}.")
    integer = kind == "int" or flags["int"]
    if kind == "int" and doc.get("int") is False:
        raise _fail(src, f"{where}.int", "is an integer setting: its range is sampled in whole numbers.")
    if integer and not all(float(v).is_integer() for v in (low, high)):
        raise _fail(src, where, f"an integer range needs whole-number bounds, got low {low!r}, high {high!r}.")
    if low >= high:
        raise _fail(src, where, f"low must be below high, got low {low!r} >= high {high!r}.")
    if flags["log"] and low <= 0:
        raise _fail(src, f"{where}.low", f"log: true needs low > 0 (a log scale has no 0 or negatives), got {low!r}.")
    step = parse_step(doc.get("step"), low, high, integer, flags["log"], src, where)
    return Range(low, high, log=flags["log"], step=step, integer=integer)


def parse_step(step: Any, low: float, high: float, integer: bool, log: bool, src: str, where: str) -> float | None:
    if step is None:
        return None
    step = _number(src, f"{where}.step", step)
    if step <= 0 or (integer and not float(step).is_integer()):
        raise _fail(src, f"{where}.step", f"must be a {'whole number' if integer else 'number'} > 0, got {step!r}.")
    if log and step != 1:
        raise _fail(
            src, f"{where}.step", "a step cannot be combined with log: true (Optuna samples log ranges freely)."
        )
    spans = (high - low) / step
    if abs(spans - round(spans)) > 1e-9 * max(1.0, abs(spans)):
        raise _fail(src, f"{where}.step", f"high - low ({high - low!r}) must be a whole number of steps of {step!r}.")
    return None if log else step


def parse_early_stop(doc: Any, src: str) -> EarlyStop:
    if doc is None:
        return EarlyStop()
    if not isinstance(doc, Mapping):
        raise _fail(src, "early_stop", f"must be a mapping such as {{method: asha, min_epochs: 3}}, got {doc!r}.")
    method = doc.get("method", "none")
    if method not in EARLY_STOP_KEYS:
        allowed = tuple(EARLY_STOP_KEYS)
        raise _fail(
            src,
            "early_stop.method",
            f"{method!r} is not allowed.{_suggest(str(method), allowed)} Allowed: {', '.join(allowed)}.",
        )
    _unknown(src, "early_stop", doc, ("method", *EARLY_STOP_KEYS[method]))
    lows = {"min_epochs": 1, "reduction": 2, "startup_trials": 0, "max_epochs": 1}
    values = {k: _int(src, f"early_stop.{k}", doc[k], lows[k]) for k in EARLY_STOP_KEYS[method] if k in doc}
    early = EarlyStop(method=method, **values)
    if early.max_epochs is not None and early.max_epochs < early.min_epochs:
        raise _fail(
            src, "early_stop.max_epochs", f"must be >= min_epochs ({early.min_epochs}), got {early.max_epochs}."
        )
    return early


def check_early_stop(early: EarlyStop, objective: Mapping[str, str], src: str) -> None:
    if early.method == "none":
        return
    if len(objective) > 1:
        raise _fail(
            src,
            "early_stop.method",
            "early stopping compares one figure every epoch: with several objectives use early_stop: none.",
        )
    name = next(iter(objective))
    fig = FIGURES[name]
    if fig.per_epoch is None:
        judged = ", ".join(f.name for f in FIGURES.values() if f.per_epoch is not None)
        raise _fail(
            src,
            "early_stop.method",
            f"the objective {name} is known only at the end of a run, so no epoch can be judged by it: "
            f"early stopping needs an objective among {judged}, or early_stop: none.",
        )


def parse_storage(value: Any, src: str) -> str | None:
    """A database URL, as written: ``$NAME`` parts (a password kept out of the file) are read from the
    environment where the storage is opened (:func:`pipeline.search.study.expand_storage`)."""
    if value is None:
        return None
    whole_url_in_a_variable = isinstance(value, str) and ENV_VAR.fullmatch(value) is not None
    if not isinstance(value, str) or ("://" not in value and not whole_url_in_a_variable):
        raise _fail(
            src,
            "storage",
            "must be a database URL such as mysql+pymysql://user:$DB_PASSWORD@host/db (or left out).",
        )
    check_not_sqlite(value, src)
    return value


ENV_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")  # $NAME or ${NAME} in a storage URL


def check_not_sqlite(url: str, src: str) -> None:
    if url.split(":", 1)[0].split("+", 1)[0] == "sqlite":
        raise _fail(
            src,
            "storage",
            "SQLite locks fail on shared file systems (Optuna's FAQ advises against it): leave storage out "
            "for the journal file in the sweep folder, or name a MySQL/PostgreSQL server.",
        )


# --------------------------------------------------------------------------------------------------
# Checks against the runs' configs
# --------------------------------------------------------------------------------------------------


def candidate_values(param: Param) -> tuple[Any, ...]:
    """Values that bound what the sampler can give: a range's ends (the schema's limits are intervals),
    every choice."""
    return param.bounds() if isinstance(param, Range) else param.values


def check_space(spec: SearchSpec, composer: Composer) -> None:
    """Every value the search can give, set alone onto the sweep's fixed layers (``composer``), passes
    the schema's validation; the objectives exist with those settings. A combination of two searched
    values that breaks a cross-field rule (warm-up longer than the epochs) can only be seen when it is
    sampled: that trial fails with the message and the study goes on."""
    layer_source = f"{spec.source} (search.params)"
    for key, param in spec.params.items():
        for value in candidate_values(param):
            try:
                composer.compose_flat([Layer(layer_source, {key: value})])
            except ConfigError as e:
                raise _fail(spec.source, f"params.{key}", f"the value {value!r} does not fit the schema: {e}") from None
    check_objective_settings(spec, composer.compose_flat([]))


def check_objective_settings(spec: SearchSpec, base: Mapping[str, Any]) -> None:
    """An objective the runs' fixed settings never produce (int8 latency without quantization) fails
    every trial: refused here. A setting that is searched may produce it."""
    for name in spec.objective:
        for key, allowed in FIGURES[name].requires.items():
            param = spec.params.get(key)
            values = candidate_values(param) if param is not None else (base.get(key),)
            if not any(v in allowed for v in values):
                raise _fail(
                    spec.source,
                    f"objective.{name}",
                    f"is not recorded with {key}={base.get(key)!r}: it needs {key} in {list(allowed)}.",
                )

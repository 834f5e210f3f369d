"""Pruning within an accuracy budget: the largest pruning whose fine-tuned model stays within ``max_drop``.

- ``structured_sensitivity``: each prunable channel group (torch-pruning's dependency graph) pruned alone
  at a few ratios, scored on the validation split without fine-tuning. It depends only on the trained
  model and its settings, so it is a JSON record with a ``key``: runs that share a training share it.
- ``structured_within_budget``: per-group ratios along the allocation path that the sensitivity record
  gives (:func:`.search.allocation_path`), one fine-tune per attempt, bisected on the path's level.
- ``uniform_within_budget`` (one ratio for every group) and ``unstructured_within_budget`` (one global
  magnitude sparsity): bisection on that number, one fine-tune per attempt.
- ``uniform_at_macs``: the uniform ratio that removes as many MACs as a chosen attempt, fine-tuned once:
  what a user would have guessed, to compare with.

An attempt is proposed by a pure function of the finished ones (:mod:`.search`), so a search that is
passed the attempts a killed job finished continues exactly: the attempt in progress is built again from
the same settings (pruning is deterministic) and ``finetune`` resumes it from its checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from pipeline.compress.budget import search
from pipeline.compress.structured import ignored_layers, prune_structured
from pipeline.compress.unstructured import MagnitudePruner, weight_sparsity

log = logging.getLogger("pipeline.compress.budget.prune")

__all__ = [
    "BudgetResult",
    "prunable_groups",
    "sensitivity_key",
    "structured_sensitivity",
    "structured_within_budget",
    "uniform_at_macs",
    "uniform_within_budget",
    "unstructured_within_budget",
]

SENSITIVITY_VERSION = 1

Score = Callable[[nn.Module], float]  # validation top-1, a fraction in [0, 1]
# (model, attempt index, unstructured pruner or None): fine-tune in place. The pruner's masks must be
# re-applied after every optimizer step (``pruner.step(t)``, as the training loop's Phase does).
Finetune = Callable[[nn.Module, int, Any], None]
OnAttempt = Callable[[dict[str, Any], nn.Module], None]  # persist a finished attempt and its model
LoadAttempt = Callable[[dict[str, Any]], nn.Module]  # the fine-tuned model of an attempt finished earlier


@dataclass
class BudgetResult:
    model: nn.Module | None  # the chosen attempt's fine-tuned model (None: finished earlier, no loader)
    record: dict[str, Any]


def _example(model: nn.Module, example: torch.Tensor | None) -> torch.Tensor:
    if example is not None:
        return example
    param = next(model.parameters())
    return torch.zeros(2, 3, 32, 32, device=param.device, dtype=param.dtype)


# --------------------------------------------------------------------------------------------------
# Sensitivity
# --------------------------------------------------------------------------------------------------


def prunable_groups(model: nn.Module, example: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """The channel groups structured pruning can shrink: [{"name": the group's first conv (the key of
    ``prune_structured(ratios=...)``), "layers": convs whose outputs shrink with it, "channels": n}]."""
    import torch_pruning as tp

    names = {m: name for name, m in model.named_modules()}
    ignored = [sub for layer in ignored_layers(model) for sub in layer.modules()]
    was_training = model.training
    model.eval()  # the tracing forward must not move BatchNorm running statistics
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=_example(model, example))
        groups = list(graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]))
    finally:
        model.train(was_training)
    out = []
    for group in groups:
        root = group[0][0].target.module
        layers = [
            names[dep.target.module]
            for dep, _ in group
            if isinstance(dep.target.module, nn.Conv2d) and graph.is_out_channel_pruning_fn(dep.handler)
        ]
        channels = getattr(root, "out_channels", getattr(root, "out_features", 0))
        out.append({"name": names[root], "layers": layers, "channels": int(channels)})
    return sorted(out, key=lambda g: g["name"])


def sensitivity_key(model: nn.Module, settings: Mapping[str, Any]) -> str:
    """sha256 of the model's tensors (names, shapes, bytes) and the settings: equal keys, equal records."""
    digest = hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _widths_changed(report: Mapping[str, Any]) -> dict[str, int]:
    return {name: int(after) for name, (before, after) in report["widths"].items() if before != after}


def structured_sensitivity(
    model: nn.Module,
    score: Score,
    *,
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    importance: str = "l2",
    round_to: int = 8,
    example: torch.Tensor | None = None,
    tag: Any = None,
) -> dict[str, Any]:
    """Each prunable group pruned alone at each of ``ratios``, scored without fine-tuning.

    ``score`` should be the validation split on a bounded number of batches: it runs once per group and
    ratio (ResNet-20-B: 12 groups, ResNet-56-A: 27). A ratio that leaves the same width as a smaller one
    (``round_to``) is not scored again. ``tag`` (e.g. the validation split's size and seed, the batches
    scored) goes into the settings and the key. Returns a JSON-able record: ``key``, ``settings``,
    ``reference_val_acc``, ``macs`` and ``groups`` ([{name, layers, channels, points: [{ratio,
    channels_after, macs_removed (fraction of the model's MACs), val_acc, drop (points)}]}]).
    """
    from pipeline.models import count_macs

    start = time.perf_counter()
    settings = {"ratios": [float(r) for r in ratios], "importance": importance, "round_to": int(round_to), "tag": tag}
    if not ratios or not all(0.0 < float(r) < 1.0 for r in ratios):
        raise ValueError(f"sensitivity ratios must be in (0, 1), got {list(ratios)}")
    example = _example(model, example)
    reference = float(score(model))
    macs = count_macs(model, (1, *example.shape[1:]))
    groups = prunable_groups(model, example)
    for group in groups:
        group["points"] = _group_points(model, group["name"], score, reference, macs, settings, example)
    return {
        "version": SENSITIVITY_VERSION,
        "key": sensitivity_key(model, settings),
        "settings": settings,
        "reference_val_acc": reference,
        "macs": macs,
        "groups": groups,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _group_points(
    model: nn.Module,
    name: str,
    score: Score,
    reference: float,
    macs: int,
    settings: Mapping[str, Any],
    example: torch.Tensor,
) -> list[dict[str, Any]]:
    points: list[dict[str, Any]] = []
    seen: dict[int, dict[str, Any]] = {}  # parameters left -> the point (round_to can repeat a width)
    for ratio in sorted(settings["ratios"]):
        pruned = copy.deepcopy(model)
        report = prune_structured(
            pruned,
            ratio=0.0,
            ratios={name: ratio},
            importance=settings["importance"],
            round_to=settings["round_to"],
            example_input=example,
        )
        left = int(report["params_after"])
        if left not in seen:
            acc = float(score(pruned)) if left != report["params_before"] else reference
            removed = (macs - report["macs_after"]) / macs
            seen[left] = {"macs_removed": removed, "val_acc": acc, "drop": search.drop_points(reference, acc)}
        width = report["widths"].get(name, [None, None])[1]
        points.append({"ratio": float(ratio), "channels_after": width, **seen[left]})
    return points


# --------------------------------------------------------------------------------------------------
# The search loop every method shares
# --------------------------------------------------------------------------------------------------


@dataclass
class _Search:
    """What a search needs besides the proposal and the build: scoring, fine-tuning, persistence."""

    score: Score
    finetune: Finetune
    reference: float
    max_drop: float
    size: str  # the attempt key that measures how much was removed
    on_attempt: OnAttempt | None
    load_attempt: LoadAttempt | None


def _size(key: str) -> Callable[[Mapping[str, Any]], float]:
    return lambda attempt: float(attempt[key])


def _run(
    s: _Search,
    propose: Callable[[list[dict[str, Any]]], dict[str, Any] | None],
    build: Callable[[dict[str, Any]], tuple[nn.Module, Any, dict[str, Any]]],
    history: Sequence[Mapping[str, Any]],
) -> tuple[list[dict[str, Any]], nn.Module | None, int, str]:
    attempts = [dict(a) for a in history]
    best: tuple[int, nn.Module] | None = None
    while (settings := propose(attempts)) is not None:
        began, k = time.perf_counter(), len(attempts)
        model, pruner, info = build(settings)
        s.finetune(model, k, pruner)
        acc = float(s.score(model))
        drop = search.drop_points(s.reference, acc)
        attempt = {"attempt": k, **settings, **info, "val_acc": acc, "drop": drop}
        attempt.update(within=search.within_budget(drop, s.max_drop), seconds=round(time.perf_counter() - began, 3))
        log.info("budget attempt %d: %s -> val acc %.4f, drop %.2f points", k, settings, acc, drop)
        attempts.append(attempt)
        if s.on_attempt is not None:
            s.on_attempt(attempt, model)
        if search.choose(attempts, s.max_drop, _size(s.size))[0] == k:
            best = (k, model)
    index, status = search.choose(attempts, s.max_drop, _size(s.size))
    chosen = best[1] if best is not None and best[0] == index else None
    if chosen is None and s.load_attempt is not None:  # chosen before a restart
        chosen = s.load_attempt(attempts[index])
    return attempts, chosen, index, status


def _record(method: str, s: _Search, attempts: list[dict[str, Any]], index: int, status: str, **extra: Any) -> dict:
    chosen = attempts[index]
    return {
        "method": method,
        "max_drop": s.max_drop,
        "reference_val_acc": s.reference,
        **extra,
        "attempts": attempts,
        "chosen": index,
        "val_acc": chosen["val_acc"],
        "drop": chosen["drop"],
        "status": status,
    }


def _structured_build(
    model: nn.Module, importance: str, round_to: int, example: torch.Tensor
) -> Callable[[dict[str, Any]], tuple[nn.Module, Any, dict[str, Any]]]:
    def build(settings: dict[str, Any]) -> tuple[nn.Module, Any, dict[str, Any]]:
        pruned = copy.deepcopy(model)
        ratios = settings.get("ratios")
        uniform = 0.0 if ratios is not None else float(settings["fraction"])
        report = prune_structured(
            pruned, ratio=uniform, ratios=ratios, importance=importance, round_to=round_to, example_input=example
        )
        return pruned, None, _size_info(report)

    return build


def _size_info(report: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "macs": int(report["macs_after"]),
        "macs_removed": 1.0 - report["macs_after"] / report["macs_before"],
        "params": int(report["params_after"]),
        "widths": _widths_changed(report),
    }


# --------------------------------------------------------------------------------------------------
# Structured: per-group ratios, and one uniform ratio
# --------------------------------------------------------------------------------------------------


def structured_within_budget(
    model: nn.Module,
    sensitivity: Mapping[str, Any],
    *,
    score: Score,
    finetune: Finetune,
    max_drop: float,
    max_attempts: int,
    reference_acc: float | None = None,
    importance: str = "l2",
    round_to: int = 8,
    example: torch.Tensor | None = None,
    history: Sequence[Mapping[str, Any]] = (),
    on_attempt: OnAttempt | None = None,
    load_attempt: LoadAttempt | None = None,
) -> BudgetResult:
    """Per-group channel ratios that remove the most MACs with the fine-tuned drop within ``max_drop``.

    Attempts walk the allocation path of ``sensitivity`` (:func:`.search.next_level`): the first at the
    last level whose predicted drop (no fine-tuning) is within budget, then bisection on the level, one
    ``finetune`` each, at most ``max_attempts``. ``score`` is the whole validation split (the reference is
    the unpruned ``model`` unless ``reference_acc`` is given). ``importance``/``round_to`` must be those
    of the sensitivity pass. ``history``: attempts finished before a restart. The record: ``attempts``
    (level, ratios, predicted and measured MACs removed, params, changed widths, val_acc, drop, within),
    ``chosen``, ``status`` (``done``, or ``over budget`` when none is within: the best accuracy is kept),
    ``levels`` and ``sensitivity_key``.
    """
    search.check_budget(max_drop, max_attempts)
    if sensitivity.get("version") != SENSITIVITY_VERSION:
        raise ValueError(f"unsupported sensitivity record version {sensitivity.get('version')!r}")
    path = search.allocation_path(sensitivity)
    if len(path) < 2:
        raise ValueError(f"{type(model).__name__} has no channel group that the sensitivity pass could prune")
    example = _example(model, example)
    reference = float(score(model)) if reference_acc is None else float(reference_acc)
    s = _Search(score, finetune, reference, float(max_drop), "macs_removed", on_attempt, load_attempt)

    def propose(attempts: list[dict[str, Any]]) -> dict[str, Any] | None:
        level = search.next_level(path, attempts, max_drop=max_drop, max_attempts=max_attempts)
        return None if level is None else {"level": level, **path[level]}

    attempts, chosen, index, status = _run(s, propose, _structured_build(model, importance, round_to, example), history)
    record = _record(
        "structured",
        s,
        attempts,
        index,
        status,
        max_attempts=max_attempts,
        levels=len(path) - 1,
        sensitivity_key=sensitivity.get("key"),
    )
    return BudgetResult(chosen, record)


def uniform_within_budget(
    model: nn.Module,
    *,
    score: Score,
    finetune: Finetune,
    max_drop: float,
    max_attempts: int,
    reference_acc: float | None = None,
    importance: str = "l2",
    round_to: int = 8,
    example: torch.Tensor | None = None,
    start: float = 0.5,
    upper: float = 0.9,
    history: Sequence[Mapping[str, Any]] = (),
    on_attempt: OnAttempt | None = None,
    load_attempt: LoadAttempt | None = None,
) -> BudgetResult:
    """One channel ratio for every group (``fraction``), bisected like ``unstructured_within_budget``:
    the baseline a user would reach with the same number of fine-tunes."""
    search.check_budget(max_drop, max_attempts)
    example = _example(model, example)
    reference = float(score(model)) if reference_acc is None else float(reference_acc)
    s = _Search(score, finetune, reference, float(max_drop), "macs_removed", on_attempt, load_attempt)

    def propose(attempts: list[dict[str, Any]]) -> dict[str, Any] | None:
        f = search.next_fraction(attempts, max_drop=max_drop, max_attempts=max_attempts, start=start, upper=upper)
        return None if f is None else {"fraction": f}

    attempts, chosen, index, status = _run(s, propose, _structured_build(model, importance, round_to, example), history)
    return BudgetResult(chosen, _record("uniform", s, attempts, index, status, max_attempts=max_attempts))


def _macs_at(model: nn.Module, ratio: float, importance: str, round_to: int, example: torch.Tensor) -> int:
    pruned = copy.deepcopy(model)
    return int(
        prune_structured(pruned, ratio=ratio, importance=importance, round_to=round_to, example_input=example)[
            "macs_after"
        ]
    )


def uniform_at_macs(
    model: nn.Module,
    macs: int,
    *,
    score: Score,
    finetune: Finetune,
    attempt: int,
    reference_acc: float,
    importance: str = "l2",
    round_to: int = 8,
    example: torch.Tensor | None = None,
    steps: int = 10,
) -> dict[str, Any]:
    """The uniform ratio whose pruned model has the MACs closest to ``macs`` (bisection, ``steps`` MAC
    counts, no fine-tune), then fine-tuned once (``finetune(model, attempt, None)``) and scored."""
    example = _example(model, example)
    lo, hi = 0.0, 0.95
    best = (abs(_macs_at(model, 0.0, importance, round_to, example) - macs), 0.0)
    for _ in range(steps):
        mid = round((lo + hi) / 2, 6)
        got = _macs_at(model, mid, importance, round_to, example)
        best = min(best, (abs(got - macs), mid))
        lo, hi = (mid, hi) if got > macs else (lo, mid)
    pruned = copy.deepcopy(model)
    info = _size_info(
        prune_structured(pruned, ratio=best[1], importance=importance, round_to=round_to, example_input=example)
    )
    finetune(pruned, attempt, None)
    acc = float(score(pruned))
    return {"ratio": best[1], **info, "val_acc": acc, "drop": search.drop_points(reference_acc, acc)}


# --------------------------------------------------------------------------------------------------
# Unstructured: one global sparsity
# --------------------------------------------------------------------------------------------------


def unstructured_within_budget(
    model: nn.Module,
    *,
    score: Score,
    finetune: Finetune,
    max_drop: float,
    max_attempts: int,
    reference_acc: float | None = None,
    scope: str = "global",
    dense_first_last: bool = True,
    start: float = 0.5,
    upper: float = 0.98,
    history: Sequence[Mapping[str, Any]] = (),
    on_attempt: OnAttempt | None = None,
    load_attempt: LoadAttempt | None = None,
) -> BudgetResult:
    """The largest magnitude sparsity (``fraction`` of the pruned weights) whose fine-tuned model is within
    ``max_drop``: bisection from ``start`` (:func:`.search.next_fraction`), one fine-tune per attempt,
    pruned once before it (``finetune`` gets the pruner and re-applies its masks after every step)."""
    search.check_budget(max_drop, max_attempts)
    reference = float(score(model)) if reference_acc is None else float(reference_acc)
    s = _Search(score, finetune, reference, float(max_drop), "fraction", on_attempt, load_attempt)

    def propose(attempts: list[dict[str, Any]]) -> dict[str, Any] | None:
        f = search.next_fraction(attempts, max_drop=max_drop, max_attempts=max_attempts, start=start, upper=upper)
        return None if f is None else {"fraction": f}

    def build(settings: dict[str, Any]) -> tuple[nn.Module, Any, dict[str, Any]]:
        pruned = copy.deepcopy(model)
        pruner = MagnitudePruner(
            pruned, final=settings["fraction"], scope=scope, dense_first_last=dense_first_last, schedule="constant"
        )
        pruner.prune_to(settings["fraction"])
        sparsity = weight_sparsity(pruned)
        return (
            pruned,
            pruner,
            {"weight_sparsity": sparsity["sparsity"], "nonzero_weights": sparsity["total"] - sparsity["zeros"]},
        )

    attempts, chosen, index, status = _run(s, propose, build, history)
    return BudgetResult(chosen, _record("unstructured", s, attempts, index, status, max_attempts=max_attempts))

"""Channel (structured) pruning with torch-pruning.

Removing whole channels makes a model really smaller and faster with dense kernels, unlike zeroed
weights. torch-pruning traces the model once to find the layers whose channels are coupled (a residual
stream, a concatenation) and removes the same channels from all of them.

A pruned model is saved as a plain ``state_dict()`` (``tp.state_dict`` pickles module objects, which
``torch.load(weights_only=True)`` refuses); :func:`pipeline.models.files.resize_to_state_dict` reshapes a
freshly built registry model to the saved tensor shapes so that state_dict loads into it.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Mapping, cast

import torch
from torch import nn

from pipeline.models.files import unwrap

log = logging.getLogger("pipeline.compress.structured")

__all__ = ["IMPORTANCES", "channel_widths", "ignored_layers", "prune_structured"]

IMPORTANCES = ("l1", "l2")


def channel_widths(model: nn.Module) -> dict[str, int]:
    """{qualified name: out_channels} of every Conv2d, in model order."""
    return {name: m.out_channels for name, m in unwrap(model).named_modules() if isinstance(m, nn.Conv2d)}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shortcut_a_ignored(model: nn.Module) -> list[nn.Module]:
    """Layers that must keep their widths in option-A (zero-padding shortcut) ResNets.

    torch-pruning cannot see through PadShortcut's F.pad: it prunes the residual stream on one side of
    the addition only, step() succeeds and the next forward fails on a shape mismatch. Keeping the
    stream's width (the stem conv and every block's last conv) leaves only the inner widths to prune.
    """
    from pipeline.models.resnet_cifar import BasicBlock, PadShortcut

    if not any(isinstance(m, PadShortcut) for m in model.modules()):
        return []
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return [stem] + [cast(nn.Module, m.conv2) for m in model.modules() if isinstance(m, BasicBlock)]


def ignored_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose output channels are never pruned: the classifier (last Linear) and, in option-A
    ResNets, the residual-stream convs (see ``_shortcut_a_ignored``)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:] + _shortcut_a_ignored(model)


def _ratio_dict(model: nn.Module, ratios: Mapping[str, float]) -> dict[nn.Module, float]:
    """{module: ratio} for torch-pruning's ``pruning_ratio_dict`` from {qualified name: ratio}."""
    modules = dict(model.named_modules())
    out: dict[nn.Module, float] = {}
    for name, r in ratios.items():
        if name not in modules:
            raise ValueError(f"ratios names {name!r}, which is no module of {type(model).__name__}")
        if not 0.0 <= float(r) < 1.0:
            raise ValueError(f"ratio of {name} must be in [0, 1), got {r}")
        out[modules[name]] = float(r)
    return out


def _channel_count(module: nn.Module, kind: str) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels if kind == "out" else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if kind == "out" else module.in_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    return int(cast(int, module.num_features))  # BatchNorm and the like


class _RemovedChannels:
    """Which channels (in the ORIGINAL layer's numbering) each pruning step removed, from the groups
    torch-pruning yields in interactive mode; composing steps maps later steps' indices back."""

    def __init__(self, names: dict[nn.Module, str]) -> None:
        self.names = names
        self.kept: dict[tuple[str, str], list[int]] = {}
        self.size: dict[tuple[str, str], int] = {}

    def record(self, group: Any, is_out_fn: Any) -> None:
        removing: dict[tuple[str, str], set[int]] = {}
        modules: dict[tuple[str, str], nn.Module] = {}
        for dep, idxs in group:
            module = dep.target.module
            name = self.names.get(module) if isinstance(module, nn.Module) else None
            if name is None or not idxs:
                continue  # torch-pruning's stand-ins for add, concat, reshape: no tensors to cut
            single = isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.BatchNorm1d))
            kind = "out" if single or is_out_fn(dep.handler) else "in"
            removing.setdefault((name, kind), set()).update(int(i) for i in idxs)
            modules[(name, kind)] = module
        for key, idxs in removing.items():
            if key not in self.kept:
                n = _channel_count(modules[key], key[1])
                self.kept[key], self.size[key] = list(range(n)), n
            self.kept[key] = [k for i, k in enumerate(self.kept[key]) if i not in idxs]

    def as_dict(self) -> dict[str, dict[str, list[int]]]:
        out: dict[str, dict[str, list[int]]] = {}
        for (name, kind), kept in self.kept.items():
            removed = sorted(set(range(self.size[(name, kind)])) - set(kept))
            if removed:
                out.setdefault(name, {})[kind] = removed
        return out


def prune_structured(
    model: nn.Module,
    *,
    ratio: float,
    importance: str = "l2",
    round_to: int = 8,
    iterative_steps: int = 1,
    example_input: torch.Tensor,
    record_removed: bool = False,
    ratios: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Remove ``ratio`` of the channels of every prunable layer group in place, by L1/L2 group magnitude.

    ``ratios`` ({qualified module name: ratio}) overrides ``ratio`` for the group that module's output
    channels belong to (torch-pruning's ``pruning_ratio_dict``; name one conv per group, e.g. the
    group's first): per-group ratios of :mod:`pipeline.compress.budget`.

    The classifier (last Linear) keeps its outputs; option-A ResNets also keep their residual-stream
    widths (see ``_shortcut_a_ignored``). ``round_to`` keeps channel counts multiples of it (fast
    kernels), so small layers can lose far more than ``ratio``: the report gives the real widths.
    ``iterative_steps`` pruning steps run back to back (importance recomputed after each).

    Returns {"params_before/after", "macs_before/after" (per image), "widths": {conv: [before, after]},
    "ignored": [names], ...}; with ``record_removed`` also "removed": {layer: {"out"|"in": [indices]}}
    in the original numbering, to check the result against the unpruned model with those channels zeroed.
    Raises RuntimeError if the pruned model no longer runs ``example_input``.

    GroupNorm models (``convert_norm(..., "group")``): torch-pruning removes the same channels from every
    norm group and applies round_to per group, so with 16 groups and round_to=8 nothing is removed (a
    warning says so); with round_to=1 channels go, but the group statistics change, so the pruned model
    is not the unpruned one with channels zeroed (fine-tuning has to recover it).
    """
    from pipeline.models import count_macs

    _check_arguments(ratio, importance, round_to, iterative_steps)
    model = unwrap(model)
    names = {m: name for name, m in model.named_modules()}
    input_size = (1, *example_input.shape[1:])
    widths_before = channel_widths(model)
    params_before, macs_before = _n_params(model), count_macs(model, input_size)
    ignored = ignored_layers(model)
    ratio_dict = _ratio_dict(model, ratios or {})

    removed = _RemovedChannels(names)
    was_training = model.training
    model.eval()  # the tracing forward must not move BatchNorm running statistics
    try:
        if ratio > 0 or any(r > 0 for r in ratio_dict.values()):
            pruner = _pruner(model, example_input, ratio, ratio_dict, importance, round_to, iterative_steps, ignored)
            for _ in range(iterative_steps):
                for group in pruner.step(interactive=True):
                    removed.record(group, pruner.DG.is_out_channel_pruning_fn)
                    group.prune()
        out = _forward_after_pruning(model, example_input)
    finally:
        model.train(was_training)
    for p in model.parameters():
        p.grad = None  # torch-pruning may leave pruned .grad tensors behind

    report: dict[str, Any] = {
        "ratio": float(ratio),
        **({"ratios": {k: float(v) for k, v in ratios.items()}} if ratios else {}),
        "importance": importance,
        "round_to": int(round_to),
        "iterative_steps": int(iterative_steps),
        "params_before": params_before,
        "params_after": _n_params(model),
        "macs_before": macs_before,
        "macs_after": count_macs(model, input_size),
        "widths": {name: [w, channel_widths(model)[name]] for name, w in widths_before.items()},
        "ignored": [names[m] for m in ignored],
        "output_shape": list(out.shape),
    }
    if ratio > 0 and report["params_after"] == params_before:
        _warn_unchanged(model, ratio, round_to)
    if record_removed:
        report["removed"] = removed.as_dict()
    return report


def _warn_unchanged(model: nn.Module, ratio: float, round_to: int) -> None:
    # E.g. GroupNorm with 16 groups: round_to applies to the per-group count, which rounds to "all".
    message = (
        f"structured pruning at ratio {ratio} removed no channel from {type(model).__name__} "
        f"(round_to={round_to}); the model is unchanged"
    )
    log.warning(message)
    warnings.warn(message)


def _check_arguments(ratio: float, importance: str, round_to: int, iterative_steps: int) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; allowed: {', '.join(IMPORTANCES)}")
    if round_to < 1 or iterative_steps < 1:
        raise ValueError(f"round_to and iterative_steps must be >= 1, got {round_to}, {iterative_steps}")


def _pruner(
    model: nn.Module,
    example_input: torch.Tensor,
    ratio: float,
    ratio_dict: dict[Any, float],
    importance: str,
    round_to: int,
    iterative_steps: int,
    ignored: list[nn.Module],
) -> Any:
    """torch-pruning's pruner by L1/L2 group magnitude over ``model``'s dependency graph."""
    import torch_pruning as tp

    return tp.pruner.BasePruner(
        model,
        example_input,
        importance=tp.importance.GroupMagnitudeImportance(p=1 if importance == "l1" else 2),
        pruning_ratio=ratio,
        pruning_ratio_dict=ratio_dict or None,
        iterative_steps=iterative_steps,
        round_to=round_to,
        ignored_layers=ignored,
    )


def _forward_after_pruning(model: nn.Module, example_input: torch.Tensor) -> torch.Tensor:
    """A forward pass of the pruned model: torch-pruning can leave one that no longer runs."""
    with torch.no_grad():
        try:
            return model(example_input)
        except Exception as exc:
            raise RuntimeError(
                f"structured pruning left {type(model).__name__} unable to run a forward pass ({exc}); "
                "torch-pruning missed a channel coupling: add the layers involved to the ignored ones"
            ) from exc

"""Magnitude pruning of individual Conv2d and Linear weights, with a sparsity schedule.

The pruner keeps plain bool masks itself (no ``torch.nn.utils.prune`` hooks), so the model's state_dict
keeps its plain ``weight`` keys and a pruned checkpoint loads into a freshly built model. It is called
after every optimizer step: it recomputes masks on the schedule's update steps and multiplies them into
the weights on every step, so momentum, Adam moments and weight decay can never revive a pruned weight.

Masks are chosen by index (a stable sort of the magnitudes), not by a threshold, so the number of zeros is
exactly round(s * n) even when many weights tie; a stable sort also makes every data-parallel rank (same
weights) choose the same mask.
"""

from __future__ import annotations

from typing import Any, Iterator, cast

import torch
from torch import nn

from pipeline.models.files import unwrap

__all__ = [
    "SCHEDULES",
    "SCOPES",
    "MagnitudePruner",
    "is_update_step",
    "phase_bounds",
    "target_sparsity",
    "update_steps",
    "weight_sparsity",
]

SCHEDULES = ("constant", "polynomial")
SCOPES = ("global", "layer")
_STATE_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------


def phase_bounds(total_steps: int, *, begin: float = 0.0, end: float = 1.0) -> tuple[int, int]:
    """(t0, t1): the first and the last mask update of a polynomial schedule, as 0-based step indices.

    t0 = round(begin * T), t1 = max(t0, round(end * T)), both clamped to the last step T - 1: the steps
    run 0..T-1, so an unclamped end=1 (t1 = T) would never be reached and the final sparsity never hit.
    Python's round() is used (halves go to the even neighbour: round(2.5) == 2).
    """
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    if not 0.0 <= begin <= end <= 1.0:
        raise ValueError(f"need 0 <= begin <= end <= 1, got begin={begin}, end={end}")
    last = max(total_steps - 1, 0)
    t0 = min(round(begin * total_steps), last)
    t1 = min(max(t0, round(end * total_steps)), last)
    return t0, t1


def _check_schedule(schedule: str, frequency: int = 1) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if not isinstance(frequency, int) or isinstance(frequency, bool) or frequency < 1:
        raise ValueError(f"frequency must be an int >= 1, got {frequency!r}")


def target_sparsity(
    step: int,
    total_steps: int,
    *,
    schedule: str,
    final: float,
    initial: float = 0.0,
    begin: float = 0.0,
    end: float = 1.0,
    power: float = 3.0,
) -> float:
    """The fraction of weights that should be zero after pruning step ``step`` (0-based) of ``total_steps``.

    constant: ``final`` from t0 on. polynomial (Zhu & Gupta 2017, "To prune, or not to prune"):
    s_t = final + (initial - final) * (1 - (t - t0) / (t1 - t0)) ** power for t0 <= t <= t1, ``final``
    after t1 (and from t0 when t1 == t0). 0 before t0. t0, t1 as in ``phase_bounds``.
    """
    _check_schedule(schedule)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    t0, t1 = phase_bounds(total_steps, begin=begin, end=end)
    if step < t0:
        return 0.0
    if schedule == "constant" or step >= t1:
        return float(final)
    frac = (step - t0) / (t1 - t0)
    return float(final + (initial - final) * (1.0 - frac) ** power)


def is_update_step(
    step: int, total_steps: int, *, schedule: str, frequency: int, begin: float = 0.0, end: float = 1.0
) -> bool:
    """Whether masks are recomputed after step ``step``: at t0, t0 + frequency, ... (polynomial: while
    <= t1, and always at t1 itself so the final sparsity is reached exactly; constant: until the last
    step, re-applying the final sparsity to weights that training has moved)."""
    _check_schedule(schedule, frequency)
    if step < 0 or step >= total_steps:
        return False
    t0, t1 = phase_bounds(total_steps, begin=begin, end=end)
    if step < t0:
        return False
    if schedule == "polynomial":
        if step > t1:
            return False
        if step == t1:
            return True
    return (step - t0) % frequency == 0


def update_steps(total_steps: int, *, schedule: str, frequency: int, begin: float = 0.0, end: float = 1.0) -> list[int]:
    """Every step index at which ``is_update_step`` is true, in order (empty when total_steps == 0)."""
    return [
        t
        for t in range(total_steps)
        if is_update_step(t, total_steps, schedule=schedule, frequency=frequency, begin=begin, end=end)
    ]


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def _weighted_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in unwrap(model).named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            yield name, m


def weight_sparsity(model: nn.Module) -> dict[str, Any]:
    """Zeros / total over the weights of every Conv2d and Linear (biases and norms not counted).

    Returns {"sparsity": overall fraction, "zeros": int, "total": int, "layers": {name: fraction}}.
    """
    zeros = total = 0
    layers: dict[str, float] = {}
    with torch.no_grad():
        for name, m in _weighted_layers(model):
            w = cast(torch.Tensor, m.weight)
            z, n = int((w == 0).sum().item()), w.numel()
            zeros, total = zeros + z, total + n
            layers[name] = z / n if n else 0.0
    return {"sparsity": zeros / total if total else 0.0, "zeros": zeros, "total": total, "layers": layers}


# --------------------------------------------------------------------------------------------------
# Pruner
# --------------------------------------------------------------------------------------------------


class MagnitudePruner:
    """Zeroes the smallest-magnitude weights of a model's Conv2d and Linear layers on a schedule.

    Call ``step(t)`` after optimizer step t (0-based) of the ``total_steps`` steps of the pruning phase;
    ``prune_to(s)`` jumps to a sparsity at once (one-shot pruning, total_steps == 0). With
    ``dense_first_last`` the first Conv2d (in ``model.modules()`` order) and the last Linear (the
    classifier) stay dense: they hold few weights and are the most sensitive ones.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        final: float,
        scope: str = "global",
        dense_first_last: bool = True,
        schedule: str = "polynomial",
        initial: float = 0.0,
        begin: float = 0.0,
        end: float = 1.0,
        power: float = 3.0,
        frequency: int = 100,
        total_steps: int = 0,
    ) -> None:
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; allowed: {', '.join(SCOPES)}")
        _check_schedule(schedule, frequency)
        for key, value in (("final", final), ("initial", initial)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} sparsity must be in [0, 1], got {value}")
        if schedule == "polynomial" and initial > final:
            raise ValueError(f"initial sparsity {initial} exceeds final {final}")
        if power <= 0:
            raise ValueError(f"power must be > 0, got {power}")
        phase_bounds(total_steps, begin=begin, end=end)  # validates total_steps, begin, end
        self.model = unwrap(model)
        self.scope, self.dense_first_last, self.schedule = scope, dense_first_last, schedule
        self.final, self.initial, self.begin, self.end = float(final), float(initial), float(begin), float(end)
        self.power, self.frequency, self.total_steps = float(power), frequency, total_steps

        layers = list(_weighted_layers(self.model))
        if dense_first_last:
            first_conv = next((name for name, m in layers if isinstance(m, nn.Conv2d)), None)
            last_linear = next((name for name, m in reversed(layers) if isinstance(m, nn.Linear)), None)
            layers = [(name, m) for name, m in layers if name not in (first_conv, last_linear)]
        if not layers:
            raise ValueError("the model has no Conv2d or Linear weight left to prune")
        # Modules, not parameters, are kept: model.to() or load_state_dict may swap a weight's storage.
        self._layers: dict[str, nn.Module] = dict(layers)
        self._keep: dict[str, torch.Tensor] = {}  # True = weight kept; CPU/GPU next to the weight
        self._zero: dict[str, torch.Tensor] = {}  # ~keep, in the weight's memory format, for masked_fill_
        self.target = 0.0  # sparsity of the last mask update
        self.updates = 0  # mask updates done so far
        self.last_update_step = -1  # step of the last update (-1: none, or prune_to)

    # -- which tensors ------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Qualified module names of the pruned layers, in model order."""
        return list(self._layers)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """{name: bool mask, True where the weight is kept}; empty before the first update."""
        return dict(self._keep)

    def _weight(self, name: str) -> torch.Tensor:
        return cast(torch.Tensor, self._layers[name].weight)

    # -- schedule -----------------------------------------------------------------------------------

    def target_at(self, step: int) -> float:
        """The schedule's target sparsity at ``step``."""
        return target_sparsity(
            step,
            self.total_steps,
            schedule=self.schedule,
            final=self.final,
            initial=self.initial,
            begin=self.begin,
            end=self.end,
            power=self.power,
        )

    def is_update_step(self, step: int) -> bool:
        return is_update_step(
            step, self.total_steps, schedule=self.schedule, frequency=self.frequency, begin=self.begin, end=self.end
        )

    def step(self, step: int) -> float | None:
        """After optimizer step ``step``: recompute masks if it is an update step (returning the new
        target sparsity, else None), then zero the pruned weights in place."""
        result = None
        if self.is_update_step(step):
            result = self.target_at(step)
            self._update_masks(result)
            self.last_update_step = step
        self.apply_masks()
        return result

    def prune_to(self, sparsity: float) -> float:
        """Recompute masks for ``sparsity`` now and apply them (one-shot pruning, or the end of a phase)."""
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
        self._update_masks(float(sparsity))
        self.apply_masks()
        return float(sparsity)

    # -- masks --------------------------------------------------------------------------------------

    @torch.no_grad()
    def _update_masks(self, sparsity: float) -> None:
        # The optimizer step just moved pruned weights off zero (momentum, weight decay): re-zero them
        # first, so they rank lowest and a rising schedule never revives a weight it has pruned.
        self.apply_masks()
        scores = {name: self._weight(name).detach().abs().float().reshape(-1) for name in self._layers}
        pruned: dict[str, torch.Tensor] = {}
        if self.scope == "layer":
            for name, s in scores.items():
                pruned[name] = self._smallest(s, round(sparsity * s.numel()))
        else:
            # One ranking over all tensors (on the first tensor's device): exactly round(s * N) zeros.
            device = next(iter(scores.values())).device
            flat = torch.cat([s.to(device) for s in scores.values()])
            chosen = self._smallest(flat, round(sparsity * flat.numel()))
            offset = 0
            for name, s in scores.items():
                pruned[name] = chosen[offset : offset + s.numel()].to(s.device)
                offset += s.numel()
        for name, p in pruned.items():
            w = self._weight(name)
            self._set_mask(name, (~p).reshape(w.shape))
        self.target = sparsity
        self.updates += 1

    @staticmethod
    def _smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
        """Bool vector, True at the k smallest scores (ties: lower index first, deterministically)."""
        chosen = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        if k > 0:
            order = torch.sort(scores, stable=True).indices
            chosen[order[:k]] = True
        return chosen

    def _set_mask(self, name: str, keep: torch.Tensor) -> None:
        w = self._weight(name)
        keep = keep.to(device=w.device, dtype=torch.bool).contiguous()
        self._keep[name] = keep
        # Same strides as the weight (channels_last stays channels_last), so masked_fill_ is a plain pass.
        zero = torch.empty_like(w, dtype=torch.bool)
        zero.copy_(~keep)
        self._zero[name] = zero

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Write exact +0.0 into every pruned weight (in place; memory format and dtype unchanged)."""
        for name, zero in self._zero.items():
            w = self._weight(name)
            if zero.device != w.device or zero.shape != w.shape or zero.stride() != w.stride():
                self._set_mask(name, self._keep[name])  # the model moved or changed format since
                zero = self._zero[name]
            w.masked_fill_(zero, 0.0)

    # -- checkpoints and metrics --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Masks (CPU bool tensors) and progress, as plain types: ``torch.load(weights_only=True)`` reads it."""
        return {
            "version": _STATE_VERSION,
            "scope": self.scope,
            "schedule": self.schedule,
            "final": self.final,
            "initial": self.initial,
            "begin": self.begin,
            "end": self.end,
            "power": self.power,
            "frequency": self.frequency,
            "total_steps": self.total_steps,
            "dense_first_last": self.dense_first_last,
            "names": self.names,
            "masks": {name: keep.detach().cpu().clone() for name, keep in self._keep.items()},
            "target": self.target,
            "updates": self.updates,
            "last_update_step": self.last_update_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore masks and progress (the schedule itself comes from this pruner's arguments), then apply
        the masks. The pruned layers must be the same ones, with the same shapes."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported pruner state version {state.get('version')!r}")
        if list(state["names"]) != self.names:
            raise ValueError(
                "the pruner state was saved for other layers: "
                f"{sorted(set(state['names']) ^ set(self.names))[:5]} differ"
            )
        for name, keep in state["masks"].items():
            if tuple(keep.shape) != tuple(self._weight(name).shape):
                raise ValueError(
                    f"mask {name} has shape {tuple(keep.shape)}, the weight {tuple(self._weight(name).shape)}"
                )
        self._keep, self._zero = {}, {}
        for name, keep in state["masks"].items():
            self._set_mask(name, keep)
        self.target = float(state["target"])
        self.updates = int(state["updates"])
        self.last_update_step = int(state["last_update_step"])
        self.apply_masks()

    def report(self) -> dict[str, Any]:
        """Measured sparsity of the pruned tensors, overall and per layer, with the current target.

        {"target": float, "sparsity": float, "zeros": int, "total": int, "layers": {name: fraction}}.
        """
        zeros = total = 0
        layers: dict[str, float] = {}
        with torch.no_grad():
            for name in self._layers:
                w = self._weight(name)
                z, n = int((w == 0).sum().item()), w.numel()
                zeros, total = zeros + z, total + n
                layers[name] = z / n
        return {"target": self.target, "sparsity": zeros / total, "zeros": zeros, "total": total, "layers": layers}

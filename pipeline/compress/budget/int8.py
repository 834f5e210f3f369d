"""int8 within an accuracy budget: post-training int8 that leaves the costliest layers in fp32.

Quantize every layer (PT2E, as :func:`pipeline.compress.quantize.quantize_int8`), score on the validation
split; while the drop exceeds ``max_drop`` points, rank the layers still in int8 by cost and quantize again
with the worst one also in fp32 (the x86 inductor quantizer's ``set_module_name_qconfig(name, None)``).
The result is still one converted program: ``save_int8`` writes it as a self-contained ``.pt2``.

Ranking. ``sqnr`` (the default) uses torchao's numeric debugger: the fp32 graph (BatchNorm folded, as in
the int8 one) and the int8 graph, both with an output logger on every node, run the same calibration
images; a layer's cost is the noise-to-signal power ratio (10^(-SQNR/10)) of its output minus that of its
input, i.e. the relative noise the layer itself adds. The propagated SQNR alone would blame every layer
after a bad one, since they inherit its noise. ``accuracy`` quantizes each layer alone (all others fp32)
and takes its validation drop. On ResNet-20 with one block made hostile to int8 (an outlier channel in
the activation a conv reads) both put that conv first. SQNR costs one logged forward of a few calibration
images per step (about the time of the quantization itself); ``accuracy`` costs one quantization and one
validation pass per layer, once (ResNet-20: 19 layers, ResNet-56: 55) -- bench/budget.py measures both,
BENCHMARKS.md has the figures. The SQNR ranking is redone at every step on the current mix, so a second
hostile layer, masked by the first one's noise, is found once the first is in fp32.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import (
    compare_results,
    extract_results_from_loggers,
    prepare_for_propagation_comparison,
)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

from pipeline.compress.budget.search import check_budget, choose, drop_points, next_fp32_layers, within_budget
from pipeline.compress.quantize import export_model, quantize_int8

log = logging.getLogger("pipeline.compress.budget.int8")

__all__ = ["RANKINGS", "accuracy_costs", "int8_within_budget", "quantized_layers", "sqnr_costs"]

RANKINGS = ("sqnr", "accuracy")

# Validation top-1 of a model or an int8 program (a fraction in [0, 1]).
Score = Callable[[Callable[[torch.Tensor], torch.Tensor]], float]

_WEIGHTED = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
_SQNR_CHUNK = 16  # images per logged forward: every node's output is kept until compared


def _module_name(node: Node) -> str | None:
    stack = list(node.meta.get("nn_module_stack", {}).values())
    if not stack:
        return None
    path = str(stack[-1][0])
    return path[len("L['self'].") :] if path.startswith("L['self'].") else path


def _is_dequantize(node: object) -> bool:
    target = getattr(node, "target", None)
    return (
        isinstance(target, torch._ops.OpOverload)
        and target.namespace == "quantized_decomposed"
        and target.__name__.startswith("dequantize_")
    )


def _weighted_nodes(gm: GraphModule) -> list[tuple[Node, str]]:
    """(node, module name) of every conv and linear call, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _WEIGHTED and (name := _module_name(node)):
            out.append((node, name))
    return out


def quantized_layers(gm: GraphModule) -> list[str]:
    """Module names of the convs and linears whose weights a converted graph holds in int8."""
    names: list[str] = []
    for node, name in _weighted_nodes(gm):
        if len(node.args) > 1 and _is_dequantize(node.args[1]) and name not in names:
            names.append(name)
    return names


# --------------------------------------------------------------------------------------------------
# Ranking
# --------------------------------------------------------------------------------------------------


def _folded_fp32(model: nn.Module, example: torch.Tensor) -> GraphModule:
    """The fp32 reference graph: exported as for int8 and BatchNorm folded into the convs (the int8 graph
    has no BatchNorm nodes left), nothing quantized (a quantizer without a config annotates nothing)."""
    gm = export_model(copy.deepcopy(model).cpu(), example.cpu()).module()
    return convert_pt2e(prepare_pt2e(gm, X86InductorQuantizer()))


def _clear_loggers(gm: GraphModule) -> None:
    for module in gm.children():
        stats = getattr(module, "stats", None)
        if isinstance(stats, list) and hasattr(module, "debug_info"):
            stats.clear()


def _noise_ratio(sqnr_db: float) -> float:
    if math.isnan(sqnr_db):  # both outputs zero: nothing lost
        return 0.0
    return min(10.0 ** (-sqnr_db / 10.0), 1e6)  # +inf dB (exact) -> 0


def _chunks(batches: Iterable[torch.Tensor], images: int) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    left = images
    for x in batches:
        for part in x.cpu().split(_SQNR_CHUNK):
            if left <= 0:
                return out
            out.append(part[:left])
            left -= out[-1].shape[0]
    return out


def _logged(gm: GraphModule) -> dict[str, Any]:
    """The loggers' outputs by the name of the exported node they come from. torchao keys them by that
    node and its graph's id; the int8 and the reference graphs come from two exports of the same model
    (same node names, other graph ids), so the name alone matches them."""
    return {info.name: result for info, result in extract_results_from_loggers(gm).items()}


@torch.no_grad()
def _noise_ratios(reference: GraphModule, int8: GraphModule, chunks: Sequence[torch.Tensor]) -> dict[str, float]:
    """Mean noise-to-signal power ratio of every node's output, by the reference graph's node name."""
    sums: dict[str, float] = {}
    for x in chunks:
        reference(x)
        int8(x)
        compared = compare_results(_logged(reference), _logged(int8))
        if not compared:
            raise RuntimeError("the numeric debugger matched no node of the int8 graph with the fp32 one")
        for summary in compared.values():
            ratio = _noise_ratio(float(summary.results[0].sqnr))
            sums[summary.ref_node_name] = sums.get(summary.ref_node_name, 0.0) + ratio
        _clear_loggers(reference)
        _clear_loggers(int8)
    return {name: total / max(len(chunks), 1) for name, total in sums.items()}


def sqnr_costs(
    reference: GraphModule, reference_logged: GraphModule, int8: GraphModule, chunks: Sequence[torch.Tensor]
) -> dict[str, float]:
    """{layer: noise-to-signal ratio of its output minus that of its input} for the layers ``int8``
    quantizes. ``reference`` is the folded fp32 graph, ``reference_logged`` the same with loggers."""
    ratios = _noise_ratios(reference_logged, prepare_for_propagation_comparison(int8), chunks)
    layers = set(quantized_layers(int8))
    costs: dict[str, float] = {}
    for node, name in _weighted_nodes(reference):
        if name in layers:
            source = node.args[0]
            before = ratios.get(source.name, 0.0) if isinstance(source, Node) else 0.0
            costs[name] = ratios.get(node.name, 0.0) - before
    return costs


def accuracy_costs(
    model: nn.Module,
    calib: Sequence[torch.Tensor],
    example: torch.Tensor,
    score: Score,
    layers: Sequence[str],
    reference_acc: float,
) -> dict[str, float]:
    """{layer: validation drop in points with that layer alone in int8, every other layer in fp32}."""
    costs = {}
    for name in layers:
        gm = quantize_int8(model, calib, example, fp32_modules=[other for other in layers if other != name])
        costs[name] = drop_points(reference_acc, score(gm))
    return costs


# --------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------


class _Ranker:
    """The costs of the layers still in int8 at each step, by the chosen ranking."""

    def __init__(self, ranking: str, model: nn.Module, calib: list[torch.Tensor], example: torch.Tensor, images: int):
        self.ranking, self.model, self.calib, self.example = ranking, model, calib, example
        self.chunks = _chunks(calib, images) if ranking == "sqnr" else []
        self.reference: GraphModule | None = None
        self.reference_logged: GraphModule | None = None
        self.accuracy: dict[str, float] | None = None

    def costs(self, gm: GraphModule, score: Score, reference_acc: float) -> dict[str, float]:
        if self.ranking == "accuracy":
            if self.accuracy is None:  # every layer alone, once: the ranking does not change between steps
                self.accuracy = accuracy_costs(
                    self.model, self.calib, self.example, score, quantized_layers(gm), reference_acc
                )
            return dict(self.accuracy)
        if self.reference is None:
            self.reference = _folded_fp32(self.model, self.example)
            self.reference_logged = prepare_for_propagation_comparison(self.reference)
        assert self.reference_logged is not None
        return sqnr_costs(self.reference, self.reference_logged, gm, self.chunks)


def _fewest_fp32(step: Mapping[str, Any]) -> float:
    return -len(step["fp32_layers"])


def int8_within_budget(
    model: nn.Module,
    calib: Iterable[torch.Tensor],
    example: torch.Tensor,
    score: Score,
    *,
    max_drop: float,
    reference_acc: float | None = None,
    ranking: str = "sqnr",
    max_steps: int | None = None,
    sqnr_images: int = 64,
) -> tuple[GraphModule, dict[str, Any]]:
    """The int8 program with the fewest fp32 layers found within ``max_drop`` points of validation top-1,
    and the record of the search.

    ``score`` gives validation top-1 of the fp32 model (the reference, unless ``reference_acc`` is given)
    and of each int8 program; ``calib`` are the calibration batches (reused at every step). The record:
    ``steps`` (``fp32_layers``, ``quantized_layers``, ``val_acc``, ``drop``, the ``costs`` that chose the
    next layer), ``chosen`` (index), ``fp32_layers``, ``val_acc``, ``drop`` and ``status``: ``done``, or
    ``over budget`` when no step met it (only one layer left quantized, or ``max_steps`` layers moved);
    then the step with the best accuracy is returned.
    """
    check_budget(max_drop)
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; allowed: {', '.join(RANKINGS)}")
    start = time.perf_counter()
    batches = [x.cpu() for x in calib]
    reference = float(score(model)) if reference_acc is None else float(reference_acc)
    ranker = _Ranker(ranking, model, batches, example, sqnr_images)
    steps: list[dict[str, Any]] = []
    best: GraphModule | None = None
    while (fp32 := next_fp32_layers(steps, max_drop=max_drop, max_steps=max_steps)) is not None:
        began = time.perf_counter()
        gm = quantize_int8(model, batches, example, fp32_modules=fp32)
        acc = float(score(gm))
        step: dict[str, Any] = {
            "step": len(steps),
            "fp32_layers": fp32,
            "quantized_layers": len(quantized_layers(gm)),
            "val_acc": acc,
            "drop": drop_points(reference, acc),
        }
        if not within_budget(step["drop"], max_drop):
            ranked = time.perf_counter()
            step["costs"] = ranker.costs(gm, score, reference)
            step["ranking_seconds"] = round(time.perf_counter() - ranked, 3)
        step["seconds"] = round(time.perf_counter() - began, 3)
        log.info("int8 with %d layer(s) in fp32: val acc %.4f, drop %.2f points", len(fp32), acc, step["drop"])
        steps.append(step)
        if choose(steps, max_drop, _fewest_fp32)[0] == len(steps) - 1:
            best = gm
    index, status = choose(steps, max_drop, _fewest_fp32)
    assert best is not None
    chosen = steps[index]
    record = {
        "max_drop": float(max_drop),
        "ranking": ranking,
        "reference_val_acc": reference,
        "layers": steps[0]["quantized_layers"],
        "steps": steps,
        "chosen": index,
        "fp32_layers": chosen["fp32_layers"],
        "val_acc": chosen["val_acc"],
        "drop": chosen["drop"],
        "status": status,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return best, record

"""Compression to an accuracy budget inside the stages (issue 18, docs/budget-design.md).

- :func:`prune_within_budget`: ``prune.sparsity: auto``. The structured search (sensitivity pass, then
  per-group ratios bisected on the allocation path) or the unstructured one (bisection on the global
  sparsity), one full, checkpointed fine-tune per attempt (:func:`pipeline.stages.loop.fit`, checkpoint
  ``checkpoints/prune-<k>.pt``). Finished attempts are in ``budget/prune_attempts.json`` and the best
  one's model in ``models/attempts/``: a killed or requeued job proposes the attempt in progress again
  and its fine-tune resumes from its checkpoint. Decisions read the validation split only; the test
  split is evaluated once, on the chosen model.
- :func:`int8_within_budget_stage`: ``quant.max_drop``, the int8 search that leaves the costliest
  layers in fp32 (not checkpointed: deterministic, minutes; a requeued stage runs it again).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.compress.budget import prune as bp
from pipeline.compress.budget.search import choose
from pipeline.compress.unstructured import weight_sparsity
from pipeline.models import count_macs
from pipeline.models.files import PRUNED, TRAINED, load_model, save_model
from pipeline.rundir import RunDir, atomic_write_json, read_json
from pipeline.stages.checkpoint import load_checkpoint
from pipeline.stages.loop import Phase, evaluate, evaluate_test, fit
from pipeline.stages.setup import Context, make_loaders, merged_schedule, to_device

log = logging.getLogger("pipeline.stages.budget")

ATTEMPTS = "prune_attempts.json"
UNIFORM = "prune_uniform.json"


# --------------------------------------------------------------------------------------------------
# Files of a run's search
# --------------------------------------------------------------------------------------------------


def budget_dir(run: RunDir) -> Path:
    return run.path / "budget"


def _attempt_model(run: RunDir, k: int) -> Path:
    return run.models / "attempts" / f"prune-{k}.pt"


def sensitivity_dir(run: RunDir) -> Path:
    """Beside the shared training (``<out>/.shared/train/<key>/sensitivity``) when the trained model is a
    link into it, so every budget of one training finds one sensitivity record; else the run's budget/."""
    trained = run.models / TRAINED
    if trained.is_symlink():
        return trained.resolve().parent.parent / "sensitivity"
    return budget_dir(run)


def _history(run: RunDir) -> list[dict[str, Any]]:
    attempts = read_json(budget_dir(run) / ATTEMPTS)
    return list(attempts) if isinstance(attempts, list) else []


# --------------------------------------------------------------------------------------------------
# The callables the searches take
# --------------------------------------------------------------------------------------------------


class _PruneRun:
    """Scoring, fine-tuning and persistence of one run's prune search."""

    def __init__(self, run: RunDir, cfg: DictConfig, ctx: Context, arch: dict[str, Any]):
        self.run, self.cfg, self.ctx, self.arch = run, cfg, ctx, arch
        self.p = cfg.prune
        self.main = ctx.dist.is_main

    def score(self, model: nn.Module, max_batches: int | None = None) -> float:
        model = to_device(model, self.cfg, self.ctx.device)
        return evaluate(model, self.ctx.val_loader, amp_dtype=self.ctx.amp_dtype, max_batches=max_batches)["acc"]

    def quick(self, model: nn.Module) -> float:
        return self.score(model, int(self.p.sensitivity_batches))

    def finetune(self, model: nn.Module, k: int, pruner: Any) -> None:
        """Attempt ``k``'s fine-tune: the prune settings' epochs and schedule, its own seed, checkpoint and
        TensorBoard folder; resumed from its checkpoint after a kill."""
        name = "uniform" if k >= int(self.p.max_attempts) else str(k)
        model = to_device(model, self.cfg, self.ctx.device)
        ckpt_path = self.run.checkpoints / f"prune-{name}.pt"
        ckpt = load_checkpoint(ckpt_path, self.run if self.main else None)
        torch.manual_seed(int(self.cfg.train.seed) + 1 + k)
        schedule = merged_schedule(
            self.cfg.schedule, {"name": str(self.p.lr_schedule), "warmup_epochs": float(self.p.warmup_epochs)}
        )
        tb = self.run.tensorboard / "prune" / f"attempt-{name}"
        phase = Phase(f"prune-{name}", int(self.p.epochs), float(self.p.lr), schedule, ckpt_path, tb, pruner)
        fit(model, self.ctx, phase, self.run, ckpt)

    def on_attempt(self, attempt: dict[str, Any], model: nn.Module) -> None:
        """Append the attempt to budget/prune_attempts.json; keep its model while it is the best so far."""
        if not self.main:
            return
        attempts = [*_history(self.run), attempt]
        k = attempt["attempt"]
        size = "fraction" if self.p.method == "unstructured" else "macs_removed"
        if choose(attempts, float(self.p.max_drop), lambda a: float(a[size]))[0] == k:
            save_model(_attempt_model(self.run, k), model, self.arch, extra={"stage": "prune", "attempt": k})
            for old in (self.run.models / "attempts").glob("prune-*.pt"):  # the new best is on disk first
                if old != _attempt_model(self.run, k):
                    old.unlink()
        atomic_write_json(budget_dir(self.run) / ATTEMPTS, attempts)

    def load_attempt(self, attempt: dict[str, Any]) -> nn.Module:
        model, _ = load_model(_attempt_model(self.run, int(attempt["attempt"])))
        return to_device(model, self.cfg, self.ctx.device)


# --------------------------------------------------------------------------------------------------
# prune.sparsity: auto
# --------------------------------------------------------------------------------------------------


def _sensitivity(s: _PruneRun, trained: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """The sensitivity record of the trained model, read from beside the training when a run with the
    same training and settings made it, else computed and written there (atomically)."""
    p, d = s.p, s.cfg.data
    tag = {"val_size": int(d.val_size), "split_seed": int(d.split_seed), "batches": int(p.sensitivity_batches)}
    ratios = [float(r) for r in p.sensitivity_ratios]
    settings = {"ratios": ratios, "importance": str(p.importance), "round_to": int(p.round_to), "tag": tag}
    path = sensitivity_dir(s.run) / f"{bp.sensitivity_key(trained, settings)}.json"
    record = read_json(path)
    if isinstance(record, dict) and record.get("version") == bp.SENSITIVITY_VERSION:
        log.info("sensitivity pass: reusing %s", path)
        return record
    record = bp.structured_sensitivity(
        trained, s.quick, ratios=ratios, importance=str(p.importance), round_to=int(p.round_to),
        example=example, tag=tag,
    )  # fmt: skip
    if s.main:
        atomic_write_json(path, record)
    return record


def _search(s: _PruneRun, trained: nn.Module, reference: float, example: torch.Tensor) -> bp.BudgetResult:
    p = s.p
    common: dict[str, Any] = dict(
        score=s.score,
        finetune=s.finetune,
        max_drop=float(p.max_drop),
        max_attempts=int(p.max_attempts),
        reference_acc=reference,
        history=_history(s.run),
        on_attempt=s.on_attempt,
        load_attempt=s.load_attempt,
    )
    if p.method == "unstructured":
        return bp.unstructured_within_budget(
            trained, scope=str(p.scope), dense_first_last=bool(p.dense_first_last), **common
        )
    sensitivity = _sensitivity(s, trained, example)
    return bp.structured_within_budget(
        trained, sensitivity, importance=str(p.importance), round_to=int(p.round_to), example=example, **common
    )


def _uniform(s: _PruneRun, trained: nn.Module, record: dict[str, Any], example: torch.Tensor) -> dict[str, Any]:
    """The uniform ratio at the chosen attempt's MACs, fine-tuned once (kept in budget/prune_uniform.json)."""
    path = budget_dir(s.run) / UNIFORM
    done = read_json(path)
    if isinstance(done, dict):
        return done
    chosen = record["attempts"][record["chosen"]]
    uniform = bp.uniform_at_macs(
        trained, int(chosen["macs"]), score=s.score, finetune=s.finetune, attempt=int(s.p.max_attempts),
        reference_acc=record["reference_val_acc"], importance=str(s.p.importance), round_to=int(s.p.round_to),
        example=example,
    )  # fmt: skip
    if s.main:
        atomic_write_json(path, uniform)
    return uniform


def _size_metrics(model: nn.Module, trained: nn.Module, method: str) -> dict[str, Any]:
    params = [sum(p.numel() for p in m.parameters()) for m in (trained, model)]
    nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    before = {n: m.out_channels for n, m in trained.named_modules() if isinstance(m, nn.Conv2d)}
    out: dict[str, Any] = {
        "params": params[1],
        "nonzero_params": nonzero,
        "macs": count_macs(model),
        "params_before": params[0],
        "macs_before": count_macs(trained),
        "widths": {k: [before[k], v] for k, v in widths.items() if k in before},
    }
    if method == "unstructured":
        out.update(sparsity=weight_sparsity(model)["sparsity"], weight_sparsity=weight_sparsity(model)["sparsity"])
    else:
        out["sparsity"] = 1 - params[1] / params[0]
    return out


def prune_within_budget(
    run: RunDir, cfg: DictConfig, ctx: Context, trained: nn.Module, info: dict[str, Any]
) -> dict[str, Any]:
    """``prune.sparsity: auto``: the search, the uniform comparison (structured), models/pruned.pt and the
    prune record with its ``budget``; the test split is evaluated once, on the chosen model."""
    p = cfg.prune
    s = _PruneRun(run, cfg, ctx, info["arch"])
    trained = to_device(trained, cfg, ctx.device)
    example = torch.zeros(2, 3, 32, 32, device=ctx.device)
    reference = s.score(trained)
    result = _search(s, trained, reference, example)
    record = dict(result.record)
    if p.method == "structured" and p.compare_uniform:
        record["uniform"] = _uniform(s, trained, record, example)
    model = result.model if result.model is not None else s.load_attempt(record["attempts"][record["chosen"]])
    metrics: dict[str, Any] = {
        "status": "done",
        "method": str(p.method),
        "during": "finetune",
        "sparsity_target": None,  # a number in the record's schema (rundir.FIELDS): auto is the budget below
        **_size_metrics(model, trained, str(p.method)),
        "val_acc": record["val_acc"],
        "trained_test_acc": info.get("extra", {}).get("test_acc"),
        "budget": record,
    }
    metrics.update(evaluate_test(model, ctx))
    log.info(
        "prune auto (%s, max drop %.2f): attempt %d of %d chosen, drop %.2f points, %s; test acc %.4f",
        p.method, record["max_drop"], record["chosen"], len(record["attempts"]), record["drop"], record["status"],
        metrics["test_acc"],
    )  # fmt: skip
    if record["status"] != "done":
        run.add_note(over_budget_note("prune", record))
    if s.main:
        extra = {"stage": "prune", "test_acc": metrics["test_acc"], "method": str(p.method), "budget": "auto"}
        save_model(run.models / PRUNED, model, info["arch"], extra=extra)
    return metrics


def over_budget_note(stage: str, record: dict[str, Any]) -> str:
    return f"{stage} over budget: best attempt {record['drop']:.2f} pt > {record['max_drop']:g}"


# --------------------------------------------------------------------------------------------------
# quant.max_drop
# --------------------------------------------------------------------------------------------------


def cpu_val_loader(cfg: DictConfig) -> Any:
    """The validation split on the CPU, un-augmented: what int8 decisions are scored on."""
    return make_loaders(cfg, torch.device("cpu"))[2]


def int8_search(
    cfg: DictConfig, model: nn.Module, calib: list[torch.Tensor], example: torch.Tensor
) -> tuple[Any, dict[str, Any]]:
    """int8 with the costliest layers in fp32 until the validation drop is within ``quant.max_drop``
    (:func:`pipeline.compress.budget.int8.int8_within_budget`): (converted program, record)."""
    from pipeline.compress.budget.int8 import int8_within_budget

    q = cfg.quant
    val = cpu_val_loader(cfg)
    score: Callable[[Any], float] = lambda f: evaluate(f, val)["acc"]  # noqa: E731
    gm, record = int8_within_budget(
        model, calib, example, score, max_drop=float(q.max_drop), ranking=str(q.ranking),
        max_steps=None if q.max_fp32_layers is None else int(q.max_fp32_layers),
    )  # fmt: skip
    return gm, record


def finish_int8_budget(run: RunDir, metrics: dict[str, Any]) -> None:
    """The quantize record's top-level ``fp32_layers`` and, over budget, a note on the run (not a failure)."""
    record = metrics.get("budget")
    if not record:
        return
    metrics["fp32_layers"] = list(record["fp32_layers"])
    if record["status"] != "done":
        run.add_note(over_budget_note(str(metrics["method"]), record))


def qat_drop(record: dict[str, Any], gm: Any, cfg: DictConfig) -> dict[str, Any]:
    """QAT within a budget: the PTQ search chose the fp32 layers (its steps in ``record``); the QAT model
    trained with them in fp32 decides done / over budget against the same reference."""
    from pipeline.compress.budget.search import drop_points, within_budget

    acc = evaluate(gm, cpu_val_loader(cfg))["acc"]
    drop = drop_points(record["reference_val_acc"], acc)
    within = within_budget(drop, float(cfg.quant.max_drop))
    return {**record, "ptq_val_acc": record["val_acc"], "val_acc": acc, "drop": drop,
            "status": "done" if within else "over budget"}  # fmt: skip


def int8_fp32_layers(run: RunDir, entries: list[dict[str, Any]]) -> None:
    """measure.json's int8 entry names the layers the quantize stage kept in fp32 (issue 18)."""
    layers = (run.read_metrics("quantize") or {}).get("fp32_layers")
    for entry in entries:
        if layers is not None and str(entry.get("name", "")).startswith("int8"):
            entry["fp32_layers"] = list(layers)

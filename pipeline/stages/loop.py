"""The training loop every stage that trains shares: ``train_one_epoch``, ``evaluate`` and ``fit`` (the
epochs of one phase: training, a pruning fine-tune, QAT), also used for calibration.

Resumable and deterministic: a checkpoint is written atomically after every epoch, every batch order
and augmentation draw is a function of (seed, epoch), and the RNG state is saved, so a run killed at
any point and restarted ends with the same weights as one that was never interrupted (CPU, same seed).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from pipeline.jobs.preempt import STOP, Preempted
from pipeline.rundir import RunDir, atomic_write_json
from pipeline.search.figures import STOPPED
from pipeline.search.reporting import current_hook
from pipeline.stages.checkpoint import save_checkpoint
from pipeline.stages.distributed import Dist
from pipeline.stages.setup import Context, autocast, build_optimizer, lr_factor

log = logging.getLogger("pipeline.stages.loop")


@dataclass
class EpochResult:
    """Sums over the steps of one epoch done so far; ``steps`` < len(loader) when it was stopped early.

    ``diverged`` is set when a loss was not finite: ``{"step": 1-based step of the epoch whose loss was
    first not finite, "loss": that loss ("nan", "inf", "-inf"; None when only another rank saw it),
    "last_finite_loss": the loss of the step before it (None when unknown)}``; ``last_loss`` is the last
    finite per-step loss seen (the next epoch's ``last_finite_loss`` when its first step diverges).
    """

    loss_sum: float = 0.0
    correct: int = 0
    images: int = 0
    seconds: float = 0.0
    steps: int = 0
    stopped: bool = False
    diverged: dict[str, Any] | None = None
    last_loss: float | None = None

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.images, 1)

    @property
    def acc(self) -> float:
        return self.correct / max(self.images, 1)

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def _any_rank(flag: bool, dist: Dist, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on one of them (ranks must stop at the same step)."""
    if not dist.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def stop_early(epoch: int, history: list[dict[str, float]], dist: Dist, device: torch.device) -> bool:
    """After a training epoch of a search's trial: whether the search stops the trial now (rank 0 asks
    the trial's reporter; every rank gets the answer). False outside a search."""
    hook = current_hook()
    if hook is None:
        return False
    return _any_rank(dist.is_main and hook.after_epoch(epoch, history), dist, device)


def set_mode(model: nn.Module, training: bool) -> None:
    """model.train(training); exported programs (QAT) cannot switch modes that way and carry their own
    switch as ``pipeline_set_mode``."""
    switch = getattr(model, "pipeline_set_mode", None)
    if switch is not None:
        switch(training)
        return
    try:
        model.train(training)
    except NotImplementedError:  # a loaded exported program: inference only, nothing to switch
        pass


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    *,
    set_lr: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    grad_clip: float = 0.0,
    label_smoothing: float = 0.0,
    log_every: int = 0,
    start_step: int = 0,
    carry: EpochResult | None = None,
    should_stop: Callable[[], bool] | None = None,
    dist: Dist = Dist(),
    nan_check_steps: int = 8,
    last_finite_loss: float | None = None,
) -> EpochResult:
    """Train over ``loader`` from batch ``start_step`` (the loader must start there too), adding to
    ``carry`` (the sums of the steps before it). Sums stay on the device: no host sync per step except
    every ``log_every`` steps (the log line), every ``nan_check_steps`` steps (the per-step losses of
    the window are read; a non-finite one ends the epoch with ``diverged`` set) and the ``should_stop``
    poll after each step (agreed over ranks), which ends it with ``stopped=True``.
    ``after_step(step)`` runs after every optimizer step (pruning re-applies its masks there).
    ``last_finite_loss`` is the last per-step loss of the epoch before (reported when step 1 diverges).

    With several ranks each rank's loss is its sum over its images times world_size / (images in the
    global batch), so DDP's gradient average equals one process's mean over the whole global batch.
    """
    set_mode(model, True)
    device = next(model.parameters()).device
    res = EpochResult(**{**vars(carry), "stopped": False}) if carry is not None else EpochResult()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    # Each step's loss goes into this window on the device (one copy, no sync); it is read every
    # ``nan_check_steps`` steps, so a diverged network (many times slower per step on a CPU) is noticed
    # within that many steps at the cost of one host sync per window.
    window_len = max(1, int(nan_check_steps))
    window = torch.zeros(window_len, device=device, dtype=torch.float32)
    filled = 0
    if last_finite_loss is not None:
        res.last_loss = last_finite_loss

    def check_window(last_step: int) -> bool:
        """Reads the window ending at ``last_step`` (0-based); True when a loss in it was not finite."""
        nonlocal filled
        values = window[:filled].tolist()
        first = last_step - filled + 2  # 1-based step of values[0]
        filled = 0
        for i, value in enumerate(values):
            if not math.isfinite(value):
                res.diverged = {"step": first + i, "loss": str(value), "last_finite_loss": res.last_loss}
                break
            res.last_loss = value
        if _any_rank(res.diverged is not None, dist, device):
            if res.diverged is None:  # only another rank saw it; DDP's averaged gradients reach us next
                res.diverged = {"step": last_step + 1, "loss": None, "last_finite_loss": res.last_loss}
            return True
        return False

    def diverged_before(step: int, error: RuntimeError) -> bool:
        """True (``diverged`` set) when the network had diverged before ``step`` raised ``error``."""
        if not (filled and check_window(step - 1)):
            if all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                return False
            res.diverged = {"step": step + 1, "loss": None, "last_finite_loss": res.last_loss}
        first_line = str(error).splitlines()[0] if str(error) else ""
        res.diverged = {**(res.diverged or {}), "error": f"{type(error).__name__}: {first_line}"}
        return True

    start = time.perf_counter()
    step = start_step
    for step, (x, y) in enumerate(loader, start=start_step):
        if set_lr is not None:
            set_lr(step)
        try:
            with autocast(device, amp_dtype):
                out = model(x)
                if dist.enabled:
                    loss = F.cross_entropy(out, y, label_smoothing=label_smoothing, reduction="sum")
                    loss_for_grad = loss * (dist.world_size / loader.global_batch_size(step))
                else:
                    loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
                    loss_for_grad = loss
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss_for_grad).backward()
                if grad_clip > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss_for_grad.backward()
                if grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
        except RuntimeError as e:
            # QAT's fake-quantize observers refuse NaN activations: the step after the loss went
            # non-finite raises instead of giving NaN. That is the divergence, not a new fault.
            if not diverged_before(step, e):
                raise
            break
        if after_step is not None:
            after_step(step)
        n = y.shape[0]
        loss_sum += loss.detach().double() * (1 if dist.enabled else n)
        correct += (out.detach().argmax(1) == y).sum()
        window[filled] = loss.detach() / n if dist.enabled else loss.detach()
        filled += 1
        res.images += n
        res.steps = step + 1  # batches of this epoch done, including those before start_step
        if log_every and (step + 1) % log_every == 0:
            running = (res.loss_sum + loss_sum.item()) / max(res.images, 1)
            log.info("  step %d/%d  loss %.4f", step + 1, len(loader), running)
        if filled == window_len and check_window(step):
            break
        # every step alone; with several ranks every 20th (agreeing costs a collective and a host sync)
        if (
            should_stop is not None
            and (not dist.enabled or (step + 1) % 20 == 0)
            and _any_rank(should_stop(), dist, device)
        ):
            res.stopped = step + 1 < len(loader)
            break
    # the steps since the last check: a stop must never checkpoint a network that has diverged
    if res.diverged is None and filled and check_window(res.steps - 1):
        res.stopped = False
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    res.seconds += time.perf_counter() - start
    res.loss_sum += loss_sum.item()
    res.correct += int(correct.item())
    return res


@torch.no_grad()
def evaluate(
    model: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    *,
    amp_dtype: torch.dtype | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy over ``loader`` (or its first ``max_batches``). ``model`` may
    be any callable (an exported int8 program, a compiled function); sums stay on the batches' device."""
    if isinstance(model, nn.Module):
        set_mode(model, False)
    loss_sum = top1 = top5 = None
    seen = 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with autocast(x.device, amp_dtype):
            out = model(x)
        out = out.float()
        k = min(5, out.shape[1])
        hit = out.topk(k, dim=1).indices == y[:, None]
        batch = (F.cross_entropy(out, y, reduction="sum").double(), hit[:, 0].sum(), hit.any(dim=1).sum())
        if loss_sum is None:
            loss_sum, top1, top5 = batch
        else:
            loss_sum, top1, top5 = loss_sum + batch[0], top1 + batch[1], top5 + batch[2]
        seen += y.shape[0]
    if loss_sum is None or top1 is None or top5 is None:
        return {"loss": float("nan"), "acc": 0.0, "top5": 0.0}
    return {"loss": loss_sum.item() / seen, "acc": top1.item() / seen, "top5": top5.item() / seen}


def _all_sum(values: list[float], dist: Dist, device: torch.device) -> list[float]:
    if not dist.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


@dataclass
class Phase:
    """One training loop over a model: the training itself, a pruning fine-tune, a QAT fine-tune.

    Each has its own checkpoint file (resumed exactly, mid-epoch included), its own TensorBoard folder
    (epochs on the x axis) and learning rate; ``pruner`` (an unstructured
    :class:`pipeline.compress.unstructured.MagnitudePruner`) re-applies its masks after every optimizer
    step, its state travels in the checkpoint and its sparsity goes to ``<tb>/../sparsity`` by step.
    """

    name: str
    epochs: int
    lr: float
    schedule: DictConfig
    checkpoint: Path
    tensorboard: Path | None
    pruner: Any = None
    sparsity_tensorboard: Path | None = None


@dataclass
class FitResult:
    status: str  # done | diverged | stopped early (by a search)
    history: list[dict[str, float]]
    elapsed_s: float
    diverged_epoch: int | None = None
    sparsity: list[dict[str, float]] = field(default_factory=list)  # (step, target, overall) per update
    # diverged: where ({"epoch", "step", "steps", "stopped_at_step", "loss", "last_finite_loss"})
    divergence: dict[str, Any] | None = None


def fit(model: nn.Module, ctx: Context, phase: Phase, run: RunDir, ckpt: dict[str, Any] | None = None) -> FitResult:
    """Train ``model`` for ``phase.epochs`` epochs (resuming from ``ckpt``, a loaded ``phase.checkpoint``,
    when given), validating after every epoch; raises :class:`pipeline.jobs.preempt.Preempted` after a
    mid-epoch checkpoint when a stop signal arrives. With several ranks every rank calls this; only
    rank 0 writes files."""
    cfg, device, dist, amp_dtype = ctx.cfg, ctx.device, ctx.dist, ctx.amp_dtype
    train_loader, val_loader = ctx.train_loader, ctx.val_loader
    epochs, steps = phase.epochs, len(train_loader)
    optimizer = build_optimizer(cfg.optim, [p for p in model.parameters() if p.requires_grad], lr=phase.lr)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    pruner = phase.pruner

    history: list[dict[str, float]] = []
    sparsity_log: list[dict[str, float]] = []
    start_epoch, start_step, carry, elapsed = 0, 0, None, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if pruner is not None and ckpt.get("pruner") is not None:
            pruner.load_state_dict(ckpt["pruner"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        start_epoch, history, elapsed = int(ckpt["epoch"]), list(ckpt["history"]), float(ckpt["elapsed_s"])
        sparsity_log = list(ckpt.get("sparsity_log") or [])
        start_step = int(ckpt.get("step", 0))
        carry = EpochResult(**ckpt["partial"]) if ckpt.get("partial") else None
        log.info(
            "%s: resuming from %s at epoch %d/%d, step %d",
            phase.name,
            phase.checkpoint,
            start_epoch + 1,
            epochs,
            start_step,
        )

    train_model: Any = model  # the module, wrapped in DDP and/or compiled
    if dist.enabled:
        if device.type == "cuda" and cfg.train.sync_bn:
            train_model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile and getattr(model, "pipeline_set_mode", None) is None:
        train_model = torch.compile(train_model)

    writer = sparsity_writer = None
    if cfg.output.tensorboard and dist.is_main:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops scalars logged after the checkpoint we resumed from (a kill between the
        # two writes), so curves never hold the same epoch (or step) twice
        if phase.tensorboard is not None:
            writer = SummaryWriter(str(phase.tensorboard), purge_step=start_epoch + 1 if ckpt is not None else None)
        if pruner is not None and phase.sparsity_tensorboard is not None:
            sparsity_writer = SummaryWriter(
                str(phase.sparsity_tensorboard), purge_step=start_epoch * steps + start_step + 1 if ckpt else None
            )

    def checkpoint(epoch_done: int, step: int = 0, partial: EpochResult | None = None) -> None:
        if dist.is_main:
            save_checkpoint(
                phase.checkpoint,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "pruner": pruner.state_dict() if pruner is not None else None,
                    "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "epoch": epoch_done,
                    "step": step,
                    "partial": vars(partial) if partial else None,
                    "history": history,
                    "elapsed_s": elapsed,
                    "sparsity_log": sparsity_log,
                },
            )
        if dist.enabled:
            torch.distributed.barrier()

    peak_lr = float(phase.lr)
    status, diverged_epoch, divergence = "done", None, None
    last_loss = carry.last_loss if carry is not None else None
    for epoch in range(start_epoch, epochs):
        first_step = start_step if epoch == start_epoch else 0
        train_loader.set_epoch(epoch, first_step)

        def set_lr(step: int, _epoch: int = epoch) -> None:
            lr = peak_lr * lr_factor(phase.schedule, _epoch + step / max(steps, 1), epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr

        after_step = None
        if pruner is not None:

            def after_step(step: int, _epoch: int = epoch) -> None:
                global_step = _epoch * steps + step
                target = pruner.step(global_step)
                if target is not None:
                    rep = pruner.report()
                    sparsity_log.append(
                        {"step": global_step + 1, "target": float(target), "overall": float(rep["sparsity"])}
                    )
                    if sparsity_writer is not None:
                        sparsity_writer.add_scalar("sparsity/target", target, global_step + 1)
                        sparsity_writer.add_scalar("sparsity/overall", rep["sparsity"], global_step + 1)
                        for name, value in rep["layers"].items():
                            sparsity_writer.add_scalar(f"sparsity/layer/{name}", value, global_step + 1)

        res = train_one_epoch(
            train_model,
            train_loader,
            optimizer,
            set_lr=set_lr,
            after_step=after_step,
            scaler=scaler,
            amp_dtype=amp_dtype,
            grad_clip=float(cfg.optim.grad_clip),
            label_smoothing=float(cfg.train.label_smoothing),
            log_every=int(cfg.output.log_every),
            start_step=first_step,
            carry=carry if epoch == start_epoch else None,
            should_stop=lambda: bool(STOP),
            dist=dist,
            nan_check_steps=int(cfg.train.nan_check_steps),
            last_finite_loss=last_loss,
        )
        last_loss = res.last_loss
        if res.diverged is not None:  # no checkpoint: the last one holds the network before it diverged
            status, diverged_epoch = "diverged", epoch + 1
            divergence = {"epoch": epoch + 1, "steps": steps, "stopped_at_step": res.steps, **res.diverged}
            d = res.diverged
            what = f"loss is {d['loss']}" if d["loss"] else "the network is not finite"
            if d.get("error"):
                what += f" (the step after it raised {d['error']})"
            last = "unknown" if d["last_finite_loss"] is None else f"{d['last_finite_loss']:.4f}"
            log.warning(
                "%s epoch %d step %d/%d: %s; last finite loss %s; stopped after step %d: this run is diverged",
                phase.name,
                epoch + 1,
                d["step"],
                steps,
                what,
                last,
                res.steps,
            )
            break
        if res.stopped:  # the partial epoch's sums (its seconds included) travel in the checkpoint
            checkpoint(epoch, res.steps, res)
            log.warning("%s: stopped at epoch %d step %d/%d; checkpoint saved", phase.name, epoch + 1, res.steps, steps)
            raise Preempted(STOP.signum or 0)
        epoch_seconds = res.seconds  # includes the part before a mid-epoch restart
        elapsed += epoch_seconds
        loss_sum, correct, images = _all_sum([res.loss_sum, float(res.correct), float(res.images)], dist, device)
        train_loss, train_acc = loss_sum / max(images, 1), correct / max(images, 1)
        if not math.isfinite(train_loss):  # a backstop: the per-step check above sees it first
            status, diverged_epoch = "diverged", epoch + 1
            divergence = {"epoch": epoch + 1, "steps": steps, "stopped_at_step": res.steps, "loss": str(train_loss)}
            log.warning(
                "%s epoch %d: training loss is %s; stopping this run as diverged", phase.name, epoch + 1, train_loss
            )
            break
        val = evaluate(model, val_loader, amp_dtype=amp_dtype)
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": images / max(epoch_seconds, 1e-9),
            "elapsed_s": elapsed,  # training seconds so far: collect's time to a target accuracy
        }
        if pruner is not None:
            row["sparsity"] = float(pruner.report()["sparsity"])
        if phase.name == "train" and cfg.train.get("test_every_epoch", False):
            test = evaluate(model, ctx.test_loader, amp_dtype=amp_dtype)
            row["test_loss"], row["test_acc"] = test["loss"], test["acc"]
        history.append(row)
        log.info(
            "%sepoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  %.0f img/s%s",
            "" if phase.name == "train" else f"{phase.name} ",
            epoch + 1,
            epochs,
            train_loss,
            train_acc,
            val["loss"],
            val["acc"],
            row["images_per_s"],
            f"  sparsity {row['sparsity']:.3f}" if "sparsity" in row else "",
        )
        if writer is not None:
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "sparsity"):
                if key in row:
                    writer.add_scalar(
                        key.replace("_", "/", 1) if key.startswith(("train", "val")) else key, row[key], epoch + 1
                    )
            writer.flush()
        if sparsity_writer is not None:
            sparsity_writer.flush()
        checkpoint(epoch + 1)
        if dist.is_main:
            atomic_write_json(
                run.progress,
                {
                    "stage": phase.name,
                    "epoch": epoch + 1,
                    "epochs": epochs,
                    "val_acc_best": max(h["val_acc"] for h in history),
                    "train_loss": train_loss,
                    "elapsed_s": elapsed,
                    "updated": time.time(),
                    "notes": run.notes(),  # e.g. a checkpoint that could not be loaded
                },
            )
        if phase.name == "train" and epoch + 1 < epochs and stop_early(epoch + 1, history, dist, device):
            status = STOPPED  # after the checkpoint: the trial keeps it, and its metrics
            log.info("stopped early by the search after epoch %d/%d", epoch + 1, epochs)
            break

    for w in (writer, sparsity_writer):
        if w is not None:
            w.close()
    return FitResult(status, history, elapsed, diverged_epoch, sparsity_log, divergence)


def evaluate_test(model: nn.Module, ctx: Context) -> dict[str, float]:
    test = evaluate(model, ctx.test_loader, amp_dtype=ctx.amp_dtype)
    return {"test_loss": test["loss"], "test_acc": test["acc"], "test_top5": test["top5"]}

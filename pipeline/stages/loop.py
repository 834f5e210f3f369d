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
from pipeline.rundir import STOPPED_EARLY, RunDir, atomic_write_json
from pipeline.stages.hooks import current_hook
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


@dataclass
class _StepRecipe:
    """How one optimizer step is done: forward under autocast, the loss, backward (scaled for fp16),
    clipping and the optimizer's step."""

    model: Any  # the module, maybe wrapped in DDP or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    grad_clip: float
    label_smoothing: float
    dist: Dist
    device: torch.device

    def run(self, x: torch.Tensor, y: torch.Tensor, loader: Any, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on batch ``step`` of ``loader``; returns the model's output and the batch's loss
        (with several ranks this rank's summed loss; the gradient is of the global batch's mean)."""
        with autocast(self.device, self.amp_dtype):
            out = self.model(x)
            if self.dist.enabled:
                loss = F.cross_entropy(out, y, label_smoothing=self.label_smoothing, reduction="sum")
                loss_for_grad = loss * (self.dist.world_size / loader.global_batch_size(step))
            else:
                loss = F.cross_entropy(out, y, label_smoothing=self.label_smoothing)
                loss_for_grad = loss
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss_for_grad).backward()
            if self.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss_for_grad.backward()
            if self.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
        return out, loss


class _Tally:
    """An epoch's sums and a window of its per-step losses, kept on the device: no host sync per step.
    The window is read every ``nan_check_steps`` steps, so a diverged network (many times slower per
    step on a CPU) is noticed within that many steps at the cost of one host sync per window."""

    def __init__(self, res: EpochResult, nan_check_steps: int, dist: Dist, device: torch.device) -> None:
        self.res, self.dist, self.device = res, dist, device
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.window = torch.zeros(max(1, int(nan_check_steps)), device=device, dtype=torch.float32)
        self.filled = 0

    def add(self, step: int, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        n = y.shape[0]
        self.loss_sum += loss.detach().double() * (1 if self.dist.enabled else n)
        self.correct += (out.detach().argmax(1) == y).sum()
        self.window[self.filled] = loss.detach() / n if self.dist.enabled else loss.detach()
        self.filled += 1
        self.res.images += n
        self.res.steps = step + 1  # batches of this epoch done, including those before start_step

    def running_loss(self) -> float:
        return (self.res.loss_sum + self.loss_sum.item()) / max(self.res.images, 1)

    def window_full(self) -> bool:
        return self.filled == len(self.window)

    def check(self, last_step: int) -> bool:
        """Reads the window ending at ``last_step`` (0-based); True when a loss in it was not finite
        (on any rank: ``res.diverged`` is set)."""
        res = self.res
        values = self.window[: self.filled].tolist()
        first = last_step - self.filled + 2  # 1-based step of values[0]
        self.filled = 0
        for i, value in enumerate(values):
            if not math.isfinite(value):
                res.diverged = {"step": first + i, "loss": str(value), "last_finite_loss": res.last_loss}
                break
            res.last_loss = value
        if _any_rank(res.diverged is not None, self.dist, self.device):
            if res.diverged is None:  # only another rank saw it; DDP's averaged gradients reach us next
                res.diverged = {"step": last_step + 1, "loss": None, "last_finite_loss": res.last_loss}
            return True
        return False

    def diverged_before(self, step: int, error: RuntimeError, model: nn.Module) -> bool:
        """True (``diverged`` set) when the network had diverged before ``step`` raised ``error``."""
        res = self.res
        if not (self.filled and self.check(step - 1)):
            if all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                return False
            res.diverged = {"step": step + 1, "loss": None, "last_finite_loss": res.last_loss}
        first_line = str(error).splitlines()[0] if str(error) else ""
        res.diverged = {**(res.diverged or {}), "error": f"{type(error).__name__}: {first_line}"}
        return True

    def finish(self, start: float) -> EpochResult:
        """The result, with the steps since the last check checked and the time since ``start`` added."""
        res = self.res
        # a stop must never checkpoint a network that has diverged
        if res.diverged is None and self.filled and self.check(res.steps - 1):
            res.stopped = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        res.seconds += time.perf_counter() - start
        res.loss_sum += self.loss_sum.item()
        res.correct += int(self.correct.item())
        return res


def _stop_agreed(should_stop: Callable[[], bool] | None, step: int, dist: Dist, device: torch.device) -> bool:
    """``should_stop`` polled after every step alone; with several ranks after every 20th and agreed
    over ranks (agreeing costs a collective and a host sync)."""
    if should_stop is None or (dist.enabled and (step + 1) % 20 != 0):
        return False
    return _any_rank(should_stop(), dist, device)


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
    if last_finite_loss is not None:
        res.last_loss = last_finite_loss
    recipe = _StepRecipe(model, optimizer, scaler, amp_dtype, grad_clip, label_smoothing, dist, device)
    tally = _Tally(res, nan_check_steps, dist, device)
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader, start=start_step):
        if set_lr is not None:
            set_lr(step)
        try:
            out, loss = recipe.run(x, y, loader, step)
        except RuntimeError as e:
            # QAT's fake-quantize observers refuse NaN activations: the step after the loss went
            # non-finite raises instead of giving NaN. That is the divergence, not a new fault.
            if not tally.diverged_before(step, e, model):
                raise
            break
        if after_step is not None:
            after_step(step)
        tally.add(step, loss, out, y)
        if log_every and (step + 1) % log_every == 0:
            log.info("  step %d/%d  loss %.4f", step + 1, len(loader), tally.running_loss())
        if tally.window_full() and tally.check(step):
            break
        if _stop_agreed(should_stop, step, dist, device):
            res.stopped = step + 1 < len(loader)
            break
    return tally.finish(start)


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
    ``on_epoch(epoch, row)`` runs after each epoch is recorded (1-based epoch, its history row with
    ``val_acc``); returning True ends the phase there with status ``stopped`` (early stopping's hook).
    """

    name: str
    epochs: int
    lr: float
    schedule: DictConfig
    checkpoint: Path
    tensorboard: Path | None
    pruner: Any = None
    sparsity_tensorboard: Path | None = None
    on_epoch: Callable[[int, dict[str, float]], bool] | None = None


@dataclass
class FitResult:
    status: str  # done | diverged | stopped early (Phase.on_epoch or a search asked)
    history: list[dict[str, float]]
    elapsed_s: float
    diverged_epoch: int | None = None
    sparsity: list[dict[str, float]] = field(default_factory=list)  # (step, target, overall) per update
    # diverged: where ({"epoch", "step", "steps", "stopped_at_step", "loss", "last_finite_loss"})
    divergence: dict[str, Any] | None = None


@dataclass
class _Training:
    """What :func:`fit` carries from one epoch to the next. ``epoch`` (0-based) is the epoch being
    trained; the per-step hooks :meth:`set_lr` and :meth:`after_step` read it."""

    model: nn.Module
    ctx: Context
    phase: Phase
    run: RunDir
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    steps: int  # batches per epoch
    train_model: Any = None  # the module, wrapped in DDP and/or compiled
    history: list[dict[str, float]] = field(default_factory=list)
    sparsity_log: list[dict[str, float]] = field(default_factory=list)
    elapsed: float = 0.0
    start_epoch: int = 0
    start_step: int = 0
    carry: EpochResult | None = None  # the sums of a resumed epoch's steps before start_step
    last_loss: float | None = None  # the last finite per-step loss (reported when the next step diverges)
    writer: Any = None
    sparsity_writer: Any = None
    epoch: int = 0

    def set_lr(self, step: int) -> None:
        phase = self.phase
        lr = float(phase.lr) * lr_factor(phase.schedule, self.epoch + step / max(self.steps, 1), phase.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def after_step(self, step: int) -> None:
        """Pruning's step: the pruner may update its masks; each update is logged by global step."""
        pruner, global_step = self.phase.pruner, self.epoch * self.steps + step
        target = pruner.step(global_step)
        if target is None:
            return
        rep = pruner.report()
        self.sparsity_log.append({"step": global_step + 1, "target": float(target), "overall": float(rep["sparsity"])})
        if self.sparsity_writer is not None:
            self.sparsity_writer.add_scalar("sparsity/target", target, global_step + 1)
            self.sparsity_writer.add_scalar("sparsity/overall", rep["sparsity"], global_step + 1)
            for name, value in rep["layers"].items():
                self.sparsity_writer.add_scalar(f"sparsity/layer/{name}", value, global_step + 1)


def fit(model: nn.Module, ctx: Context, phase: Phase, run: RunDir, ckpt: dict[str, Any] | None = None) -> FitResult:
    """Train ``model`` for ``phase.epochs`` epochs (resuming from ``ckpt``, a loaded ``phase.checkpoint``,
    when given), validating after every epoch; raises :class:`pipeline.jobs.preempt.Preempted` after a
    mid-epoch checkpoint when a stop signal arrives. With several ranks every rank calls this; only
    rank 0 writes files."""
    t = _start(model, ctx, phase, run, ckpt)
    for epoch in range(t.start_epoch, phase.epochs):
        t.epoch = epoch
        res = _train_epoch(t)
        if res.diverged is not None:  # no checkpoint: the last one holds the network before it diverged
            return _finish(t, "diverged", _diverged_at_step(t, res))
        if res.stopped:  # the partial epoch's sums (its seconds included) travel in the checkpoint
            _checkpoint(t, epoch, res.steps, res)
            log.warning(
                "%s: stopped at epoch %d step %d/%d; checkpoint saved", phase.name, epoch + 1, res.steps, t.steps
            )
            raise Preempted(STOP.signum or 0)
        t.elapsed += res.seconds  # includes the part before a mid-epoch restart
        train_loss, train_acc, images = _train_figures(t, res)
        if not math.isfinite(train_loss):  # a backstop: the per-step check in train_one_epoch sees it first
            return _finish(t, "diverged", _diverged_loss(t, res, train_loss))
        row = _record_epoch(t, res, train_loss, train_acc, images)
        if _stop_after(t, epoch + 1, row):  # after the checkpoint: the trial keeps it, and its metrics
            log.info("%s: stopped early after epoch %d/%d", phase.name, epoch + 1, phase.epochs)
            return _finish(t, STOPPED_EARLY)
    return _finish(t, "done")


def _stop_after(t: _Training, epoch: int, row: dict[str, float]) -> bool:
    """Whether the phase ends after ``epoch``: its own ``on_epoch`` asks, or (training only, before the
    last epoch) the search whose trial this run is stops it early."""
    phase = t.phase
    if phase.on_epoch is not None and phase.on_epoch(epoch, row):
        return True
    return phase.name == "train" and epoch < phase.epochs and stop_early(epoch, t.history, t.ctx.dist, t.ctx.device)


def _start(model: nn.Module, ctx: Context, phase: Phase, run: RunDir, ckpt: dict[str, Any] | None) -> _Training:
    """The optimizer, the state of ``ckpt`` when resuming, the training wrapper and the writers."""
    optimizer = build_optimizer(ctx.cfg.optim, [p for p in model.parameters() if p.requires_grad], lr=phase.lr)
    scaler = torch.amp.GradScaler(ctx.device.type) if ctx.amp_dtype == torch.float16 else None
    t = _Training(model, ctx, phase, run, optimizer, scaler, steps=len(ctx.train_loader))
    if ckpt is not None:
        _resume(t, ckpt)
    t.train_model = _training_wrapper(model, ctx)
    if ctx.cfg.output.tensorboard and ctx.dist.is_main:
        _open_writers(t, resumed=ckpt is not None)
    return t


def _resume(t: _Training, ckpt: dict[str, Any]) -> None:
    """Every bit of state ``ckpt`` holds, RNG included, so the rest of the run matches an unbroken one."""
    t.model.load_state_dict(ckpt["model"])
    t.optimizer.load_state_dict(ckpt["optimizer"])
    if t.scaler is not None and ckpt.get("scaler"):
        t.scaler.load_state_dict(ckpt["scaler"])
    if t.phase.pruner is not None and ckpt.get("pruner") is not None:
        t.phase.pruner.load_state_dict(ckpt["pruner"])
    torch.set_rng_state(ckpt["rng_cpu"])
    if t.ctx.device.type == "cuda" and ckpt.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng_cuda"], t.ctx.device)
    t.start_epoch, t.history, t.elapsed = int(ckpt["epoch"]), list(ckpt["history"]), float(ckpt["elapsed_s"])
    t.sparsity_log = list(ckpt.get("sparsity_log") or [])
    t.start_step = int(ckpt.get("step", 0))
    t.carry = EpochResult(**ckpt["partial"]) if ckpt.get("partial") else None
    t.last_loss = t.carry.last_loss if t.carry is not None else None
    phase = t.phase
    log.info(
        "%s: resuming from %s at epoch %d/%d, step %d",
        phase.name,
        phase.checkpoint,
        t.start_epoch + 1,
        phase.epochs,
        t.start_step,
    )


def _training_wrapper(model: nn.Module, ctx: Context) -> Any:
    """``model`` wrapped for training: in DDP with several ranks, compiled when train.compile asks."""
    train_model: Any = model
    if ctx.dist.enabled:
        if ctx.device.type == "cuda" and ctx.cfg.train.sync_bn:
            train_model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    if ctx.cfg.train.compile and getattr(model, "pipeline_set_mode", None) is None:
        train_model = torch.compile(train_model)
    return train_model


def _open_writers(t: _Training, resumed: bool) -> None:
    """The phase's TensorBoard writers (by epoch; the pruner's sparsity by step)."""
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops scalars logged after the checkpoint we resumed from (a kill between the
    # two writes), so curves never hold the same epoch (or step) twice
    phase = t.phase
    if phase.tensorboard is not None:
        t.writer = SummaryWriter(str(phase.tensorboard), purge_step=t.start_epoch + 1 if resumed else None)
    if phase.pruner is not None and phase.sparsity_tensorboard is not None:
        purge_step = t.start_epoch * t.steps + t.start_step + 1 if resumed else None
        t.sparsity_writer = SummaryWriter(str(phase.sparsity_tensorboard), purge_step=purge_step)


def _stop_signalled() -> bool:
    return bool(STOP)


def _train_epoch(t: _Training) -> EpochResult:
    """Epoch ``t.epoch``, from ``t.start_step`` with the resumed sums when it is the resumed epoch."""
    ctx, resumed = t.ctx, t.epoch == t.start_epoch
    first_step = t.start_step if resumed else 0
    ctx.train_loader.set_epoch(t.epoch, first_step)
    res = train_one_epoch(
        t.train_model,
        ctx.train_loader,
        t.optimizer,
        set_lr=t.set_lr,
        after_step=t.after_step if t.phase.pruner is not None else None,
        scaler=t.scaler,
        amp_dtype=ctx.amp_dtype,
        grad_clip=float(ctx.cfg.optim.grad_clip),
        label_smoothing=float(ctx.cfg.train.label_smoothing),
        log_every=int(ctx.cfg.output.log_every),
        start_step=first_step,
        carry=t.carry if resumed else None,
        should_stop=_stop_signalled,
        dist=ctx.dist,
        nan_check_steps=int(ctx.cfg.train.nan_check_steps),
        last_finite_loss=t.last_loss,
    )
    t.last_loss = res.last_loss
    return res


def _checkpoint(t: _Training, epoch_done: int, step: int = 0, partial: EpochResult | None = None) -> None:
    """Rank 0 saves everything a resume needs (``partial``: the sums of a stopped epoch's steps)."""
    if t.ctx.dist.is_main:
        device = t.ctx.device
        save_checkpoint(
            t.phase.checkpoint,
            {
                "model": t.model.state_dict(),
                "optimizer": t.optimizer.state_dict(),
                "scaler": t.scaler.state_dict() if t.scaler is not None else None,
                "pruner": t.phase.pruner.state_dict() if t.phase.pruner is not None else None,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "epoch": epoch_done,
                "step": step,
                "partial": vars(partial) if partial else None,
                "history": t.history,
                "elapsed_s": t.elapsed,
                "sparsity_log": t.sparsity_log,
            },
        )
    if t.ctx.dist.enabled:
        torch.distributed.barrier()


def _diverged_at_step(t: _Training, res: EpochResult) -> dict[str, Any]:
    """Where the per-step check saw the loss go non-finite, logged."""
    assert res.diverged is not None
    d = res.diverged
    what = f"loss is {d['loss']}" if d["loss"] else "the network is not finite"
    if d.get("error"):
        what += f" (the step after it raised {d['error']})"
    last = "unknown" if d["last_finite_loss"] is None else f"{d['last_finite_loss']:.4f}"
    log.warning(
        "%s epoch %d step %d/%d: %s; last finite loss %s; stopped after step %d: this run is diverged",
        t.phase.name,
        t.epoch + 1,
        d["step"],
        t.steps,
        what,
        last,
        res.steps,
    )
    return {"epoch": t.epoch + 1, "steps": t.steps, "stopped_at_step": res.steps, **d}


def _diverged_loss(t: _Training, res: EpochResult, train_loss: float) -> dict[str, Any]:
    """An epoch whose summed training loss is not finite, logged."""
    log.warning(
        "%s epoch %d: training loss is %s; stopping this run as diverged", t.phase.name, t.epoch + 1, train_loss
    )
    return {"epoch": t.epoch + 1, "steps": t.steps, "stopped_at_step": res.steps, "loss": str(train_loss)}


def _train_figures(t: _Training, res: EpochResult) -> tuple[float, float, float]:
    """The epoch's training loss and accuracy over all ranks, and the images they count."""
    loss_sum, correct, images = _all_sum(
        [res.loss_sum, float(res.correct), float(res.images)], t.ctx.dist, t.ctx.device
    )
    return loss_sum / max(images, 1), correct / max(images, 1), images


def _record_epoch(
    t: _Training, res: EpochResult, train_loss: float, train_acc: float, images: float
) -> dict[str, float]:
    """Validate, then record the epoch: history, log line, TensorBoard, checkpoint, progress file."""
    row = _epoch_row(t, res, train_loss, train_acc, images)
    t.history.append(row)
    _log_epoch(t, row)
    _write_scalars(t, row)
    _checkpoint(t, t.epoch + 1)
    if t.ctx.dist.is_main:
        _write_progress(t, row)
    return row


def _epoch_row(t: _Training, res: EpochResult, train_loss: float, train_acc: float, images: float) -> dict[str, float]:
    """The epoch's history row: training figures, validation (and test, when asked), lr, speed."""
    ctx = t.ctx
    val = evaluate(t.model, ctx.val_loader, amp_dtype=ctx.amp_dtype)
    row = {
        "epoch": t.epoch + 1,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val_loss": val["loss"],
        "val_acc": val["acc"],
        "lr": t.optimizer.param_groups[0]["lr"],
        "images_per_s": images / max(res.seconds, 1e-9),
        "elapsed_s": t.elapsed,  # training seconds so far: collect's time to a target accuracy
    }
    if t.phase.pruner is not None:
        row["sparsity"] = float(t.phase.pruner.report()["sparsity"])
    if t.phase.name == "train" and ctx.cfg.train.get("test_every_epoch", False):
        test = evaluate(t.model, ctx.test_loader, amp_dtype=ctx.amp_dtype)
        row["test_loss"], row["test_acc"] = test["loss"], test["acc"]
    return row


def _log_epoch(t: _Training, row: dict[str, float]) -> None:
    log.info(
        "%sepoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  %.0f img/s%s",
        "" if t.phase.name == "train" else f"{t.phase.name} ",
        t.epoch + 1,
        t.phase.epochs,
        row["train_loss"],
        row["train_acc"],
        row["val_loss"],
        row["val_acc"],
        row["images_per_s"],
        f"  sparsity {row['sparsity']:.3f}" if "sparsity" in row else "",
    )


def _write_scalars(t: _Training, row: dict[str, float]) -> None:
    """The row's curves by epoch (train/loss, val/acc, lr, ...); the sparsity writer's steps flushed."""
    if t.writer is not None:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "sparsity"):
            if key in row:
                tag = key.replace("_", "/", 1) if key.startswith(("train", "val")) else key
                t.writer.add_scalar(tag, row[key], t.epoch + 1)
        t.writer.flush()
    if t.sparsity_writer is not None:
        t.sparsity_writer.flush()


def _write_progress(t: _Training, row: dict[str, float]) -> None:
    """The run's progress file, which ``status`` shows while the job runs."""
    atomic_write_json(
        t.run.progress,
        {
            "stage": t.phase.name,
            "epoch": t.epoch + 1,
            "epochs": t.phase.epochs,
            "val_acc_best": max(h["val_acc"] for h in t.history),
            "train_loss": row["train_loss"],
            "elapsed_s": t.elapsed,
            "updated": time.time(),
            "notes": t.run.notes(),  # e.g. a checkpoint that could not be loaded
        },
    )


def _finish(t: _Training, status: str, divergence: dict[str, Any] | None = None) -> FitResult:
    for w in (t.writer, t.sparsity_writer):
        if w is not None:
            w.close()
    diverged_epoch = divergence["epoch"] if divergence is not None else None
    return FitResult(status, t.history, t.elapsed, diverged_epoch, t.sparsity_log, divergence)


def evaluate_test(model: nn.Module, ctx: Context) -> dict[str, float]:
    test = evaluate(model, ctx.test_loader, amp_dtype=ctx.amp_dtype)
    return {"test_loss": test["loss"], "test_acc": test["acc"], "test_top5": test["top5"]}

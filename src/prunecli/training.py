"""The one training loop of prunecli, shared by ``finetune`` and ``finetune-lora``.

API in one screen::

    from prunecli.training import TrainConfig, train

    result = train(
        model,                          # any nn.Module mapping images → logits
        loader,                         # iterable of (x, y) batches (a DataLoader; shuffled by the caller)
        device,                         # torch.device
        TrainConfig(epochs=10, optimizer="adam", lr=1e-3, schedule="cosine", precision="fp32"),
        trainable=lambda name, p: ...,  # optional: which parameters train (others frozen for the run)
        extra_loss=wcr,                 # optional: zero-arg callable → scalar added to the loss (float32)
        masks=masks,                    # optional: prunecli.masks.Masks kept exactly through every step
        val_loader=val,                 # optional: evaluated after every epoch (top-1, loss)
    )
    result.metrics()                    # {"train_loss": [...per epoch], "train_acc": final, "val_top1": [...], ...}

Per step: forward (under autocast with ``precision`` bf16/fp16; fp32 by default) → cross-entropy with
label smoothing → ``+ extra_loss()`` (outside autocast, so e.g. WCR stays float32) → backward
(loss-scaled for fp16) → unscale → ``masks.mask_grads()`` → gradient clipping → optimizer step →
``masks.apply()`` → per-step LR schedule. Loss and accuracy are
accumulated on the device and read once per epoch, so there is no per-step host sync.

Optimizers (``adam``, ``adamw``, ``sgd`` with momentum) and LR schedules (``cosine``, ``step``,
``none``) are registries, so ``--optimizer``/``--schedule`` list their choices and new ones are one
decorated function. As in timm's ``create_optimizer_v2``, weight decay applies to tensors with
``ndim > 1`` only, never to biases and normalisation parameters.

Determinism: with a seeded caller (``prunecli.device.seed_everything``), a seeded loader and the same
thread count, training on CPU is bit-reproducible; the loop itself draws no randomness.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunecli.device import PRECISIONS, autocast, check_precision, input_to, model_to
from prunecli.errors import InputError
from prunecli.evaluation import evaluate_model
from prunecli.masks import Masks
from prunecli.progress import progress
from prunecli.registry import Registry

__all__ = ["OPTIMIZERS", "SCHEDULES", "EpochStats", "TrainConfig", "TrainResult", "lr_factor", "run_precision", "train"]

log = logging.getLogger(__name__)

OptimizerFn = Callable[[list[dict[str, Any]], "TrainConfig"], torch.optim.Optimizer]
ScheduleFn = Callable[[int], Callable[[int], float]]  # total steps → (step → LR factor)

OPTIMIZERS: Registry[OptimizerFn] = Registry("optimizer")
SCHEDULES: Registry[ScheduleFn] = Registry("schedule")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (validated by :meth:`validate`).

    Attributes:
        epochs: passes over the loader (>= 1).
        optimizer: name in :data:`OPTIMIZERS`.
        lr: peak learning rate (> 0).
        weight_decay: decay on tensors with ``ndim > 1`` (>= 0); L2 for adam/sgd, decoupled for adamw.
        momentum: SGD momentum (ignored by Adam-type optimizers).
        schedule: name in :data:`SCHEDULES`, stepped after every optimizer step.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        clip_grad: clip the global gradient L2 norm to this value (None: no clipping).
        precision: ``fp32`` (exact, the default), ``bf16`` or ``fp16`` (CUDA only, with a GradScaler): the
            forward pass runs under autocast; the loss, gradients, optimizer state and weights stay float32.
        channels_last: NHWC weights and inputs (faster convolutions on tensor cores; same numbers up to
            summation order).
        max_steps: stop after this many optimizer steps (None: ``epochs`` full passes).
        warmup_steps: linear warm-up from ``lr/(warmup_steps+1)`` to ``lr`` over the first steps, then
            ``schedule`` over the rest. Fine-tuning a trained network needs it: Adam's first updates have
            the full step size whatever the gradient's scale, which knocks a converged network out of its
            minimum before the moment estimates settle.
    """

    epochs: int = 10
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    clip_grad: float | None = None
    precision: str = "fp32"
    channels_last: bool = False
    max_steps: int | None = None
    warmup_steps: int = 0

    def validate(self) -> None:
        """Raises :class:`InputError` (or UnknownNameError) for values that cannot train."""
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise InputError(f"--epochs must be a positive integer, got {self.epochs}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise InputError(f"--lr must be a positive number, got {self.lr}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise InputError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise InputError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.label_smoothing < 1:
            raise InputError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise InputError(f"--clip-grad must be positive, got {self.clip_grad}")
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError(f"max_steps must be positive, got {self.max_steps}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise InputError(f"--warmup-steps must be a non-negative integer, got {self.warmup_steps}")
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision!r}: choose from {', '.join(PRECISIONS)}")
        OPTIMIZERS.canonical(self.optimizer)
        SCHEDULES.canonical(self.schedule)


@dataclass
class EpochStats:
    """What one epoch measured (losses are sample means over the epoch's training batches)."""

    epoch: int
    train_loss: float
    train_acc: float
    lr: float
    steps: int
    seconds: float
    extra_loss: float | None = None
    val: dict[str, Any] | None = None


@dataclass
class TrainResult:
    """Per-epoch statistics of a finished run.

    ``train_acc`` is the running accuracy on the training batches of an epoch (train mode, with
    augmentation and dropout), the number timm's ``train.py`` logs; held-out accuracy is ``val_top1``.
    """

    epochs: list[EpochStats] = field(default_factory=list)
    steps: int = 0
    precision: str = "fp32"
    channels_last: bool = False

    def metrics(self) -> dict[str, Any]:
        """The record's training metrics: per-epoch lists plus final values."""
        out: dict[str, Any] = {
            "epochs": len(self.epochs),
            "steps": self.steps,
            "train_loss": [e.train_loss for e in self.epochs],
            "train_acc": self.epochs[-1].train_acc if self.epochs else float("nan"),
            "train_acc_per_epoch": [e.train_acc for e in self.epochs],
            "lr": [e.lr for e in self.epochs],  # the LR at the start of each epoch
            "precision": self.precision,
            "channels_last": self.channels_last,
        }
        if any(e.extra_loss is not None for e in self.epochs):
            out["extra_loss"] = [e.extra_loss for e in self.epochs]
        if any(e.val is not None for e in self.epochs):
            out["val_top1"] = [e.val["top1"] if e.val else None for e in self.epochs]
            out["val_loss"] = [e.val["loss"] if e.val else None for e in self.epochs]
        return out


# ---- optimizers ----------------------------------------------------------------------------------


@OPTIMIZERS.register("adam")
def _adam(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=cfg.lr, foreach=True)


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)


@OPTIMIZERS.register("sgd", aliases=("momentum",))
def _sgd(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False, foreach=True)


# ---- LR schedules (per optimizer step) -----------------------------------------------------------


@SCHEDULES.register("cosine")
def _cosine(total: int) -> Callable[[int], float]:
    """Half a cosine from the peak LR down to 0 over the run."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


@SCHEDULES.register("step")
def _step(total: int) -> Callable[[int], float]:
    """LR ÷10 at 1/3 and again at 2/3 of the run (paper C's CNN schedule without its dynamic part)."""
    return lambda step: 0.1 ** ((3 * step >= total) + (3 * step >= 2 * total))


@SCHEDULES.register("none", aliases=("constant",))
def _constant(total: int) -> Callable[[int], float]:
    return lambda step: 1.0


def lr_factor(schedule: str, total: int, warmup: int = 0) -> Callable[[int], float]:
    """LR factor per optimizer step: a linear warm-up over ``warmup`` steps, then ``schedule`` over the rest.

    Warm-up step ``s`` (0-based) uses ``(s + 1) / (warmup + 1)``, so the first update is already small
    but never zero, and the schedule starts at its peak on step ``warmup``.
    """
    warmup = min(warmup, max(total - 1, 0))
    after = SCHEDULES.get(schedule)(total - warmup)
    if not warmup:
        return after
    return lambda step: (step + 1) / (warmup + 1) if step < warmup else after(step - warmup)


def run_precision(precision: str, amp: bool, device: torch.device) -> str:
    """``--precision``, or with the older ``--amp`` on CUDA (and ``--precision`` left at fp32) bf16, else fp16."""
    if not amp or precision != "fp32" or device.type != "cuda":
        return precision
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


# ---- the loop ------------------------------------------------------------------------------------


def _param_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for _, p in params if p.ndim > 1]
    no_decay = [p for _, p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def train(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    config: TrainConfig,
    *,
    trainable: Callable[[str, nn.Parameter], bool] | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    masks: Masks | None = None,
    val_loader: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    """Trains ``model`` in place with cross-entropy (+ ``extra_loss``) and returns per-epoch stats.

    Args:
        model: the network; moved to ``device``, left in eval mode on ``device`` afterwards.
        loader: training batches; its length (if any) sizes the LR schedule and the progress bar.
        device: where to train.
        config: hyper-parameters (validated here).
        trainable: ``(name, param) -> bool`` choosing the parameters to train among those with
            ``requires_grad``; the others are frozen for the run and their flags restored afterwards.
        extra_loss: zero-argument callable returning a scalar added to the task loss at every step,
            evaluated outside autocast (e.g. :class:`prunecli.wcr.WCR`). Its epoch mean is reported.
        masks: pruning masks to keep: applied before the first step, gradients masked before and
            weights re-masked after every optimizer step.
        val_loader: evaluated with :func:`prunecli.evaluation.evaluate_model` after every epoch.
        on_epoch: called with each epoch's :class:`EpochStats` (logging, early inspection).

    Raises:
        InputError: invalid configuration, nothing to train, or the loss became NaN/inf (diverged).

    Example:
        >>> result = train(model, loader, torch.device("cpu"), TrainConfig(epochs=2))
        >>> result.metrics()["train_loss"]
    """
    config.validate()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (trainable is None or trainable(n, p))]
    if not params:
        raise InputError("no trainable parameters selected", hint="check the trainable-parameter filter")
    chosen = {id(p) for _, p in params}
    for _, p in model.named_parameters():
        p.requires_grad_(id(p) in chosen)
    try:
        return _run(model, loader, device, config, params, extra_loss, masks, val_loader, on_epoch)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, True))
        model.eval()


def _run(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    config: TrainConfig,
    params: list[tuple[str, nn.Parameter]],
    extra_loss: Callable[[], torch.Tensor] | None,
    masks: Masks | None,
    val_loader: Iterable[tuple[torch.Tensor, torch.Tensor]] | None,
    on_epoch: Callable[[EpochStats], None] | None,
) -> TrainResult:
    model_to(model, device, channels_last=config.channels_last)
    if masks:
        masks.to(device).apply()
    optimizer = OPTIMIZERS.get(config.optimizer)(_param_groups(params, config.weight_decay), config)
    per_epoch = len(loader) if isinstance(loader, Sized) else None
    total = per_epoch * config.epochs if per_epoch is not None else (config.max_steps or 1)
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.schedule, total, config.warmup_steps))
    amp_dtype = check_precision(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    trainable = [p for _, p in params]
    result = TrainResult(precision=config.precision, channels_last=config.channels_last)

    for epoch in range(1, config.epochs + 1):
        model.train()
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        extra_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = steps = 0
        lr = optimizer.param_groups[0]["lr"]
        for x, y in progress(loader, total=per_epoch, description=f"epoch {epoch}/{config.epochs}"):
            x = input_to(x, device, channels_last=config.channels_last)
            y = torch.as_tensor(y).to(device, non_blocking=True)
            with autocast(device, config.precision):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
            total_loss = loss
            if extra_loss is not None:
                extra = extra_loss()
                total_loss = loss + extra
                extra_sum += extra.detach().double() * y.numel()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total_loss).backward()
            scaler.unscale_(optimizer)
            if masks:
                masks.mask_grads()
            if config.clip_grad is not None:
                nn.utils.clip_grad_norm_(trainable, config.clip_grad, foreach=True)
            scaler.step(optimizer)
            scaler.update()
            if masks:
                masks.apply()
            scheduler.step()
            loss_sum += loss.detach().double() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
            steps += 1
            result.steps += 1
            if config.max_steps is not None and result.steps >= config.max_steps:
                break
        if seen == 0:
            raise InputError("the training data yielded no batches", hint="use more data or a smaller --batch-size")
        train_loss = float(loss_sum) / seen
        if not math.isfinite(train_loss):
            raise InputError(
                f"training diverged at epoch {epoch} (loss is {train_loss})", hint="lower --lr or set --clip-grad"
            )
        stats = EpochStats(
            epoch=epoch,
            train_loss=train_loss,
            train_acc=int(correct) / seen,
            lr=lr,
            steps=steps,
            seconds=time.perf_counter() - start,
            extra_loss=float(extra_sum) / seen if extra_loss is not None else None,
        )
        if val_loader is not None:
            stats.val = evaluate_model(model, val_loader, device, precision=config.precision,
                                       channels_last=config.channels_last)  # fmt: skip
        result.epochs.append(stats)
        _log_epoch(stats, config.epochs)
        if on_epoch is not None:
            on_epoch(stats)
        if config.max_steps is not None and result.steps >= config.max_steps:
            break
    return result


def _log_epoch(s: EpochStats, epochs: int) -> None:
    parts = [f"epoch {s.epoch}/{epochs}", f"loss {s.train_loss:.4f}", f"acc {s.train_acc:.4f}", f"lr {s.lr:.2e}"]
    if s.extra_loss is not None:
        parts.append(f"extra {s.extra_loss:.4g}")
    if s.val is not None:
        parts.append(f"val top1 {s.val['top1']:.4f}")
    parts.append(f"{s.seconds:.1f}s")
    log.info("  ".join(parts))

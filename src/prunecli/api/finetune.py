"""``prunecli finetune``: full fine-tuning of a checkpoint, or training from scratch from ``arch:NAME``.

Pruning masks recorded in the checkpoint (``manifest.masked``) are kept exactly through every step,
and ``wcr`` adds paper C's Weight Concentration Regularizer (docs/wcr.md) to the loss. The loop is
:func:`prunecli.training.train`, shared with ``finetune-lora``. Under ``torchrun`` each process
trains on its shard of every global batch (DDP, :mod:`prunecli.distributed`); only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from prunecli.api._common import InputOptions, save_output, training_data, training_setup
from prunecli.errors import InputError
from prunecli.record import Result
from prunecli.requests import FinetuneRequest

__all__ = ["finetune"]


def _check_wcr(lam: float, eps: float, delta: float) -> None:
    if not math.isfinite(lam) or lam < 0:
        raise InputError(f"--wcr must be >= 0, got {lam}")
    if not math.isfinite(eps) or eps <= 0:
        raise InputError(f"--wcr-eps must be positive, got {eps}", hint="it keeps sqrt(w²+ε) differentiable at 0")
    if not math.isfinite(delta) or delta <= 0:
        raise InputError(f"--wcr-delta must be positive, got {delta}")


def _load(spec: str, source: Any, inputs: InputOptions | None) -> Any:
    """``load_input`` on an already-resolved source (``-`` reads stdin only once)."""
    from prunecli.checkpoint.loaders import load_checkpoint

    o = inputs or InputOptions()
    return load_checkpoint(
        spec, arch=o.arch, num_classes=o.num_classes, ema=o.ema, model_args=dict(o.model_args), source=source
    )


def finetune(req: FinetuneRequest) -> Result:
    """Trains every parameter of CKPT on ``req.data`` and writes the result to ``req.output``.

    ``arch:NAME`` trains a freshly initialised model. Training options left at None (optimizer, lr,
    schedule, warmup, augment) come from ``req.training.recipe`` (:data:`prunecli.recipes.RECIPES`):
    ``auto`` takes ``scratch`` (paper A: Adam 1e-3, cosine, crop + flip) for an ``arch:`` model and
    ``finetune`` (Adam 1e-4, 10 % warm-up, cosine, crop only) for a trained checkpoint, which the
    from-scratch recipe damages. The resolved values are the record's ``metrics.recipe`` and the
    lineage step's ``recipe``.

    Returns:
        A Result whose metrics hold per-epoch ``train_loss``, final ``train_acc``, ``val_top1`` per
        epoch (with ``val``), ``sparsity_before``/``sparsity_after`` over the prunable weights, the
        masked tensors' sparsity, ``recipe``, and with ``wcr > 0`` the ``wcr`` block (λ, R, λ·R,
        per-layer Var(|w|)).

    Raises:
        InputError: invalid hyper-parameters or output path.
        DataError: the data's classes do not fit the model's head.

    Example:
        >>> finetune(FinetuneRequest.build(checkpoint="arch:improved_cnn", output="base.safetensors",
        ...                                data="digits:train", val="digits:test", epochs=12))
    """
    from prunecli import distributed as D
    from prunecli.checkpoint.sources import SourceKind, resolve_source
    from prunecli.checkpoint.writer import check_output
    from prunecli.data import loader_info, make_loader
    from prunecli.device import describe, seed_everything
    from prunecli.masks import Masks, sparsity
    from prunecli.prunable import prunable_params
    from prunecli.recipes import warmup_steps
    from prunecli.training import train
    from prunecli.wcr import WCR

    source = resolve_source(req.checkpoint)
    t, run = req.training, req.runtime
    config, chosen, recipe_report, augment, dev = training_setup(req, fresh=source.kind is SourceKind.ARCH)
    _check_wcr(req.wcr.wcr, req.wcr.wcr_eps, req.wcr.wcr_delta)
    check_output(req.output, force=req.force, inputs=[source.path, source.weights])  # fail before any work
    seed_everything(run.seed)  # before load_input: an arch: model is initialised there
    loaded = _load(req.checkpoint, source, req.source)
    train_ds, val_ds = training_data(req, loaded, augment, recipe_report)

    model = loaded.model
    masks = Masks.from_manifest(model, loaded.manifest.masked)
    prunable = prunable_params(model)
    sparsity_before = sparsity(prunable.values())
    masked_before = masks.sparsity() if masks else None
    reg = WCR.for_model(model, req.wcr.wcr, eps=req.wcr.wcr_eps, delta=req.wcr.wcr_delta)

    # One seeded permutation per epoch, sharded over torchrun processes: N processes × B/N = one process × B.
    ctx = D.init(dev)
    if run.batch_size % ctx.world_size:
        raise InputError(f"--batch-size {run.batch_size} is not divisible by the {ctx.world_size} torchrun processes")
    n = len(train_ds.dataset)
    sampler = D.ShardSampler(
        n, shuffle=True, seed=run.seed, rank=ctx.rank, world_size=ctx.world_size, global_batch=run.batch_size,
        drop_last=n > run.batch_size,  # equal shards per step; no size-1 BatchNorm batches (timm's train.py drops too)
    )  # fmt: skip
    loader = make_loader(train_ds, batch_size=run.batch_size // ctx.world_size, workers=run.workers, sampler=sampler,
                         device=dev)  # fmt: skip
    val_loader = (
        make_loader(val_ds, batch_size=max(run.batch_size, 256), workers=run.workers, device=dev) if val_ds else None
    )
    total_steps = min(len(loader) * t.epochs, t.max_steps or len(loader) * t.epochs)
    config = dataclasses.replace(config, warmup_steps=warmup_steps(chosen["warmup"], total_steps))
    recipe_report["warmup_steps"] = config.warmup_steps
    start = time.perf_counter()
    result = train(
        D.wrap_ddp(model, dev), loader, dev, config, extra_loss=reg if req.wcr.wcr > 0 else None, masks=masks or None,
        val_loader=val_loader,
    )  # fmt: skip
    train_time = time.perf_counter() - start
    D.sync_buffers(model)  # rank 0's BatchNorm statistics are the ones written
    model.to("cpu")

    metrics: dict[str, Any] = result.metrics()
    for key in ("train_loss", "train_acc_per_epoch", "extra_loss"):  # equal shards: the mean over ranks is global
        if key in metrics:
            metrics[key] = D.mean_over_ranks(metrics[key])
    metrics["train_acc"] = metrics["train_acc_per_epoch"][-1]
    if "extra_loss" in metrics:
        metrics["wcr_per_epoch"] = metrics.pop("extra_loss")
    metrics.update(
        {
            "data": req.data,
            "val": req.val,
            "arch": loaded.manifest.arch,
            "train_samples": len(train_ds.dataset),
            "train_time_s": round(train_time, 3),
            "world_size": ctx.world_size,
            "sparsity_before": sparsity_before,
            "sparsity_after": sparsity(prunable.values()),
            "masked": masks.names(),
            "masked_sparsity_before": masked_before,
            "masked_sparsity_after": masks.sparsity() if masks else None,
            "recipe": recipe_report,
            "loader": loader_info(loader),
        }
    )
    if req.wcr.wcr > 0:  # the block (λ, R, per-layer variances) only describes a run that used the regulariser
        metrics["wcr"] = reg.stats()
    if result.epochs and result.epochs[-1].val is not None:
        metrics["val_top1_final"] = result.epochs[-1].val["top1"]
    written: tuple[str | None, str | None] = (None, None)
    if ctx.is_main:  # under torchrun only rank 0 writes
        written = save_output(req.output, model, loaded, command="finetune", options=req.to_json(), force=req.force,
                              provenance={"recipe": recipe_report})  # fmt: skip
    path, sha = D.broadcast_object(written)
    return Result(checkpoint=path, sha256=sha, metrics=metrics, device=describe(dev))

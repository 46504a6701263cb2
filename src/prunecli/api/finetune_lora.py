"""``prunecli finetune-lora``: LoRA recovery of a pruned checkpoint that keeps its sparsity (paper A).

Adapters ``(α/r)·B A`` are trained beside the frozen (pruned) weights of every Linear layer — plus
``targets`` — with :func:`prunecli.training.train`; B starts at zero, so step 0 is the pruned model.
Afterwards a merge mode from :data:`prunecli.lora.MERGE_MODES` decides what is written:
``masked`` (merge, then re-apply each masked tensor's pruning mask: the sparsity survives exactly),
``dense`` (merge; the adapted layers lose their zeros) or ``none`` (the adapter stays beside the
weights, in peft's format, in ``OUT.adapter/``; ``eval`` and peft both load it). With ``masked`` the
masked layers also *train* through their mask (:func:`prunecli.lora.mask_updates`), so the written
checkpoint is exactly the trained model; ``masked_update=False`` trains paper A's plain ``W + s·B A``
instead and loses the update's pruned positions at the merge.

Under ``torchrun --nproc-per-node N`` the run is data-parallel (DDP over the adapter parameters;
see :mod:`prunecli.distributed` for how N processes reproduce one); only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecli.api._common import training_data, training_setup
from prunecli.errors import InputError
from prunecli.record import Result
from prunecli.registry import Registry
from prunecli.requests import FinetuneLoraRequest

__all__ = ["TARGET_PRESETS", "finetune_lora"]

log = logging.getLogger(__name__)

# ---- which layers get adapters by default ------------------------------------------------------------
#
# Paper A adapts every Linear layer, which on its CNN covers the pruned classifier MLP. On a CNN whose
# convolutions were pruned (a ResNet: every pruned layer is a conv, the only Linear is the unpruned head)
# that set adapts nothing that lost weights, and the masked merge then has no mask to keep. "auto" adds
# the pruned layers whenever some of them are not Linear.

PresetFn = Callable[[nn.Module, list[str], int], tuple[str, bool, list[str]]]  # → (name, every Linear?, names)
TARGET_PRESETS: Registry[PresetFn] = Registry("target preset")


def _pruned_layers(model: nn.Module, manifest: Any) -> list[str]:
    """Modules that lost weights: those of masked tensors, and those channel pruning narrowed."""
    names = {n.rsplit(".", 1)[0] for n in manifest.masked if n.endswith(".weight")}
    structure = manifest.structure or {}
    names |= {m for m, diff in (structure.get("modules") or {}).items() if m and "weight" in (diff.get("params") or {})}
    modules = dict(model.named_modules())
    return [n for n in modules if n in names]  # definition order


def _adaptable(model: nn.Module, names: list[str], rank: int) -> list[str]:
    """The layers of ``names`` peft can adapt at ``rank`` and merge: Linear/Conv with one group, rank ≤ min dim."""
    kept = []
    for name in names:
        mod = model.get_submodule(name)
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or getattr(mod, "groups", 1) != 1:
            log.info("LoRA: pruned layer %s (%s) is not adapted (peft cannot merge it)", name, type(mod).__name__)
        elif rank > min(int(mod.weight.shape[0]), int(mod.weight[0].numel())):  # the largest rank B·A can have
            log.info("LoRA: pruned layer %s is not adapted (rank %d > its min(fan-out, fan-in))", name, rank)
        else:
            kept.append(name)
    return kept


@TARGET_PRESETS.register("auto")
def _auto(model: nn.Module, pruned: list[str], rank: int) -> tuple[str, bool, list[str]]:
    """Every Linear layer, plus the pruned layers when some pruned layer is not Linear."""
    if any(not isinstance(model.get_submodule(n), nn.Linear) for n in pruned):
        return "linear+pruned", True, _adaptable(model, pruned, rank)
    return "linear", True, []


@TARGET_PRESETS.register("linear", aliases=("paper-a",))
def _linear(model: nn.Module, pruned: list[str], rank: int) -> tuple[str, bool, list[str]]:
    """Paper A's set: every Linear layer."""
    return "linear", True, []


@TARGET_PRESETS.register("pruned")
def _pruned(model: nn.Module, pruned: list[str], rank: int) -> tuple[str, bool, list[str]]:
    """Only the layers that were pruned (masked or narrowed)."""
    return "pruned", False, _adaptable(model, pruned, rank)


@TARGET_PRESETS.register("linear+pruned")
def _linear_pruned(model: nn.Module, pruned: list[str], rank: int) -> tuple[str, bool, list[str]]:
    """Every Linear layer and every pruned layer."""
    return "linear+pruned", True, _adaptable(model, pruned, rank)


@TARGET_PRESETS.register("none")
def _none(model: nn.Module, pruned: list[str], rank: int) -> tuple[str, bool, list[str]]:
    """Nothing but the ``targets`` globs."""
    return "none", False, []


def _check(wcr: float, wcr_eps: float, wcr_delta: float, batch_size: int) -> None:
    if not math.isfinite(wcr) or wcr < 0:
        raise InputError(f"--wcr must be >= 0, got {wcr}")
    if not math.isfinite(wcr_eps) or wcr_eps <= 0:
        raise InputError(f"--wcr-eps must be positive, got {wcr_eps}")
    if not math.isfinite(wcr_delta) or wcr_delta <= 0:
        raise InputError(f"--wcr-delta must be positive, got {wcr_delta}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {batch_size}")


def _prunable_sparsity(model: Any, names: list[str]) -> float:
    from prunecli.masks import sparsity

    params = dict(model.named_parameters())
    return sparsity(params[n] for n in names if n in params)


def finetune_lora(req: FinetuneLoraRequest) -> Result:
    """Trains LoRA adapters on a (pruned) checkpoint and writes the recovered model to ``req.output``.

    The layers adapted are ``req.lora.target_preset`` (:data:`TARGET_PRESETS`; ``auto`` adds the pruned
    layers — a pruned CNN's convs — to paper A's every-Linear set when some pruned layer is not Linear)
    plus the ``targets`` globs, minus ``exclude``. Training options left at None come from
    ``req.training.recipe``: ``auto`` takes ``lora`` for a trained checkpoint and ``lora-paper`` for a
    fresh ``arch:`` model. ``merge="masked"`` on a checkpoint whose adapted layers carry no pruning mask
    falls back to ``dense`` with a warning (the record says ``merge: dense``, ``merge_requested: masked``).

    Returns:
        A Result whose metrics hold per-epoch ``train_loss``, final ``train_acc``, ``trainable_params``,
        ``targets`` (and ``target_preset``, ``pruned_layers``), ``recipe``, ``sparsity_before``/``_after``
        over all prunable weights (head included), ``masked_sparsity_before``/``_after`` over the masked
        tensors, ``merge``, and with ``val``: ``top1_before``, ``top1_after``, ``lora_improvement`` (after −
        before, paper A's metric) and ``top1_unmerged`` (the adapted model before merging).

    Raises:
        InputError: bad rank, a target glob that matches nothing, bad hyper-parameters or output.

    Example:
        >>> finetune_lora(FinetuneLoraRequest.build(checkpoint="p50.safetensors", output="p50lora.safetensors",
        ...                                         data="digits:train", val="digits:test"))
    """
    from prunecli import distributed as D
    from prunecli import lora
    from prunecli.checkpoint.loaders import load_checkpoint
    from prunecli.checkpoint.sources import SourceKind, resolve_source
    from prunecli.checkpoint.writer import check_output
    from prunecli.counting import count_model
    from prunecli.data import loader_info, make_loader
    from prunecli.device import describe, seed_everything
    from prunecli.evaluation import eval_loader, evaluate_sharded
    from prunecli.prunable import prunable_params
    from prunecli.recipes import warmup_steps
    from prunecli.training import train
    from prunecli.wcr import WCR

    t, lo, run = req.training, req.lora, req.runtime
    source = resolve_source(req.checkpoint)
    config, chosen_recipe, recipe_report, augment, dev = training_setup(
        req, fresh=source.kind is SourceKind.ARCH, adapters=True
    )
    _check(req.wcr.wcr, req.wcr.wcr_eps, req.wcr.wcr_delta, run.batch_size)
    preset = TARGET_PRESETS.canonical(lo.target_preset if lo.linear else "none")
    merge_fn = lora.MERGE_MODES.get(lo.merge)
    merge = lora.MERGE_MODES.canonical(lo.merge)
    masked_update = lo.masked_update
    if masked_update is None:
        masked_update = merge == "masked"
    elif masked_update and merge != "masked":
        raise InputError(
            f"--masked-update needs --merge masked (got --merge {merge})",
            hint="--merge dense and none keep the whole update; drop --masked-update",
        )
    lora.BN_MODES.canonical(lo.bn)
    opts = lora.LoraOptions(
        lo.rank, lo.alpha, lo.dropout, lo.linear, tuple(lo.targets), tuple(lo.exclude), lo.dora, lo.bn
    )

    out_path = check_output(req.output, force=req.force, inputs=[source.path, source.weights])  # before any work
    adapter_dir = lora.adapter_dir_for(req.output) if merge == "none" else None
    if adapter_dir is not None and adapter_dir.exists() and not req.force:
        raise InputError(f"adapter folder {str(adapter_dir)!r} exists", hint="pass --force to overwrite it")
    ctx = D.init(dev)
    if run.batch_size % ctx.world_size:
        raise InputError(f"--batch-size {run.batch_size} is not divisible by the {ctx.world_size} torchrun processes")

    seed_everything(run.seed)
    o = req.source
    loaded = load_checkpoint(
        req.checkpoint, arch=o.arch, num_classes=o.num_classes, ema=o.ema, model_args=dict(o.model_args), source=source
    )
    # A --merge none checkpoint: fold its adapter in (masks kept) before training a new one.
    model = lora.merge_kept_adapters(loaded.model, loaded.manifest.masked)
    prunable = sorted(prunable_params(model))
    masks = lora.masks_of(model, loaded.manifest.masked)
    sparsity_before = count_model(model).sparsity  # the one counting convention (prunecli.counting)
    masked_before = _prunable_sparsity(model, sorted(masks))
    train_ds, val_ds = training_data(req, loaded, augment, recipe_report)
    eval_bs = max(run.batch_size, 256)
    # one validation loader for the three evaluations (its workers persist)
    val_loader = eval_loader(val_ds, dev, batch_size=eval_bs, workers=run.workers) if val_ds is not None else None
    fast = {"precision": config.precision, "channels_last": run.channels_last, "loader": val_loader}

    metrics: dict[str, Any] = {}
    if val_ds is not None:
        before = evaluate_sharded(model, val_ds, dev, **fast)
        metrics.update(top1_before=before["top1"], loss_before=before["loss"])

    pruned_layers = _pruned_layers(model, loaded.manifest)
    preset, adapt_linear, preset_targets = TARGET_PRESETS.get(preset)(model, pruned_layers, lo.rank)
    opts = dataclasses.replace(opts, linear=adapt_linear, targets=(*preset_targets, *opts.targets))
    chosen = lora.select_targets(model, opts)
    peft_model = lora.attach_lora(model, opts, chosen)
    through_mask = lora.mask_updates(peft_model, masks) if masked_update else []
    n_trainable = sum(p.numel() for p in lora.trainable_params(peft_model).values())
    trainee = D.wrap_ddp(_BnMode(peft_model, lo.bn), dev)
    n = len(train_ds.dataset)
    sampler = D.ShardSampler(
        n, shuffle=True, seed=run.seed, rank=ctx.rank, world_size=ctx.world_size, global_batch=run.batch_size,
        drop_last=n > run.batch_size,  # equal shards per step (DDP == one process); no size-1 BatchNorm batches
    )  # fmt: skip
    loader = make_loader(train_ds, batch_size=run.batch_size // ctx.world_size, workers=run.workers, sampler=sampler,
                         device=dev)  # fmt: skip
    total_steps = min(len(loader) * t.epochs, t.max_steps or len(loader) * t.epochs)
    config = dataclasses.replace(config, warmup_steps=warmup_steps(chosen_recipe["warmup"], total_steps))
    recipe_report["warmup_steps"] = config.warmup_steps
    w = req.wcr
    reg = WCR(lora.effective_weight_fns(peft_model), w.wcr, w.wcr_eps, w.wcr_delta) if w.wcr > 0 else None

    start = time.perf_counter()
    result = train(trainee, loader, dev, config, extra_loss=reg)
    train_time = time.perf_counter() - start
    D.sync_buffers(peft_model)
    tm = result.metrics()
    for key in ("train_loss", "train_acc_per_epoch", "extra_loss"):  # equal shards: the mean over ranks is global
        if key in tm:
            tm[key] = D.mean_over_ranks(tm[key])
    tm["train_acc"] = tm["train_acc_per_epoch"][-1] if tm["train_acc_per_epoch"] else float("nan")
    if "extra_loss" in tm:
        tm["wcr_per_epoch"] = tm.pop("extra_loss")
    metrics.update(tm)
    if reg is not None:
        stats = reg.stats()
        metrics["wcr"] = {k: stats[k] for k in ("lambda", "eps", "delta", "R", "value", "layers", "var_abs")}

    if val_ds is not None:
        unmerged = evaluate_sharded(peft_model, val_ds, dev, **fast)
        metrics["top1_unmerged"] = unmerged["top1"]
    peft_model.to("cpu")
    outcome = merge_fn(peft_model, {k: v.cpu() for k, v in masks.items()})
    for w in outcome.warnings:
        lora.log.warning(w)
    final = outcome.model.eval()
    after = count_model(final)
    metrics.update(after.metrics())
    metrics["sparsity_after"] = after.sparsity
    metrics["masked_sparsity_before"] = masked_before  # over the tensors the checkpoint lists as masked
    metrics["masked_sparsity_after"] = _prunable_sparsity(final, sorted(masks))
    if outcome.adapter_state is not None:
        eff = {k: v.detach() for k, v in lora.effective_weights(outcome.adapter_state).items()}
        metrics["sparsity_effective"] = _effective_sparsity(final, prunable, eff)
    if val_ds is not None:
        if outcome.adapter_state is None:
            after = evaluate_sharded(final, val_ds, dev, **fast)["top1"]
        else:
            after = metrics["top1_unmerged"]  # the written checkpoint evaluates with its adapter attached
        metrics.update(top1_after=after, lora_improvement=after - metrics["top1_before"])
        final.to("cpu")

    metrics.update(
        {
            "data": req.data,
            "val": req.val,
            "arch": loaded.manifest.arch,
            "targets": chosen,
            "target_preset": preset,
            "pruned_layers": pruned_layers,
            "recipe": recipe_report,
            "loader": loader_info(loader),
            "rank": lo.rank,
            "alpha": lo.alpha,
            "scale": opts.scale,
            "dora": lo.dora,
            "bn": lo.bn,
            "trainable_params": n_trainable,
            "merge": outcome.mode,
            "merge_requested": merge,
            "masked_update": bool(through_mask),
            "masked_update_layers": through_mask,
            "masked": outcome.masked,
            "sparsity_before": sparsity_before,
            "sparsity_lost": max(0.0, sparsity_before - metrics["sparsity_after"]),
            "train_samples": n,
            "train_time_s": round(train_time, 3),
            "world_size": ctx.world_size,
        }
    )
    written: tuple[str | None, str | None] = (None, None)
    if ctx.is_main:
        written = _write(req.output, out_path, final, loaded, outcome, adapter_dir, req, recipe_report)
    written = D.broadcast_object(written)
    if outcome.adapter_state is not None and adapter_dir is not None:
        metrics["adapter"] = str(adapter_dir)
    return Result(checkpoint=written[0], sha256=written[1], metrics=metrics, device=describe(dev))


def _write(
    output: str | Path,
    out_path: Path,
    model: Any,
    loaded: Any,
    outcome: Any,
    adapter_dir: Path | None,
    req: FinetuneLoraRequest,
    recipe: dict[str, Any],
) -> tuple[str, str]:
    """Rank 0: the checkpoint (and for ``--merge none`` the adapter folder beside it), all or nothing."""
    import dataclasses
    import shutil

    from prunecli import lora
    from prunecli.api._common import save_output

    manifest = dataclasses.replace(loaded.manifest, masked=list(outcome.masked), adapters=None)
    staged = None
    if outcome.adapter_state is not None and adapter_dir is not None:
        staged, meta = lora.stage_adapter(outcome.adapter_state, out_path.parent)
        base = out_path if adapter_dir.parent == out_path else out_path.parent
        manifest.adapters = {**meta, "path": str(adapter_dir.relative_to(base))}
    try:
        path, sha = save_output(output, model, loaded, command="finetune-lora", options=req.to_json(),
                                force=req.force, manifest=manifest, provenance={"recipe": recipe})  # fmt: skip
        if staged is not None and adapter_dir is not None:
            lora.commit_adapter(staged, adapter_dir)
    except BaseException:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    return path, sha


def _effective_sparsity(model: Any, names: list[str], effective: dict[str, Any]) -> float:
    """Sparsity of the weights the model with its adapter computes with (adapted layers are dense)."""
    from prunecli.masks import sparsity

    params = dict(model.named_parameters())
    return sparsity(effective.get(n, params[n]) for n in names if n in params)


class _BnMode(nn.Module):
    """Keeps ``--bn`` in force whenever the training loop switches the model to train mode."""

    def __init__(self, model: nn.Module, bn: str) -> None:
        super().__init__()
        self.model = model
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def train(self, mode: bool = True) -> _BnMode:
        from prunecli.lora import BN_MODES

        super().train(mode)
        if mode:
            BN_MODES.get(self.bn)(self.model)
        return self

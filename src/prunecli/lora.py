"""LoRA recovery on peft: target selection, B = 0 start, BN modes, merges that keep the sparsity.

Paper A (METHODS §1.3) recovers a pruned network by training low-rank adapters ``ΔW = (α/r)·B A``
beside every Linear layer while all original weights stay frozen. This module is the thin layer
between prunecli and peft:

- :func:`select_targets` turns globs into the exact module names to adapt (every ``nn.Linear`` by
  default, as in paper A; ``targets`` adds e.g. conv layers, ``exclude`` removes), and refuses what
  peft cannot adapt, a glob that matches nothing, and a rank that is 0 or larger than a layer;
- :func:`attach_lora` wraps the model with peft (``init_lora_weights=True``: A Kaiming-uniform,
  **B = 0**, so training starts exactly at the pruned model) and freezes everything else;
- :data:`BN_MODES` says whether BatchNorm statistics keep updating while the adapters train;
- :data:`MERGE_MODES` ends training: ``masked`` merges and re-applies each tensor's pruning mask
  (``mask = weight != 0`` for tensors listed in ``Manifest.masked``) so the sparsity survives
  exactly; ``dense`` merges and reports the sparsity lost; ``none`` keeps the adapter beside the
  weights in peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``);
- :func:`mask_updates` makes masked layers train through their mask, ``(W + scale·B A) ⊙ M``, so that
  the ``masked`` merge writes exactly the model that was trained;
- :func:`effective_weights` gives the weights the adapted model really computes with
  (``W + scale·B A``, or DoRA's rescaled form) for the WCR term (METHODS §3);
- :func:`attach_adapters` re-attaches a kept adapter when a checkpoint is loaded, so ``eval`` gives
  the same logits as peft's ``PeftModel.from_pretrained``.

peft is imported inside the functions: only ``finetune-lora`` and loading a checkpoint that carries
an adapter pay for it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecli.checkpoint.adapters import ADAPTER_NAME, attach_adapters
from prunecli.errors import InputError
from prunecli.prunable import match_any
from prunecli.registry import Registry

__all__ = [
    "ADAPTER_NAME",
    "BN_MODES",
    "MERGE_MODES",
    "LoraOptions",
    "MergeOutcome",
    "adapter_dir_for",
    "attach_adapters",
    "attach_lora",
    "commit_adapter",
    "effective_weight_fns",
    "effective_weights",
    "lora_layers",
    "mask_updates",
    "masks_of",
    "merge_adapters",
    "merge_kept_adapters",
    "select_targets",
    "stage_adapter",
    "trainable_params",
]

log = logging.getLogger(__name__)

# Module types peft's default LoRA dispatcher adapts (``peft.tuners.lora.layer.dispatch_default``).
_ADAPTABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


@dataclass(frozen=True)
class LoraOptions:
    """What to adapt and how (paper A's defaults).

    Attributes:
        rank: adapter rank r (paper A: 8).
        alpha: scaling numerator; the update is ``(alpha / rank) · B A`` (paper A: 16, scale 2).
        dropout: dropout on the adapter input (paper A: not stated → 0).
        linear: adapt every ``nn.Linear`` layer (paper A); False adapts only ``targets``.
        targets: extra module globs to adapt (e.g. ``features.*.conv`` for the convolutions).
        exclude: module globs never adapted (applied last).
        dora: weight-decomposed LoRA (DoRA, peft ``use_dora``).
        bn: ``train`` (BatchNorm running statistics update while training) or ``eval`` (frozen).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    linear: bool = True
    targets: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    dora: bool = False
    bn: str = "train"

    @property
    def scale(self) -> float:
        """The LoRA scaling factor α / r."""
        return self.alpha / self.rank


# ----------------------------------------------------------------------------------------- targets


def _min_dim(module: nn.Module) -> int:
    """The largest rank a layer's update can have: min(fan-out, fan-in)."""
    w = module.weight
    if isinstance(module, nn.Embedding):
        return min(w.shape)
    return min(int(w.shape[0]), int(w[0].numel()))


def select_targets(model: nn.Module, opts: LoraOptions) -> list[str]:
    """Module names to adapt, in definition order.

    Every ``nn.Linear`` (paper A) when ``opts.linear``, plus modules matching ``opts.targets``,
    minus modules matching ``opts.exclude``.

    Raises:
        InputError: rank or alpha out of range, a ``targets``/``exclude`` glob that matches no
            module, a matched module that peft cannot adapt, nothing left to adapt, or a rank larger
            than a selected layer.

    Example:
        >>> select_targets(timm.create_model("improved_cnn"), LoraOptions())
        ['fc1', 'fc2']
    """
    if opts.rank < 1:
        raise InputError(f"--rank must be at least 1, got {opts.rank}")
    if opts.alpha <= 0:
        raise InputError(f"--alpha must be positive, got {opts.alpha}")
    if not 0.0 <= opts.dropout < 1.0:
        raise InputError(f"--dropout must be in [0, 1), got {opts.dropout}")
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    for kind, globs in (("--targets", opts.targets), ("--exclude", opts.exclude)):
        for g in globs:
            if not any(match_any(n, [g]) for n in names):
                raise InputError(
                    f"{kind} {g!r} matches no module of the model",
                    hint="module names look like " + ", ".join(names[:6]) + "; see `prunecli inspect --layers`",
                )
    chosen: list[str] = []
    for name in names:
        mod = modules[name]
        wanted = (opts.linear and isinstance(mod, nn.Linear)) or match_any(name, opts.targets)
        if not wanted or match_any(name, opts.exclude):
            continue
        if not isinstance(mod, _ADAPTABLE) or getattr(mod, "weight", None) is None:
            raise InputError(
                f"--targets: module {name!r} is a {type(mod).__name__}; LoRA adapts Linear, Conv1d/2d/3d and "
                "Embedding layers",
                hint="narrow the glob to the layers themselves (e.g. 'features.*.conv')",
            )
        chosen.append(name)
    if not chosen:
        raise InputError("no layer to adapt", hint="the model has no Linear layer left: pass --targets GLOB")
    for name in chosen:
        limit = _min_dim(modules[name])
        if opts.rank > limit:
            raise InputError(
                f"--rank {opts.rank} is larger than layer {name!r} allows (min(fan-out, fan-in) = {limit})",
                hint=f"use --rank {limit} or less, or --exclude {name}",
            )
    return chosen


# ----------------------------------------------------------------------------------------- BN modes

BN_MODES: Registry[Callable[[nn.Module], None]] = Registry("BatchNorm mode")


@BN_MODES.register("train")
def _bn_train(model: nn.Module) -> None:
    """BatchNorm layers normalise with batch statistics and update their running statistics."""
    model.train()


@BN_MODES.register("eval")
def _bn_eval(model: nn.Module) -> None:
    """BatchNorm layers keep their running statistics (frozen); dropout stays in training mode."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# ----------------------------------------------------------------------------------------- attach


def attach_lora(model: nn.Module, opts: LoraOptions, targets: Sequence[str] | None = None) -> nn.Module:
    """Wraps ``model`` with peft LoRA adapters on ``targets`` (default :func:`select_targets`).

    The base model is modified in place (peft injects its layers); the returned object is the
    ``PeftModel``. Only the adapter parameters (and DoRA magnitudes) require gradients. B is
    zero-initialised, so the adapted model computes exactly what the pruned model computed.
    """
    from peft import LoraConfig, get_peft_model

    targets = list(targets) if targets is not None else select_targets(model, opts)
    config = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        # A regex matched with re.fullmatch: exactly these module names, never a suffix match.
        target_modules="|".join(re.escape(t) for t in targets),
        use_dora=opts.dora,
        init_lora_weights=True,
        bias="none",
    )
    peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
    for name, p in peft_model.named_parameters():
        p.requires_grad_(_is_adapter_param(name))
    return peft_model


def _is_adapter_param(name: str) -> bool:
    return any(f".{k}." in f".{name}." for k in ("lora_A", "lora_B", "lora_magnitude_vector"))


def trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name → parameter for every parameter that requires a gradient."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Base-model module name → peft LoRA layer, for every adapted layer inside ``model``."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            out[_base_name(name)] = mod
    return out


def _base_name(name: str) -> str:
    """``base_model.model.fc1`` → ``fc1`` (peft's wrapper prefixes)."""
    return name.removeprefix("base_model.model.")


def effective_weights(model: nn.Module, only: str | None = None) -> dict[str, torch.Tensor]:
    """Base parameter name → the weight each adapted layer computes with, differentiable.

    Vanilla LoRA: ``W + (α/r)·B A`` (peft's ``get_delta_weight``, which covers conv shapes).
    DoRA: ``m / ‖W + ΔW‖_row · (W + ΔW)`` (the merged weight, with the norm not detached so that a
    regulariser sees it). A layer set up by :func:`mask_updates` multiplies this by its pruning mask.
    These are the tensors the WCR term regularises (METHODS §3, paper C's LoRA setting).
    """
    out: dict[str, torch.Tensor] = {}
    for name, layer in sorted(lora_layers(model).items()):
        if ADAPTER_NAME not in layer.lora_A or (only is not None and only != f"{name}.weight"):
            continue
        eff = _merged_weight(layer)
        keep = _mask_of(layer)
        out[f"{name}.weight"] = eff if keep is None else eff * keep
    return out


def _merged_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a merge would write for one LoRA layer (before any mask), differentiable."""
    w = layer.get_base_layer().weight
    eff = w + layer.get_delta_weight(ADAPTER_NAME)
    if ADAPTER_NAME in getattr(layer, "lora_magnitude_vector", {}):
        mag = layer.lora_magnitude_vector[ADAPTER_NAME].weight
        norm = eff.flatten(1).norm(p=2, dim=1)
        eff = eff * (mag.reshape(-1) / norm).reshape(-1, *([1] * (eff.ndim - 1)))
    return eff


def effective_weight_fns(model: nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
    """Like :func:`effective_weights`, one zero-argument function per layer, recomputed at each call.

    The form :class:`prunecli.wcr.WCR` takes for tensors that change every step.
    """
    names = sorted(f"{n}.weight" for n, layer in lora_layers(model).items() if ADAPTER_NAME in layer.lora_A)
    return {n: functools.partial(_one_effective, model, n) for n in names}


def _one_effective(model: nn.Module, name: str) -> torch.Tensor:
    return effective_weights(model, only=name)[name]


# ----------------------------------------------------------------------------------------- masks


def masks_of(model: nn.Module, masked: Iterable[str]) -> dict[str, torch.Tensor]:
    """Parameter name → boolean keep-mask (``param != 0``) for the tensors listed in ``masked``.

    Names are those of the plain (unwrapped) model: take the masks before attaching adapters.
    """
    params = dict(model.named_parameters())
    return {n: params[n].detach() != 0 for n in sorted(set(masked)) if n in params}


# ----------------------------------------------------------------------------------------- masked update

_MASK_ATTR = "_prunecli_keep"
_MASKABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def mask_updates(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[str]:
    """Makes every adapted layer that carries a pruning mask compute with ``(W + ΔW) ⊙ M``.

    Paper A trains ``W + (α/r)·B A`` with a dense ``B A``; re-applying the mask after the merge then
    throws away the part of the update that fell on pruned positions, so the written checkpoint is not
    the model that was trained (at high sparsity most of the update is lost). Training through the
    mask keeps the update where it survives: the adapted layer computes with exactly the weight the
    ``masked`` merge writes, and the gradient reaching ``B`` and ``A`` sees only kept positions. With
    ``B = 0`` the layer still computes ``W ⊙ M = W``, so training starts at the pruned model.

    The layer's ``forward`` is replaced on the instance (peft's class is untouched); merging or
    unloading drops the LoRA layer and with it the replacement.

    Args:
        model: a model with peft LoRA layers (:func:`attach_lora`).
        masks: base parameter name → boolean keep-mask (:func:`masks_of`).

    Returns:
        The base parameter names now trained through their mask, sorted.
    """
    done: list[str] = []
    for name, layer in sorted(lora_layers(model).items()):
        keep = masks.get(f"{name}.weight")
        base = layer.get_base_layer()
        if keep is None or ADAPTER_NAME not in layer.lora_A or not isinstance(base, _MASKABLE):
            continue
        # A plain attribute, not a buffer: DDP would broadcast a weight-sized buffer every step.
        setattr(layer, _MASK_ATTR, keep.to(torch.bool))
        layer.forward = functools.partial(_masked_forward, layer)
        done.append(f"{name}.weight")
    return done


def _mask_of(layer: nn.Module) -> torch.Tensor | None:
    """The layer's keep-mask on its weight's device (moved once, then cached), or None."""
    keep = getattr(layer, _MASK_ATTR, None)
    if keep is None:
        return None
    device = layer.get_base_layer().weight.device
    if keep.device != device:
        keep = keep.to(device)
        setattr(layer, _MASK_ATTR, keep)
    return keep


def _masked_forward(layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``(W + ΔW) ⊙ M`` applied as the base layer would apply ``W``; dropout only on the update's input."""
    base = layer.get_base_layer()
    if layer.disable_adapters or layer.merged or ADAPTER_NAME not in layer.active_adapters:
        return base(x, *args, **kwargs)
    weight = _merged_weight(layer) * _mask_of(layer)
    dropout = layer.lora_dropout[ADAPTER_NAME]
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
        # W ⊙ M = W (the mask is W's own non-zero pattern), so the update alone sees the dropped input.
        return _apply(base, x, base.weight, base.bias) + _apply(base, dropout(x), weight - base.weight, None)
    return _apply(base, x, weight, base.bias)


_PLAIN_FORWARDS = frozenset({nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward})


def _apply(base: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The base layer's operation with another weight (its stride, padding, groups for convolutions)."""
    if type(base).forward in _PLAIN_FORWARDS:
        if isinstance(base, nn.Linear):
            return nn.functional.linear(x, weight, bias)
        return base._conv_forward(x, weight, bias)
    # A subclass with its own forward (timm's Conv2dSame pads first, StdConv2d standardises the weight):
    # run that forward with the weight swapped in, so the merged layer computes the same thing.
    params = {"weight": weight}
    if base.bias is not None:
        params["bias"] = bias if bias is not None else torch.zeros_like(base.bias)
    return torch.func.functional_call(base, params, (x,))


# ----------------------------------------------------------------------------------------- merge


@dataclass
class MergeOutcome:
    """What a merge mode did.

    Attributes:
        model: the plain model to save (adapters merged in, or removed when kept aside).
        mode: the mode actually applied (``masked`` may fall back to ``dense``).
        masked: the tensors whose zeros are still pruning masks after the merge.
        adapter_state: for ``none``: the peft model whose adapter is saved beside the checkpoint.
        warnings: what the user should know (e.g. the fallback).
    """

    model: nn.Module
    mode: str
    masked: list[str]
    adapter_state: Any = None
    warnings: list[str] = field(default_factory=list)


MergeFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], MergeOutcome]
MERGE_MODES: Registry[MergeFn] = Registry("merge mode")


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merges every LoRA layer of ``model`` into its base layer in place and unwraps it.

    Works on a ``PeftModel`` and on a plain model with injected layers (:func:`attach_adapters`).
    Returns the plain model. peft's safe merge refuses NaN/inf results.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload(safe_merge=True)
    with torch.no_grad():
        for name, layer in list(lora_layers(model).items()):
            layer.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer.get_base_layer())
    return model


def merge_kept_adapters(model: nn.Module, masked: Iterable[str]) -> nn.Module:
    """Folds an attached adapter (:func:`attach_adapters`) into a plain model, keeping the pruning masks.

    For commands that need plain parameter names (``prune``, ``score``, ``finetune``, a new
    ``finetune-lora``) on a ``--merge none`` checkpoint: the masks are read from the base weights
    before merging and re-applied after, as ``--merge masked`` does.
    """
    layers = lora_layers(model)
    if not layers:
        return model
    keep: dict[str, torch.Tensor] = {}
    for name in sorted(set(masked)):
        mod_name = name.removesuffix(".weight")
        if name.endswith(".weight") and mod_name in layers:
            keep[name] = layers[mod_name].get_base_layer().weight.detach() != 0
    model = merge_adapters(model)
    with torch.no_grad():
        for name, k in keep.items():
            p = model.get_parameter(name)
            p.mul_(k.to(p.dtype))
    return model


@MERGE_MODES.register("masked")
def _merge_masked(peft_model: nn.Module, masks: Mapping[str, torch.Tensor]) -> MergeOutcome:
    """Merge, then multiply each masked tensor by its pruning mask: the sparsity survives exactly."""
    adapted = {f"{n}.weight" for n in lora_layers(peft_model)}
    warn: list[str] = []
    if not adapted & set(masks):
        warn.append(
            "--merge masked: no adapted layer carries a pruning mask (the checkpoint lists none for them); "
            "merged dense instead"
        )
    model = merge_adapters(peft_model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            params[name].mul_(keep.to(params[name].dtype))
    return MergeOutcome(model, "dense" if warn else "masked", sorted(masks), warnings=warn)


@MERGE_MODES.register("dense")
def _merge_dense(peft_model: nn.Module, masks: Mapping[str, torch.Tensor]) -> MergeOutcome:
    """Merge; the adapted layers become dense, so their masks are dropped from the manifest."""
    adapted = {f"{n}.weight" for n in lora_layers(peft_model)}
    model = merge_adapters(peft_model)
    return MergeOutcome(model, "dense", sorted(set(masks) - adapted))


@MERGE_MODES.register("none")
def _merge_none(peft_model: nn.Module, masks: Mapping[str, torch.Tensor]) -> MergeOutcome:
    """Keep the adapter beside the (untouched, still sparse) base weights, in peft's format."""
    base = peft_model.get_base_model()
    plain = _unwrapped_copy(base)
    return MergeOutcome(plain, "none", sorted(masks), adapter_state=peft_model)


def _unwrapped_copy(base: nn.Module) -> nn.Module:
    """A copy of ``base`` with every LoRA layer replaced by its base layer (adapter dropped)."""
    import copy

    clone = copy.deepcopy(base)
    for name, layer in list(lora_layers(clone).items()):
        parent_name, _, child = name.rpartition(".")
        parent = clone.get_submodule(parent_name) if parent_name else clone
        setattr(parent, child, layer.get_base_layer())
    return clone


# ----------------------------------------------------------------------------------------- save / load


def adapter_dir_for(checkpoint: str | Path) -> Path:
    """Where ``--merge none`` keeps the adapter: ``OUT.adapter/`` beside a file, ``OUT/adapter/`` in a folder."""
    s = str(checkpoint)
    path = Path(s).expanduser().resolve()
    if s.endswith(("/", os.sep)) or path.is_dir():
        return path / "adapter"
    return path.with_name(path.stem + ".adapter")


def stage_adapter(peft_model: nn.Module, near: Path) -> tuple[Path, dict[str, Any]]:
    """Writes the adapter with peft's ``save_pretrained`` into a temporary folder in ``near``.

    Staged first because the checkpoint's manifest records the adapter's sha256 and a folder
    checkpoint is written by replacing the whole folder; :func:`commit_adapter` moves it in place
    afterwards. Returns (temporary folder, the metadata for ``Manifest.adapters`` without ``path``).
    """
    from prunecli.checkpoint.hashing import file_sha256

    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", suffix=".tmp", dir=near))
    try:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        config = json.loads((tmp / "adapter_config.json").read_text())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta = {
        "format": "peft",
        "adapter_name": ADAPTER_NAME,
        "sha256": file_sha256(tmp / "adapter_model.safetensors"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "use_dora": bool(config.get("use_dora")),
        "target_modules": config.get("target_modules"),
    }
    return tmp, meta


def commit_adapter(tmp: Path, folder: Path) -> None:
    """Moves a staged adapter folder to ``folder``, replacing an older one."""
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)

"""Rebuild channel-pruned shapes on a freshly built dense model, without pickle (docs/channel-pruning.md).

Channel pruning (:mod:`prunecli.pruning.channel`) changes tensor shapes and a few module attributes
that ``forward`` reads (``Conv2d.out_channels``, ``LayerNorm.normalized_shape``, timm ``Attention.head_dim``,
…). A checkpoint stores the pruned weights plus ``manifest.structure``, a JSON document that lists, for
every module that changed:

.. code-block:: json

    {"format": 1, "kind": "channel",
     "modules": {"layer1.0.conv1": {"params": {"weight": [45, 64, 3, 3]},
                                     "buffers": {},
                                     "attrs": {"out_channels": 45}},
                 "": {"params": {"pos_embed": [1, 197, 538]}}},
     "channels": {"layer1.0.conv1": {"out": {"kept": [0, 2, ...], "dense": 64}}}}

:func:`apply_structure` turns a model built by ``timm.create_model`` (normally on the ``meta`` device,
see :func:`prunecli.models.build_model`) into those shapes: it replaces each listed parameter/buffer with
an empty tensor of the recorded shape (same device, dtype and persistence) and sets the recorded
attributes, so that ``load_state_dict(strict=True, assign=True)`` of the pruned weights succeeds and the
forward equals the pruned model's. Recording the *diff* of every module, instead of knowing layer types,
is what makes this work for any architecture Torch-Pruning can prune (timm's own ``_prune.py`` only
knows Conv/BN/Linear). ``channels`` is not needed to rebuild; it tells ``restore`` which dense channels
survived.

A non-persistent buffer is not in the checkpoint: it is a value the module computes from its own
attributes. Most rebuild themselves in the forward and are left out; where the module offers timm's
``init_non_persistent_buffers`` (``BlurPool2d``'s per-channel kernel), a changed shape is recorded
under ``"computed"`` and :func:`apply_structure` resizes the buffer, then lets the module fill it
from its (already pruned) attributes. A prunecli that predates the key ignores it and the buffer keeps
its dense shape: the forward fails loudly rather than running on uninitialised memory.

:func:`snapshot`/:func:`diff_structure`/:func:`revert` are the recording side, used by the pruner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunecli.errors import CheckpointError

__all__ = ["STRUCTURE_FORMAT", "Snapshot", "apply_structure", "diff_structure", "revert", "snapshot"]

STRUCTURE_FORMAT = 1

# Attribute names never recorded: nn.Module bookkeeping, and flags unrelated to shapes.
_SKIP_ATTRS = frozenset({"training", "_is_full_backward_hook", "fused_attn", "inplace"})


def _simple(value: Any) -> bool:
    """True for the attribute values a structure can carry: numbers and (nested) tuples/lists of them."""
    if isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_simple(v) for v in value)
    return False


def _to_json(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    return value


def _like(template: Any, value: Any) -> Any:
    """Converts a JSON value back to the container types of the attribute it replaces (tuple vs list)."""
    if isinstance(value, list):
        items = [_like(template[i] if isinstance(template, (tuple, list)) and i < len(template) else None, v)
                 for i, v in enumerate(value)]  # fmt: skip
        return tuple(items) if isinstance(template, tuple) or template is None else items
    if isinstance(template, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@dataclass
class Snapshot:
    """References to every module's own tensors and simple attributes, taken before pruning.

    Torch-Pruning never modifies a tensor in place: it assigns new ``nn.Parameter``s and buffers.
    Holding references is therefore enough to :func:`revert` a failed attempt without copying weights.
    """

    tensors: dict[str, dict[str, tuple[str, torch.Tensor | None]]] = field(default_factory=dict)
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)


def snapshot(model: nn.Module) -> Snapshot:
    """Records each module's direct parameters, buffers and number-valued attributes."""
    snap = Snapshot()
    for name, mod in model.named_modules():
        tensors: dict[str, tuple[str, torch.Tensor | None]] = {}
        for pname, p in mod._parameters.items():
            tensors[pname] = ("param", p)
        for bname, b in mod._buffers.items():
            tensors[bname] = ("buffer", b)
        snap.tensors[name] = tensors
        snap.attrs[name] = {
            k: (list(v) if isinstance(v, list) else v)  # a copy, still a list: model code may index or append
            for k, v in vars(mod).items()
            if not k.startswith("_") and k not in _SKIP_ATTRS and _simple(v)
        }
    return snap


def revert(model: nn.Module, snap: Snapshot) -> None:
    """Puts back the tensors and attributes of :func:`snapshot` (undoes a pruning attempt)."""
    modules = dict(model.named_modules())
    for name, tensors in snap.tensors.items():
        mod = modules.get(name)
        if mod is None:
            continue
        for tname, (kind, t) in tensors.items():
            (mod._parameters if kind == "param" else mod._buffers)[tname] = t
        for k, v in snap.attrs[name].items():
            object.__setattr__(mod, k, list(v) if isinstance(v, list) else v)  # the snapshot stays reusable


def diff_structure(model: nn.Module, snap: Snapshot) -> dict[str, dict[str, Any]]:
    """Per module: the new shapes of tensors and the new values of attributes that changed since ``snap``."""
    out: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        before = snap.tensors.get(name, {})
        params: dict[str, list[int]] = {}
        buffers: dict[str, list[int]] = {}
        for pname, p in mod._parameters.items():
            old = before.get(pname, (None, None))[1]
            if p is not None and (old is None or tuple(old.shape) != tuple(p.shape)):
                params[pname] = list(p.shape)
        computed: dict[str, list[int]] = {}
        for bname, b in mod._buffers.items():
            old = before.get(bname, (None, None))[1]
            if b is None or (old is not None and tuple(old.shape) == tuple(b.shape)):
                continue
            if bname not in mod._non_persistent_buffers_set:
                buffers[bname] = list(b.shape)
            elif callable(getattr(mod, "init_non_persistent_buffers", None)):
                computed[bname] = list(b.shape)
            # else not in the checkpoint; a forward-side cache (convit's rel_indices) rebuilds itself
        old_attrs = snap.attrs.get(name, {})
        attrs = {}
        for k, v in vars(mod).items():
            if k.startswith("_") or k in _SKIP_ATTRS or not _simple(v):
                continue
            if k not in old_attrs or _to_json(old_attrs[k]) != _to_json(v):
                attrs[k] = _to_json(v)
        entry: dict[str, Any] = {}
        if params:
            entry["params"] = params
        if buffers:
            entry["buffers"] = buffers
        if attrs:
            entry["attrs"] = attrs
        if computed:
            entry["computed"] = computed
        if entry:
            out[name] = entry
    return dict(sorted(out.items()))


def apply_structure(model: nn.Module, structure: Mapping[str, Any]) -> nn.Module:
    """Reshapes a dense model in place to the recorded pruned structure; returns it.

    Tensors are replaced by uninitialised ones of the recorded shape on the device and dtype of the
    tensor they replace (``meta`` for :func:`prunecli.models.build_model`, so nothing is allocated);
    the checkpoint's weights are loaded afterwards.

    Raises:
        CheckpointError: the structure is from a newer prunecli, or names a module or tensor the
            architecture does not have (the checkpoint does not belong to this architecture).
    """
    fmt = int(structure.get("format", 1))
    if fmt > STRUCTURE_FORMAT:
        raise CheckpointError(f"pruned structure format {fmt} is newer than this prunecli's", hint="upgrade prunecli")
    modules = dict(model.named_modules())
    for name, entry in structure.get("modules", {}).items():
        mod = modules.get(name)
        if mod is None:
            raise CheckpointError(f"pruned structure names module {name!r}, which the architecture does not have")
        for kind, store in (("params", mod._parameters), ("buffers", mod._buffers)):
            for tname, shape in entry.get(kind, {}).items():
                old = store.get(tname)
                if old is None:
                    raise CheckpointError(f"pruned structure names tensor {name}.{tname}, which does not exist")
                new = torch.empty(tuple(int(s) for s in shape), dtype=old.dtype, device=old.device)
                store[tname] = nn.Parameter(new, requires_grad=old.requires_grad) if kind == "params" else new
        for attr, value in entry.get("attrs", {}).items():
            object.__setattr__(mod, attr, _like(getattr(mod, attr, None), value))
        if entry.get("computed"):
            for bname, shape in entry["computed"].items():
                old = mod._buffers.get(bname)
                if old is None or bname not in mod._non_persistent_buffers_set:
                    raise CheckpointError(
                        f"pruned structure names computed buffer {name}.{bname}, which does not exist"
                    )
                mod._buffers[bname] = torch.empty(tuple(int(s) for s in shape), dtype=old.dtype, device=old.device)
            init = getattr(mod, "init_non_persistent_buffers", None)
            if not callable(init):
                raise CheckpointError(f"pruned structure asks module {name!r} to compute its buffers; it cannot")
            init()  # from the attributes just set (BlurPool2d: the kernel repeated `channels` times)
    return model

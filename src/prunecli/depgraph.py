"""The only module that imports Torch-Pruning: dependency graphs (DepGraph) and the names prunecli uses from it.

Torch-Pruning traces a model through autograd and links every set of coupled channels (a conv's
outputs, its BatchNorm, its consumers' inputs, residual additions, concatenations, …). Channel
pruning (:mod:`prunecli.pruning.groups`, :mod:`prunecli.pruning.apply`) walks those groups;
restoration (:mod:`prunecli.restoration.graph`) walks the producer → consumer edges. Both build the
graph through :func:`build_graph`, so the tracing options (warnings silenced, gradients on) are set
in one place and a Torch-Pruning upgrade is checked against one file.

Importing this module imports ``torch_pruning`` (and torch): import it lazily from commands that do
not always need it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import graph as _graph
from torch_pruning.dependency import index_mapping as _index_mapping
from torch_pruning.dependency import shape_infer as _shape_infer

from prunecli.registry import class_key

__all__ = [
    "CUSTOM_PRUNERS",
    "DW_FNS",
    "ENGINE",
    "MAX_GROUP_INDICES",
    "MAX_GROUP_ITEMS",
    "OUT_FNS",
    "TIED_HEADS",
    "GroupTooLarge",
    "Importance",
    "build_graph",
    "is_elementwise_op",
    "is_reshape_op",
    "static_widths",
]

_F = tp.pruner.function

OUT_FNS = (_F.prune_conv_out_channels, _F.prune_linear_out_channels, _F.prune_depthwise_conv_out_channels)
"""Pruning functions that remove a conv/linear layer's *output* channels (the members whose scores vote)."""

DW_FNS = (_F.prune_depthwise_conv_out_channels, _F.prune_depthwise_conv_in_channels)
"""Pruning functions of depthwise convs, whose input and output channels are the same dimension."""

ENGINE = f"torch-pruning {tp.__version__}" if hasattr(tp, "__version__") else "torch-pruning"
"""Recorded in a channel-pruned checkpoint's structure (``engine``)."""

Importance = tp.importance.Importance
"""Torch-Pruning's group-importance base class (``__call__(group) -> Tensor``)."""


_TP_CONCAT_MAPPING = _index_mapping.update_concat_index_mapping


def _leaving_unmapped(error: type[Exception], mapping: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """``mapping`` (one of Torch-Pruning's per-op index-mapping updates), leaving the op unmapped where
    it raises ``error`` before assigning anything — what Torch-Pruning itself does when a width is
    unknown; the safety net then checks the plans whose groups cross that op."""

    def update(graph: Any, node: Any) -> None:
        try:
            mapping(graph, node)
        except error:
            return

    return update


def _concat_mapping(graph: Any, cat_node: Any) -> None:
    """Torch-Pruning's ``update_concat_index_mapping``, skipping a concat one of whose input widths is unknown.

    Torch-Pruning sums the widths that ``infer_channels_between`` found for the concat's inputs before
    its own ``None`` check and raises ``TypeError`` (int + None) when one is unknown (cs3darknet's
    shortcut add, coat's class token): the whole graph build then fails. Its own code gives up on such
    a concat a few lines later (no offsets, ``concat_sizes`` left ``None`` so its concat pruner skips
    it); this returns before the sum instead, so the rest of the graph is built. Channels coupled through
    that concat are then not index-mapped, and the safety net (a forward after the plan) catches a
    group whose pruning breaks it. A width whose inference itself fails counts as unknown: through a
    split of more chunks than its recorded sizes, Torch-Pruning reads past their list (gemma4_vit:
    ``IndexError``). Where that happens inside its own mapping (the concat's output width, after the
    input widths were recorded and before any offset), it is left as Torch-Pruning's own early
    return leaves it: sizes recorded, no offsets, no index mapping.
    """
    if cat_node.type == tp.ops.OPTYPE.CONCAT and cat_node.module.concat_sizes is None:
        try:
            widths = [_shape_infer.infer_channels_between(graph, n, cat_node) for n in cat_node.inputs]
        except IndexError:
            return
        if any(w is None for w in widths):
            return
    _leaving_unmapped(IndexError, _TP_CONCAT_MAPPING)(graph, cat_node)


# update_index_mapping looks the function up in its module at each call: replacing the module attribute is enough
_index_mapping.update_concat_index_mapping = _concat_mapping


_TP_RESHAPE_MAPPING = _index_mapping.update_reshape_index_mapping

# A reshape whose width is 0: Torch-Pruning's width inference returns 0 for a tensor that a residual
# connection ties to the model's input (its own comment says so) and then divides by it (shvit:
# ZeroDivisionError, the whole graph build failed). The division comes before any mapping is assigned.
_index_mapping.update_reshape_index_mapping = _leaving_unmapped(ZeroDivisionError, _TP_RESHAPE_MAPPING)


_TP_EXPAND_MAPPING = _index_mapping.update_expand_index_mapping


def _expand_mapping(graph: Any, node: Any) -> None:
    """Torch-Pruning's ``update_expand_index_mapping``, without the mappings whose repeat count is 0.

    It takes every expand of a 5-D tensor for Hugging Face's grouped-query ``repeat_kv`` and maps
    channels by ``repeat = output width // input width``; where the inferred output is narrower than
    the input (an expand elsewhere, twins_svt), the repeat is 0 and every group through it fails with
    ``ZeroDivisionError`` — twins' residual stream could not be pruned at all. Those mappings are
    removed: the expand is left unmapped, as Torch-Pruning leaves one whose width it cannot infer.
    """
    _TP_EXPAND_MAPPING(graph, node)
    for deps in [node.dependencies, *(n.dependencies for n in node.inputs)]:
        for dep in deps:
            for k, mapping in enumerate(dep.index_mapping):
                if isinstance(mapping, _index_mapping._GQAIndexMapping) and mapping.repeat < 1:
                    dep.index_mapping[k] = None


_index_mapping.update_expand_index_mapping = _expand_mapping


_TP_UPDATE_MAPPING = _index_mapping.update_index_mapping


def _update_mapping(graph: Any) -> None:
    """Torch-Pruning's ``update_index_mapping``, run once per :func:`static_widths` block instead of per group.

    ``graph._prunecli_static``: 0 outside a block, 1 inside one before the first update, 2 after it.
    """
    if getattr(graph, "_prunecli_static", 0) == 2:
        return
    _TP_UPDATE_MAPPING(graph)
    if getattr(graph, "_prunecli_static", 0) == 1:
        graph._prunecli_static = 2


# get_pruning_group calls it as `index_mapping.update_index_mapping(self)`, a module attribute lookup
_index_mapping.update_index_mapping = _update_mapping


@contextmanager
def static_widths(graph: Any) -> Iterator[Any]:
    """A block in which ``graph``'s model is not pruned: its index mappings are computed once.

    Torch-Pruning recomputes every concat/split/reshape index mapping of the whole graph (with a
    recursive width inference per op) at each ``get_pruning_group``, because pruning a group changes
    widths. Enumerating the groups prunes nothing, so the mappings of the first call hold for all:
    on efficientvit_m0, that recomputation was most of the enumeration's time.
    """
    graph._prunecli_static = 1
    try:
        yield graph
    finally:
        graph._prunecli_static = 0


MAX_GROUP_ITEMS = 1000
"""A dependency group with more items than this is given up (:class:`GroupTooLarge`).

The largest groups of ordinary models have 33 (resnet50), 102 (densenet121), 122 (convnext_tiny) and
180 items (vit_base's residual stream, 12 blocks); one item per coupled layer and direction. Torch-Pruning
builds a group by a closure whose membership test scans the whole group (quadratic in its size); on
efficientvit_m0 one root's closure passed 8 000 items and ran for minutes without ending.
"""


MAX_GROUP_INDICES = 1 << 22
"""A dependency group whose items hold more channel indices than this, together, is given up.

Measured at 224 px, the largest group's indices summed over its items: 24 576 (vgg16), 37 376
(densenet121), 40 960 (resnet50), 46 848 (convnext_tiny), 138 240 (vit_base_patch16_224). Torch-Pruning
maps a flatten or reshape that it takes for a merge of channels with positions as a stride: each
channel becomes ``stride`` indices, and back and forth through a block the lists multiply. On
efficientvim_m1 and nest_tiny (channels-last reshapes) one root's closure built 10⁸ index objects and
ran for 200 s; such a group is not a channel coupling anyone can prune by anyway.
"""


class GroupTooLarge(RuntimeError):
    """Torch-Pruning's closure of one root's group passed :data:`MAX_GROUP_ITEMS` items or
    :data:`MAX_GROUP_INDICES` indices."""


class _BoundedGroup(_graph.Group):
    """Torch-Pruning's ``Group``, raising :class:`GroupTooLarge` past ``MAX_GROUP_ITEMS`` items or
    ``MAX_GROUP_INDICES`` indices."""

    def add_dep(self, dep: Any, idxs: Any) -> None:
        super().add_dep(dep, idxs)
        self._prunecli_indices = getattr(self, "_prunecli_indices", 0) + len(idxs)
        if len(self) > MAX_GROUP_ITEMS:
            raise GroupTooLarge(f"its dependency group passed {MAX_GROUP_ITEMS} items (Torch-Pruning's closure)")
        if self._prunecli_indices > MAX_GROUP_INDICES:
            raise GroupTooLarge(f"its dependency group passed {MAX_GROUP_INDICES} indices (Torch-Pruning's mapping)")


# get_pruning_group creates its groups through this module-level name: every group prunecli builds is bounded
_graph.Group = _BoundedGroup


class _FixedDepthwisePruner(_F.BasePruningFunc):
    """A module that filters each channel with a fixed kernel it stores per channel (a non-persistent buffer).

    timm's ``BlurPool2d`` (anti-aliased downsampling: tresnet, the ``aa`` variants of resnet) blurs every
    channel with the same binomial kernel, repeated ``channels`` times in its ``filt`` buffer, through
    ``F.conv2d(..., groups=channels)``. Torch-Pruning's tracer sees a conv whose weight is no parameter and
    passes the channels through, so after pruning the stored ``channels`` and ``filt`` no longer fit its
    input and the safety net froze every block around it. As a pruner its input and output channels are
    one dimension (``prune_in_channels = prune_out_channels``, as for BatchNorm): the removed channels'
    rows of ``filt`` go and ``channels`` follows. ``filt`` is recomputed from ``channels`` by the module's
    ``init_non_persistent_buffers`` when a pruned checkpoint is rebuilt (:mod:`prunecli.surgery`).
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if layer.channels is None:  # built without a width: one kernel, expanded to any input
            return layer
        drop = set(int(i) for i in idxs)
        keep = torch.tensor([i for i in range(int(layer.channels)) if i not in drop], dtype=torch.long)
        layer._buffers["filt"] = torch.index_select(layer.filt, 0, keep.to(layer.filt.device))
        layer.channels = len(keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int | None:
        return None if layer.channels is None else int(layer.channels)

    get_in_channels = get_out_channels


CUSTOM_PRUNERS: dict[str, Any] = {
    "timm.layers.blur_pool.BlurPool2d": _FixedDepthwisePruner(),
}
"""Module class (``module.qualname``) → the pruner Torch-Pruning uses for it.

For layers whose widths Torch-Pruning cannot see (they are not in its own table of layers). Keyed by
name, so that a user's own class of the same name is not taken for it.
"""


TIED_HEADS: dict[str, tuple[tuple[str, ...], str]] = {
    "timm.models.davit.ChannelAttention": (("proj",), "qkv"),
    "timm.models.davit.WindowAttention": (("proj",), "qkv"),
    "timm.models.twins.LocallyGroupedAttn": (("proj",), "qkv"),
    "timm.models.twins.GlobalSubSampleAttn": (("proj", "q", "sr"), "q"),
}
"""Attention (``module.qualname``) whose head width is its input's width over ``num_heads``:
(its layers whose output is tied one to one to their input, its layer whose output holds the heads).

DaViT's and Twins' attentions reshape their projections as ``(…, num_heads, C // num_heads)`` with
``C`` the width of their input, the residual stream (Twins' subsampling conv ``sr`` is reshaped by
``C`` too). Their head dimensions must then shrink exactly as the stream does: pruning one without the
other breaks the forward, and the safety net froze the classes (56 % of davit_tiny's MACs kept at any
ratio) or, for an attention of unknown layout, kept the stream whole (twins: 55.8 %). :func:`build_graph`
couples the listed layers' outputs with their inputs one to one — ``proj``'s output is the stream, its
input the heads' dimensions, which Torch-Pruning couples with ``q``/``k``/``v`` — so stream channel
``j`` goes with dimension ``j`` of every head projection. The head layer's output is cut into
``num_heads`` equal slices (:mod:`prunecli.pruning.groups`), so every head keeps as many dimensions
and ``C // num_heads`` stays their width.
"""


def tied_heads(model: nn.Module) -> dict[nn.Module, tuple[nn.Module, int]]:
    """Every :data:`TIED_HEADS` module of ``model`` → (its head layer, its head count)."""
    out = {}
    for m in model.modules():
        entry = TIED_HEADS.get(class_key(m))
        heads = getattr(m, "num_heads", None)
        if entry is not None and isinstance(heads, int) and isinstance(getattr(m, entry[1], None), nn.Module):
            out[m] = (getattr(m, entry[1]), heads)
    return out


def _tie_heads(graph: Any, model: nn.Module) -> None:
    """Couples the outputs and inputs of the tied layers of every :data:`TIED_HEADS` module in ``graph``."""
    from torch_pruning.dependency.dependency import Dependency

    for m in tied_heads(model):
        for name in TIED_HEADS[class_key(m)][0]:
            layer = getattr(m, name, None)
            node = graph.module2node.get(layer) if isinstance(layer, nn.Module) else None
            if node is None:
                continue
            pruner = graph.get_pruner_of_module(layer)
            for trigger, handler in (
                (pruner.prune_out_channels, pruner.prune_in_channels),
                (pruner.prune_in_channels, pruner.prune_out_channels),
            ):
                node.dependencies.append(Dependency(trigger, handler, source=node, target=node))


def build_graph(model: nn.Module, example_inputs: Any) -> Any:
    """Torch-Pruning's ``DependencyGraph`` of ``model``, traced once on ``example_inputs``.

    Gradients are enabled (the graph is read from autograd, callers may sit inside ``no_grad``) and
    Torch-Pruning's warnings about every unwrapped parameter (ViT ``cls_token``/``pos_embed``) are
    silenced. The model's train/eval mode is left as it is. The modules of :data:`CUSTOM_PRUNERS` get
    their pruners; those of :data:`TIED_HEADS` their coupling.

    Raises:
        Exception: whatever Torch-Pruning raises on an op it does not understand.
    """
    custom = {}  # by class: Torch-Pruning looks its pruners up by a module's class
    for m in model.modules():
        pruner = CUSTOM_PRUNERS.get(class_key(m))
        if pruner is not None:
            custom[type(m)] = pruner
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=example_inputs, verbose=False, customized_pruners=custom or None
        )
    _tie_heads(graph, model)
    return graph


def is_reshape_op(module: Any) -> bool:
    """True for Torch-Pruning's node of a view/reshape/flatten."""
    return isinstance(module, tp.ops._ReshapeOp)


def is_elementwise_op(module: Any) -> bool:
    """True for Torch-Pruning's node of an element-wise op (activations, pooling, adds, …); see ``_grad_fn``."""
    return isinstance(module, tp.ops._ElementWiseOp)

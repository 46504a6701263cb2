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
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

__all__ = [
    "DW_FNS",
    "ENGINE",
    "OUT_FNS",
    "Importance",
    "build_graph",
    "is_elementwise_op",
    "is_reshape_op",
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


def build_graph(model: nn.Module, example_inputs: Any) -> Any:
    """Torch-Pruning's ``DependencyGraph`` of ``model``, traced once on ``example_inputs``.

    Gradients are enabled (the graph is read from autograd, callers may sit inside ``no_grad``) and
    Torch-Pruning's warnings about every unwrapped parameter (ViT ``cls_token``/``pos_embed``) are
    silenced. The model's train/eval mode is left as it is.

    Raises:
        Exception: whatever Torch-Pruning raises on an op it does not understand.
    """
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)


def is_reshape_op(module: Any) -> bool:
    """True for Torch-Pruning's node of a view/reshape/flatten."""
    return isinstance(module, tp.ops._ReshapeOp)


def is_elementwise_op(module: Any) -> bool:
    """True for Torch-Pruning's node of an element-wise op (activations, pooling, adds, …); see ``_grad_fn``."""
    return isinstance(module, tp.ops._ElementWiseOp)

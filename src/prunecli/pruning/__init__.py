"""Pruning engines behind ``prunecli prune``, and the layer trace they share.

* :mod:`prunecli.pruning.unstructured` — exact ``round(r·N)`` per layer or globally (dense shapes,
  zeros listed in ``manifest.masked``);
* :mod:`prunecli.pruning.nm` — N:M semi-structured sparsity (``--structure 2:4``);
* :mod:`prunecli.pruning.channel` — output-channel removal through torch-pruning's dependency graph;
* :mod:`prunecli.pruning.compensate` — paper E's bias shifts (``--compensate bias``).

:func:`trace_layers` runs one forward pass with hooks to learn, per prunable layer, how many output
positions it computes per sample (MAC counts) and which BatchNorm consumes its output directly (for
bias compensation). It runs on the ``meta`` device when the model allows it, so it costs no
arithmetic and no memory even for large models, and falls back to a real CPU forward pass.

MAC convention: a conv/linear layer whose weight has ``P`` entries and that produces ``T`` output
positions per output channel for one sample (conv: ``H_out·W_out``; linear: tokens, 1 for a plain
vector) costs ``T·P`` multiply-accumulates; ``macs_nonzero`` counts ``T·nnz(W)`` — the MACs a
sparse kernel that skips zero weights would do. Only conv and linear layers are counted (attention
score/value products, norms and activations are not), for one sample at the data config's input size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from prunecli.prunable import prunable_layers

__all__ = ["LayerTrace", "count_macs", "trace_layers"]

_LOG = logging.getLogger("prunecli")


@dataclass
class LayerTrace:
    """What one forward pass tells about the prunable layers of a model.

    Attributes:
        positions: module name → output positions per output channel per sample, summed over calls
            (a module called twice counts twice); absent for layers that never ran.
        bn_after: module name → name of the BatchNorm whose input is this module's output tensor.
        device: ``meta`` or ``cpu``: where the trace ran.
    """

    positions: dict[str, int] = field(default_factory=dict)
    bn_after: dict[str, str] = field(default_factory=dict)
    device: str = "meta"


def trace_layers(model: nn.Module, input_size: Sequence[int]) -> LayerTrace:
    """Traces one sample of ``input_size`` (C, H, W) through ``model`` with hooks.

    Example:
        >>> trace = trace_layers(model, (3, 224, 224))
        >>> count_macs(model, trace)["macs"]
    """
    layers = prunable_layers(model)
    owner = {id(mod): name for name, mod in layers.items()}
    bns = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)}
    trace = LayerTrace()
    last_out: dict[int, str] = {}  # id of the output tensor of each layer call → layer name

    def after_layer(mod: nn.Module, _args: object, out: object) -> None:
        if not isinstance(out, torch.Tensor) or out.ndim == 0:
            return
        name = owner[id(mod)]
        per_sample = out.numel() // max(out.shape[0], 1) if out.ndim > 1 else out.numel()
        trace.positions[name] = trace.positions.get(name, 0) + per_sample // max(int(mod.weight.shape[0]), 1)
        last_out[id(out)] = name
        keep.append(out)  # keep the tensor alive so that its id stays unique during the pass

    def before_bn(bn: nn.Module, args: tuple[object, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in last_out:
            name = last_out[id(args[0])]
            if int(getattr(bn, "num_features", -1)) == int(layers[name].weight.shape[0]):
                trace.bn_after.setdefault(name, bn_names[id(bn)])

    keep: list[torch.Tensor] = []
    bn_names = {id(m): n for n, m in bns.items()}
    handles = [m.register_forward_hook(after_layer) for m in layers.values()]
    handles += [m.register_forward_pre_hook(before_bn) for m in bns.values()]
    was_training = model.training
    model.eval()
    try:
        try:
            _meta_forward(model, input_size)
        except Exception as exc:  # an op without a meta kernel, data-dependent control flow, …
            _LOG.debug("meta trace failed (%s); tracing on CPU", exc)
            trace.positions.clear()
            trace.bn_after.clear()
            last_out.clear()
            keep.clear()
            trace.device = "cpu"
            with torch.no_grad():
                model(torch.zeros(1, *input_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return trace


def _meta_forward(model: nn.Module, input_size: Sequence[int]) -> None:
    """Runs the forward pass with every parameter and buffer replaced by a meta tensor."""
    from torch.func import functional_call

    state = {n: torch.empty_like(t, device="meta") for n, t in model.named_parameters()}
    state.update({n: torch.empty_like(t, device="meta") for n, t in model.named_buffers()})
    with torch.no_grad():
        functional_call(model, state, (torch.zeros(1, *input_size, device="meta"),), strict=False, tie_weights=True)


def count_macs(
    model: nn.Module,
    trace: LayerTrace,
    layers: Mapping[str, nn.Module] | None = None,
    nonzero: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """``macs`` and ``macs_nonzero`` of the conv/linear layers, per the module docstring's convention.

    Args:
        model: the model that was traced.
        trace: from :func:`trace_layers`.
        layers: module name → conv/linear module (default: all prunable layers).
        nonzero: parameter name (``fc1.weight``) → non-zero count, when the caller has it already.
    """
    layers = layers if layers is not None else prunable_layers(model)
    macs = nnz_macs = 0
    for name, mod in layers.items():
        pos = trace.positions.get(name, 0)
        macs += pos * mod.weight.numel()
        nnz = nonzero.get(f"{name}.weight") if nonzero is not None else None
        # count_nonzero on a float tensor is branchy (slow on sparse weights); on a bool tensor it is not
        nnz_macs += pos * (nnz if nnz is not None else int(torch.count_nonzero(mod.weight.detach() != 0)))
    return {"macs": macs, "macs_nonzero": nnz_macs}

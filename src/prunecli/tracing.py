"""The one forward-pass tracer: what consumes each prunable layer's output, and how many positions it computes.

Every consumer that needs to know something about a model's dataflow without a dependency graph
asks this module:

* MAC counts (``prune``'s metrics, the layer table): per prunable layer, the output positions per
  output channel for one sample (:attr:`LayerTrace.positions`);
* "the norm after this layer" — bias compensation (``prune --compensate bias``,
  :attr:`LayerTrace.bn_after`), restoration's folding of constant shifts into ``running_mean``
  (:func:`norms_after`) and the criteria (:attr:`Follow.norm`) all use one rule;
* criteria (proscore, biascomp, bnscale): the element-wise activation that directly consumes a
  layer's (or its norm's) output, and whether that output is modified in place later
  (:func:`trace_followers` → :class:`Follow`).

All of them come from one hook engine (:func:`_record_calls`): one forward pass with a pre- and a
post-hook on every watched module, recording each call's input and output tensor together with its
version counter. Module names cannot tell the dataflow reliably (timm's ResNet adds the shortcut *in
place* into ``bn2``'s output before ``act2``); tensor identity can. "Directly consumes" means the
same tensor object at the same version — an in-place op in between changes the version and breaks
the link. The norm after a layer is the first BatchNorm (in call order) that directly consumes the
layer's output and whose width equals the layer's output channels. (A bias-free conv whose output
also feeds another consumer is rare in timm; that consumer does not see a shift folded into the BN.)

:func:`trace_layers` runs on the ``meta`` device when the model allows it, so it costs no arithmetic
and no memory even for large models, and falls back to a real CPU forward pass.

MAC convention: a conv/linear layer whose weight has ``P`` entries and that produces ``T`` output
positions per output channel for one sample (conv: ``H_out·W_out``; linear: tokens, 1 for a plain
vector) costs ``T·P`` multiply-accumulates; ``macs_nonzero`` counts ``T·nnz(W)`` — the MACs a
sparse kernel that skips zero weights would do. Only conv and linear layers are counted (attention
score/value products, norms and activations are not), for one sample at the data config's input size.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunecli.prunable import prunable_layers

__all__ = [
    "Follow",
    "LayerTrace",
    "count_macs",
    "is_activation",
    "is_batchnorm",
    "meta_forward",
    "norms_after",
    "trace_followers",
    "trace_layers",
    "trace_run",
]

_LOG = logging.getLogger("prunecli")

_TORCH_ACTS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.PReLU,
)  # fmt: skip


def _timm_acts() -> tuple[type[nn.Module], ...]:
    found: list[type[nn.Module]] = []
    try:
        from timm.layers import activations, activations_me
    except ImportError:  # timm is a dependency; tracing must still work on plain torch models
        return ()
    for mod in (activations, activations_me):
        found += [c for _, c in inspect.getmembers(mod, inspect.isclass) if issubclass(c, nn.Module)]
    return tuple(found)


_ACTS: tuple[type[nn.Module], ...] | None = None


def is_activation(module: nn.Module) -> bool:
    """True for element-wise activation modules (torch's and timm's; timm's classes are looked up once)."""
    global _ACTS
    if _ACTS is None:
        _ACTS = _TORCH_ACTS + _timm_acts()
    return isinstance(module, _ACTS)


def is_batchnorm(module: nn.Module) -> bool:
    """True for BatchNorm modules of any dimension (and timm's subclasses such as ``BatchNormAct2d``)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


# ------------------------------------------------------------------------------------------------ the hook engine


@dataclass
class _Call:
    """One call of a watched module: its input and output tensors and their versions at the time.

    The tensors are kept alive by the record, so their ids stay unique for the whole pass.
    """

    name: str
    seq: int  # order of the pre-hooks (call order); the list itself is in order of completion
    inp: Any
    in_version: int | None
    out: Any = None
    out_version: int | None = None


def _record_calls(modules: Mapping[str, nn.Module], run: Callable[[], Any]) -> list[_Call]:
    """Runs ``run()`` with hooks on ``modules`` and returns their calls in order of completion."""
    calls: list[_Call] = []
    pending: dict[int, list[_Call]] = {}
    counter = [0]
    handles = []
    for name, mod in modules.items():

        def pre(m: nn.Module, args: tuple, _n: str = name) -> None:
            x = args[0] if args else None
            tensor = x if isinstance(x, torch.Tensor) else None
            pending.setdefault(id(m), []).append(
                _Call(_n, counter[0], tensor, tensor._version if tensor is not None else None)
            )
            counter[0] += 1

        def post(m: nn.Module, _args: tuple, out: Any, _n: str = name) -> None:
            stack = pending.get(id(m))
            call = stack.pop() if stack else _Call(_n, counter[0], None, None)
            if isinstance(out, torch.Tensor):
                call.out, call.out_version = out, out._version
            calls.append(call)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return calls


def _eval_mode(model: nn.Module, run: Callable[[], Any]) -> Any:
    was_training = model.training
    model.eval()
    try:
        return run()
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------------ positions, BN


@dataclass
class LayerTrace:
    """What one forward pass tells about the prunable layers of a model.

    Attributes:
        positions: module name → output positions per output channel per sample, summed over calls
            (a module called twice counts twice); absent for layers that never ran.
        bn_after: module name → name of the BatchNorm whose input is this module's output tensor.
        device: ``meta``, ``cpu`` or ``table`` (read from a checkpoint's layer table): where it came from.
    """

    positions: dict[str, int] = field(default_factory=dict)
    bn_after: dict[str, str] = field(default_factory=dict)
    device: str = "meta"


def meta_forward(model: nn.Module, input_size: Sequence[int]) -> None:
    """Runs the forward pass with every parameter and buffer replaced by a meta tensor.

    The model's own tensors are put back by hand afterwards: ``functional_call`` swaps a module that is
    reachable under two names (timm's CoaT shares ``cpe1``/``crpe1`` between its blocks) once per name
    and restores it in an order that leaves the meta tensor in place, which breaks every later use.
    """
    from torch.func import functional_call

    owned = [
        (slots, key, t)
        for mod in model.modules()
        for slots in (mod._parameters, mod._buffers)
        for key, t in slots.items()
        if t is not None
    ]
    state = {n: torch.empty_like(t, device="meta") for n, t in model.named_parameters()}
    state.update({n: torch.empty_like(t, device="meta") for n, t in model.named_buffers()})
    try:
        with torch.no_grad():
            x = torch.zeros(1, *input_size, device="meta")
            functional_call(model, state, (x,), strict=False, tie_weights=True)
    finally:
        for slots, key, t in owned:
            slots[key] = t


def _cpu_forward(model: nn.Module, input_size: Sequence[int]) -> None:
    with torch.no_grad():
        model(torch.zeros(1, *input_size))


def _norms_after(
    calls: Sequence[_Call], layers: Mapping[str, nn.Module], watched: Mapping[str, nn.Module]
) -> dict[str, str]:
    """The one "norm after this layer" rule (module docstring): layer name → BatchNorm name.

    The first BatchNorm call (in call order) whose input is the layer's output tensor — the same
    object at the same version, so an in-place op in between breaks the link — and whose width equals
    the layer's output channels.
    """
    made_by: dict[tuple[int, int], str] = {}
    for c in calls:
        key = _key(c.out, c.out_version)
        if c.name in layers and key is not None:
            made_by[key] = c.name
    result: dict[str, str] = {}
    for c in sorted((c for c in calls if is_batchnorm(watched[c.name])), key=lambda c: c.seq):
        name = made_by.get(_key(c.inp, c.in_version) or (0, -1))
        width = int(getattr(watched[c.name], "num_features", -1))
        if name is not None and width == int(layers[name].weight.shape[0]):
            result.setdefault(name, c.name)
    return result


def _layer_trace(
    calls: Sequence[_Call], layers: Mapping[str, nn.Module], watched: Mapping[str, nn.Module]
) -> LayerTrace:
    """Output positions per layer, and the BatchNorm after each layer (:func:`_norms_after`)."""
    trace = LayerTrace()
    for c in calls:
        if c.name not in layers or c.out is None or c.out.ndim == 0:
            continue
        out = c.out
        per_sample = out.numel() // max(out.shape[0], 1) if out.ndim > 1 else out.numel()
        weight_out = max(int(layers[c.name].weight.shape[0]), 1)
        trace.positions[c.name] = trace.positions.get(c.name, 0) + per_sample // weight_out
    trace.bn_after = _norms_after(calls, layers, watched)
    return trace


def trace_layers(model: nn.Module, input_size: Sequence[int], *, cpu_fallback: bool = True) -> LayerTrace | None:
    """Traces one sample of ``input_size`` (C, H, W) through ``model`` (prunable layers and BatchNorms).

    Runs on the ``meta`` device; when that fails (an op without a meta kernel, data-dependent control
    flow, …) runs on CPU, or returns None with ``cpu_fallback=False`` (the layer table is only written
    when it costs no real forward pass).

    Example:
        >>> trace = trace_layers(model, (3, 224, 224))
        >>> count_macs(model, trace)["macs"]
    """
    layers = prunable_layers(model)
    bns = {name: mod for name, mod in model.named_modules() if is_batchnorm(mod)}
    watched = {**layers, **{n: m for n, m in bns.items() if n not in layers}}
    try:
        calls = _eval_mode(model, lambda: _record_calls(watched, lambda: meta_forward(model, input_size)))
        device = "meta"
    except Exception as exc:  # an op without a meta kernel, data-dependent control flow, …
        if not cpu_fallback:
            _LOG.debug("no meta trace (%s)", exc)
            return None
        _LOG.debug("meta trace failed (%s); tracing on CPU", exc)
        calls = _eval_mode(model, lambda: _record_calls(watched, lambda: _cpu_forward(model, input_size)))
        device = "cpu"
    trace = _layer_trace(calls, layers, watched)
    trace.device = device
    return trace


def trace_run(model: nn.Module, run: Callable[[], Any]) -> LayerTrace:
    """The layer trace of the forward pass(es) that ``run()`` makes — one the caller runs anyway.

    Channel pruning's safety net runs the pruned model once; tracing that pass gives the output
    positions (unchanged by channel pruning, so they count the dense MACs too) at no extra forward.
    """
    layers = prunable_layers(model)
    watched = {**layers, **{n: m for n, m in model.named_modules() if is_batchnorm(m) and n not in layers}}
    trace = _layer_trace(_record_calls(watched, run), layers, watched)
    trace.device = "cpu"
    return trace


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


# ------------------------------------------------------------------------------------------------ followers


@dataclass(frozen=True)
class Follow:
    """What consumes a prunable layer's output in the forward pass.

    Attributes:
        norm: name of the BatchNorm whose input is the layer's output (None if none).
        act: name of the activation whose input is the norm's output (or the layer's, without norm).
        act_owned: the activation is the norm's own child (timm ``BatchNormAct2d``), so every call of
            it belongs to this layer and its input is the normalised value.
        inplace_after: the layer's output tensor is modified in place later in the forward pass.
    """

    norm: str | None = None
    act: str | None = None
    act_owned: bool = False
    inplace_after: bool = False


def _owned_act(bn: nn.Module) -> nn.Module | None:
    act = getattr(bn, "act", None)
    return act if isinstance(act, nn.Module) and is_activation(act) else None


def _key(t: Any, version: int | None) -> tuple[int, int] | None:
    return (id(t), int(version)) if t is not None and version is not None else None


@torch.no_grad()
def norms_after(model: nn.Module, layers: Mapping[str, nn.Module], example: torch.Tensor) -> dict[str, str]:
    """Runs ``model(example)`` once: conv/linear name → the BatchNorm directly after it (:func:`_norms_after`)."""
    watched = dict(layers)
    watched.update({n: m for n, m in model.named_modules() if is_batchnorm(m) and n not in watched})
    calls = _eval_mode(model, lambda: _record_calls(watched, lambda: model(example)))
    return _norms_after(calls, layers, watched)


@torch.no_grad()
def trace_followers(model: nn.Module, layers: dict[str, nn.Module], example: torch.Tensor) -> dict[str, Follow]:
    """Runs ``model(example)`` once and returns, per prunable layer name, its :class:`Follow`."""
    watched: dict[str, nn.Module] = dict(layers)
    for name, mod in model.named_modules():
        if is_batchnorm(mod) or is_activation(mod):
            watched.setdefault(name, mod)
    calls = _eval_mode(model, lambda: _record_calls(watched, lambda: model(example)))

    def activation_of(out_key: tuple[int, int] | None) -> str | None:
        """The first activation call whose input is the tensor ``out_key`` (same object, same version)."""
        if out_key is None:
            return None
        return next(
            (c.name for c in calls if is_activation(watched[c.name]) and _key(c.inp, c.in_version) == out_key), None
        )

    norms = _norms_after(calls, layers, watched)
    outputs = {c.name: c for c in calls if c.name in layers}
    result: dict[str, Follow] = {}
    for name in layers:
        call = outputs.get(name)
        out_key = _key(call.out, call.out_version) if call is not None else None
        norm = norms.get(name)
        act, owned = None, False
        if norm is not None:
            own = _owned_act(watched[norm])
            if own is not None:
                act, owned = next(n for n, m in model.named_modules() if m is own), True
            else:
                norm_call = next(c for c in calls if c.name == norm)
                act = activation_of(_key(norm_call.out, norm_call.out_version))
        else:
            act = activation_of(out_key)
        inplace = call is not None and call.out is not None and call.out._version != call.out_version
        result[name] = Follow(norm=norm, act=act, act_owned=owned, inplace_after=inplace)
    return result

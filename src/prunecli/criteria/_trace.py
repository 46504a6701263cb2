"""Which BatchNorm and which element-wise activation directly consume each prunable layer's output.

proscore needs the target layer (a BN after a conv, METHODS §4.3) and the element-wise op σ after it
(§4.2); biascomp needs to know whether a bias-free layer feeds a BN (§5.5); bnscale needs the BN's γ.
Module names cannot tell this reliably (timm's ResNet adds the shortcut *in place* into ``bn2``'s
output before ``act2``), so one forward pass is traced: every call of a prunable layer, BatchNorm or
activation records the identity and version counter of its input and output tensors. "Directly
consumes" means the same tensor object at the same version — an in-place add in between changes the
version and breaks the link, as it should.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Follow", "is_activation", "trace_followers"]

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


_ACTS = _TORCH_ACTS + _timm_acts()


def is_activation(module: nn.Module) -> bool:
    """True for element-wise activation modules (torch's and timm's)."""
    return isinstance(module, _ACTS)


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


@torch.no_grad()
def trace_followers(model: nn.Module, layers: dict[str, nn.Module], example: torch.Tensor) -> dict[str, Follow]:
    """Runs ``model(example)`` once and returns, per prunable layer name, its :class:`Follow`."""
    watched: dict[str, nn.Module] = dict(layers)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) or is_activation(mod):
            watched.setdefault(name, mod)
    calls: list[tuple[str, tuple[int, int] | None, tuple[int, int] | None]] = []
    keep: list[Any] = []  # keeps traced tensors alive so that their ids are not reused
    pending: dict[int, tuple[int, int] | None] = {}
    handles = []

    def key(t: Any) -> tuple[int, int] | None:
        if not isinstance(t, torch.Tensor):
            return None
        keep.append(t)
        return id(t), t._version

    for name, mod in watched.items():

        def pre(m: nn.Module, args: tuple, _n: str = name) -> None:
            pending[id(m)] = key(args[0]) if args else None

        def post(m: nn.Module, args: tuple, out: Any, _n: str = name) -> None:
            calls.append((_n, pending.pop(id(m), None), key(out)))

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    def consumer(out_key: tuple[int, int] | None, want: type | None) -> str | None:
        if out_key is None:
            return None
        for name, in_key, _ in calls:
            mod = watched[name]
            ok = isinstance(mod, nn.modules.batchnorm._BatchNorm) if want is nn.Module else is_activation(mod)
            if in_key == out_key and ok:
                return name
        return None

    result: dict[str, Follow] = {}
    outputs = {name: out for name, _, out in calls if name in layers}
    for name in layers:
        out_key = outputs.get(name)
        norm = consumer(out_key, nn.Module)
        act, owned = None, False
        if norm is not None:
            own = _owned_act(watched[norm])
            if own is not None:
                act, owned = next(n for n, m in model.named_modules() if m is own), True
            else:
                norm_out = next(o for n, _, o in calls if n == norm)
                act = consumer(norm_out, None)
        else:
            act = consumer(out_key, None)
        inplace = False
        if out_key is not None:
            t = next(t for t in keep if id(t) == out_key[0])
            inplace = t._version != out_key[1]
        result[name] = Follow(norm=norm, act=act, act_owned=owned, inplace_after=inplace)
    return result

"""Training-free restoration after channel pruning (paper B and baselines; docs/restoration.md).

Methods are registered by name in :data:`RESTORERS`:

* ``lbyl`` — LBYL closed form, data-free (the default without data; :func:`default_method`);
* ``merge`` — Neuron Merging, data-free baseline;
* ``lstsq`` — ridge least-squares refit of each consumer on calibration activations;
* ``bn`` — BatchNorm statistics re-estimation on calibration images.

Each entry declares its ``-p key=value`` parameters with defaults, and whether it needs the dense
parent and calibration data, so the API can validate a request before any work is done.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prunecli.errors import InputError
from prunecli.registry import Registry

__all__ = ["RESTORERS", "Restorer", "default_method", "parse_methods", "resolve_params"]


@dataclass(frozen=True)
class Restorer:
    """A named restoration method.

    Attributes:
        name: registry name.
        run: ``run(ctx, params)``: rewrites ``ctx.pruned`` in place and fills ``ctx.layers``.
        params: accepted ``-p`` keys and their defaults (the default's type is the value's type).
        needs_dense: reads the dense parent's pruned filters.
        needs_data: needs calibration data (``--data``).
        compensates: folds pruned channels into consumers (applying it twice would double-count).
        summary: one line for ``--help``.
    """

    name: str
    run: Callable[[Any, dict[str, Any]], None]
    params: Mapping[str, Any] = field(default_factory=dict)
    needs_dense: bool = True
    needs_data: bool = False
    compensates: bool = False
    summary: str = ""


RESTORERS: Registry[Restorer] = Registry("restoration method")


def _lbyl(ctx: Any, params: dict[str, Any]) -> None:
    from prunecli.restoration.lbyl import restore_lbyl

    restore_lbyl(ctx, params)


def _merge(ctx: Any, params: dict[str, Any]) -> None:
    from prunecli.restoration.merge import restore_merge

    restore_merge(ctx, params)


def _lstsq(ctx: Any, params: dict[str, Any]) -> None:
    from prunecli.restoration.lstsq import restore_lstsq

    restore_lstsq(ctx, params)


def _bn(ctx: Any, params: dict[str, Any]) -> None:
    from prunecli.restoration.bn import restore_bn

    restore_bn(ctx, params)


# λ defaults: medians of the published VGG-16/ResNet-50 L2-norm settings (docs/restoration.md, [OURS]).
RESTORERS.add("lbyl", Restorer("lbyl", _lbyl, {"lambda1": 1e-5, "lambda2": 2e-3, "mode": "math"}, compensates=True,
                               summary="LBYL closed form (paper B), data-free"))  # fmt: skip
RESTORERS.add("merge", Restorer("merge", _merge, {"threshold": None, "lambda": 0.85, "mode": "math"},
                                compensates=True, summary="Neuron Merging baseline, data-free"),
              aliases=("nm",))  # fmt: skip
RESTORERS.add("lstsq", Restorer("lstsq", _lstsq, {"ridge": 1e-3, "samples": 256}, needs_data=True,
                                summary="ridge least-squares refit of the consumers on calibration data"))  # fmt: skip
RESTORERS.add("bn", Restorer("bn", _bn, {"samples": 2048, "scope": "downstream", "exact": True},
                             needs_dense=False, needs_data=True,
                             summary="BatchNorm statistics re-estimation on calibration data"))  # fmt: skip


# The default chain with calibration data: on the digits study (benchmarks/restore_study.md) the refit
# plus BatchNorm re-estimation is the best of the chains; without BatchNorms (a ViT) bn has nothing to do.
DATA_DEFAULT, DATA_DEFAULT_NO_BN, DATA_FREE_DEFAULT = "lstsq+bn", "lstsq", "lbyl"


def default_method(model: Any, has_data: bool) -> str:
    """``restore``'s method when none is given: it follows from the data (docs/restoration.md).

    With calibration data, the data-aware chain ``lstsq+bn`` (``lstsq`` for a model without
    BatchNorm); without, the data-free ``lbyl``.
    """
    if not has_data:
        return DATA_FREE_DEFAULT
    from prunecli.tracing import is_batchnorm

    has_bn = model is None or any(is_batchnorm(m) for m in model.modules())
    return DATA_DEFAULT if has_bn else DATA_DEFAULT_NO_BN


def parse_methods(method: str) -> list[Restorer]:
    """``lbyl``, or several joined by ``+`` (``lbyl+bn``) applied in that order."""
    names = [m.strip() for m in str(method).split("+") if m.strip()]
    if not names:
        raise InputError("no restoration method given", hint=f"choose from {', '.join(RESTORERS.names())}")
    methods = [RESTORERS.get(n) for n in names]
    if sum(m.compensates for m in methods) > 1:
        raise InputError("combine at most one of lbyl/merge in one run: each folds the pruned channels once")
    return methods


def _cast(key: str, value: Any, default: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float) or default is None:
            return float(text)
    except ValueError:
        raise InputError(
            f"-p {key}={value}: expected a {type(default).__name__ if default is not None else 'number'}"
        ) from None
    return text


def resolve_params(methods: list[Restorer], params: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Per-method parameter dicts: defaults overridden by ``params``; unknown keys are refused."""
    params = dict(params or {})
    known = {k for m in methods for k in m.params}
    unknown = sorted(set(params) - known)
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise InputError(
            f"unknown parameter {unknown[0]!r} for {'+'.join(m.name for m in methods)}; accepted: {allowed}"
        )
    out = []
    for m in methods:
        resolved = dict(m.params)
        for k, v in params.items():
            if k in resolved:
                resolved[k] = _cast(k, v, m.params[k])
        out.append(resolved)
    return out

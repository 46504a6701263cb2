"""Training-free restoration after channel pruning (paper B and baselines; docs/restoration.md).

Methods are registered by name in :data:`RESTORERS`:

* ``lbyl`` — LBYL closed form, data-free (the default without data; :func:`default_method`);
* ``merge`` — Neuron Merging, data-free baseline;
* ``lstsq`` — ridge least-squares refit of each consumer on calibration activations;
* ``bn`` — BatchNorm statistics re-estimation on calibration images;
* ``obs`` — second-order (OBS / SparseGPT) refit of the surviving weights of a *masked* checkpoint
  (unstructured or N:M) to its dense parent's layer outputs (docs/obs.md).

Each entry declares its ``-p key=value`` parameters with defaults, whether it needs the dense
parent and calibration data, and which kinds of checkpoint it restores (``channel``: channel-pruned,
``masked``: unstructured/N:M masks), so the API can validate a request before any work is done.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prunecli.errors import InputError
from prunecli.registry import Registry

__all__ = [
    "KINDS",
    "RESTORERS",
    "Restorer",
    "cast_param",
    "check_kind",
    "default_method",
    "parse_methods",
    "resolve_params",
]

KINDS = ("channel", "masked")
"""Kinds of pruned checkpoint: ``channel`` (``manifest.structure["channels"]``) and ``masked``
(unstructured or N:M zeros listed in ``manifest.masked``)."""


@dataclass(frozen=True)
class Restorer:
    """A named restoration method.

    Attributes:
        name: registry name.
        run: ``run(ctx, params)`` on a channel-pruned checkpoint (a ``RestoreContext``): rewrites
            ``ctx.pruned`` in place and fills ``ctx.layers``; None when the method does not restore channels.
        params: accepted ``-p`` keys and their defaults (the default's type is the value's type).
        needs_dense: reads the dense parent's weights.
        needs_data: needs calibration data (``--data``).
        compensates: folds pruned channels into consumers (applying it twice would double-count).
        summary: one line for ``--help``.
        masked: ``masked(ctx, params)`` on a masked (unstructured/N:M) checkpoint (a
            :class:`prunecli.restoration.masked.MaskedContext`); None when the method does not apply there.
        check: ``check(params)`` validates the resolved parameters before any work (raises InputError).
    """

    name: str
    run: Callable[[Any, dict[str, Any]], None] | None
    params: Mapping[str, Any] = field(default_factory=dict)
    needs_dense: bool = True
    needs_data: bool = False
    compensates: bool = False
    summary: str = ""
    masked: Callable[[Any, dict[str, Any]], None] | None = None
    check: Callable[[dict[str, Any]], Any] | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of checkpoint (:data:`KINDS`) this method restores."""
        return tuple(k for k, fn in zip(KINDS, (self.run, self.masked), strict=True) if fn is not None)


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


def _bn_masked(ctx: Any, params: dict[str, Any]) -> None:
    from prunecli.restoration.masked import restore_bn_masked

    restore_bn_masked(ctx, params)


def _obs(ctx: Any, params: dict[str, Any]) -> None:
    from prunecli.restoration.masked import restore_obs

    restore_obs(ctx, params)


def _check_obs(params: dict[str, Any]) -> None:
    from prunecli.reconstruction.joint import obs_params

    obs_params(params, params)


# λ defaults: medians of the published VGG-16/ResNet-50 L2-norm settings (docs/restoration.md, [OURS]).
RESTORERS.add("lbyl", Restorer("lbyl", _lbyl, {"lambda1": 1e-5, "lambda2": 2e-3, "mode": "math"}, compensates=True,
                               summary="LBYL closed form (paper B), data-free"))  # fmt: skip
RESTORERS.add("merge", Restorer("merge", _merge, {"threshold": None, "lambda": 0.85, "mode": "math"},
                                compensates=True, summary="Neuron Merging baseline, data-free"),
              aliases=("nm",))  # fmt: skip
RESTORERS.add("lstsq", Restorer("lstsq", _lstsq, {"ridge": 1e-3, "samples": 256}, needs_data=True,
                                summary="ridge least-squares refit of the consumers on calibration data"))  # fmt: skip
RESTORERS.add("bn", Restorer("bn", _bn, {"samples": 2048, "scope": "downstream", "exact": True},
                             needs_dense=False, needs_data=True, masked=_bn_masked,
                             summary="BatchNorm statistics re-estimation on calibration data"))  # fmt: skip
# obs defaults (docs/obs.md): SparseGPT's dampening and block; the exact refit, since a given mask was not
# chosen with the column schedule in mind; 128 images, the calibration size of the OBC/SparseGPT experiments.
RESTORERS.add("obs", Restorer("obs", None, {"damp": 0.01, "blocksize": 128, "refit": True, "samples": 128},
                              needs_data=True, masked=_obs, check=_check_obs,
                              summary="OBS/SparseGPT refit of a masked checkpoint's weights to the dense "
                              "parent on calibration data"))  # fmt: skip


# The default chain with calibration data: on the digits study (benchmarks/restore_study.md) the refit
# plus BatchNorm re-estimation is the best of the chains; without BatchNorms (a ViT) bn has nothing to do.
DATA_DEFAULT, DATA_DEFAULT_NO_BN, DATA_FREE_DEFAULT = "lstsq+bn", "lstsq", "lbyl"


# A masked checkpoint has no data-free method: obs needs calibration data, bn after it as OBC's correction.
MASKED_DEFAULT, MASKED_DEFAULT_NO_BN = "obs+bn", "obs"


def default_method(model: Any, has_data: bool, kind: str = "channel") -> str:
    """``restore``'s method when none is given: it follows from the data (docs/restoration.md).

    Channel-pruned (``kind="channel"``): with calibration data, the data-aware chain ``lstsq+bn``
    (``lstsq`` for a model without BatchNorm); without, the data-free ``lbyl``. Masked
    (``kind="masked"``): ``obs+bn`` (``obs`` without BatchNorm); it needs data.

    Raises:
        InputError: a masked checkpoint without calibration data.
    """
    if kind == "masked":
        if not has_data:
            raise InputError("a masked (unstructured or N:M) checkpoint is restored with obs, which needs data",
                             hint="pass --data SPEC (e.g. --data digits:train)")  # fmt: skip
        defaults = (MASKED_DEFAULT, MASKED_DEFAULT_NO_BN)
    elif not has_data:
        return DATA_FREE_DEFAULT
    else:
        defaults = (DATA_DEFAULT, DATA_DEFAULT_NO_BN)
    from prunecli.tracing import is_batchnorm

    has_bn = model is None or any(is_batchnorm(m) for m in model.modules())
    return defaults[0] if has_bn else defaults[1]


def check_kind(methods: list[Restorer], kind: str, what: str) -> None:
    """Refuses a method that does not restore this kind of checkpoint (``what`` names it in the message).

    Raises:
        InputError: e.g. ``obs`` on a channel-pruned checkpoint, ``lbyl`` on a masked one.
    """
    for m in methods:
        if kind not in m.kinds:
            able = ", ".join(n for n, r in RESTORERS.items() if kind in r.kinds)
            words = " or ".join(_KIND_WORDS[k] for k in m.kinds)
            raise InputError(f"{m.name} restores {words} checkpoints; {what} is {_KIND_WORDS[kind]}, not {words}",
                             hint=f"for this checkpoint use {able}")  # fmt: skip


_KIND_WORDS = {"channel": "channel-pruned", "masked": "masked (unstructured or N:M)"}


def parse_methods(method: str) -> list[Restorer]:
    """``lbyl``, or several joined by ``+`` (``lbyl+bn``) applied in that order."""
    names = [m.strip() for m in str(method).split("+") if m.strip()]
    if not names:
        raise InputError("no restoration method given", hint=f"choose from {', '.join(RESTORERS.names())}")
    methods = [RESTORERS.get(n) for n in names]
    if sum(m.compensates for m in methods) > 1:
        raise InputError("combine at most one of lbyl/merge in one run: each folds the pruned channels once")
    return methods


def cast_param(key: str, value: Any, default: Any) -> Any:
    """``-p key=value`` converted to the type of its default (a non-string value is taken as it is)."""
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
                resolved[k] = cast_param(k, v, m.params[k])
        if m.check is not None:
            m.check(resolved)
        out.append(resolved)
    return out

"""The criterion contract: what a criterion declares, what the scoring engine gives it, what it returns.

A criterion never runs its own loop. It declares what it ``requires`` (``data``: calibration
batches; ``grads``: backward passes), and the engine (:mod:`prunecli.scoring`) drives the
lifecycle below, so no criterion has a hidden "call ``loss.backward()`` first" rule (STYLE (b) 4):

```
begin(ctx)                                   register hooks, allocate accumulators
for each calibration batch (x, y):           only when "data" in requires
    logits = model(x)                        (no autograd graph unless "grads" in requires)
    for obj in objectives(logits, y):        one scalar per backward pass (default: mean CE)
        on_grads(ctx, autograd.grad(obj, grad_targets(ctx)))
    end_batch(ctx, n)
reduce_state(reduce)                         under torchrun: sum hook accumulators over ranks
finish(ctx) -> CriterionOutput               scores (higher = more important), extras, notes
close()                                      remove hooks (always, also on errors)
```

Under ``torchrun`` every rank sees its share of each global batch (:mod:`prunecli.distributed`). The
engine scales a ``mean`` objective by the rank's share of the batch, so the per-sample gradients equal
those of the one-process objective; with ``sync_grads`` it sums the gradients of the grad targets
over ranks before :meth:`Criterion.on_grads` (every rank then accumulates the global batch's
gradient, as Taylor's ``|θ·g|`` needs), and before :meth:`Criterion.finish` it lets the criterion sum
whatever its hooks accumulated from local activations (:meth:`Criterion.reduce_state`).

Options are a frozen dataclass per criterion; ``-p key=value`` strings are converted and checked
against its field types by :func:`parse_options` (as llm builds ``model.Options(**options)``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from prunecli.errors import InputError, UnknownNameError

__all__ = [
    "Criterion",
    "CriterionOutput",
    "NoOptions",
    "ScoreContext",
    "at_least_float32",
    "option_help",
    "option_key",
    "options_dict",
    "parse_options",
]

Granularity = Literal["weight", "channel"]
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class NoOptions:
    """A criterion without options."""


@dataclass
class ScoreContext:
    """What the engine hands to a criterion.

    Attributes:
        model: the model being scored (on ``device``, eval mode unless ``score_mode='train'``).
        layers: prunable module name → module, in definition order (:func:`prunecli.prunable.prunable_layers`).
        params: prunable parameter name (``layer.weight``) → weight, same order.
        device: where the model runs.
        seed: the run's seed (random criterion, Hutchinson probes).
        example: callable returning one small input batch on ``device`` (for structure tracing).
        rank: this process's rank under torchrun (0 otherwise); its rows of a global batch are
            ``rank::world_size``.
        world_size: number of processes sharing each batch.
        batch_rows: rows of the current global batch (all ranks together).
    """

    model: nn.Module
    layers: dict[str, nn.Module]
    params: dict[str, nn.Parameter]
    device: torch.device
    seed: int = 0
    example: Callable[[], torch.Tensor] | None = None
    rank: int = 0
    world_size: int = 1
    batch_rows: int = 0
    _followers: dict[str, Any] | None = field(default=None, repr=False)

    def followers(self) -> dict[str, Any]:
        """Per prunable layer: the BatchNorm and activation that consume its output (traced once)."""
        if self._followers is None:
            from prunecli.tracing import trace_followers

            if self.example is None:
                raise InputError("this criterion needs an example input to trace the model")
            self._followers = trace_followers(self.model, self.layers, self.example())
        return self._followers


@dataclass
class CriterionOutput:
    """Scores of one criterion run.

    Attributes:
        scores: parameter name → score tensor (weight shape, or ``[out_channels]``).
        extras: kind → {parameter name → tensor}, e.g. ``{"bias_shift": …}``.
        notes: parameter name → small JSON-able facts merged into the per-layer stats
            (e.g. which BatchNorm a score came from).
    """

    scores: dict[str, torch.Tensor]
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)


class Criterion:
    """Base class of every importance criterion (higher score = more important = kept first).

    Class attributes:
        name: registry name.
        Options: frozen dataclass of options; each field's ``metadata["help"]`` is its help text and
            ``metadata["key"]`` its ``-p`` key when that is not a Python identifier (``lambda``).
        requires: subset of ``{"data", "grads"}``.
        granularity: ``weight`` or ``channel`` (criteria with a ``granularity`` option override it
            per instance).
        default_batches: calibration batches when neither ``--batches`` nor ``--fraction`` is given
            (None: the whole split).
        presets: alias name → option values it fixes (``l1`` → ``{"norm": 1}``).
        objective_reduction: ``mean`` when :meth:`objectives` averages over the batch (the engine
            rescales it under torchrun), ``sum`` when it sums per-sample terms (nothing to rescale).
        sync_grads: sum the gradients over ranks before :meth:`on_grads` (needed when they are
            parameter gradients of the batch; not when they are per-sample output gradients).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    requires: ClassVar[frozenset[str]] = frozenset()
    granularity: Granularity = "weight"
    default_batches: ClassVar[int | None] = None
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    objective_reduction: ClassVar[Literal["mean", "sum"]] = "mean"
    sync_grads: ClassVar[bool] = True

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()
        if hasattr(self.options, "granularity"):
            self.granularity = self.options.granularity
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ lifecycle (engine-driven)
    def begin(self, ctx: ScoreContext) -> None:
        """Registers hooks and allocates accumulators (default: nothing)."""

    def objectives(self, logits: torch.Tensor, targets: torch.Tensor) -> Iterable[torch.Tensor]:
        """Scalars to differentiate, one backward pass each (default: mean cross-entropy of the batch)."""
        return [F.cross_entropy(at_least_float32(logits), targets)]

    def grad_targets(self, ctx: ScoreContext) -> Sequence[torch.Tensor]:
        """Tensors whose gradients :meth:`on_grads` receives (default: the prunable weights)."""
        return list(ctx.params.values())

    def on_grads(self, ctx: ScoreContext, grads: Sequence[torch.Tensor | None]) -> None:
        """Receives the gradients of one objective w.r.t. :meth:`grad_targets` (None = unused)."""

    def end_batch(self, ctx: ScoreContext, n: int) -> None:
        """Called after the forward (and backward passes) of a batch of ``n`` samples."""

    def reduce_state(self, reduce: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
        """Sums accumulators built from local activations over ranks (default: nothing to sum).

        Args:
            reduce: sums each tensor of a name → tensor mapping over ranks and returns the results
                (:func:`prunecli.distributed.all_reduce_tensors`).
        """

    def finish(self, ctx: ScoreContext) -> CriterionOutput:
        """Turns the accumulated statistics into scores."""
        raise NotImplementedError

    def close(self) -> None:
        """Removes every hook registered through :meth:`hook`."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def hook(self, handle: Any) -> None:
        """Keeps a hook handle so :meth:`close` removes it."""
        self._handles.append(handle)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or kept in float64.

    Half-precision activations and logits are upcast so that losses and statistics are accumulated in
    at least float32; a float64 model (the tests' independent references run in float64) keeps its
    precision instead of being rounded to float32 half-way through.
    """
    return t if t.dtype == torch.float64 else t.float()


# ---------------------------------------------------------------------------------------- options
def option_key(f: dataclasses.Field) -> str:
    """The ``-p`` key of an options field (``metadata['key']`` or the field name)."""
    return f.metadata.get("key", f.name)


def option_help(options_cls: type) -> dict[str, str]:
    """``-p`` key → help text with type and default, for ``--help`` and ``--list-methods``."""
    hints = typing.get_type_hints(options_cls)
    out = {}
    for f in dataclasses.fields(options_cls):
        out[option_key(f)] = f"{f.metadata.get('help', '')} ({_type_name(hints[f.name])}, default {f.default})"
    return out


def options_dict(options: Any) -> dict[str, Any]:
    """Resolved options keyed by their ``-p`` keys (what the scores file and the record store)."""
    return {option_key(f): getattr(options, f.name) for f in dataclasses.fields(options)}


def parse_options(
    options_cls: type, params: Mapping[str, Any], *, method: str, preset: Mapping[str, Any] | None = None
) -> Any:
    """Builds ``options_cls`` from ``-p`` values (strings from the CLI, or Python values from the API).

    Raises:
        UnknownNameError: a key the criterion does not have.
        InputError: a value of the wrong type or outside the allowed choices, or a key that the
            method's preset fixes (``l1`` with ``-p norm=2``).
    """
    fields = {option_key(f): f for f in dataclasses.fields(options_cls)}
    hints = typing.get_type_hints(options_cls)
    preset = dict(preset or {})
    kwargs: dict[str, Any] = {}
    for key, raw in preset.items():
        kwargs[fields[key].name] = raw
    for key, raw in params.items():
        if key not in fields:
            choices = ", ".join(sorted(fields)) or "none"
            raise UnknownNameError(f"unknown option {key!r} for method {method!r}; choose from {choices}")
        if key in preset and _convert(hints[fields[key].name], raw, key, method) != preset[key]:
            raise InputError(
                f"method {method!r} fixes {key}={preset[key]}", hint="use the base method to choose this option"
            )
        kwargs[fields[key].name] = _convert(hints[fields[key].name], raw, key, method)
    try:
        return options_cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise InputError(f"method {method!r}: {exc}") from None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and _is_optional(tp):
        return _type_name(args[0]) + "|none"
    return getattr(tp, "__name__", str(tp))


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _convert(tp: Any, raw: Any, key: str, method: str) -> Any:
    """Converts one ``-p`` value to the field type ``tp``; raises :class:`InputError` naming the key."""
    text = raw.strip() if isinstance(raw, str) else raw
    if _is_optional(tp):
        if raw is None or (isinstance(text, str) and text.lower() == "none"):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if text == c or (isinstance(text, str) and text == str(c)):
                return c
        raise InputError(
            f"option {key}={raw!r} of method {method!r} is not one of {', '.join(str(c) for c in choices)}"
        )
    if tp is bool:
        if isinstance(text, bool):
            return text
        if isinstance(text, str) and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise InputError(f"option {key} of method {method!r} expects true or false, got {raw!r}")
    if tp in (int, float):
        if isinstance(text, bool):
            raise InputError(f"option {key} of method {method!r} expects a number, got {raw!r}")
        try:
            value = tp(text) if not isinstance(text, str) or tp is float else int(text, 10)
        except (TypeError, ValueError):
            kind = "an integer" if tp is int else "a number"
            raise InputError(f"option {key} of method {method!r} expects {kind}, got {raw!r}") from None
        if tp is float and value != value:  # NaN
            raise InputError(f"option {key} of method {method!r} expects a number, got {raw!r}")
        return value
    if tp is str:
        return str(text)
    raise TypeError(f"unsupported option type {tp!r} for {key}")  # a programming error in a criterion

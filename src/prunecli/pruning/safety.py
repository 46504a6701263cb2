"""Channel pruning, step 5: the safety net — run the pruned model; when its forward breaks, freeze and retry.

A module may reshape with a width it stores itself, which no tracer can see. After pruning, the
model runs once on the example input (and its output must keep the dense model's shape). When the
forward fails, the attempt is undone (tensors are swapped back by :func:`prunecli.surgery.revert`,
nothing is copied), every module of the failing module's class is frozen (no group that touches it
is pruned) and the plan is made again — at most ``max_retries`` times. When Torch-Pruning itself
fails while pruning a group, that group's root is left out instead. Frozen classes are reported in
``metrics["frozen"]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunecli import surgery
from prunecli.errors import InputError
from prunecli.pruning.apply import GroupFailed
from prunecli.pruning.groups import short

__all__ = ["ForwardBroken", "Retries", "output_shape", "run_checked", "with_safety_net"]

log = logging.getLogger("prunecli")

_LEAF_TYPES = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Dropout,
    nn.Identity,
)


class ForwardBroken(Exception):
    """The pruned model's forward failed in the module stack ``stack`` with ``error``."""

    def __init__(self, stack: list[str], error: str) -> None:
        super().__init__(error)
        self.stack = stack
        self.error = error


def output_shape(out: Any) -> Any:
    """Shape of a model output (nested for tuples/lists/dicts of tensors)."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return tuple(output_shape(o) for o in out)
    if isinstance(out, dict):
        return tuple((k, output_shape(v)) for k, v in sorted(out.items()))
    return None


def run_checked(model: nn.Module, x: torch.Tensor, want_shape: Any) -> None:
    """Runs ``model(x)``; raises :class:`ForwardBroken` with the stack of module names when it fails
    or when the output's shape is not ``want_shape`` (None: not checked).

    (A forward on ``meta`` tensors would compute nothing, but on CPU its Python decompositions of
    batch_norm & co. cost more than the real forward of the pruned model.)
    """
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []

    def pre(mod: nn.Module, _args: Any) -> None:
        stack.append(names.get(id(mod), "?"))

    def post(mod: nn.Module, _args: Any, _out: Any) -> None:
        if stack:
            stack.pop()

    handles = [
        nn.modules.module.register_module_forward_pre_hook(pre),
        nn.modules.module.register_module_forward_hook(post),
    ]
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # any failure of a user model's forward
        raise ForwardBroken(list(stack), short(exc)) from None
    finally:
        for h in handles:
            h.remove()
    if want_shape is not None and output_shape(out) != want_shape:
        raise ForwardBroken([], f"output shape {output_shape(out)} != {want_shape}")


def _culprit(model: nn.Module, stack: Sequence[str], frozen_types: set[type]) -> type | None:
    """The module class to freeze after a failed forward: the innermost non-leaf module not yet frozen."""
    modules = dict(model.named_modules())
    for name in reversed(stack):
        mod = modules.get(name)
        if mod is None or name == "" or type(mod) in frozen_types:
            continue
        if type(mod).__module__.startswith("torch.nn") or type(mod) in _LEAF_TYPES:
            continue  # torch's own layers are pruned correctly; the cause is the custom module around them
        return type(mod)
    return None


@dataclass
class Retries:
    """What the safety net did: classes frozen, group roots left out, and the failures that caused it."""

    frozen_types: set[type] = field(default_factory=set)
    bad_roots: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def frozen_modules(self, model: nn.Module) -> list[str]:
        """Names of the modules of a frozen class."""
        return [n for n, m in model.named_modules() if n and type(m) in self.frozen_types]


def with_safety_net(
    model: nn.Module, attempt: Callable[[Retries], Any], max_retries: int, frozen: Collection[type] = ()
) -> tuple[Any, Retries]:
    """Calls ``attempt(retries)`` (prune ``model`` and check its forward) until it succeeds.

    ``frozen``: classes frozen from the first attempt on (a caller that plans the same model again,
    :mod:`prunecli.pruning.budget`, knows them from its previous plan and saves the broken attempts).

    ``attempt`` raises :class:`ForwardBroken` or :class:`~prunecli.pruning.apply.GroupFailed`; the model
    is then reverted to its state at the call, and the next attempt sees the updated :class:`Retries`.

    Raises:
        InputError: no module to freeze explains the failure, or it keeps failing after ``max_retries``.
    """
    snap = surgery.snapshot(model)
    retries = Retries(frozen_types=set(frozen))
    for _attempt in range(max_retries + 1):
        try:
            return attempt(retries), retries
        except GroupFailed as failed:
            surgery.revert(model, snap)
            retries.failures.append(f"{failed.root}: {failed.error}")
            log.info("Torch-Pruning failed on the group of %s (%s); leaving it", failed.root, failed.error)
            retries.bad_roots.append(failed.root)
        except ForwardBroken as broken:
            surgery.revert(model, snap)
            where = broken.stack[-1] if broken.stack else "?"
            retries.failures.append(f"{where}: {broken.error}")
            culprit = _culprit(model, broken.stack, retries.frozen_types)
            if culprit is None:
                raise InputError(
                    f"channel pruning breaks the model's forward in {where!r} ({broken.error})",
                    hint="exclude that module with --exclude, or prune unstructured",
                ) from None
            log.info("channel pruning broke %s (%s); freezing %s", where, broken.error, culprit.__name__)
            retries.frozen_types.add(culprit)
    raise InputError(
        f"channel pruning keeps breaking the model's forward after {max_retries} retries ({retries.failures[-1]})",
        hint="exclude the failing modules with --exclude",
    )

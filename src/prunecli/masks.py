"""Pruning masks that survive training: the zeros listed in ``manifest.masked`` stay exactly zero.

A checkpoint written by unstructured pruning lists its masked tensors in ``Manifest.masked``; the
mask is ``param != 0`` at load time (docs/checkpoints.md). Masking only the gradient is not enough: Adam's
update divides by a running second moment and weight decay adds ``wd·w`` to the gradient, and SGD
momentum carries earlier updates, so an optimizer can still move a pruned weight. The training loop
therefore does both, around every optimizer step::

    loss.backward()
    masks.mask_grads()       # pruned weights get no gradient (and no Adam state builds up)
    optimizer.step()
    masks.apply()            # re-zero anything the optimizer moved anyway

Masks bind to the ``nn.Parameter`` objects, not to names, so they keep working after a wrapper
(e.g. PEFT's LoRA layers) renames the base weights.

Example:
    >>> masks = Masks.from_manifest(model, loaded.manifest.masked)
    >>> masks.apply(); masks.sparsity()
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from prunecli.errors import CheckpointError

__all__ = ["Masks", "sparsity"]


@dataclass
class Masks:
    """Boolean keep-masks (True = keep) bound to parameters of one model.

    Attributes:
        params: name → parameter being masked.
        keep: name → boolean tensor of the same shape, on the parameter's device.
    """

    params: dict[str, nn.Parameter] = field(default_factory=dict)
    keep: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, model: nn.Module, names: Iterable[str]) -> Masks:
        """Masks for the parameters named in ``manifest.masked``: ``keep = param != 0`` now.

        Raises:
            CheckpointError: a listed name is not a parameter of ``model``.
        """
        named = dict(model.named_parameters())
        params: dict[str, nn.Parameter] = {}
        for name in sorted(set(names)):
            if name not in named:
                raise CheckpointError(
                    f"the checkpoint marks {name!r} as masked but the model has no such parameter",
                    hint="the prunecli metadata does not match the weights; re-run prune",
                )
            params[name] = named[name]
        return cls.from_params(params)

    @classmethod
    def from_params(cls, params: Mapping[str, nn.Parameter]) -> Masks:
        """Masks ``param != 0`` for the given named parameters."""
        return cls(dict(params), {n: p.detach() != 0 for n, p in params.items()})

    def __bool__(self) -> bool:
        return bool(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def names(self) -> list[str]:
        """Masked parameter names, sorted."""
        return sorted(self.params)

    def to(self, device: torch.device) -> Masks:
        """Moves the masks next to their parameters (call after ``model.to(device)``)."""
        self.keep = {n: k.to(device) for n, k in self.keep.items()}
        return self

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zeroes the gradient of every pruned entry (parameters without a gradient are skipped)."""
        for name, p in self.params.items():
            if p.grad is not None:
                p.grad.masked_fill_(~self.keep[name], 0)

    @torch.no_grad()
    def apply(self) -> None:
        """Sets every pruned entry back to exactly zero."""
        for name, p in self.params.items():
            p.masked_fill_(~self.keep[name], 0)  # exact +0.0, unlike multiplying by the mask

    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of exact zeros over the masked tensors (NaN when there are none)."""
        total = sum(p.numel() for p in self.params.values())
        zeros = sum(int((p == 0).sum()) for p in self.params.values())
        return zeros / total if total else float("nan")


@torch.no_grad()
def sparsity(params: Iterable[torch.Tensor]) -> float:
    """Fraction of exact zeros over ``params`` (NaN for an empty set)."""
    total = zeros = 0
    for p in params:
        total += p.numel()
        zeros += int((p == 0).sum())
    return zeros / total if total else float("nan")

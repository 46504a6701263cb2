"""Reconstruction of a masked checkpoint against its dense parent (``restore --method obs``; docs/obs.md).

A checkpoint written by unstructured or N:M pruning (by any criterion) lists its masked weights in
``manifest.masked``; the mask is ``weight != 0``. :func:`restore_masked` keeps every mask exactly and
refits the surviving weights so that each masked layer reproduces the output of the *dense parent's*
layer on calibration data: the masked weights are first reset to the parent's values, then solved
layer by layer in forward order (:func:`~prunecli.reconstruction.sequential.reconstruct` with the masks
as given targets). Everything else in the checkpoint (biases, norms, unmasked layers) is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from prunecli.errors import CheckpointError, InputError
from prunecli.reconstruction.sequential import ReconstructionReport, reconstruct

__all__ = ["check_params", "restore_masked"]


def check_params(damp: float, blocksize: int) -> None:
    """Validates the solver's parameters before any work (so a bad value writes nothing).

    Raises:
        InputError: ``damp <= 0`` (or not a number) or ``blocksize < 1``.
    """
    if not float(damp) > 0:
        raise InputError(f"damp={damp}: dampening must be a positive number", hint="e.g. -p damp=0.01")
    if int(blocksize) < 1:
        raise InputError(f"blocksize={blocksize}: must be a positive integer", hint="e.g. -p blocksize=128")


def restore_masked(
    pruned: nn.Module,
    dense: nn.Module,
    masked: Sequence[str],
    calib: Iterable[Any],
    *,
    damp: float = 0.01,
    blocksize: int = 128,
    device: torch.device | str | None = None,
    refit: bool = True,
) -> ReconstructionReport:
    """Refits the surviving weights of ``pruned``'s masked layers to the dense parent's layers, in place.

    Args:
        pruned: the masked model (rewritten in place; its masks are kept exactly).
        dense: the dense parent (read only).
        masked: the masked weight names (``manifest.masked``, e.g. ``"fc1.weight"``).
        calib: re-iterable calibration batches (see :func:`~prunecli.reconstruction.sequential.reconstruct`).
        damp: relative dampening λ > 0.
        blocksize: columns per lazy-update block.
        device: where the forward passes and solves run.
        refit: replace the schedule's weights by the per-row optimum on the mask (docs/obs.md, "Exact
            refit"). On by default here: a given mask was not chosen with the schedule's column order in
            mind, and the schedule alone leaves much of the compensation undone.

    Returns:
        the per-layer report; ``error_mask`` is the error of the checkpoint's mask on the parent's
        weights without any update, ``error_obs`` after the refit.

    Raises:
        InputError: nothing is masked, or a bad parameter.
        CheckpointError: the dense parent lacks a masked weight or has it in another shape.

    Example:
        >>> report = restore_masked(loaded.model, parent.model, loaded.manifest.masked, calib_batches)
    """
    check_params(damp, blocksize)
    if not masked:
        raise InputError(
            "the checkpoint has no masked weights: obs restores unstructured or N:M pruning",
            hint="prune with --structure unstructured or N:M first",
        )
    mine, parent = dict(pruned.named_parameters()), dict(dense.named_parameters())
    targets: dict[str, torch.Tensor] = {}
    for name in sorted(set(masked)):
        if name not in mine:
            raise CheckpointError(f"the checkpoint marks {name!r} as masked but the model has no such parameter")
        if name not in parent or parent[name].shape != mine[name].shape:
            found = tuple(parent[name].shape) if name in parent else "no such parameter"
            raise CheckpointError(
                f"the dense parent's {name} does not match the checkpoint's {tuple(mine[name].shape)}: {found}",
                hint="pass the checkpoint that was pruned as --dense",
            )
        targets[name] = mine[name].detach() != 0
    layers = {n.removesuffix(".weight"): keep for n, keep in targets.items() if n.endswith(".weight")}
    others = sorted(n for n in targets if not n.endswith(".weight"))
    saved = {n: mine[n].detach().clone() for n in targets}
    with torch.no_grad():
        for name in layers:
            mine[f"{name}.weight"].copy_(parent[f"{name}.weight"].to(saved[f"{name}.weight"]))
    try:
        report = reconstruct(pruned, layers, calib, damp=damp, blocksize=blocksize, device=device, refit=refit)
    except BaseException:
        _put_back(mine, saved, saved)
        raise
    # layers the solve did not reach keep the checkpoint's own weights, not the parent's
    _put_back(mine, saved, [f"{n}.weight" for n, r in report.layers.items() if r.status != "reconstructed"])
    report.warnings.extend(f"{n}: masked but not a layer weight; left as it is" for n in others)
    return report


def _put_back(params: dict[str, nn.Parameter], saved: dict[str, torch.Tensor], names: Iterable[str]) -> None:
    with torch.no_grad():
        for name in names:
            params[name].copy_(saved[name])

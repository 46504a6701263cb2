"""What the two ways into OBS reconstruction share (``prune --reconstruct obs``, ``restore --method obs``).

* :func:`obs_params` — the ``-p`` keys (``damp``, ``blocksize``, ``samples``, ``refit``) converted and
  checked before any work, so a bad value writes nothing;
* :func:`calibration` — the first ``samples`` images of the calibration loader as a re-iterable list
  of input batches (the solver iterates it once per layer, so it must yield the same batches each time);
* :func:`shard` — under ``torchrun``, this process's share of those images: the solver sums the Gram
  matrices over the processes, so N shards give the one-process result up to summation order;
* :func:`targets_from_plan` — per-layer solver targets from a prune plan: the ratio each layer reaches in
  the criterion's plan (so ``--scope global`` keeps the criterion's global ranking of layers), or N:M;
* :func:`layer_rows` — the per-layer record (errors relative to the layer's output signal).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from prunecli.errors import InputError
from prunecli.reconstruction.obs import NM
from prunecli.reconstruction.sequential import ReconstructionReport, Target

__all__ = [
    "PRUNE_DEFAULTS",
    "calibration",
    "layer_rows",
    "obs_params",
    "predicted_zeros",
    "shard",
    "summary",
    "targets_from_plan",
]

PRUNE_DEFAULTS: dict[str, Any] = {"damp": 0.01, "blocksize": 128, "samples": 128, "refit": False}
"""``prune --reconstruct obs``'s ``-p`` keys and defaults. ``refit`` is off: with a mask chosen jointly the
column schedule is SparseGPT's method as published, and the exact refit costs most at 50 % (docs/obs.md).
``restore --method obs`` has the same keys with ``refit`` on (``prunecli.restoration.RESTORERS``)."""


def obs_params(params: Mapping[str, Any], defaults: Mapping[str, Any] = PRUNE_DEFAULTS) -> dict[str, Any]:
    """``defaults`` overridden by the matching keys of ``params`` (strings converted), validated.

    Raises:
        InputError: ``damp <= 0``, ``blocksize < 1``, ``samples < 1`` or a value of the wrong type.
    """
    from prunecli.reconstruction.masked import check_params

    out = dict(defaults)
    for key, value in params.items():
        if key in out:
            out[key] = _convert(key, value)
    check_params(float(out["damp"]), int(out["blocksize"]))
    if int(out["samples"]) < 1:
        raise InputError(f"samples={out['samples']}: at least one calibration image", hint="e.g. -p samples=128")
    return out


def _flag(text: str) -> bool:
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]


_TYPES: dict[str, Any] = {"damp": float, "blocksize": int, "samples": int, "refit": _flag}


def _convert(key: str, value: Any) -> Any:
    """A ``-p`` value (a string from the command line) as its key's type; other values are taken as they are."""
    if not isinstance(value, str):
        return value
    try:
        return _TYPES[key](value.strip())
    except ValueError:
        kind = {"damp": "number", "refit": "true or false"}.get(key, "integer")
        raise InputError(f"-p {key}={value}: expected a {kind}") from None


def calibration(batches: Iterable[Any], samples: int) -> list[torch.Tensor]:
    """The first ``samples`` inputs of ``batches`` (tensors or (input, label, …) sequences), on the CPU.

    Raises:
        InputError: the data holds no image.
    """
    out: list[torch.Tensor] = []
    n = 0
    for b in batches:
        if n >= samples:
            break
        x = b[0] if isinstance(b, (tuple, list)) else b
        out.append(x[: samples - n].detach().cpu())
        n += len(out[-1])
    if not n:
        raise InputError("the calibration data holds no image", hint="pass --data SPEC with images")
    return out


def shard(batches: list[torch.Tensor], rank: int, world: int) -> list[torch.Tensor]:
    """Images ``rank, rank + world, …`` of ``batches``, re-batched at the original batch size.

    Every process must see at least one image (the Gram matrices are summed over the processes).

    Raises:
        InputError: fewer images than processes.
    """
    if world <= 1:
        return batches
    size = len(batches[0])
    images = torch.cat(batches)
    if len(images) < world:
        raise InputError(f"{len(images)} calibration image(s) for {world} processes: each needs one",
                         hint="raise -p samples")  # fmt: skip
    mine = images[rank::world]
    return list(mine.split(size))


def targets_from_plan(plan: Any, nm: tuple[int, int] | None) -> dict[str, Target]:
    """Module name → solver target for every layer ``plan`` prunes.

    Unstructured: the fraction of the layer's weights the plan removes (``removed / numel``), so a
    global ranking's per-layer outcome is kept; the solver removes ``round(p·cols)`` per row. A layer the
    plan leaves untouched gets no target. N:M: ``NM(n, m)`` for every layer of the plan (the plan
    already skips layers whose rows do not split into groups of m).
    """
    out: dict[str, Target] = {}
    for lp in plan.layers:
        if nm is not None:
            out[lp.name.removesuffix(".weight")] = NM(*nm)
        elif lp.removed > 0:
            out[lp.name.removesuffix(".weight")] = lp.removed / lp.numel
    return out


def predicted_zeros(weight: torch.Tensor, target: Target) -> int:
    """The weights the solver removes for ``target``: ``rows · round(p·cols)`` (unstructured) or
    ``rows · cols/m · (m − n)`` (N:M); a conv's row is one filter (``in/groups·kh·kw`` columns)."""
    rows, cols = weight.shape[0], weight[0].numel()
    if isinstance(target, NM):
        return rows * (cols // target.m) * (target.m - target.n)
    return rows * round(float(target) * cols)  # type: ignore[arg-type]


def layer_rows(report: ReconstructionReport) -> dict[str, dict[str, Any]]:
    """Per layer: status, and for a reconstructed one the errors relative to its output signal.

    ``error_mask`` = ``‖(W − W⊙keep) X‖² / ‖W X‖²`` (the plain mask, no update), ``error_obs`` the same for
    the reconstructed weight, on the layer's calibration inputs; ``positions`` the columns of ``X``.
    """
    rows: dict[str, dict[str, Any]] = {}
    for name, r in report.layers.items():
        row: dict[str, Any] = {"status": r.status}
        if r.status == "reconstructed":
            scale = r.signal if r.signal > 0 else 1.0  # no signal: both errors are 0
            row.update({
                "error_mask": r.error_mask / scale, "error_obs": r.error_obs / scale, "positions": r.positions,
                "sparsity": r.sparsity, "fallback_rows": r.fallback_rows,
            })  # fmt: skip
        else:
            row["note"] = r.note
        rows[name] = row
    return rows


def summary(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``reconstructed`` (layer count) and the mean relative errors before/after over those layers."""
    done = [r for r in rows.values() if r["status"] == "reconstructed"]
    out: dict[str, Any] = {"reconstructed": len(done)}
    if done:
        out["error_mask_mean"] = sum(r["error_mask"] for r in done) / len(done)
        out["error_obs_mean"] = sum(r["error_obs"] for r in done) / len(done)
    return out

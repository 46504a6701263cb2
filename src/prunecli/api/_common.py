"""What every subcommand shares: reading CKPT with its flags, data with its transforms, writing OUT."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunecli.requests import ModelSource, Transforms

__all__ = ["DataOptions", "InputOptions", "load_input", "save_output"]


# The shared pieces of every request (:mod:`prunecli.requests`), under the names the api has used.
InputOptions = ModelSource
DataOptions = Transforms


def load_input(spec: str, opts: InputOptions | None = None):  # -> Loaded (torch import kept lazy)
    """Loads CKPT (any form in docs/checkpoints.md) with the given flags."""
    from prunecli.checkpoint.loaders import load_checkpoint

    opts = opts or InputOptions()
    return load_checkpoint(
        spec, arch=opts.arch, num_classes=opts.num_classes, ema=opts.ema, model_args=dict(opts.model_args)
    )


def save_output(
    out: str | Path,
    model: Any,
    loaded: Any,
    *,
    command: str,
    options: Mapping[str, Any],
    force: bool,
    manifest: Any = None,
    transform: Any = None,
    provenance: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """Writes ``model`` with ``loaded``'s manifest (or ``manifest``) plus one lineage step.

    ``options`` is the request's JSON form (the same object as the record's ``options``);
    ``provenance`` adds what the run found rather than was asked (a scores file's digest, the dense
    parent restore used) as further keys of the lineage step.

    ``model`` may also be a mapping of tensors; ``transform`` goes to
    :func:`prunecli.checkpoint.safetensors_io.write_safetensors`.
    """
    from prunecli.checkpoint.writer import lineage_step, save_checkpoint

    base = manifest or loaded.manifest
    new = base.with_step({**lineage_step(command, options, loaded), **(provenance or {})})
    inputs = [loaded.source.path, loaded.source.weights]
    return save_checkpoint(out, model, new, force=force, inputs=inputs, transform=transform)

"""The scores file that ``score`` writes and ``prune`` reads (README.md, Subcommands).

A safetensors file with one tensor per scored parameter, named after the parameter: the parameter's
own shape for weight criteria, ``[out_channels]`` for channel criteria. Extra per-parameter tensors
(e.g. biascomp's optimal bias shifts) are stored as ``NAME::KIND`` (``conv1.weight::bias_shift``).
Header metadata key ``prunecli_scores`` holds method, granularity, options, data spec, samples used,
the sha256 of the scored checkpoint and versions, so that ``prune`` can refuse scores computed on
another checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from prunecli import __version__
from prunecli.checkpoint.header import read_header
from prunecli.errors import CheckpointError, InputError
from prunecli.record import dumps

__all__ = ["SCORES_KEY", "ScoresFile", "load_scores", "save_scores"]

SCORES_KEY = "prunecli_scores"
Granularity = Literal["weight", "channel"]


@dataclass
class ScoresFile:
    """Importance scores of one checkpoint under one criterion.

    Attributes:
        method: criterion name (``taylor``, ``proscore``, …).
        granularity: ``weight`` (same shape as the parameter) or ``channel`` (one per output channel).
        scores: parameter name → score tensor (higher = more important, keep first).
        extras: kind → {parameter name → tensor}, e.g. ``{"bias_shift": {...}}`` for biascomp.
        options: the criterion's resolved options.
        data: the data spec used, or None for data-free criteria.
        samples: calibration samples used (0 for data-free criteria).
        checkpoint_sha256: sha256 of the scored checkpoint's weights file (None for ``arch:``/``timm:``).
        stats: per-layer score statistics (also reported in the record).
    """

    method: str
    granularity: Granularity
    scores: dict[str, torch.Tensor]
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    samples: int = 0
    checkpoint_sha256: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def check_checkpoint(self, sha256: str | None, where: str = "scores") -> None:
        """Refuses scores that were computed on another checkpoint."""
        if self.checkpoint_sha256 and sha256 and self.checkpoint_sha256 != sha256:
            raise InputError(
                f"{where} were computed on another checkpoint (sha256 {self.checkpoint_sha256[:12]}…, "
                f"this one is {sha256[:12]}…)",
                hint="score this checkpoint first, or pass the checkpoint the scores belong to",
            )


def save_scores(path: str | Path, scores: ScoresFile, *, force: bool = False) -> str:
    """Writes ``scores`` atomically; returns the absolute path."""
    from prunecli.checkpoint import transaction
    from prunecli.checkpoint.permissions import publish_file
    from prunecli.checkpoint.safetensors_io import write_safetensors

    path = Path(path).expanduser().resolve()
    if path.exists() and not force:
        raise InputError(f"output {str(path)!r} exists", hint="pass --force to overwrite it")
    if not path.parent.is_dir():
        raise InputError(f"output directory {str(path.parent)!r} does not exist")
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in scores.scores.items()}
    for kind, group in scores.extras.items():
        for name, t in group.items():
            tensors[f"{name}::{kind}"] = t.detach().float().cpu().contiguous()
    meta = {
        "format": 1,
        "method": scores.method,
        "granularity": scores.granularity,
        "options": scores.options,
        "data": scores.data,
        "samples": scores.samples,
        "checkpoint_sha256": scores.checkpoint_sha256,
        "stats": scores.stats,
        "versions": {"prunecli": __version__, "torch": torch.__version__.split("+")[0]},
    }
    with transaction.output_errors(path):  # a full disk or a vanished folder: one line, nothing left behind
        fd, tmp = transaction.temporary(
            lambda: tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        )
        os.close(fd)
        try:
            write_safetensors(tmp, tensors, {"format": "pt", SCORES_KEY: dumps(meta)})  # byte-deterministic
            publish_file(tmp)  # mkstemp made it 0600: the umask's mode, as for checkpoints
            transaction.publish(tmp, path)  # atomic rename; undone if the run fails later
        except BaseException:
            transaction.discard(tmp)
            raise
    return str(path)


def load_scores(path: str | Path) -> ScoresFile:
    """Reads a scores file; raises :class:`CheckpointError` if it is not one."""
    from safetensors.torch import load_file

    header = read_header(path)
    if SCORES_KEY not in header.metadata:
        raise CheckpointError(f"{path}: not a prunecli scores file (no '{SCORES_KEY}' metadata)")
    try:
        meta = json.loads(header.metadata[SCORES_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: scores metadata is not valid JSON") from None
    _check_scores_meta(meta, path)
    tensors = load_file(str(path), device="cpu")
    scores: dict[str, torch.Tensor] = {}
    extras: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if "::" in name:
            base, kind = name.split("::", 1)
            extras.setdefault(kind, {})[base] = t
        else:
            scores[name] = t
    return ScoresFile(
        method=meta["method"],
        granularity=meta["granularity"],
        scores=scores,
        extras=extras,
        options=meta.get("options") or {},
        data=meta.get("data"),
        samples=int(meta.get("samples") or 0),
        checkpoint_sha256=meta.get("checkpoint_sha256"),
        stats=meta.get("stats") or {},
    )


# Scores metadata field → (accepted JSON types, what it must be): a file that breaks one is refused by name.
_META_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "method": ((str,), "the criterion's name"),
    "granularity": ((str,), "'weight' or 'channel'"),
    "options": ((dict, type(None)), "an object"),
    "data": ((str, type(None)), "a data spec or null"),
    "samples": ((int, type(None)), "a count"),
    "checkpoint_sha256": ((str, type(None)), "a sha256 digest or null"),
    "stats": ((dict, type(None)), "an object"),
}
_REQUIRED = ("method", "granularity")


def _check_scores_meta(meta: Any, path: str | Path) -> None:
    """Refuses scores metadata that lacks a required field or holds a field of the wrong kind, naming it."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: scores metadata is not a JSON object")
    for name in _REQUIRED:
        if name not in meta:
            raise CheckpointError(f"{path}: scores metadata has no {name!r} ({_META_FIELDS[name][1]})")
    for name, (types, what) in _META_FIELDS.items():
        if name in meta and (not isinstance(meta[name], types) or isinstance(meta[name], bool)):
            raise CheckpointError(f"{path}: scores metadata {name!r} must be {what}, not {meta[name]!r}")
    if meta["granularity"] not in ("weight", "channel"):
        raise CheckpointError(f"{path}: scores metadata 'granularity' must be 'weight' or 'channel'")

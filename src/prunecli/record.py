"""The one JSON record each run prints on stdout (docs/records.md).

Torch-free on purpose: ``inspect`` builds its record without importing torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunecli import __version__

__all__ = ["SCHEMA", "Result", "dumps", "jsonable", "make_record"]

SCHEMA = "prunecli/record-v1"


@dataclass
class Result:
    """What a library call returns: the checkpoint it wrote (if any) and its metrics.

    Attributes:
        checkpoint: absolute path of the written checkpoint, or None (eval, inspect, report).
        sha256: digest of the written weights file, or None.
        metrics: command-specific numbers (docs/records.md lists the required keys).
        device: the device the work ran on ("cpu", "cuda:0", or "none" for header-only work).
        extra: further top-level record keys (e.g. ``scores`` for the scores file a step wrote).
    """

    checkpoint: str | None = None
    sha256: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    device: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)


def jsonable(value: Any) -> Any:
    """Converts ``value`` into plain JSON types; NaN and infinities become None.

    Tensors and numpy scalars are converted through ``tolist``/``item`` without importing either
    library here.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return jsonable(value.tolist())
    if hasattr(value, "item"):
        return jsonable(value.item())
    return str(value)


def dumps(obj: Any) -> str:
    """One line of JSON with sorted keys and no NaN, as every record and metadata blob is written."""
    return json.dumps(jsonable(obj), sort_keys=True, allow_nan=False, separators=(",", ":"))


def make_record(
    command: str,
    input: str | None,
    result: Result,
    options: Mapping[str, Any],
    elapsed_s: float,
) -> dict[str, Any]:
    """Assembles the record of docs/records.md from a library result."""
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command,
        "input": input,
        "checkpoint": result.checkpoint,
        "sha256": result.sha256,
        "options": dict(options),
        "metrics": result.metrics,
        "device": result.device,
        "elapsed_s": round(elapsed_s, 4),
        "version": __version__,
    }
    record.update(result.extra)
    return jsonable(record)

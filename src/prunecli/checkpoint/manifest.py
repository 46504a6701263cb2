"""The prunecli metadata that makes a checkpoint self-describing (docs/checkpoints.md).

Stored as one JSON string under the safetensors header key ``prunecli``. Torch-free, so that
``inspect`` can read it from the header alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from prunecli.errors import CheckpointError
from prunecli.record import dumps

__all__ = ["FORMAT_VERSION", "METADATA_KEY", "Manifest"]

METADATA_KEY = "prunecli"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    """Everything needed to rebuild a model from its weights, plus its history.

    Attributes:
        arch: timm architecture name (without pretrained tag).
        num_classes: classifier width the weights were trained for.
        model_args: extra keyword arguments for ``timm.create_model``.
        pretrained_cfg: timm's pretrained config (input size, mean/std, interpolation, crop), used for
            the eval transforms so that eval needs no flags.
        structure: how to rebuild structurally pruned shapes without pickle (written by ``prune
            --structure channel``; read by :func:`prunecli.models.build_model`), or None.
        masked: names of tensors whose zeros are pruning masks that fine-tuning must keep.
        adapters: LoRA adapters kept beside the weights (``finetune-lora --merge none``), or None.
        lineage: one entry per step that produced this checkpoint, oldest first.
        format: metadata format version.
        layer_table: prunable weights, classifier head, MACs per weight and buffer names, written by
            :func:`prunecli.checkpoint.writer.save_checkpoint` so that weight pruning can run without
            rebuilding the model (schema in :mod:`prunecli.layertable`), or None. Older readers ignore it.
    """

    arch: str
    num_classes: int | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    structure: dict[str, Any] | None = None
    masked: list[str] = field(default_factory=list)
    adapters: dict[str, Any] | None = None
    lineage: list[dict[str, Any]] = field(default_factory=list)
    format: int = FORMAT_VERSION
    layer_table: dict[str, Any] | None = None

    def to_json(self) -> str:
        """Compact, key-sorted JSON (deterministic bytes for identical inputs)."""
        doc = asdict(self)
        doc["masked"] = sorted(set(self.masked))
        return dumps(doc)

    @classmethod
    def from_json(cls, text: str, *, where: str = "checkpoint") -> Manifest:
        """Parses the metadata string; unknown keys from newer versions are ignored."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            raise CheckpointError(f"{where}: prunecli metadata is not valid JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("arch"), str):
            raise CheckpointError(f"{where}: prunecli metadata has no 'arch'")
        try:
            version = int(doc.get("format", 1))
        except (TypeError, ValueError):
            raise CheckpointError(f"{where}: prunecli metadata has an invalid format version") from None
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: written by a newer prunecli (metadata format {doc['format']})",
                hint="upgrade prunecli",
            )
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in doc.items() if k in known})

    def with_step(self, step: dict[str, Any]) -> Manifest:
        """A copy with ``step`` appended to the lineage."""
        new = Manifest(**{k: v for k, v in asdict(self).items()})
        new.lineage = [*self.lineage, step]
        return new

"""Checkpoint formats: torch-free header reading and manifest here; loading/saving in ``io``."""

from prunecli.checkpoint.header import SafetensorsHeader, TensorInfo, read_header
from prunecli.checkpoint.manifest import METADATA_KEY, Manifest
from prunecli.checkpoint.sources import Source, SourceKind, resolve_source

__all__ = [
    "METADATA_KEY",
    "Manifest",
    "SafetensorsHeader",
    "Source",
    "SourceKind",
    "TensorInfo",
    "read_header",
    "resolve_source",
]

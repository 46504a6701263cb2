"""Checkpoint formats.

Torch-free here (``inspect`` needs only these): the header (:mod:`.header`), the manifest
(:mod:`.manifest`) and CKPT resolution (:mod:`.sources`). Loading is in :mod:`.loaders`, writing in
:mod:`.writer`, tensor data in :mod:`.safetensors_io`, digests in :mod:`.hashing`, the Hugging Face
cache in :mod:`.hf_cache`, kept LoRA adapters in :mod:`.adapters`, output permissions in :mod:`.permissions`.
"""

import prunecli.checkpoint.permissions  # noqa: F401  (reads the umask before any command starts a thread)
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

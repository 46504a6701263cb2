"""Resolve a CKPT argument into a typed source, without loading any weights (docs/checkpoints.md).

Accepted forms: a prunecli ``.safetensors``; a bare state dict (``.safetensors``/``.pth``/``.bin``/
``.pt``) with ``--arch``; a timm Hugging Face folder; a timm ``train.py`` ``.pth.tar``;
``timm:NAME[.TAG]`` (local Hugging Face cache, offline); ``arch:NAME`` (fresh weights); ``-`` (the
``checkpoint`` field of one JSON record on stdin).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TextIO

from prunecli.checkpoint.header import SafetensorsHeader, read_header
from prunecli.checkpoint.manifest import METADATA_KEY
from prunecli.errors import CheckpointError, InputError

__all__ = ["Source", "SourceKind", "read_stdin_record", "resolve_source"]

TORCH_SUFFIXES = (".pth", ".bin", ".pt", ".pth.tar", ".tar", ".ckpt")


class SourceKind(str, Enum):
    PRUNECLI = "prunecli"  # self-describing safetensors (file, or model.safetensors inside a folder)
    SAFETENSORS = "safetensors"  # bare safetensors state dict
    TORCH = "torch"  # .pth/.bin/.pth.tar, read with weights_only=True
    HF_FOLDER = "hf-folder"  # timm Hugging Face folder (config.json + weights)
    TIMM = "timm"  # timm:NAME[.TAG] from the local HF cache
    ARCH = "arch"  # arch:NAME, fresh initialisation


@dataclass(frozen=True)
class Source:
    """Where a checkpoint comes from.

    Attributes:
        spec: the argument as given (after ``-`` substitution).
        kind: what it is.
        weights: the weights file (None for ``timm:``/``arch:``).
        folder: the folder for folder checkpoints, else None.
        name: architecture name for ``timm:``/``arch:``.
        header: the parsed safetensors header when ``weights`` is a safetensors file.
    """

    spec: str
    kind: SourceKind
    weights: Path | None = None
    folder: Path | None = None
    name: str | None = None
    header: SafetensorsHeader | None = None

    @property
    def path(self) -> Path | None:
        """The path a user would call this checkpoint (the folder for folders)."""
        return self.folder or self.weights


_STDIN: dict[str, tuple[object, dict]] = {}  # the record read from a stream, which can be read only once


def stdin_checkpoint() -> str | None:
    """The checkpoint named by the stdin record this process already read for ``-``, if any.

    The CLI puts it in the record's ``input`` so that pipes keep the file names ``report`` joins on.
    """
    cached = _STDIN.get("last")
    return cached[1].get("checkpoint") if cached and cached[0] is sys.stdin else None


def read_stdin_record(stream: TextIO | None = None) -> dict:
    """Reads the previous step's JSON record from stdin (the last non-empty line), once per stream."""
    stream = stream or sys.stdin
    cached = _STDIN.get("last")
    if cached is not None and cached[0] is stream:
        return cached[1]
    if stream.isatty():
        raise InputError("'-' reads the previous step's JSON record from stdin, but stdin is a terminal")
    lines = [ln for ln in stream.read().splitlines() if ln.strip()]
    if not lines:
        # in a pipe, an empty stdin means the step before failed (its error is on the terminal above)
        raise InputError(
            "'-' given but stdin holds no JSON record: the previous step in the pipe wrote no record "
            "(it failed: see its error above)",
            hint="fix the first failing step; '-' takes the checkpoint of the record a prunecli command prints",
        )
    try:
        record = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise InputError("stdin is not a prunecli JSON record") from None
    if not isinstance(record, dict):
        raise InputError("stdin is not a prunecli JSON record")
    _STDIN["last"] = (stream, record)
    return record


def resolve_source(spec: str, *, stdin: TextIO | None = None) -> Source:
    """Classifies ``spec``; reads only the safetensors header (no torch import)."""
    if spec == "-":
        record = read_stdin_record(stdin)
        ckpt = record.get("checkpoint")
        if not ckpt:
            raise InputError(f"the record on stdin (command {record.get('command')!r}) names no checkpoint")
        if not isinstance(ckpt, str):
            raise InputError(f"the record on stdin has a 'checkpoint' that is not a path ({ckpt!r})")
        return resolve_source(ckpt)
    for prefix, kind in (("timm:", SourceKind.TIMM), ("arch:", SourceKind.ARCH)):
        if spec.startswith(prefix):
            name = spec[len(prefix) :]
            if not name:
                raise InputError(f"{spec!r}: missing model name after {prefix!r}")
            return Source(spec, kind, name=name)
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"{spec}: no such file or directory")
    if path.is_dir():
        return _folder_source(spec, path)
    if not path.is_file():  # a FIFO would block the first read forever, a device never ends
        raise CheckpointError(f"{spec}: not a regular file (a device, FIFO or socket cannot be a checkpoint)")
    if path.suffix == ".safetensors":
        header = read_header(path)
        kind = SourceKind.PRUNECLI if METADATA_KEY in header.metadata else SourceKind.SAFETENSORS
        return Source(spec, kind, weights=path.resolve(), header=header)
    if path.name.endswith(TORCH_SUFFIXES):
        return Source(spec, SourceKind.TORCH, weights=path.resolve())
    # Unknown suffix: sniff safetensors by its header, else treat as a torch file.
    try:
        header = read_header(path)
    except CheckpointError:
        return Source(spec, SourceKind.TORCH, weights=path.resolve())
    kind = SourceKind.PRUNECLI if METADATA_KEY in header.metadata else SourceKind.SAFETENSORS
    return Source(spec, kind, weights=path.resolve(), header=header)


def _folder_source(spec: str, path: Path) -> Source:
    folder = path.resolve()
    st = folder / "model.safetensors"
    if st.is_file():
        header = read_header(st)
        kind = SourceKind.PRUNECLI if METADATA_KEY in header.metadata else SourceKind.HF_FOLDER
        if kind is SourceKind.HF_FOLDER and not (folder / "config.json").is_file():
            raise CheckpointError(f"{spec}: folder has model.safetensors but no config.json")
        return Source(spec, kind, weights=st, folder=folder, header=header)
    binf = folder / "pytorch_model.bin"
    if binf.is_file():
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{spec}: folder has pytorch_model.bin but no config.json")
        return Source(spec, SourceKind.HF_FOLDER, weights=binf, folder=folder)
    raise CheckpointError(
        f"{spec}: folder holds no weights (model.safetensors or pytorch_model.bin)",
        hint="point at a timm Hugging Face folder or a checkpoint file",
    )

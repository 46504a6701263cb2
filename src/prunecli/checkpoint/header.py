"""Safetensors header parsing without torch.

``inspect`` must be fast on multi-GB files and must not import torch (DESIGN §4), so the header is
read and validated here by hand: 8 bytes of little-endian length, then that many bytes of JSON.
The same validation guards every load, so a truncated file or a header whose offsets run past the end
of the file fails with a clear message instead of a crash inside the safetensors extension.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunecli.errors import CheckpointError

__all__ = ["DTYPE_BYTES", "SafetensorsHeader", "TensorInfo", "read_header"]

# Bytes per element of every dtype the safetensors format defines (bool is stored as one byte).
DTYPE_BYTES: dict[str, float] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 0.5, "F6_E2M3": 0.75,
    "F6_E3M2": 0.75, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8,
    "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip

_MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library itself enforces


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of the header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of a safetensors file.

    Attributes:
        path: the file.
        tensors: tensor entries in the order of their data offsets.
        metadata: the ``__metadata__`` string map (empty when absent).
        data_start: byte offset where tensor data begins.
        file_size: size of the file in bytes.
    """

    path: Path
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: str | Path) -> SafetensorsHeader:
    """Reads and validates the header of a safetensors file.

    Raises:
        CheckpointError: the file is missing, truncated, its header is not JSON, or a tensor's
            offsets do not fit its shape or run past the end of the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: truncated or not a safetensors file (header of {n} bytes in a {size}-byte file)"
                )
            raw = fh.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors file") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_len = size - 8 - n
    tensors = [_tensor_info(path, name, entry, data_len) for name, entry in doc.items()]
    tensors.sort(key=lambda t: (t.begin, t.name))
    return SafetensorsHeader(path, tuple(tensors), dict(metadata), 8 + n, size)


def _tensor_info(path: Path, name: str, entry: Any, data_len: int) -> TensorInfo:
    try:
        dtype = entry["dtype"]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from None
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if any(d < 0 for d in shape) or not 0 <= begin <= end:
        raise CheckpointError(f"{path}: tensor {name!r} has a negative shape or offsets")
    if end > data_len:
        raise CheckpointError(
            f"{path}: tensor {name!r} ends at byte {end} but the file holds only {data_len} data bytes "
            "(truncated or corrupt)"
        )
    expected = math.ceil(math.prod(shape) * DTYPE_BYTES[dtype])
    if end - begin != expected:
        raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape needs {expected}")
    return TensorInfo(name, dtype, shape, begin, end)

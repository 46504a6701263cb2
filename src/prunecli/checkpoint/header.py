"""Safetensors header parsing and validation without torch: the one gate every safetensors reader passes.

``inspect`` must be fast on multi-GB files and must not import torch (README.md, Subcommands), so the header is
read and validated here by hand: 8 bytes of little-endian length, then that many bytes of JSON. Every
reader in prunecli starts from :func:`read_header` (the checkpoint sources, ``inspect``, scores files,
the copying and the memory-mapped readers of :mod:`prunecli.checkpoint.safetensors_io`), so a file is
refused here, with a one-line message naming what is wrong, before any byte of tensor data is read.

What is refused is everything the safetensors format (its README) and the ``safetensors`` library
(0.8) refuse: a header longer than the library's 100 000 000-byte limit or than the file, a header that
is not UTF-8 JSON (NaN, Infinity, out-of-range numbers, lone surrogates and nesting deeper than
serde_json's limit included), ``__metadata__`` that is not a string-to-string map, an unknown dtype, a
shape or offset that is not a non-negative 64-bit integer, an element count that overflows 64 bits,
a sub-byte tensor that does not fill whole bytes, a tensor whose offsets do not span exactly its
shape × dtype width, and offsets that are not contiguous from 0 to the end of the file (no gap, no
overlap, no trailing bytes). Three rules of the format that the library does not enforce are enforced
too: the header starts with ``{``, no key appears twice (a duplicate tensor name would make the file
mean different things to different readers), and a dtype is a string.
"""

from __future__ import annotations

import json
import math
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunecli.errors import CheckpointError

__all__ = ["DTYPE_BITS", "DTYPE_BYTES", "MAX_HEADER", "SafetensorsHeader", "TensorInfo", "parse_header", "read_header"]

# Bits per element of every dtype the safetensors library (0.8) knows; bool is stored as one byte.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "I64": 64, "U64": 64, "F64": 64,
}  # fmt: skip
# Bytes per element (fractional for the sub-byte dtypes).
DTYPE_BYTES: dict[str, float] = {k: v / 8 for k, v in DTYPE_BITS.items()}

MAX_HEADER = 100_000_000  # bytes: the limit the safetensors library enforces (``MAX_HEADER_SIZE``)
_U64_MAX = 2**64 - 1  # sizes and offsets are Rust ``usize`` (64-bit) in the library
_MAX_DEPTH = 127  # serde_json refuses JSON nested 128 containers deep (its recursion limit)


class _Refused(Exception):
    """Why a header is refused (one line), raised inside the parser and reported with the file name."""


class _NegativeZero(int):
    """JSON ``-0``: serde_json reads it as a float, so it is neither a size nor an offset."""


def _parse_int(text: str) -> int:
    if text == "-0":
        return _NegativeZero(0)
    if len(text) > 20 and math.isinf(float(text)):  # serde_json reads integers past 64 bits as f64
        raise _Refused(f"number {text[:20]}… is out of range")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:40]} is out of range")
    return value


def _parse_constant(text: str) -> Any:
    raise _Refused(f"{text} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"key {key!r} appears twice in the header")
        out[key] = value
    return out


def _check_tree(doc: Any) -> None:
    """Nesting depth (serde_json's limit) and strings that are not Unicode scalar values (lone surrogates)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > _MAX_DEPTH:
                raise _Refused(f"JSON nested deeper than {_MAX_DEPTH} levels")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, value in items:
                if isinstance(key, str):
                    _check_text(key)
                stack.append((value, depth + 1))
        elif isinstance(node, str):
            _check_text(node)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Refused(f"string {text[:40]!r} holds a lone surrogate (not valid Unicode)") from None


def _is_size(value: Any) -> bool:
    """A JSON integer in [0, 2**64 - 1] (bool, float and ``-0`` are not)."""
    return type(value) is int and 0 <= value <= _U64_MAX


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
    """Reads and validates the header of a safetensors file (the checks in the module docstring).

    Raises:
        CheckpointError: the file is missing, truncated or not a valid safetensors file; the message
            names the first thing found wrong.
    """
    path = Path(path)
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO blocks the first read forever; /dev/zero never ends
            raise CheckpointError(f"{path}: not a regular file (a device, FIFO or socket cannot be a safetensors file)")
        size = st.st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise CheckpointError(
                    f"{path}: not a safetensors file (header length {n} exceeds the format's {MAX_HEADER}-byte limit)"
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: truncated or not a safetensors file (header of {n} bytes in a {size}-byte file)"
                )
            raw = fh.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors file") from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied") from None
    tensors, metadata = parse_header(raw, size - 8 - n, where=str(path))
    return SafetensorsHeader(path, tensors, metadata, 8 + n, size)


def parse_header(
    raw: bytes, data_len: int, *, where: str = "safetensors file"
) -> tuple[tuple[TensorInfo, ...], dict[str, str]]:
    """Validates header bytes ``raw`` for a data section of ``data_len`` bytes.

    Returns:
        (tensor entries sorted by data offset, then name; the ``__metadata__`` map, empty when absent).

    Raises:
        CheckpointError: what is wrong, in one line prefixed by ``where``.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{where}: safetensors header is not valid JSON (UnicodeDecodeError)") from None
    try:
        if not text.startswith("{"):
            raise _Refused("safetensors header does not start with '{'")
        try:
            doc = json.loads(
                text,
                object_pairs_hook=_unique_keys,
                parse_int=_parse_int,
                parse_float=_parse_float,
                parse_constant=_parse_constant,
            )
        except json.JSONDecodeError as exc:
            raise _Refused(f"safetensors header is not valid JSON ({exc.msg} at character {exc.pos})") from None
        except RecursionError:
            raise _Refused(f"JSON nested deeper than {_MAX_DEPTH} levels") from None
        if not isinstance(doc, dict):
            raise _Refused("safetensors header is not a JSON object")
        _check_tree(doc)
        metadata = doc.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _Refused("safetensors __metadata__ must map strings to strings")
        tensors = sorted(
            (_tensor_info(name, entry) for name, entry in doc.items()), key=lambda t: (t.begin, t.end, t.name)
        )
        _check_layout(tensors, data_len)
    except _Refused as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    tensors.sort(key=lambda t: (t.begin, t.name))
    return tuple(tensors), dict(metadata)


def _tensor_info(name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _Refused(f"malformed header entry for tensor {name!r} (needs dtype, shape and data_offsets)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise _Refused(f"tensor {name!r} has dtype {dtype!r}, not a dtype name")
    if dtype not in DTYPE_BITS:
        raise _Refused(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise _Refused(f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets):
        raise _Refused(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end] in bytes")
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


def _nbytes(info: TensorInfo) -> int:
    """Bytes the shape and dtype need; overflow and partial bytes refused as the library refuses them."""
    numel = 1
    for d in info.shape:  # left to right, as the library's checked product: [2**40, 2**40, 0] overflows
        numel *= d
        if numel > _U64_MAX:
            raise _Refused(f"tensor {info.name!r}: shape {list(info.shape)} overflows a 64-bit element count")
    bits = numel * DTYPE_BITS[info.dtype]
    if bits > _U64_MAX:
        raise _Refused(f"tensor {info.name!r}: shape {list(info.shape)} overflows a 64-bit size")
    if bits % 8:
        raise _Refused(f"tensor {info.name!r}: {numel} {info.dtype} elements do not fill whole bytes")
    return bits // 8


def _check_layout(tensors: list[TensorInfo], data_len: int) -> None:
    """Offsets in bounds, each spanning its tensor's size, contiguous from 0 and covering the data exactly."""
    pos = 0
    for t in tensors:
        if t.end < t.begin:
            raise _Refused(f"tensor {t.name!r} has data_offsets [{t.begin}, {t.end}] that end before they begin")
        if t.end > data_len:
            raise _Refused(
                f"tensor {t.name!r} ends at byte {t.end} but the file holds only {data_len} data bytes "
                "(truncated or corrupt)"
            )
        expected = _nbytes(t)
        if t.end - t.begin != expected:
            raise _Refused(f"tensor {t.name!r} spans {t.end - t.begin} bytes, its shape needs {expected}")
        if t.begin != pos:
            what = "overlaps the tensor before it" if t.begin < pos else f"leaves a gap of {t.begin - pos} bytes"
            raise _Refused(f"tensor {t.name!r} at data_offsets [{t.begin}, {t.end}] {what}")
        pos = t.end
    if pos != data_len:
        raise _Refused(f"the data section holds {data_len} bytes but the tensors cover {pos} (trailing bytes)")

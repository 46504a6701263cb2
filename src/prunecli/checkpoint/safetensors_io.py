"""Safetensors tensor data: read (copied or memory-mapped, hashed on the way) and written deterministically.

The header is parsed and validated by :mod:`prunecli.checkpoint.header` (torch-free); this module
turns the validated layout into tensors, and tensors into bytes that depend only on their content.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from prunecli.checkpoint.hashing import Sha256Pipe, hash_file
from prunecli.checkpoint.header import SafetensorsHeader, TensorInfo, read_header
from prunecli.errors import CheckpointError

__all__ = ["ST_DTYPES", "map_safetensors_hashed", "read_safetensors", "read_safetensors_hashed", "write_safetensors"]

# safetensors dtype names of the torch dtypes a checkpoint may hold.
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
    **{getattr(torch, a): b for a, b in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                                           ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"))
       if hasattr(torch, a)},
}  # fmt: skip


_ALIGN = 64  # bytes: a cache line, and the widest SIMD load


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    transform: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> str:
    """Writes a safetensors file whose bytes depend only on the tensors and the metadata.

    ``safetensors.torch.save_file`` keeps ``__metadata__`` in a Rust hash map, so two saves of the same
    checkpoint can order its keys differently; determinism (same inputs, same bytes) needs a writer that
    fixes the order. The layout is the library's own: 8-byte little-endian header length, a JSON header
    padded with spaces so that the tensor data starts at a multiple of 64 bytes, then the tensors'
    little-endian bytes: first those whose size is a multiple of 64 bytes (each then starts 64-byte
    aligned), then the rest; within each group largest dtypes first, so every tensor is aligned to its
    element size. The safetensors library reads the result (and maps it: a reloaded weight keeps the
    alignment it had in memory, so SIMD kernels take the same path and a reloaded model computes
    bit-identical outputs — with 8-byte alignment that depended on the header's length).

    ``transform`` (tensor name → function) replaces a tensor by what the function returns, of the
    same dtype and shape, just before it is written (``prune`` masks memory-mapped weights this way
    instead of copying them). A returned tensor may be overwritten after the next-but-one call.

    Returns:
        The sha256 of the bytes written, computed while writing: the record and the lineage need the
        digest, and reading a large file back only to hash it costs a second pass over it.
    """
    import sys

    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        from safetensors.torch import save_file

        fix = transform or {}
        save_file(
            {k: (fix[k](v) if k in fix else v).clone() for k, v in tensors.items()}, str(path), metadata=dict(metadata)
        )
        return hash_file(Path(path))
    entries = []
    for name, t in tensors.items():
        if t.dtype not in ST_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        entries.append((name, t.detach().to("cpu").contiguous()))
    entries.sort(key=lambda e: ((e[1].numel() * e[1].element_size()) % _ALIGN != 0, -e[1].element_size(), e[0]))
    header: dict[str, Any] = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}} if metadata else {}
    offset = 0
    for name, t in entries:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    with Sha256Pipe() as digest, open(path, "wb") as fh:
        for chunk in (len(raw).to_bytes(8, "little"), raw):
            digest.update(chunk)
            fh.write(chunk)
        hashed: list[Any] = []  # futures of the transformed chunks (their buffers are reused)
        for name, t in entries:
            if transform is not None and name in transform:
                if len(hashed) >= 2:
                    hashed[-2].result()  # the buffer the transform is about to reuse is hashed
                t = transform[name](t)
            if t.numel():
                data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                done = digest.update(data)  # hashed on the worker while this thread writes it
                if transform is not None and name in transform:
                    hashed.append(done)
                fh.write(data)
        return digest.hexdigest()


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, read by the safetensors library (CPU, writable).

    The header goes through :func:`prunecli.checkpoint.header.read_header` first, like every reader's:
    a bad file is refused with prunecli's one-line reason, and with the same rules on every path.
    """
    from safetensors.torch import load_file

    read_header(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read safetensors data ({str(exc).splitlines()[0][:160]})") from None


_READ_CHUNK = 1 << 23


def read_safetensors_hashed(header: SafetensorsHeader) -> tuple[dict[str, torch.Tensor], str]:
    """Reads a whole safetensors file once: its tensors (writable, CPU) and the sha256 of its bytes.

    One pass reads the file into one buffer and hashes each chunk while it is still in cache; the
    tensors are views into that buffer (a copy only where a tensor is not aligned to its element
    size). ``safetensors.torch.load_file`` followed by :func:`file_sha256` reads the file twice.

    Raises:
        CheckpointError: the file is shorter than its header says.
    """
    path, size = header.path, header.file_size
    # Ordinary pages: a MADV_HUGEPAGE mapping faults 400x less often, but after other processes freed
    # memory the kernel compacts for it inside this read (measured 0.6-0.75 s of system time against
    # 0.14 s with 4 KiB pages for 330 MiB); the steady cost is the better choice.
    buf = torch.empty(size, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with Sha256Pipe() as digest, open(path, "rb", buffering=0) as fh:
        _check_unchanged(header, fh.fileno())
        pos = 0
        while pos < size:
            n = fh.readinto(view[pos : pos + _READ_CHUNK])
            if not n:
                raise CheckpointError(f"{path}: file is shorter than its header says (truncated while reading?)")
            digest.update(view[pos : pos + n])
            pos += n
        sha = digest.hexdigest()
    dtypes = {v: k for k, v in ST_DTYPES.items()}
    tensors: dict[str, torch.Tensor] = {}
    for info in header.tensors:
        dtype = dtypes.get(info.dtype)
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {info.name!r} has dtype {info.dtype}, which torch cannot hold")
        raw = buf[header.data_start + info.begin : header.data_start + info.end]
        if (header.data_start + info.begin) % dtype.itemsize:
            raw = raw.clone()
        tensors[info.name] = raw.view(dtype).view(_torch_shape(header, info))
    return tensors, sha


def map_safetensors_hashed(header: SafetensorsHeader) -> tuple[dict[str, torch.Tensor], Any] | None:
    """Maps a safetensors file read-only: its tensors (views of the file's cached pages, no copy) and a
    future of the sha256 of its bytes (hashed on a worker thread meanwhile).

    The tensors must never be written (the mapping is read-only; use :func:`read_safetensors_hashed`
    for tensors to modify in place). None where the platform has no such mapping or a tensor is not
    aligned to its element size.
    """
    import mmap
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    if not hasattr(mmap, "MAP_SHARED") or not hasattr(mmap, "PROT_READ"):  # pragma: no cover - Windows
        return None
    dtypes = {v: k for k, v in ST_DTYPES.items()}
    if any(
        dtypes.get(i.dtype) is None or (header.data_start + i.begin) % dtypes[i.dtype].itemsize for i in header.tensors
    ):
        return None
    with open(header.path, "rb") as fh:
        _check_unchanged(header, fh.fileno())
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # one call maps every cached page
        mem = mmap.mmap(fh.fileno(), header.file_size, flags=flags, prot=mmap.PROT_READ)
    pool = ThreadPoolExecutor(1, thread_name_prefix="prunecli-sha256")
    sha = pool.submit(lambda: hashlib.sha256(memoryview(mem)).hexdigest())
    pool.shutdown(wait=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "buffer is not writable": nothing writes these tensors
        buf = torch.frombuffer(mem, dtype=torch.uint8)
    tensors = {
        i.name: buf[header.data_start + i.begin : header.data_start + i.end]
        .view(dtypes[i.dtype])
        .view(_torch_shape(header, i))
        for i in header.tensors
    }
    return tensors, sha


def _check_unchanged(header: SafetensorsHeader, fd: int) -> None:
    """Refuses a file whose size changed since its header was validated (a mapping past its end would crash)."""
    import os

    size = os.fstat(fd).st_size
    if size != header.file_size:
        raise CheckpointError(
            f"{header.path}: changed while being read ({header.file_size} bytes when its header was read, now {size})"
        )


_INT64_MAX = 2**63 - 1


def _torch_shape(header: SafetensorsHeader, info: TensorInfo) -> tuple[int, ...]:
    """``info.shape``, refused where torch cannot hold it: the format allows 64-bit unsigned sizes, torch
    counts elements in signed 64 bits, multiplying left to right (an empty ``[2**62, 2, 0]`` overflows)."""
    count = 1
    for d in info.shape:
        count *= d
        if d > _INT64_MAX or count > _INT64_MAX:
            raise CheckpointError(
                f"{header.path}: tensor {info.name!r} has shape {list(info.shape)}, too large for torch"
            )
    return info.shape

"""sha256 of checkpoint files: cached per process, and hashed beside the I/O instead of after it.

Torch-free: lineage, records and the adapter check need digests without loading any weights. Every
writer and reader that sees a whole file's bytes hashes them on the way (:class:`Sha256Pipe`) and
:func:`remember_sha256` stores the result, so no file is read a second time only to hash it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

__all__ = ["Sha256Pipe", "file_sha256", "hash_file", "remember_sha256"]

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached per (path, size, mtime) within the process."""
    key = _sha_key(path)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = hash_file(path)
    return _SHA_CACHE[key]


def _sha_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def hash_file(path: Path) -> str:
    """sha256 of a file read in 4 MiB chunks, uncached (for a file just written by another writer)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class Sha256Pipe:
    """sha256 of a byte stream hashed on a worker thread while the caller reads or writes the next chunk.

    hashlib releases the GIL on large buffers, so hashing overlaps the file I/O (wall time; the CPU
    time is the same). One worker keeps the chunks in order. The chunks must not change until
    :meth:`hexdigest` returns.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._sha = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prunecli-sha256")

    def update(self, chunk: Any) -> Any:
        """Queues ``chunk``; returns the future that completes once it is hashed."""
        return self._pool.submit(self._sha.update, chunk)

    def hexdigest(self) -> str:
        self._pool.shutdown(wait=True)
        return self._sha.hexdigest()

    def __enter__(self) -> Sha256Pipe:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)


def remember_sha256(path: Path, sha: str) -> None:
    """Caches the digest of a file this process has just written or read in full (saves a re-read)."""
    _SHA_CACHE[_sha_key(path)] = sha

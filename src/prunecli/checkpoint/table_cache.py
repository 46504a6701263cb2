"""The layer-table cache: what timm said about a third-party checkpoint's architecture, kept for the next run.

A prunecli checkpoint carries its layer table (:mod:`prunecli.layertable`), so unstructured and N:M
pruning of it never imports timm. A third-party file (a timm ``save_for_hf`` folder, a ``train.py``
``.pth.tar``, a bare state dict with ``--arch``) carries none: the first prune of such a file builds
the model through timm (meta device, as the model path does) to learn the table, and this module
keeps the answer under the user's cache directory, so that later runs on files of the same
architecture read it back instead of importing timm (docs/checkpoints.md, "The layer-table cache").

An entry holds two answers of timm: the layer table of the model as the model path rebuilds it (or
``null`` where no exact table exists, so that such inputs go straight to the model path), and the
default ``pretrained_cfg`` of the architecture where the input does not carry its own. Everything else
the manifest needs is computed from the input by the loaders' own code.

Where: ``$XDG_CACHE_HOME/prunecli/layer-tables/`` (an absolute ``XDG_CACHE_HOME``, as the XDG spec
asks), else ``~/.cache/prunecli/layer-tables/``. ``PRUNECLI_NO_CACHE=1`` or ``prune --no-cache``
neither read nor write it.

Key: the source kind, the architecture name, ``--num-classes``/``--ema``, the fields of the folder's
``config.json`` that decide the model (``num_classes``, ``model_args``, ``pretrained_cfg`` — hence the
input size of the MAC count), a digest of the state's structure (names, dtypes, shapes), and the
prunecli, timm and torch versions plus the table and cache formats. The file name carries the key's
digest, so a change of any of these is a different entry.

Trust: an entry is input like a checkpoint's header. It is read as plain JSON (never pickle), its
``sha256`` must be the digest of its content (a hand-edited or torn entry is *tampered*), its stored
key must equal the key asked for (a copied or renamed entry is *stale*), and its table goes through
the same checks against the tensors as a table read from a checkpoint
(:func:`prunecli.checkpoint.validate.check_manifest`, :meth:`prunecli.layertable.LayerTable.fits`).
An entry failing any of these is never used: it is rebuilt and overwritten, with a warning. The digest
detects edits and damage, not a forger who recomputes it; such a forger could equally edit a
checkpoint's own table, which passes the same consistency checks. Writes are atomic (temporary file
in the same folder, then rename); a cache folder that cannot be created or written means no cache,
never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CACHE_FORMAT", "CacheEntry", "cache_dir", "cache_key", "entry_path", "read_entry", "write_entry"]

_LOG = logging.getLogger("prunecli")

CACHE_FORMAT = 1
"""Version of the entry layout; part of the key (a new layout never reads an old entry)."""

MAX_ENTRY_BYTES = 64 << 20
"""An entry larger than this is not read (a vit_base entry is ~10 KiB; the largest timm models stay under 1 MiB)."""

_FIELDS = frozenset({"format", "key", "default_cfg", "layer_table", "sha256"})


@dataclass(frozen=True)
class CacheEntry:
    """What an entry answers in place of timm (module docstring)."""

    default_cfg: dict[str, Any] | None
    layer_table: dict[str, Any] | None


def cache_dir(no_cache: bool = False) -> Path | None:
    """The cache folder, or None when the cache is disabled (``no_cache``, ``PRUNECLI_NO_CACHE=1``)."""
    if no_cache or os.environ.get("PRUNECLI_NO_CACHE", "") not in ("", "0"):
        return None
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path("~/.cache").expanduser()
    return base / "prunecli" / "layer-tables"


def structure_digest(entries: Iterable[tuple[str, str, Sequence[int]]]) -> str:
    """sha256 of the sorted ``name:dtype:d0,d1,…`` lines of a state dict (safetensors dtype names)."""
    lines = sorted(f"{n}:{dt}:{','.join(str(int(d)) for d in shape)}" for n, dt, shape in entries)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def cache_key(
    *,
    kind: str,
    arch: str,
    num_classes: int | None,
    ema: bool,
    config: Mapping[str, Any] | None,
    structure: str,
) -> dict[str, Any]:
    """The key of an entry (module docstring): everything the manifest and the table depend on.

    ``config`` is the folder's checked ``config.json`` (None for a bare state dict); only the fields
    that decide the model are kept. ``structure`` is :func:`structure_digest` of the state.
    """
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from prunecli import __version__
    from prunecli.layertable import TABLE_VERSION

    try:
        timm_version = version("timm")  # the distribution's metadata: importing timm is what the cache avoids
    except PackageNotFoundError:  # pragma: no cover - a source checkout of timm on sys.path
        import timm

        timm_version = str(timm.__version__)

    fields = None
    if config is not None:
        fields = {k: config.get(k) for k in ("architecture", "num_classes", "model_args", "pretrained_cfg")}
    return {
        "cache": CACHE_FORMAT,
        "table": TABLE_VERSION,
        "kind": kind,
        "arch": arch,
        "num_classes": num_classes,
        "ema": bool(ema),
        "config": fields,
        "state": structure,
        "versions": {"prunecli": __version__, "timm": timm_version, "torch": torch.__version__},
    }


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _digest(key: Mapping[str, Any], default_cfg: Any, layer_table: Any) -> str:
    return hashlib.sha256(_canonical({"key": key, "default_cfg": default_cfg, "layer_table": layer_table})).hexdigest()


def entry_path(folder: Path, key: Mapping[str, Any]) -> Path:
    """``<arch>-<key digest>.json``: the architecture for people listing the folder, the digest for lookups."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(key["arch"]))[:64].lstrip(".") or "model"
    return folder / f"{name}-{hashlib.sha256(_canonical(key)).hexdigest()[:40]}.json"


def _reject(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def read_entry(folder: Path, key: Mapping[str, Any]) -> tuple[CacheEntry | None, str]:
    """The entry for ``key`` and what was found: ``hit``, ``miss``, ``stale`` or ``tampered``.

    Only the entry's own consistency is checked here; the caller checks its table against the tensors.
    Never raises: an unreadable entry is a miss, a malformed one is tampered.
    """
    path = entry_path(folder, key)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO planted there must not block
    except FileNotFoundError:
        return None, "miss"
    except OSError as exc:
        _LOG.debug("layer-table cache: cannot read %s (%s)", path, exc)
        return None, "miss"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_ENTRY_BYTES:
            return None, "tampered"
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(MAX_ENTRY_BYTES + 1)
    except OSError as exc:
        _LOG.debug("layer-table cache: cannot read %s (%s)", path, exc)
        return None, "miss"
    finally:
        os.close(fd)
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_reject)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, "tampered"
    if not isinstance(doc, dict) or set(doc) != _FIELDS or doc["format"] != CACHE_FORMAT:
        return None, "tampered"
    cfg, table, sha = doc["default_cfg"], doc["layer_table"], doc["sha256"]
    if not isinstance(sha, str) or sha != _digest(doc["key"], cfg, table):
        return None, "tampered"
    if doc["key"] != key:
        return None, "stale"
    if not (cfg is None or isinstance(cfg, dict)) or not (table is None or isinstance(table, dict)):
        return None, "tampered"
    return CacheEntry(cfg, table), "hit"


def write_entry(folder: Path, key: Mapping[str, Any], entry: CacheEntry) -> Path | None:
    """Writes the entry atomically (temporary file, then rename); None where the folder is not writable."""
    path = entry_path(folder, key)
    doc = {
        "format": CACHE_FORMAT,
        "key": key,
        "default_cfg": entry.default_cfg,
        "layer_table": entry.layer_table,
        "sha256": _digest(key, entry.default_cfg, entry.layer_table),
    }
    text = json.dumps(doc, sort_keys=True, indent=1, allow_nan=False) + "\n"
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
        return path
    except (OSError, ValueError) as exc:  # read-only or missing home, full disk; ValueError: NaN in a config
        _LOG.debug("layer-table cache: not written (%s)", exc)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return None

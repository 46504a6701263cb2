"""The fast path's input: a checkpoint read as raw tensors plus its layer table, no model built.

Used by ``prunecli prune`` (see :mod:`prunecli.api.prune`, "Fast path") for unstructured and N:M
pruning with magnitude scores or a scores file. ``fast_input`` returns None whenever the model path
must run instead.

Where the table comes from depends on the input (:data:`_READERS`): a prunecli checkpoint carries it
in its manifest; a third-party file (timm folder, train.py file, bare state dict with ``--arch``) gets
it from the layer-table cache (:mod:`prunecli.checkpoint.table_cache`), which the first run of an
architecture fills by rebuilding the model once through the model path's own loader. ``no_cache`` is
``--no-cache``: the table is then built in process every time, and the cache neither read nor written.
Either way the manifest is computed by the model path's own functions, so the output is the model
path's, byte for byte.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prunecli.checkpoint.sources import SourceKind
from prunecli.requests import ModelSource, Transforms

__all__ = ["MAGNITUDE", "FastInput", "fast_input"]

_LOG = logging.getLogger("prunecli")

MAGNITUDE = frozenset({"magnitude", "l1", "l2"})
"""Criterion names computed on the fly as |w| (the L1 and L2 norms of one weight rank alike)."""


@dataclasses.dataclass
class FastInput:
    """A checkpoint read for the fast path: tensors straight from the file, the model described by its table.

    ``mapped``: the tensors are read-only views of the file (magnitude pruning plans on them and masks
    each pruned tensor while writing it, ``transform``); otherwise they are a private copy, pruned in
    place. ``sha``: a future of the input's sha256 while it is being hashed.
    """

    loaded: Any  # prunecli.checkpoint.loaders.Loaded with model=None
    tensors: dict[str, Any]
    table: Any  # prunecli.layertable.LayerTable
    mapped: bool = False
    sha: Any = None
    transform: dict[str, Any] | None = None

    def input_sha256(self) -> str:
        """The input's digest (waits for the hashing thread); also what the lineage records."""
        if self.sha is not None:
            from prunecli.checkpoint.hashing import remember_sha256

            self.loaded._sha = self.sha.result()
            remember_sha256(self.loaded.source.weights, self.loaded._sha)
            self.sha = None
        return str(self.loaded._sha)

    def writable(self, names: Sequence[str]) -> None:
        """Private copies of ``names`` (for in-place pruning of a mapped input)."""
        self.tensors.update({n: self.tensors[n].clone() for n in names})


def fast_input(
    spec: str,
    *,
    kind: str,
    method: str | None,
    scores: Path | None,
    compensate: str | None,
    inputs: ModelSource | None,
    dopts: Transforms | None,
    out: tuple[str | Path, bool],
    no_cache: bool = False,
) -> FastInput | None:
    """Reads CKPT for the fast path (module docstring) when the run allows it; None → the model path.

    Every condition is one under which the model path would compute exactly what the table and the
    raw tensors give: weight scores that need no model (magnitude on the fly, or a scores file), no
    bias compensation (it needs the BatchNorm modules), the MAC count at the table's input size,
    float32 tensors (the model path converts others to float32), and a table that fits the file.
    Where the table comes from depends on the input (:data:`_READERS`): a prunecli checkpoint carries
    it; for a third-party file it comes from the layer-table cache, or is built once (timm) and cached.
    """
    if os.environ.get("PRUNECLI_FAST_PRUNE", "1") == "0" or kind not in ("unstructured", "nm") or compensate:
        return None
    if scores is None and (method or "").lower() not in MAGNITUDE:
        return None
    if (inputs is not None and inputs.model_args) or (dopts is not None and dopts.input_size):
        return None
    from prunecli.checkpoint.sources import resolve_source

    source = resolve_source(spec)
    reader = _READERS.get(source.kind)
    if reader is None:
        return None
    opts = inputs or ModelSource()
    return reader(source, _Run(kind, scores, out, opts, no_cache))


@dataclasses.dataclass(frozen=True)
class _Run:
    """What a reader needs to know of the run: the structure, the scores file, the output, CKPT's flags."""

    kind: str
    scores: Path | None
    out: tuple[str | Path, bool]
    opts: ModelSource
    no_cache: bool

    @property
    def maps(self) -> bool:
        """Magnitude pruning needs no writable weights (MagnitudeMasks): the file is mapped, not copied."""
        return self.kind == "unstructured" and self.scores is None

    @property
    def load_options(self) -> Any:
        """CKPT's flags as the loaders take them (``LoadOptions``; model args never reach the fast path)."""
        from prunecli.checkpoint.loaders import LoadOptions

        return LoadOptions(self.opts.arch, self.opts.num_classes, None, self.opts.ema)

    def check_output(self, source: Any) -> None:
        from prunecli.checkpoint.writer import check_output

        check_output(self.out[0], force=self.out[1], inputs=[source.path, source.weights])  # before reading


def _prunecli_input(source: Any, run: _Run) -> FastInput | None:
    """A prunecli checkpoint: its manifest carries the layer table."""
    from prunecli.checkpoint.validate import manifest_from_header
    from prunecli.layertable import LayerTable

    header = source.header
    if header is None:
        return None
    manifest = manifest_from_header(header, where=source.spec)  # metadata checked against the tensors
    table = LayerTable.parse(manifest.layer_table)
    if table is None or manifest.adapters or not table.fits({t.name: t.shape for t in header.tensors}):
        return None
    if any(t.dtype in _FLOAT_DTYPES and t.dtype != "F32" for t in header.tensors):
        return None
    from prunecli.checkpoint.loaders import check_finite as _check_finite

    run.check_output(source)
    assert source.weights is not None
    tensors, sha, mapped = _read_safetensors(header, run.maps, source.weights)
    fast = _fast(manifest, source, tensors, table, mapped, sha)
    try:
        _check_finite(tensors, source.spec)
    except BaseException:
        fast.input_sha256()  # let the hashing thread finish before the error unwinds
        raise
    return fast


def _read_safetensors(header: Any, maps: bool, weights: Path) -> tuple[dict[str, Any], Any, bool]:
    """(tensors, the file's sha256 or a future of it, mapped?): mapped read-only where ``maps``, else read once."""
    from prunecli.checkpoint.safetensors_io import map_safetensors_hashed, read_safetensors_hashed

    mapped = map_safetensors_hashed(header) if maps else None
    if mapped is not None:
        return mapped[0], mapped[1], True
    tensors, sha = read_safetensors_hashed(header)
    return tensors, sha, False


def _fast(manifest: Any, source: Any, tensors: dict[str, Any], table: Any, mapped: bool, sha: Any) -> FastInput:
    """The FastInput; a digest already known (``str``) is the input's at once (a scores file is checked against it)."""
    from prunecli.checkpoint.hashing import remember_sha256
    from prunecli.checkpoint.loaders import Loaded

    if isinstance(sha, str):
        remember_sha256(source.weights, sha)
        return FastInput(Loaded(None, manifest, source, _sha=sha), tensors, table, mapped=mapped)  # type: ignore[arg-type]
    return FastInput(Loaded(None, manifest, source), tensors, table, mapped=mapped, sha=sha)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ third-party files


class _Known:
    """timm's answers as a cache entry recorded them (:class:`prunecli.checkpoint.loaders.Registry`)."""

    def __init__(self, default_cfg: dict[str, Any] | None) -> None:
        self.default_cfg = default_cfg

    def check(self, name: str) -> None:
        pass  # the entry's key names the architecture; it was a registered one when the entry was built

    def pretrained_cfg(self, name: str) -> dict[str, Any]:
        if self.default_cfg is None:
            raise _Unusable("the entry has no default pretrained_cfg")
        return dict(self.default_cfg)


class _Unusable(Exception):
    """A cache entry that does not describe this input (it is rebuilt)."""


@dataclasses.dataclass(frozen=True)
class _Described:
    """A third-party input as far as its manifest and its table depend on it, before its weights are read.

    ``shapes``: name → tensor of the state's shapes (the read tensors of a torch file; meta tensors from
    the header of a safetensors file, which is then only read once its table is known).
    """

    source: Any
    opts: Any  # LoadOptions
    config: dict[str, Any] | None
    file_arch: str | None
    structure: list[tuple[str, str, tuple[int, ...]]]  # (name, safetensors dtype, shape)
    shapes: dict[str, Any]

    @property
    def name(self) -> str | None:
        """The architecture as the model path resolves it (``--arch``, the folder's, the train.py file's)."""
        from prunecli.checkpoint.loaders import folder_arch

        if self.config is not None:
            return folder_arch(self.source, self.opts, self.config)
        return self.opts.arch or self.file_arch

    def manifest(self, registry: Any) -> Any:
        """The manifest the model path's loader computes (:mod:`prunecli.checkpoint.loaders`), asking ``registry``."""
        from prunecli.checkpoint.loaders import bare_manifest, folder_manifest

        if self.config is not None:
            return folder_manifest(self.source, self.opts, self.config, registry)
        return bare_manifest(self.source, self.opts, self.shapes, self.file_arch, registry)


def _third_party_input(source: Any, run: _Run) -> FastInput | None:
    """A timm folder, a train.py file or a bare state dict: the table from the cache, or built once and cached.

    The tensors are read as for a prunecli file (safetensors mapped or read once, torch files with
    ``weights_only=True``), the manifest is computed by the loaders' own functions
    (:func:`~prunecli.checkpoint.loaders.folder_manifest`, :func:`~prunecli.checkpoint.loaders.bare_manifest`)
    with timm's two answers taken from the entry. On a miss the model path's loader rebuilds the model
    once (timm) and the table is built from it exactly as the model path's save builds it; for a
    safetensors file this happens before the file is mapped, so a miss holds no more memory than the
    model path. Any error of the input returns None: the model path then reports it, in its own words
    and order.
    """
    from prunecli.checkpoint.loaders import check_finite, read_folder_config
    from prunecli.errors import PrunecliError

    run.check_output(source)
    sha: Any = None
    try:
        # the model path refuses a bad config.json before reading any weight
        config = read_folder_config(source) if source.kind is SourceKind.HF_FOLDER else None
        header = source.header
        if header is not None:
            if any(t.dtype in _FLOAT_DTYPES and t.dtype != "F32" for t in header.tensors):
                return None
            structure = [(t.name, t.dtype, tuple(t.shape)) for t in header.tensors]
            found = _table_for(_Described(source, run.load_options, config, None, structure, _meta(structure)), run)
            if found is None:
                return None
            tensors, sha, mapped = _read_safetensors(header, run.maps, source.weights)
        else:
            read = _read_torch(source, run)
            if read is None:
                return None
            tensors, sha, file_arch = read
            mapped = False
            structure = _structure(tensors)
            found = _table_for(_Described(source, run.load_options, config, file_arch, structure, tensors), run)
            if found is None:
                return None
        check_finite(tensors, source.spec)
    except PrunecliError as exc:
        _LOG.debug("fast path: %s; the model path reads %s", exc, source.spec)
        _settle(sha)
        return None
    manifest, table = found
    return _fast(manifest, source, tensors, table, mapped, sha)


def _settle(sha: Any) -> None:
    """Waits for the input's hashing thread (an abandoned mapping must not be hashed behind the model path)."""
    if sha is not None and not isinstance(sha, str):
        sha.result()


def _meta(structure: list[tuple[str, str, tuple[int, ...]]]) -> dict[str, Any]:
    """Tensors of the state's shapes and no data (what the manifest reads of a bare state dict: the head's width)."""
    import torch

    from prunecli.checkpoint.safetensors_io import ST_DTYPES

    dtypes = {v: k for k, v in ST_DTYPES.items()}
    return {n: torch.empty(shape, dtype=dtypes.get(dt, torch.uint8), device="meta") for n, dt, shape in structure}


def _read_torch(source: Any, run: _Run) -> tuple[dict[str, Any], str, str | None] | None:
    """(tensors, the file's sha256, the file's own architecture name) of a torch file, or None (not float32)."""
    from concurrent.futures import ThreadPoolExecutor

    from prunecli.checkpoint.hashing import hash_file
    from prunecli.checkpoint.loaders import read_torch_state, read_weights

    with ThreadPoolExecutor(1, thread_name_prefix="prunecli-sha256") as pool:
        future = pool.submit(hash_file, source.weights)  # the input's digest, hashed while torch reads it
        try:
            if source.kind is SourceKind.TORCH:
                sd, file_arch = read_torch_state(source, run.load_options)
            else:
                sd, file_arch = read_weights(source.weights), None
        finally:
            sha = future.result()
    if not _plain_float32(sd):
        return None
    return sd, sha, file_arch


def _plain_float32(sd: dict[str, Any]) -> bool:
    """Tensors the fast path can write as the model path would: float32 (no conversion), no shared memory
    (the model path's table refuses tied tensors; a file may tie what its architecture does not), storable."""
    import torch

    from prunecli.checkpoint.safetensors_io import ST_DTYPES

    seen: set[int] = set()
    for t in sd.values():
        if (t.is_floating_point() and t.dtype != torch.float32) or t.dtype not in ST_DTYPES:
            return False
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                return False
            seen.add(ptr)
    return True


def _structure(tensors: dict[str, Any]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every tensor: the state's structure (the key's digest, the checks)."""
    from prunecli.checkpoint.safetensors_io import ST_DTYPES

    return [(n, ST_DTYPES[t.dtype], tuple(t.shape)) for n, t in tensors.items()]


_WHY = {
    "stale": "its key is not this input's",
    "tampered": "its content does not match its digest",
    "invalid": "it does not describe this input",
}


def _table_for(d: _Described, run: _Run) -> tuple[Any, Any] | None:
    """(the manifest the model path would build, with its layer table; the parsed table), or None → model path."""
    from prunecli.checkpoint import table_cache

    name = d.name
    if not name:
        return None  # the model path says what is missing
    key = table_cache.cache_key(
        kind=d.source.kind.value, arch=name, num_classes=d.opts.num_classes, ema=d.opts.ema, config=d.config,
        structure=table_cache.structure_digest(d.structure),
    )  # fmt: skip
    folder = table_cache.cache_dir(run.no_cache)
    entry, found = table_cache.read_entry(folder, key) if folder is not None else (None, "off")
    where = str(table_cache.entry_path(folder, key)) if folder is not None else "layer-table cache"
    if entry is not None:
        try:
            result = _from_entry(d, entry, where)
        except _Unusable as why:
            _LOG.debug("layer-table cache: %s: %s", where, why)
            found = "invalid"
        else:
            _LOG.debug("layer-table cache: hit %s", where)
            return result
    if found in _WHY:
        _LOG.warning("layer-table cache entry %s is %s (%s); rebuilt", where, found, _WHY[found])
    entry = _build_entry(d)
    if entry is None:
        return None
    if folder is not None:
        table_cache.write_entry(folder, key, entry)
    try:
        return _from_entry(d, entry, where)
    except _Unusable as why:  # pragma: no cover - an entry just built from this input describes it
        _LOG.debug("fast path: the built entry does not describe %s (%s)", d.source.spec, why)
        return None


def _from_entry(d: _Described, entry: Any, where: str) -> tuple[Any, Any] | None:
    """The manifest and table an entry gives for this input, checked as a checkpoint's own table is.

    Returns None where the entry says that no exact table exists (the model path, without a rebuild).

    Raises:
        _Unusable: the entry contradicts the tensors (a table a checkpoint could not carry, or one that
            does not fit the state), or lacks an answer this input needs.
    """
    from prunecli.checkpoint.header import SafetensorsHeader, TensorInfo
    from prunecli.checkpoint.validate import check_manifest
    from prunecli.errors import CheckpointError
    from prunecli.layertable import LayerTable

    manifest = d.manifest(_Known(entry.default_cfg))
    if entry.layer_table is None:
        return None
    manifest = dataclasses.replace(manifest, layer_table=entry.layer_table)
    infos = tuple(TensorInfo(n, dt, shape, 0, 0) for n, dt, shape in d.structure)
    try:
        check_manifest(manifest, SafetensorsHeader(Path(where), infos, {}, 0, 0), where=where)
    except CheckpointError as exc:
        raise _Unusable(str(exc)) from None
    table = LayerTable.parse(entry.layer_table)
    if table is None or not table.fits({n: shape for n, _, shape in d.structure}):
        raise _Unusable("the table does not fit the tensors")
    return manifest, table


def _build_entry(d: _Described) -> Any:
    """timm's answers for this input: the model rebuilt by the model path's own loader (meta device, the
    file's weights assigned), its layer table built as the model path's save builds it, and the default
    pretrained_cfg where the input has none. None where the entry would not reproduce that manifest."""
    from prunecli.checkpoint.loaders import TIMM, load_checkpoint
    from prunecli.checkpoint.table_cache import CacheEntry
    from prunecli.layertable import build_layer_table

    opts, config = d.opts, d.config
    loaded = load_checkpoint(
        d.source.spec, arch=opts.arch, num_classes=opts.num_classes, ema=opts.ema, source=d.source
    )  # raises what the model path raises
    needs_default = config is None or not config.get("pretrained_cfg")
    default_cfg = TIMM.pretrained_cfg(str(d.name)) if needs_default else None
    table = build_layer_table(loaded.model, loaded.manifest, loaded.model.state_dict())
    if d.manifest(_Known(default_cfg)) != loaded.manifest:  # pragma: no cover - both from the loaders' functions
        _LOG.debug("fast path: the cached answers would not reproduce the manifest of %s", d.source.spec)
        return None
    return CacheEntry(default_cfg, table)


_Reader = Callable[[Any, _Run], "FastInput | None"]

_READERS: dict[SourceKind, _Reader] = {
    SourceKind.PRUNECLI: _prunecli_input,
    SourceKind.HF_FOLDER: _third_party_input,
    SourceKind.SAFETENSORS: _third_party_input,
    SourceKind.TORCH: _third_party_input,
}
"""The fast path's reader per kind of CKPT; ``timm:`` and ``arch:`` sources take the model path."""


_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4"})

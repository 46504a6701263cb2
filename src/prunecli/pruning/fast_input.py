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


def _third_party_input(source: Any, run: _Run) -> FastInput | None:
    """A timm folder, a train.py file or a bare state dict: the table from the cache, or built once and cached.

    The tensors are read as for a prunecli file (safetensors mapped or read once, torch files with
    ``weights_only=True``), the manifest is computed by the loaders' own functions
    (:func:`~prunecli.checkpoint.loaders.folder_manifest`, :func:`~prunecli.checkpoint.loaders.bare_manifest`)
    with timm's two answers taken from the entry. On a miss the model path's loader rebuilds the model
    once (timm) and the table is built from it exactly as the model path's save builds it. Any error
    of the input returns None: the model path then reports it, in its own words and order.
    """
    from prunecli.checkpoint.loaders import read_folder_config
    from prunecli.errors import PrunecliError

    run.check_output(source)
    read: tuple[dict[str, Any], Any, bool, str | None] | None = None
    try:
        # the model path refuses a bad config.json before reading any weight
        config = read_folder_config(source) if source.kind is SourceKind.HF_FOLDER else None
        read = _read_third_party(source, run)
        if read is None:
            return None
        tensors, sha, mapped, file_arch = read
        found = _table_for(source, run, config, tensors, file_arch)
        if found is None:
            _settle(sha)
            return None
        manifest, table = found
    except PrunecliError as exc:
        _LOG.debug("fast path: %s; the model path reads %s", exc, source.spec)
        if read is not None:
            _settle(read[1])
        return None
    return _fast(manifest, source, tensors, table, mapped, sha)


def _settle(sha: Any) -> None:
    """Waits for the input's hashing thread (an abandoned mapping must not be hashed behind the model path)."""
    if sha is not None and not isinstance(sha, str):
        sha.result()


def _read_third_party(source: Any, run: _Run) -> tuple[dict[str, Any], Any, bool, str | None] | None:
    """(tensors, a future of the weights file's sha256, mapped?, the file's own architecture name) or None."""
    from prunecli.checkpoint.loaders import read_torch_state, read_weights

    if source.header is not None:
        if any(t.dtype in _FLOAT_DTYPES and t.dtype != "F32" for t in source.header.tensors):
            return None
        tensors, sha, mapped = _read_safetensors(source.header, run.maps, source.weights)
        return tensors, sha, mapped, None
    from concurrent.futures import ThreadPoolExecutor

    from prunecli.checkpoint.hashing import hash_file

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
    return sd, sha, False, file_arch


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


def _table_for(
    source: Any, run: _Run, config: dict[str, Any] | None, tensors: dict[str, Any], file_arch: str | None
) -> tuple[Any, Any] | None:
    """(the manifest the model path would build, with its layer table; the parsed table), or None → model path."""
    from prunecli.checkpoint import table_cache
    from prunecli.checkpoint.loaders import check_finite, folder_arch

    opts = run.load_options
    name = folder_arch(source, opts, config) if config is not None else (opts.arch or file_arch)
    if not name:
        return None  # the model path says what is missing
    structure = _structure(source, tensors)
    key = table_cache.cache_key(
        kind=source.kind.value, arch=name, num_classes=opts.num_classes, ema=opts.ema, config=config,
        structure=table_cache.structure_digest(structure),
    )  # fmt: skip
    folder = table_cache.cache_dir(run.no_cache)
    entry, found = table_cache.read_entry(folder, key) if folder is not None else (None, "off")
    where = str(table_cache.entry_path(folder, key)) if folder is not None else "layer-table cache"
    if entry is not None:
        try:
            result = _from_entry(source, opts, config, tensors, file_arch, structure, entry, where)
        except _Unusable as why:
            _LOG.debug("layer-table cache: %s: %s", where, why)
            found = "invalid"
        else:
            check_finite(tensors, source.spec)
            _LOG.debug("layer-table cache: hit %s", where)
            return result
    if found in ("stale", "tampered", "invalid"):
        _LOG.warning(
            "layer-table cache entry %s is %s (%s); rebuilt", where, found,
            {"stale": "its key is not this input's", "tampered": "its content does not match its digest",
             "invalid": "it does not describe this input"}[found],
        )  # fmt: skip
    entry = _build_entry(source, opts, config, tensors, file_arch, structure)
    if entry is None:
        return None
    if folder is not None:
        table_cache.write_entry(folder, key, entry)
    try:
        return _from_entry(source, opts, config, tensors, file_arch, structure, entry, where)
    except _Unusable as why:  # pragma: no cover - an entry just built from this input describes it
        _LOG.debug("fast path: the built entry does not describe %s (%s)", source.spec, why)
        return None


def _structure(source: Any, tensors: dict[str, Any]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every tensor: the state's structure (the key's digest, the checks)."""
    if source.header is not None:
        return [(t.name, t.dtype, tuple(t.shape)) for t in source.header.tensors]
    from prunecli.checkpoint.safetensors_io import ST_DTYPES

    return [(n, ST_DTYPES[t.dtype], tuple(t.shape)) for n, t in tensors.items()]


def _manifest(
    source: Any, opts: Any, config: dict[str, Any] | None, tensors: dict[str, Any], file_arch: str | None, registry: Any
) -> Any:
    """The manifest the model path's loader computes (:mod:`prunecli.checkpoint.loaders`), asking ``registry``."""
    from prunecli.checkpoint.loaders import bare_manifest, folder_manifest

    if config is not None:
        return folder_manifest(source, opts, config, registry)
    return bare_manifest(source, opts, tensors, file_arch, registry)


def _from_entry(
    source: Any,
    opts: Any,
    config: dict[str, Any] | None,
    tensors: dict[str, Any],
    file_arch: str | None,
    structure: list[tuple[str, str, tuple[int, ...]]],
    entry: Any,
    where: str,
) -> tuple[Any, Any] | None:
    """The manifest and table an entry gives for this input, checked as a checkpoint's own table is.

    Raises:
        _Unusable: the entry contradicts the tensors (a table a checkpoint could not carry, or one that
            does not fit the state), or lacks an answer this input needs.
    """
    import dataclasses

    from prunecli.checkpoint.header import SafetensorsHeader, TensorInfo
    from prunecli.checkpoint.validate import check_manifest
    from prunecli.errors import CheckpointError
    from prunecli.layertable import LayerTable

    manifest = _manifest(source, opts, config, tensors, file_arch, _Known(entry.default_cfg))
    if entry.layer_table is None:
        return None  # no exact table exists for this model: the model path, without building it again
    manifest = dataclasses.replace(manifest, layer_table=entry.layer_table)
    header = SafetensorsHeader(
        Path(where), tuple(TensorInfo(n, dt, shape, 0, 0) for n, dt, shape in structure), {}, 0, 0
    )
    try:
        check_manifest(manifest, header, where=where)
    except CheckpointError as exc:
        raise _Unusable(str(exc)) from None
    table = LayerTable.parse(entry.layer_table)
    if table is None or not table.fits({n: shape for n, _, shape in structure}):
        raise _Unusable("the table does not fit the tensors")
    return manifest, table


def _build_entry(
    source: Any,
    opts: Any,
    config: dict[str, Any] | None,
    tensors: dict[str, Any],
    file_arch: str | None,
    structure: list[tuple[str, str, tuple[int, ...]]],
) -> Any:
    """timm's answers for this input: the model rebuilt by the model path's own loader (meta device, the
    file's weights assigned), its layer table built as the model path's save builds it, and the default
    pretrained_cfg where the input has none. None where that manifest is not the one the entry reproduces."""
    from prunecli.checkpoint.loaders import TIMM, load_checkpoint
    from prunecli.checkpoint.table_cache import CacheEntry
    from prunecli.layertable import build_layer_table

    loaded = load_checkpoint(
        source.spec, arch=opts.arch, num_classes=opts.num_classes, ema=opts.ema, source=source
    )  # raises what the model path raises
    needs_default = config is None or not config.get("pretrained_cfg")
    default_cfg = TIMM.pretrained_cfg(_arch_name(opts, config, file_arch)) if needs_default else None
    model = loaded.model
    table = build_layer_table(model, loaded.manifest, model.state_dict())
    entry = CacheEntry(default_cfg, table)
    again = _manifest(source, opts, config, tensors, file_arch, _Known(default_cfg))
    if again != loaded.manifest:  # pragma: no cover - the loaders compute both from the same functions
        _LOG.debug("fast path: the cached answers would not reproduce the manifest of %s", source.spec)
        return None
    return entry


def _arch_name(opts: Any, config: dict[str, Any] | None, file_arch: str | None) -> str:
    return str(opts.arch or (config or {}).get("architecture") or file_arch)


_Reader = Callable[[Any, _Run], "FastInput | None"]

_READERS: dict[SourceKind, _Reader] = {
    SourceKind.PRUNECLI: _prunecli_input,
    SourceKind.HF_FOLDER: _third_party_input,
    SourceKind.SAFETENSORS: _third_party_input,
    SourceKind.TORCH: _third_party_input,
}
"""The fast path's reader per kind of CKPT; ``timm:`` and ``arch:`` sources take the model path."""


_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4"})

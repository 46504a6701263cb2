"""prunecli's own metadata is input: every field that changes what is computed is checked against the tensors.

A checkpoint's header carries the manifest (:mod:`prunecli.checkpoint.manifest`): the layer table that
decides which tensors the fast path prunes, the pruned structure that reshapes the rebuilt model, the
masked tensors that fine-tuning keeps at zero, a kept LoRA adapter, and the lineage whose hashes
``restore`` trusts. prunecli writes these consistent with the tensors beside them, so a field that
contradicts them means the file was edited or damaged; the file is then refused, by every command
and before anything is computed, with one line naming the field
(``ckpt.safetensors: prunecli metadata 'masked' is invalid: 'bn1.running_var' is a buffer, not a weight``).
Refusing instead of falling back to the model path is deliberate: the model path reads the same
manifest (structure, masks, adapters), so there is no path that could ignore a forged field safely.

The checks need only the header (names, shapes, dtypes), so they cost nothing next to reading the data.
Torch-free.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from prunecli.checkpoint.header import SafetensorsHeader, TensorInfo
from prunecli.checkpoint.manifest import METADATA_KEY, Manifest
from prunecli.errors import CheckpointError

__all__ = ["LOADER_ARGS", "check_folder_config", "check_manifest", "filter_model_args", "manifest_from_header"]

_FLOATS = frozenset({"F64", "F32", "F16", "BF16"})
_BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")  # BatchNorm statistics
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KIND_NDIM = {"linear": (2,), "conv": (3, 4, 5)}  # Linear weights are 2-D; Conv1d/2d/3d weights 3/4/5-D
# Attributes a pruned structure may set, and the tensor dimension each must equal (module, tensor, dim).
_ATTR_DIMS: dict[str, tuple[str, int]] = {
    "out_channels": ("weight", 0), "out_features": ("weight", 0), "in_features": ("weight", 1),
    "num_features": ("weight", 0),
}  # fmt: skip


class _Bad(Exception):
    """One field that contradicts the tensors: (field path, what is wrong)."""

    def __init__(self, field: str, what: str) -> None:
        super().__init__(field, what)
        self.field, self.what = field, what


def manifest_from_header(header: SafetensorsHeader, *, where: str) -> Manifest:
    """The manifest of a prunecli file, checked against its tensors (:func:`check_manifest`).

    Raises:
        CheckpointError: the metadata is not a manifest, or one of its fields contradicts the tensors.
    """
    manifest = Manifest.from_json(header.metadata[METADATA_KEY], where=where)
    check_manifest(manifest, header, where=where)
    return manifest


def check_manifest(manifest: Manifest, header: SafetensorsHeader, *, where: str) -> None:
    """Refuses a manifest whose fields contradict the tensors of ``header`` (module docstring)."""
    tensors = {t.name: t for t in header.tensors}
    try:
        for name, check in _CHECKS.items():
            check(getattr(manifest, name), tensors, manifest)
    except _Bad as bad:
        raise CheckpointError(
            f"{where}: prunecli metadata '{bad.field}' is invalid: {bad.what}",
            hint="the file was edited or damaged after prunecli wrote it; use the original file",
        ) from None


def _is_weight(name: str, t: TensorInfo | None, field: str) -> TensorInfo:
    """The tensor ``name`` when it is a floating-point weight of the file (never a buffer)."""
    if not isinstance(name, str):
        raise _Bad(field, f"{name!r} is not a tensor name")
    if t is None:
        raise _Bad(field, f"{name!r} is not a tensor of the file")
    if name.endswith(_BUFFER_SUFFIXES):
        raise _Bad(field, f"{name!r} is a buffer, not a weight")
    if t.dtype not in _FLOATS:
        raise _Bad(field, f"{name!r} is a {t.dtype} tensor, not floating-point weights")
    return t


def _check_masked(masked: Any, tensors: Mapping[str, TensorInfo], manifest: Manifest) -> None:
    if not isinstance(masked, list):
        raise _Bad("masked", "not a list of tensor names")
    table = manifest.layer_table if isinstance(manifest.layer_table, Mapping) else {}
    buffers = set(table.get("buffers") or ()) if isinstance(table.get("buffers"), list) else set()
    for name in masked:
        t = _is_weight(name, tensors.get(name) if isinstance(name, str) else None, "masked")
        if name in buffers:
            raise _Bad("masked", f"{name!r} is a buffer, not a weight")
        if len(t.shape) < 2:
            raise _Bad("masked", f"{name!r} of shape {list(t.shape)} is no conv/linear weight")


def _check_layer_table(doc: Any, tensors: Mapping[str, TensorInfo], manifest: Manifest) -> None:
    """The layer table (schema in :mod:`prunecli.layertable`); a table of another version is ignored by readers."""
    if doc is None or not isinstance(doc, Mapping) or doc.get("version") != 1:
        return
    layers, buffers = doc.get("layers"), doc.get("buffers")
    if not isinstance(layers, list) or not isinstance(buffers, list):
        raise _Bad("layer_table", "'layers' and 'buffers' must be lists")
    for b in buffers:
        if not isinstance(b, str) or b not in tensors:
            raise _Bad("layer_table.buffers", f"{b!r} is not a tensor of the file")
    seen: set[str] = set()
    for i, e in enumerate(layers):
        field = f"layer_table.layers[{i}]"
        if not isinstance(e, Mapping):
            raise _Bad(field, "not an object")
        name, kind = e.get("name"), e.get("kind")
        t = _is_weight(name, tensors.get(name) if isinstance(name, str) else None, field)
        if name in seen:
            raise _Bad(field, f"{name!r} is listed twice")
        seen.add(name)
        if name in buffers or not name.endswith(".weight"):
            raise _Bad(field, f"{name!r} is a buffer, not a layer weight")
        if kind not in _KIND_NDIM or len(t.shape) not in _KIND_NDIM[kind]:
            raise _Bad(field, f"{name!r} of shape {list(t.shape)} cannot be a {kind!r} weight")
        shape = e.get("shape")
        if not isinstance(shape, list) or tuple(shape) != t.shape:
            raise _Bad(field, f"shape {shape!r} differs from the file's {list(t.shape)} for {name!r}")
        macs = e.get("macs_per_weight")
        if type(macs) is not int or macs < 0 or not isinstance(e.get("head"), bool):
            raise _Bad(field, "'macs_per_weight' must be a count and 'head' true or false")
    _check_head(layers, manifest)
    size = doc.get("input_size")
    if not isinstance(size, list) or not size or any(type(s) is not int or s <= 0 for s in size):
        raise _Bad("layer_table.input_size", f"{size!r} is not a list of positive sizes")
    nf = doc.get("num_features")
    if nf is not None and (type(nf) is not int or nf <= 0):
        raise _Bad("layer_table.num_features", f"{nf!r} is not a positive count")


def _check_head(layers: list[Any], manifest: Manifest) -> None:
    """The head flags agree with the classifier that ``pretrained_cfg`` names (when it names one the table has)."""
    head = manifest.pretrained_cfg.get("classifier") if isinstance(manifest.pretrained_cfg, Mapping) else None
    names = {head} if isinstance(head, str) else {h for h in (head or ()) if isinstance(h, str)}
    modules = {e["name"].removesuffix(".weight") for e in layers}
    if not names & modules:
        return  # the classifier was found another way (get_classifier, or the last layer)
    for i, e in enumerate(layers):
        if e["head"] != (e["name"].removesuffix(".weight") in names):
            raise _Bad(f"layer_table.layers[{i}]", f"'head' of {e['name']!r} contradicts pretrained_cfg.classifier")


MAX_COMPUTED_NUMEL = 1 << 24
"""Elements of one buffer a module computes after a rebuild (``BlurPool2d``: channels · k²; a few 10⁵)."""


def _check_structure(doc: Any, tensors: Mapping[str, TensorInfo], manifest: Manifest) -> None:
    """Every reshaped tensor of the pruned structure is a tensor of the file with that shape; the
    attributes it sets are plain numbers that agree with those shapes."""
    if doc is None:
        return
    if not isinstance(doc, Mapping) or not isinstance(doc.get("modules", {}), Mapping):
        raise _Bad("structure", "not an object with 'modules'")
    for module, entry in doc.get("modules", {}).items():
        field = f"structure.modules[{module!r}]"
        if not isinstance(entry, Mapping):
            raise _Bad(field, "not an object")
        for kind in ("params", "buffers"):
            for tname, shape in (entry.get(kind) or {}).items():
                full = f"{module}.{tname}" if module else str(tname)
                t = tensors.get(full)
                if t is None:
                    raise _Bad(field, f"{full!r} is not a tensor of the file")
                if not isinstance(shape, list) or tuple(shape) != t.shape:
                    raise _Bad(field, f"shape {shape!r} of {full!r} differs from the file's {list(t.shape)}")
        computed = entry.get("computed") or {}
        if not isinstance(computed, Mapping):
            raise _Bad(field, "'computed' is not an object")
        for bname, shape in computed.items():
            if not isinstance(bname, str) or not bname.isidentifier() or bname.startswith("_"):
                raise _Bad(field, f"computed buffer {bname!r} is not a buffer name")
            if f"{module}.{bname}" in tensors or bname in tensors:
                raise _Bad(field, f"computed buffer {bname!r} is a tensor of the file")
            if (
                not isinstance(shape, list)
                or len(shape) > 8
                or not all(type(d) is int and d >= 0 for d in shape)
                or math.prod(shape) > MAX_COMPUTED_NUMEL
            ):
                raise _Bad(field, f"computed buffer {bname!r}: shape {shape!r} is not 8 sizes or fewer, 2**24 elements")
        for attr, value in (entry.get("attrs") or {}).items():
            if not isinstance(attr, str) or not attr.isidentifier() or attr.startswith("_"):
                raise _Bad(field, f"attribute {attr!r} is not one a pruned structure sets")
            if not _plain(value):
                raise _Bad(field, f"attribute {attr!r} = {value!r} is not a number or a list of numbers")
            if attr in _ATTR_DIMS and type(value) is int:
                tname, dim = _ATTR_DIMS[attr]
                t = tensors.get(f"{module}.{tname}" if module else tname)
                if t is not None and len(t.shape) > dim and t.shape[dim] != value:
                    raise _Bad(field, f"{attr} = {value} but {t.name!r} has {t.shape[dim]} along dimension {dim}")


def _plain(value: Any) -> bool:
    if isinstance(value, (bool, int, float)):
        return True
    return isinstance(value, list) and all(_plain(v) for v in value)


def _check_adapters(doc: Any, tensors: Mapping[str, TensorInfo], manifest: Manifest) -> None:
    """A kept adapter lives in a folder beside the checkpoint, named relative to it, with a recorded hash."""
    if doc is None:
        return
    if not isinstance(doc, Mapping):
        raise _Bad("adapters", "not an object")
    path = doc.get("path")
    if not isinstance(path, str) or not path:
        raise _Bad("adapters.path", "no adapter folder named")
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or "\\" in path:
        raise _Bad("adapters.path", f"{path!r} is not a folder beside the checkpoint")
    sha = doc.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise _Bad("adapters.sha256", f"{sha!r} is not a sha256 digest")
    if manifest.layer_table is not None:
        raise _Bad("layer_table", "a checkpoint with a kept adapter never has a layer table")


def _check_lineage(doc: Any, tensors: Mapping[str, TensorInfo], manifest: Manifest) -> None:
    """Lineage entries are objects; the input digests that ``restore`` checks its parent against are sha256s."""
    if not isinstance(doc, list):
        raise _Bad("lineage", "not a list of steps")
    for i, step in enumerate(doc):
        if not isinstance(step, Mapping):
            raise _Bad(f"lineage[{i}]", "not an object")
        sha, inp = step.get("input_sha256"), step.get("input")
        if sha is not None and (not isinstance(sha, str) or not _SHA256.fullmatch(sha)):
            raise _Bad(f"lineage[{i}].input_sha256", f"{sha!r} is not a sha256 digest")
        if inp is not None and not isinstance(inp, str):
            raise _Bad(f"lineage[{i}].input", f"{inp!r} is not a path")


def _check_model_args(doc: Any, tensors: Mapping[str, TensorInfo], manifest: Manifest) -> None:
    if not isinstance(doc, Mapping):
        raise _Bad("model_args", "not an object")


# Keyword arguments of ``timm.create_model`` and ``timm.models.build_model_with_cfg`` that load files,
# fetch weights or change what is built beyond the architecture's own constructor arguments.
LOADER_ARGS = frozenset({
    "model_name", "model_cls", "variant", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
    "cache_dir", "scriptable", "exportable", "no_jit", "model_cfg", "feature_cfg", "pretrained_strict",
    "pretrained_filter_fn", "kwargs_filter", "pretrained_model_args", "features_only", "out_indices", "feature_cls",
    "output_stride_features",
})  # fmt: skip


def _path_like(value: Any) -> bool:
    """A string that names a file (a separator, ``~`` or a URL), anywhere inside ``value``."""
    if isinstance(value, str):
        return "/" in value or "\\" in value or value.startswith("~") or ":" in value
    if isinstance(value, Mapping):
        return any(_path_like(k) or _path_like(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_path_like(v) for v in value)
    return False


def filter_model_args(args: Mapping[str, Any], *, where: str) -> tuple[dict[str, Any], list[str]]:
    """The architecture arguments of ``args`` (a manifest's or a folder's ``model_args``), and a warning for
    each one dropped: loader options (:data:`LOADER_ARGS`) and values that name files never reach timm.
    """
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in args.items():
        if not isinstance(key, str) or not key.isidentifier() or key in LOADER_ARGS:
            dropped.append(f"{where}: model_args {key!r} ignored: a loader option, not an architecture argument")
        elif _path_like(value):
            dropped.append(f"{where}: model_args {key!r} ignored: its value names a file ({value!r})")
        else:
            kept[key] = value
    return kept, dropped


def _check_pretrained_cfg(doc: Any, tensors: Mapping[str, TensorInfo], manifest: Manifest) -> None:
    if not isinstance(doc, Mapping):
        raise _Bad("pretrained_cfg", "not an object")


def _check_num_classes(doc: Any, tensors: Mapping[str, TensorInfo], manifest: Manifest) -> None:
    if doc is not None and (type(doc) is not int or doc < 1):
        raise _Bad("num_classes", f"{doc!r} is not a positive count")


# config.json key of a timm folder → (accepted JSON types, what it must be).
_FOLDER_CONFIG: dict[str, tuple[tuple[type, ...], str]] = {
    "architecture": ((str, type(None)), "a model name"),
    "num_classes": ((int, type(None)), "a count"),
    "pretrained_cfg": ((dict, type(None)), "an object"),
    "model_args": ((dict, type(None)), "an object"),
}


def check_folder_config(config: Any, where: str) -> dict[str, Any]:
    """A timm folder's ``config.json`` (parsed): an object whose known keys have the types timm writes.

    Raises:
        CheckpointError: naming the key (or saying the file is not an object).
    """
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: config.json is not a JSON object (found a {type(config).__name__})")
    for key, (types, what) in _FOLDER_CONFIG.items():
        value = config.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            raise CheckpointError(f"{where}: config.json {key!r} must be {what}, not {value!r}")
    return config


# Manifest field → its check, run in this order (the masked check reads the table's buffer list).
_CHECKS = {
    "num_classes": _check_num_classes,
    "pretrained_cfg": _check_pretrained_cfg,
    "model_args": _check_model_args,
    "layer_table": _check_layer_table,
    "masked": _check_masked,
    "structure": _check_structure,
    "adapters": _check_adapters,
    "lineage": _check_lineage,
}

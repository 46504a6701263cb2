"""Load any supported checkpoint (docs/checkpoints.md) into a timm model: one loader per :class:`SourceKind`.

:data:`LOADERS` maps each kind of source to the function that turns it into a :class:`Loaded` model,
and :data:`STATE_LOADERS` each kind of weights file to the function that reads its state dict and
manifest; adding a source kind means adding a row to each table, not a branch to a chain.

Weights are never unpickled with arbitrary code: torch files go through ``torch.load(...,
weights_only=True)`` with one extra allowlisted global (``argparse.Namespace``, which timm's
``train.py`` stores as ``args``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from prunecli.checkpoint.hashing import file_sha256
from prunecli.checkpoint.hf_cache import hf_repo_folder, hf_snapshot
from prunecli.checkpoint.manifest import Manifest
from prunecli.checkpoint.safetensors_io import read_safetensors
from prunecli.checkpoint.sources import Source, SourceKind, resolve_source
from prunecli.checkpoint.validate import check_folder_config, manifest_from_header
from prunecli.errors import CheckpointError

__all__ = [
    "LOADERS", "STATE_LOADERS", "TIMM", "LoadOptions", "Loaded", "Registry", "bare_manifest", "check_finite",
    "folder_arch", "folder_manifest", "load_checkpoint", "load_state_dict", "read_folder_config", "read_torch_state",
    "read_weights",
]  # fmt: skip


@dataclass
class Loaded:
    """A model rebuilt from a checkpoint, with what it was rebuilt from.

    Attributes:
        model: the timm model in eval mode, on CPU, float32.
        manifest: architecture, configs, masks and lineage.
        source: the resolved CKPT argument.
    """

    model: nn.Module
    manifest: Manifest
    source: Source
    _sha: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str | None:
        """sha256 of the weights file, or None for ``timm:``/``arch:`` sources."""
        if self._sha is None and self.source.weights is not None:
            self._sha = file_sha256(self.source.weights)
        return self._sha


@dataclass(frozen=True)
class LoadOptions:
    """The CKPT options a loader may use (each kind of source uses the ones that apply to it)."""

    arch: str | None = None
    num_classes: int | None = None
    model_args: Mapping[str, Any] | None = None
    ema: bool = False


# ----------------------------------------------------------------------------------------- readers


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError from zip reader, EOFError, …
        text = str(exc).strip()
        glob = re.search(r"GLOBAL\s+([\w.]+)", text)
        if glob or "weights_only" in text or "Weights only load failed" in text:
            detail = f" ({glob.group(1).rstrip('.')})" if glob else ""
            raise CheckpointError(
                f"{path}: refused to unpickle: the file references a global that is not allowlisted{detail}",
                hint="prunecli loads torch files with weights_only=True; convert the weights to safetensors",
            ) from None
        first = text.splitlines()[0] if text else exc.__class__.__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({first[:160]})") from None


def _strip_prefix(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"entry {k!r} of the state dict is a {type(v).__name__}, not a tensor")
        out[k[7:] if k.startswith("module.") else k] = v
    return out


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A weights file of a folder or the hub cache: safetensors, else a torch state dict."""
    return read_safetensors(path) if path.suffix == ".safetensors" else _strip_prefix(_torch_load(path))


def _num_classes_from(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]) -> int | None:
    head = cfg.get("classifier")
    names = [head] if isinstance(head, str) else list(head or [])
    for n in names:
        w = sd.get(f"{n}.weight")
        if w is not None and w.ndim >= 1:
            return int(w.shape[0])
    return None


def _is_timm_model(name: str) -> bool:
    import timm

    import prunecli.archs  # noqa: F401  (improved_cnn, fc_mlp)

    return bool(timm.is_model(name.partition(".")[0]))


def check_finite(sd: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuses NaN/inf weights. A finite sum proves every element finite (NaN and ±inf propagate through
    additions), at a fraction of ``isfinite``'s cost; only a non-finite sum (possibly an overflow) is
    checked element by element."""
    for name, t in sd.items():
        if not t.is_floating_point() or math.isfinite(float(t.sum())):
            continue
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{where}: tensor {name!r} holds NaN or infinite values")


# ----------------------------------------------------------------------------------------- state dicts

StateLoader = Callable[[Source, LoadOptions], tuple[dict[str, torch.Tensor], Manifest]]


def _prunecli_state(source: Source, opts: LoadOptions) -> tuple[dict[str, torch.Tensor], Manifest]:
    """A self-describing prunecli safetensors: the manifest is in its header."""
    assert source.header is not None and source.weights is not None
    manifest = manifest_from_header(source.header, where=source.spec)  # its fields checked against the tensors
    return read_safetensors(source.weights), manifest


class Registry(Protocol):
    """timm's two answers that a third-party file's manifest needs (:data:`TIMM`; the layer-table cache
    answers them from an entry on the fast path, :mod:`prunecli.checkpoint.table_cache`)."""

    def check(self, name: str) -> None:
        """Raises UnknownNameError unless ``name`` (``arch[.tag]``) is a registered architecture."""
        ...

    def pretrained_cfg(self, name: str) -> dict[str, Any]:
        """The architecture's default ``pretrained_cfg`` (for inputs that do not carry their own)."""
        ...


class _Timm:
    def check(self, name: str) -> None:
        from prunecli.models import split_arch

        split_arch(name)

    def pretrained_cfg(self, name: str) -> dict[str, Any]:
        from prunecli.models import default_pretrained_cfg

        return default_pretrained_cfg(name)


TIMM: Registry = _Timm()
"""The registry the model path asks (imports timm)."""


def read_folder_config(source: Source) -> dict[str, Any]:
    """A timm folder's ``config.json``, read and checked (torch- and timm-free)."""
    assert source.folder is not None
    try:
        config = json.loads((source.folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{source.folder / 'config.json'}: unreadable ({exc.__class__.__name__})") from None
    return check_folder_config(config, source.spec)


def folder_arch(source: Source, opts: LoadOptions, config: Mapping[str, Any]) -> str:
    """The architecture a folder is built as: ``--arch``, else its ``config.json``'s."""
    name = opts.arch or config.get("architecture")
    if not name:
        raise CheckpointError(f"{source.spec}: config.json names no 'architecture'", hint="pass --arch")
    return str(name)


def folder_manifest(source: Source, opts: LoadOptions, config: Mapping[str, Any], registry: Registry) -> Manifest:
    """The manifest of a timm Hugging Face folder: ``config.json`` names the architecture and its configs."""
    name = folder_arch(source, opts, config)
    registry.check(name)
    base = name.partition(".")[0]
    cfg = dict(config.get("pretrained_cfg") or registry.pretrained_cfg(name))
    n = opts.num_classes or config.get("num_classes") or cfg.get("num_classes")
    return Manifest(base, n, dict(config.get("model_args") or {}), cfg)


def bare_manifest(
    source: Source, opts: LoadOptions, sd: Mapping[str, torch.Tensor], file_arch: str | None, registry: Registry
) -> Manifest:
    """The manifest of a state dict that does not describe itself: ``--arch`` (or the file's own arch name) decides."""
    name = opts.arch or file_arch
    if not name:
        raise CheckpointError(
            f"{source.spec}: a bare state dict does not say its architecture",
            hint="pass --arch NAME (and --num-classes N if the head differs from the default)",
        )
    registry.check(name)
    base = name.partition(".")[0]
    cfg = registry.pretrained_cfg(name)
    n = opts.num_classes or _num_classes_from(sd, cfg) or cfg.get("num_classes")
    return Manifest(base, n, {}, cfg)


def _hf_folder_state(source: Source, opts: LoadOptions) -> tuple[dict[str, torch.Tensor], Manifest]:
    """A timm Hugging Face folder: the manifest from ``config.json``, then the weights."""
    assert source.folder is not None and source.weights is not None
    manifest = folder_manifest(source, opts, read_folder_config(source), TIMM)
    return read_weights(source.weights), manifest


def _bare_safetensors(source: Source, opts: LoadOptions) -> tuple[dict[str, torch.Tensor], str | None]:
    """A bare safetensors state dict: tensors only, no architecture."""
    assert source.weights is not None
    return read_safetensors(source.weights), None


def read_torch_state(source: Source, opts: LoadOptions) -> tuple[dict[str, torch.Tensor], str | None]:
    """A torch state dict, or a timm ``train.py`` checkpoint (which also names its architecture)."""
    assert source.weights is not None
    obj = _torch_load(source.weights)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source.spec}: expected a state dict, found a {type(obj).__name__}")
    file_arch = None
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):  # timm train.py layout
        args = obj.get("args")
        file_arch = getattr(args, "model", None) if args is not None else None
        if not file_arch and isinstance(obj.get("arch"), str) and _is_timm_model(obj["arch"]):
            file_arch = obj["arch"]  # older train.py files: "arch" is the model name
        key = "state_dict_ema" if opts.ema else "state_dict"
        if obj.get(key) is None:
            raise CheckpointError(f"{source.spec}: --ema given but the checkpoint has no 'state_dict_ema'")
        obj = obj[key]
    elif opts.ema:
        raise CheckpointError(f"{source.spec}: --ema needs a timm train.py checkpoint with 'state_dict_ema'")
    return _strip_prefix(obj), file_arch


def _bare_state(
    read: Callable[[Source, LoadOptions], tuple[dict[str, torch.Tensor], str | None]],
    source: Source,
    opts: LoadOptions,
) -> tuple[dict[str, torch.Tensor], Manifest]:
    """A state dict that does not describe itself (:func:`bare_manifest`)."""
    sd, file_arch = read(source, opts)
    return sd, bare_manifest(source, opts, sd, file_arch, TIMM)


STATE_LOADERS: dict[SourceKind, StateLoader] = {
    SourceKind.PRUNECLI: _prunecli_state,
    SourceKind.HF_FOLDER: _hf_folder_state,
    SourceKind.SAFETENSORS: functools.partial(_bare_state, _bare_safetensors),
    SourceKind.TORCH: functools.partial(_bare_state, read_torch_state),
}


def load_state_dict(
    source: Source, *, arch: str | None = None, num_classes: int | None = None, ema: bool = False
) -> tuple[dict[str, torch.Tensor], Manifest]:
    """Reads the weights and the manifest of a file or folder source (not ``timm:``/``arch:``)."""
    assert source.weights is not None
    return STATE_LOADERS[source.kind](source, LoadOptions(arch, num_classes, None, ema))


# ----------------------------------------------------------------------------------------- models

Loader = Callable[[Source, LoadOptions], Loaded]


def _load_fresh(source: Source, opts: LoadOptions) -> Loaded:
    """``arch:NAME``: timm's fresh initialisation, no weights read."""
    from prunecli.models import create_fresh, default_pretrained_cfg, split_arch

    assert source.name is not None
    base, _ = split_arch(source.name)
    cfg = default_pretrained_cfg(source.name)
    n = opts.num_classes or cfg.get("num_classes")
    manifest = Manifest(base, n, dict(opts.model_args or {}), cfg)
    return Loaded(create_fresh(manifest).float().eval(), manifest, source)


def _load_timm_cache(source: Source, opts: LoadOptions) -> Loaded:
    """``timm:NAME[.TAG]``: timm's pretrained weights read straight from the local HF cache.

    The cache is read by hand (:mod:`prunecli.checkpoint.hf_cache`, never through the hub client), so
    nothing is downloaded whatever the network or ``HF_HUB_OFFLINE`` say, and the weights go through
    the same safe readers, NaN check and meta-device rebuild as every other checkpoint.
    """
    from prunecli.models import build_model, default_pretrained_cfg, split_arch

    assert source.name is not None
    num_classes = opts.num_classes
    base, _ = split_arch(source.name)
    cfg = default_pretrained_cfg(source.name)
    repo_id = cfg.get("hf_hub_id")
    if not repo_id:
        raise CheckpointError(f"{source.spec}: timm has no Hugging Face weights for {source.name!r}")
    snap = hf_snapshot(repo_id)
    names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
    weights = next((snap / n for n in names if snap is not None and (snap / n).is_file()), None)
    if weights is None:
        raise CheckpointError(
            f"{source.spec}: pretrained weights are not in the local Hugging Face cache ({hf_repo_folder(repo_id)})",
            hint=f"download them once on a connected machine (timm.create_model({source.name!r}, pretrained=True)), "
            "set HF_HUB_CACHE/HF_HOME, or pass a file or folder",
        )
    config: dict[str, Any] = {}
    if (weights.parent / "config.json").is_file():
        try:
            config = check_folder_config(json.loads((weights.parent / "config.json").read_text()), source.spec)
        except (OSError, json.JSONDecodeError, CheckpointError):
            config = {}  # the hub's config is optional here: timm's own pretrained_cfg decides
    sd = read_weights(weights)
    n = _num_classes_from(sd, cfg) or config.get("num_classes") or cfg.get("num_classes")
    if num_classes and num_classes != n:
        raise CheckpointError(
            f"{source.spec} has {n} classes, --num-classes says {num_classes}",
            hint="drop --num-classes; to train a new head start from arch:NAME --num-classes N",
        )
    model_args = {k: v for k, v in dict(config.get("model_args") or {}).items() if k != "num_classes"}
    manifest = Manifest(base, n, model_args, {k: v for k, v in cfg.items() if k not in ("file", "state_dict")})
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    check_finite(sd, source.spec)
    return Loaded(build_model(manifest, sd), manifest, source)


def _load_weights(source: Source, opts: LoadOptions) -> Loaded:
    """A file or folder: its state dict (:data:`STATE_LOADERS`), rebuilt on the meta device, plus a kept adapter."""
    from prunecli.models import build_model

    sd, manifest = STATE_LOADERS[source.kind](source, opts)
    if opts.model_args:
        manifest.model_args.update(opts.model_args)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    check_finite(sd, source.spec)
    model = build_model(manifest, sd)
    if manifest.adapters:  # finetune-lora --merge none: the LoRA adapter kept beside the weights
        from prunecli.checkpoint.adapters import attach_adapters

        model = attach_adapters(model, manifest.adapters, source.path or source.spec)
    return Loaded(model, manifest, source)


LOADERS: dict[SourceKind, Loader] = {
    SourceKind.ARCH: _load_fresh,
    SourceKind.TIMM: _load_timm_cache,
    **{kind: _load_weights for kind in STATE_LOADERS},
}


def load_checkpoint(
    spec: str,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    model_args: Mapping[str, Any] | None = None,
    ema: bool = False,
    source: Source | None = None,
) -> Loaded:
    """Loads any supported CKPT (docs/checkpoints.md) into a float32 timm model on CPU, in eval mode.

    Example:
        >>> loaded = load_checkpoint("base.safetensors")
        >>> loaded.model(torch.randn(1, 3, 32, 32)).shape
    """
    source = source or resolve_source(spec)
    return LOADERS[source.kind](source, LoadOptions(arch, num_classes, model_args, ema))

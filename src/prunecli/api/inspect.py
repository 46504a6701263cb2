"""``prunecli inspect``: describe a checkpoint from its header alone when the format allows it.

Safetensors checkpoints (prunecli files, timm folders, bare files) are described without importing
torch or building the model: counts come from the header, sparsity from the raw bytes through numpy.
Other forms (``.pth``, ``timm:``, ``arch:``) are loaded.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from prunecli.checkpoint.header import SafetensorsHeader, TensorInfo
from prunecli.checkpoint.sources import SourceKind, resolve_source
from prunecli.checkpoint.validate import check_folder_config, manifest_from_header
from prunecli.counting import TensorCount, count_model, count_tensors, is_buffer
from prunecli.errors import CheckpointError
from prunecli.record import Result
from prunecli.requests import InspectRequest

__all__ = ["inspect"]

# numpy views whose all-zero bit pattern (ignoring the sign bit for floats) means value zero.
_ZERO_VIEWS = {
    "F64": ("<u8", 0x7FFF_FFFF_FFFF_FFFF), "F32": ("<u4", 0x7FFF_FFFF), "F16": ("<u2", 0x7FFF),
    "BF16": ("<u2", 0x7FFF), "I64": ("<i8", None), "I32": ("<i4", None), "I16": ("<i2", None),
    "I8": ("i1", None), "U8": ("u1", None), "BOOL": ("u1", None), "U16": ("<u2", None),
    "U32": ("<u4", None), "U64": ("<u8", None),
}  # fmt: skip


def _is_param(name: str) -> bool:
    return not is_buffer(name)


_CHUNK_BYTES = 8 << 20  # zeros are counted 8 MiB at a time, read into one reused buffer: memory stays bounded


def _zeros(header: SafetensorsHeader, t: TensorInfo, fd: int, chunk: bytearray) -> int | None:
    """Zero elements of ``t``, read chunk by chunk into ``chunk`` (never the whole tensor in memory).

    ``os.preadv`` into a reused buffer rather than a memory map: mapped pages of a large file count
    towards the process's resident memory, a reused buffer does not grow with the tensor.
    """
    import numpy as np

    view = _ZERO_VIEWS.get(t.dtype)
    if view is None or t.numel == 0:
        return None if view is None else 0
    dt, mask = view
    itemsize = np.dtype(dt).itemsize
    total, done, nonzero = t.numel * itemsize, 0, 0
    base = header.data_start + t.begin
    while done < total:
        want = min(len(chunk), total - done)
        got = os.preadv(fd, [memoryview(chunk)[:want]], base + done)
        if got <= 0 or got % itemsize:
            raise CheckpointError(f"{header.path}: the file ended inside tensor {t.name!r} (it changed while read)")
        arr = np.frombuffer(chunk, dtype=dt, count=got // itemsize)
        if mask is not None:
            arr = arr & np.array(mask, dtype=dt)  # a chunk-sized copy without the sign bit (-0.0 is a zero)
        nonzero += int(np.count_nonzero(arr))
        done += got
    return t.numel - nonzero


def _from_header(header: SafetensorsHeader, layers: bool) -> dict[str, Any]:
    params = [t for t in header.tensors if _is_param(t.name)]
    out: dict[str, Any] = {
        "params": sum(t.numel for t in params),
        "tensors": len(header.tensors),
        "bytes": header.file_size,
        "dtypes": sorted({t.dtype for t in header.tensors}),
    }
    if layers:
        rows, counted = [], []
        chunk = bytearray(_CHUNK_BYTES)
        with header.path.open("rb") as fh:
            for t in sorted(params, key=lambda t: t.name):
                z = _zeros(header, t, fh.fileno(), chunk)
                rows.append(
                    {"name": t.name, "shape": list(t.shape), "params": t.numel, "dtype": t.dtype,
                     "sparsity": (z / t.numel) if (z is not None and t.numel) else (0.0 if z == 0 else None)}
                )  # fmt: skip
                if z is not None:  # dtypes without a zero view (none of timm's) are left out of the counts
                    counted.append(TensorCount(t.name, tuple(t.shape), z))
        out["layers"] = rows
        counts = count_tensors(counted)  # prunecli.counting: the same convention as prune and finetune-lora
        out["params_nonzero"], out["sparsity"] = counts.params_nonzero, counts.sparsity
    return out


def _st_dtype(dtype: Any) -> str:
    """The safetensors name of a torch dtype (``F32``), so both inspect paths report dtypes alike."""
    from prunecli.checkpoint.safetensors_io import ST_DTYPES as _ST_DTYPES

    return _ST_DTYPES.get(dtype, str(dtype).removeprefix("torch."))


def _size(path: Path | None) -> int | None:
    if path is None:
        return None
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else path.stat().st_size


def _from_model(loaded: Any, layers: bool) -> dict[str, Any]:
    import torch

    model = loaded.model
    state = model.state_dict()
    names = {n for n, _ in model.named_parameters()}
    out: dict[str, Any] = {
        "params": sum(p.numel() for p in model.parameters()),  # = count_model(model).params
        "tensors": len(state),
        "bytes": _size(loaded.source.path),
        "dtypes": sorted({_st_dtype(t.dtype) for t in state.values()}),
    }
    if layers:
        rows = []
        for name in sorted(names):
            t = state[name]
            z = int(t.numel() - torch.count_nonzero(t))
            rows.append({"name": name, "shape": list(t.shape), "params": t.numel(), "dtype": _st_dtype(t.dtype),
                         "sparsity": z / t.numel() if t.numel() else 0.0})  # fmt: skip
        out["layers"] = rows
        counts = count_model(model)  # prunecli.counting: the same convention as prune and finetune-lora
        out["params_nonzero"], out["sparsity"] = counts.params_nonzero, counts.sparsity
    return out


def _folder_config(folder: Path | None) -> dict[str, Any]:
    if folder is None or not (folder / "config.json").is_file():
        return {}
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return check_folder_config(config, str(folder))


def inspect(req: InspectRequest) -> Result:
    """Describes CKPT: architecture, parameter count, bytes, lineage, and per-layer sparsity.

    ``req.layers`` adds per-tensor shape, parameter count and sparsity (reads the tensor bytes);
    ``req.arch`` is only used for torch files, which must be loaded.

    Example:
        >>> inspect(InspectRequest(checkpoint="p50.safetensors", layers=True)).metrics["sparsity"]
    """
    spec, layers, arch = req.checkpoint, req.layers, req.arch
    source = resolve_source(spec)
    if source.header is not None:
        header = source.header
        manifest = manifest_from_header(header, where=spec) if source.kind is SourceKind.PRUNECLI else None
        config = _folder_config(source.folder)
        metrics = _from_header(header, layers)
        metrics["arch"] = manifest.arch if manifest else (arch or config.get("architecture"))
        metrics["num_classes"] = manifest.num_classes if manifest else config.get("num_classes")
        if source.folder is not None:
            metrics["bytes"] = sum(f.stat().st_size for f in source.folder.iterdir() if f.is_file())
    else:
        from prunecli.api._common import InputOptions, load_input

        loaded = load_input(spec, InputOptions(arch=arch))
        manifest = loaded.manifest
        metrics = _from_model(loaded, layers)
        metrics["arch"], metrics["num_classes"] = manifest.arch, manifest.num_classes
    if manifest is not None:
        metrics["lineage"] = manifest.lineage
        metrics["masked"] = sorted(manifest.masked)
        metrics["structured"] = bool(manifest.structure)
        metrics["adapters"] = manifest.adapters
        metrics["input_size"] = manifest.pretrained_cfg.get("input_size")
    else:
        metrics["lineage"] = []
    metrics["params_m"] = round(metrics["params"] / 1e6, 4) if metrics.get("params") is not None else math.nan
    return Result(checkpoint=None, sha256=None, metrics=metrics, device="none")

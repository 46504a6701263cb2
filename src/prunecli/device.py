"""Device selection and seeding: one place for ``--device`` and ``--seed`` semantics."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import torch

from prunecli.errors import InputError

__all__ = [
    "PRECISIONS",
    "autocast",
    "check_precision",
    "describe",
    "input_to",
    "model_to",
    "resolve_device",
    "seed_everything",
]

# --precision → the autocast dtype (None: no autocast, exact float32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` → the first GPU when there is one, else CPU; ``cpu``; ``cuda``/``cuda:i``.

    Under ``torchrun`` (``LOCAL_RANK`` set) ``auto``/``cuda`` pick the process's own GPU.
    """
    spec = (spec or "auto").lower()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: no CUDA device is available", hint="use --device cpu or auto")
        try:
            dev = torch.device(spec) if spec != "cuda" else torch.device("cuda", local_rank)
        except RuntimeError:
            raise InputError(f"--device {spec!r} is not a device name") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    raise InputError(f"--device {spec!r}: choose auto, cpu, cuda or cuda:N")


def describe(device: torch.device) -> str:
    """The device as the record reports it (``cpu``, ``cuda:0``)."""
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type


def seed_everything(seed: int) -> torch.Generator:
    """Seeds python, numpy (when present) and torch; returns a CPU generator for samplers."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is a dependency, but seeding must never be the thing that fails
        pass
    return torch.Generator().manual_seed(seed)


def check_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--precision`` on ``device``; refuses what cannot run well.

    fp16 on CPU is refused: CPU kernels gain nothing from it (bf16 is the CPU's reduced precision)
    and its narrow range needs loss scaling; bf16 on a GPU without bf16 support is refused too.
    """
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is torch.float16 and device.type != "cuda":
        raise InputError("--precision fp16 runs on CUDA only", hint="use --precision bf16 on CPU (or fp32)")
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(f"--precision bf16: {describe(device)} has no bfloat16 support", hint="use fp16 or fp32")
    return dtype


def autocast(device: torch.device, precision: str = "fp32") -> Any:
    """``torch.autocast`` for ``--precision`` (a no-op context for fp32): matmuls and convolutions run in
    the reduced dtype, reductions and losses stay float32 (torch's autocast op lists)."""
    dtype = check_precision(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def model_to(model: torch.nn.Module, device: torch.device, *, channels_last: bool = False) -> torch.nn.Module:
    """Moves ``model`` to ``device``; ``channels_last`` stores its 4-D weights NHWC (timm's ``--channels-last``)."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def input_to(x: torch.Tensor, device: torch.device, *, channels_last: bool = False) -> torch.Tensor:
    """Copies a batch to ``device`` (non-blocking: from pinned memory it overlaps the GPU's work), NHWC if asked."""
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x

"""Device selection and seeding: one place for ``--device`` and ``--seed`` semantics."""

from __future__ import annotations

import os
import random

import torch

from prunecli.errors import InputError

__all__ = ["describe", "resolve_device", "seed_everything"]


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

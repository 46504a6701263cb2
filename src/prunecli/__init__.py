"""prunecli: prune saved vision checkpoints from the shell, and load the results from Python.

From Python, :func:`load_model` reads any checkpoint the command line reads (channel-pruned ones
included) into a model ready to run; :func:`data_config` and :func:`create_transform` give the data
config and eval transform of its ``pretrained_cfg``::

    import prunecli

    model = prunecli.load_model("p50.safetensors")
    transform = prunecli.create_transform(model)

The subcommands' library API lives in :mod:`prunecli.api`; the command line in :mod:`prunecli.cli`.
Importing this package is cheap: torch and timm load only when a function that needs them runs, which
keeps ``prunecli --help`` and ``prunecli inspect`` fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["LoadedModel", "__version__", "create_transform", "data_config", "load_model"]

_LAZY = {name: "prunecli.loading" for name in ("LoadedModel", "create_transform", "data_config", "load_model")}


def __getattr__(name: str) -> Any:  # PEP 562: import prunecli.loading (and torch) on first use only
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prunecli' has no attribute {name!r}")

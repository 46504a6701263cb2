"""The library API: one function per subcommand, each returning a :class:`prunecli.record.Result`.

The CLI modules in :mod:`prunecli.cli` only parse options, call these, and print the record. Each
function lives in its own module so that importing one does not import the others' dependencies
(``inspect`` must not import torch; ``finetune_lora`` alone imports peft).

Example:
    >>> from prunecli import api
    >>> api.inspect("model.safetensors", layers=True).metrics["params"]
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["InputOptions", "evaluate", "finetune", "finetune_lora", "inspect", "prune", "report", "restore", "score"]

_LAZY = {
    "InputOptions": "prunecli.api._common",
    "inspect": "prunecli.api.inspect",
    "evaluate": "prunecli.api.eval",
    "score": "prunecli.api.score",
    "prune": "prunecli.api.prune",
    "restore": "prunecli.api.restore",
    "finetune": "prunecli.api.finetune",
    "finetune_lora": "prunecli.api.finetune_lora",
    "report": "prunecli.api.report",
}


def __getattr__(name: str) -> Any:  # PEP 562: import a subcommand's module only when it is used
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prunecli.api' has no attribute {name!r}")

"""The library API: one function per subcommand, each returning a :class:`prunecli.record.Result`.

The CLI modules in :mod:`prunecli.cli` only parse options, call these, and print the record. Each
function lives in the module of the same name (``prunecli.api.prune.prune``) so that importing one does
not import the others' dependencies (``inspect`` must not import torch; only ``finetune_lora`` imports
peft); the functions are loaded on first use.

Each function takes one request (:mod:`prunecli.requests`, also exported here), the object the
command line builds from its options.

Example:
    >>> from prunecli import api
    >>> api.inspect(api.InspectRequest(checkpoint="model.safetensors", layers=True)).metrics["params"]
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_REQUESTS = ("EvalRequest", "FinetuneLoraRequest", "FinetuneRequest", "InspectRequest", "LoraOptions", "ModelSource",
             "PruneRequest", "ReportRequest", "Reporting", "RestoreRequest", "Runtime", "ScoreRequest", "Training",
             "Transforms", "Wcr")  # fmt: skip
__all__ = ["DataOptions", "InputOptions", "evaluate", "finetune", "finetune_lora", "inspect", "prune", "report",
           "restore", "score", *_REQUESTS]  # fmt: skip

_LAZY = {
    "InputOptions": "prunecli.api._common",
    "DataOptions": "prunecli.api._common",
    "inspect": "prunecli.api.inspect",
    "evaluate": "prunecli.api.eval",
    "score": "prunecli.api.score",
    "prune": "prunecli.api.prune",
    "restore": "prunecli.api.restore",
    "finetune": "prunecli.api.finetune",
    "finetune_lora": "prunecli.api.finetune_lora",
    "report": "prunecli.api.report",
    **{name: "prunecli.requests" for name in _REQUESTS},
}


class _Api(types.ModuleType):
    """Keeps ``api.prune`` the function even after ``prunecli.api.prune`` (the module) is imported.

    Importing a submodule makes Python set it as an attribute of its package, which would shadow the
    function of the same name; this module type stores the function instead.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == value.__name__ and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:  # PEP 562-style lazy loading
        if name in _LAZY:
            value = getattr(importlib.import_module(_LAZY[name]), name)
            super().__setattr__(name, value)
            return value
        raise AttributeError(f"module 'prunecli.api' has no attribute {name!r}")


sys.modules[__name__].__class__ = _Api

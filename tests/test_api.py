"""The library API: one callable per subcommand, stable even after the CLI imported its modules."""

from __future__ import annotations

import importlib

import pytest

NAMES = ["inspect", "evaluate", "score", "prune", "restore", "finetune", "finetune_lora", "report"]


@pytest.mark.parametrize("name", NAMES)
def test_api_names_are_functions_after_module_import(name):
    from prunecli import api

    module = {"evaluate": "eval"}.get(name, name)
    importlib.import_module(f"prunecli.api.{module}")  # what the CLI does
    fn = getattr(api, name)
    assert callable(fn) and not isinstance(fn, type(importlib))
    assert fn is getattr(importlib.import_module(f"prunecli.api.{module}"), name)


def test_api_inspect_returns_result(tmp_path, save_model):
    import timm

    import prunecli.archs  # noqa: F401  (registers fc_mlp with timm)
    from prunecli import api

    model = timm.create_model("fc_mlp", num_classes=10)
    path = save_model(model, tmp_path / "m.safetensors", "fc_mlp", 10)
    result = api.inspect(api.InspectRequest(checkpoint=str(path)))
    assert result.metrics["params"] == sum(p.numel() for p in model.parameters())

"""Shared fixtures: CPU only, offline, tiny models, a CLI runner with separate stdout/stderr."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("PRUNECLI_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PRUNECLI_NO_CACHE", "1")  # tests never write the user's layer-table cache


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


class Cli:
    """Runs ``prunecli`` in-process; returns (exit code, parsed stdout record or None, stderr)."""

    def __init__(self) -> None:
        from typer.testing import CliRunner

        from prunecli.cli.main import app

        self.app = app
        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | None = None) -> Any:
        result = self.runner.invoke(self.app, [str(a) for a in args], input=input, catch_exceptions=False)
        result.record = None
        if result.exit_code == 0 and result.stdout.strip():
            with contextlib.suppress(json.JSONDecodeError):  # `report` prints a table, not a record
                result.record = json.loads(result.stdout.strip().splitlines()[-1])
        return result


@pytest.fixture
def cli() -> Cli:
    return Cli()


@pytest.fixture
def save_model() -> Callable[..., Path]:
    """Saves a model as a self-describing prunecli checkpoint: save_model(model, path, arch, num_classes)."""

    def save(model: Any, path: Path, arch: str, num_classes: int | None = None, **model_args: Any) -> Path:
        from prunecli.checkpoint.manifest import Manifest
        from prunecli.checkpoint.writer import save_checkpoint
        from prunecli.models import default_pretrained_cfg

        manifest = Manifest(arch, num_classes or getattr(model, "num_classes", None), model_args,
                            default_pretrained_cfg(arch))  # fmt: skip
        save_checkpoint(path, model, manifest, force=True)
        return Path(path)

    return save

"""LoRA adapters kept beside a checkpoint (``finetune-lora --merge none``), re-attached when it loads.

Loading a checkpoint whose manifest lists an adapter is part of reading the checkpoint format, so it
lives here, below :mod:`prunecli.lora` (which trains and writes adapters and imports this module, never
the other way round). peft is imported inside :func:`attach_adapters`: only checkpoints that carry an
adapter pay for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from prunecli.checkpoint.hashing import file_sha256
from prunecli.errors import CheckpointError

__all__ = ["ADAPTER_NAME", "adapter_folder", "attach_adapters"]

ADAPTER_NAME = "default"  # the peft adapter name prunecli trains, saves and loads


def adapter_folder(meta: Mapping[str, Any], checkpoint_path: str | Path) -> Path:
    """The adapter folder ``meta['path']`` names, relative to the checkpoint's folder (or absolute)."""
    ckpt = Path(checkpoint_path)
    base = ckpt if ckpt.is_dir() else ckpt.parent
    folder = Path(str(meta.get("path", "")))
    return folder if folder.is_absolute() else (base / folder)


def attach_adapters(model: nn.Module, adapters_meta: Mapping[str, Any], checkpoint_path: str | Path) -> nn.Module:
    """Attaches a kept (``--merge none``) adapter to a freshly built model, in place, for inference.

    Uses peft's own loader (``PeftModel.from_pretrained``), so the logits equal those of a user who
    loads base + adapter with peft. Returns ``model`` itself (peft injects its layers into it), in eval
    mode with nothing trainable; :func:`prunecli.lora.merge_adapters` turns it into a plain model.

    Raises:
        CheckpointError: the adapter folder is missing, or its weights are not the ones recorded.
    """
    from peft import PeftModel

    folder = adapter_folder(adapters_meta, checkpoint_path)
    weights = folder / "adapter_model.safetensors"
    if not (folder / "adapter_config.json").is_file() or not weights.is_file():
        raise CheckpointError(
            f"{checkpoint_path}: its LoRA adapter folder {str(folder)!r} is missing",
            hint="keep the .adapter folder beside the checkpoint (finetune-lora --merge none writes both)",
        )
    sha = adapters_meta.get("sha256")
    if sha and file_sha256(weights) != sha:
        raise CheckpointError(f"{weights}: adapter weights differ from those recorded in {checkpoint_path}")
    PeftModel.from_pretrained(model, str(folder), adapter_name=ADAPTER_NAME, is_trainable=False)
    return model.eval()

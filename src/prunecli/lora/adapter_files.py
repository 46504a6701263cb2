"""Writing a kept adapter (``--merge none``) beside its checkpoint; reading it is in the checkpoint layer.

Loading a checkpoint re-attaches its adapter (:func:`prunecli.checkpoint.adapters.attach_adapters`), so
that half lives with the checkpoint format; this module writes what it reads.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from prunecli.checkpoint import transaction
from prunecli.checkpoint.adapters import ADAPTER_NAME
from prunecli.checkpoint.hashing import file_sha256
from prunecli.checkpoint.permissions import publish_tree

__all__ = ["adapter_dir_for", "commit_adapter", "stage_adapter"]


def adapter_dir_for(checkpoint: str | Path) -> Path:
    """Where ``--merge none`` keeps the adapter: ``OUT.adapter/`` beside a file, ``OUT/adapter/`` in a folder."""
    s = str(checkpoint)
    path = Path(s).expanduser().resolve()
    if s.endswith(("/", os.sep)) or path.is_dir():
        return path / "adapter"
    return path.with_name(path.stem + ".adapter")


def stage_adapter(peft_model: nn.Module, near: Path) -> tuple[Path, dict[str, Any]]:
    """Writes the adapter with peft's ``save_pretrained`` into a temporary folder in ``near``.

    Staged first because the checkpoint's manifest records the adapter's sha256 and a folder
    checkpoint is written by replacing the whole folder; :func:`commit_adapter` moves it in place
    afterwards. Returns (temporary folder, the metadata for ``Manifest.adapters`` without ``path``).
    """
    with transaction.output_errors(near):  # a full disk or a vanished folder: one line, nothing left behind
        tmp = Path(transaction.temporary(lambda: tempfile.mkdtemp(prefix=".adapter.", suffix=".tmp", dir=near)))
        try:
            peft_model.save_pretrained(str(tmp), safe_serialization=True)
            config = json.loads((tmp / "adapter_config.json").read_text())
            publish_tree(tmp)  # mkdtemp made it 0700, safetensors writes 0600: the umask's modes instead
        except BaseException:
            transaction.discard(tmp)
            raise
    meta = {
        "format": "peft",
        "adapter_name": ADAPTER_NAME,
        "sha256": file_sha256(tmp / "adapter_model.safetensors"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "use_dora": bool(config.get("use_dora")),
        "target_modules": config.get("target_modules"),
    }
    return tmp, meta


def commit_adapter(tmp: Path, folder: Path) -> None:
    """Moves a staged adapter folder to ``folder``, replacing an older one."""
    with transaction.output_errors(folder):
        transaction.publish(tmp, folder)  # replaces an older one; undone if the run fails later

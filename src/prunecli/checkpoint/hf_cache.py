"""The local Hugging Face hub cache, located and read by hand (never through the hub client).

``timm:NAME[.TAG]`` reads timm's pretrained weights from this cache, so nothing is downloaded whatever
the network or ``HF_HUB_OFFLINE`` say. Torch-free: these are path lookups only.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["hf_hub_cache", "hf_repo_folder", "hf_snapshot"]


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment at call time.

    huggingface_hub reads ``HF_HUB_CACHE``/``HF_HOME`` once, when it is imported; resolving it here
    instead means the variables always apply (and tests can point them at a temporary folder).
    """
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hf_repo_folder(repo_id: str) -> Path:
    """The cache folder of one model repository (``models--OWNER--NAME``)."""
    return hf_hub_cache() / f"models--{repo_id.replace('/', '--')}"


def hf_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (a ref name or a commit hash), if any."""
    repo = hf_repo_folder(repo_id)
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = repo / "snapshots" / commit
    if snap.is_dir():
        return snap
    snaps = sorted(p for p in (repo / "snapshots").glob("*") if p.is_dir()) if repo.is_dir() else []
    return snaps[0] if len(snaps) == 1 else None

"""Output files and folders get the permissions the user's umask asks for.

Outputs are written to a temporary file or folder beside their final path and renamed over it (atomic
replace). ``tempfile.mkstemp``/``mkdtemp`` create those 0600/0700 whatever the umask, so without a
``chmod`` every checkpoint, scores file and adapter would be private to its owner where ``cp`` or a
plain ``open`` would have made it group- or world-readable. Before the rename the temporary gets
``0o666 & ~umask`` (files) or ``0o777 & ~umask`` (folders), the modes ``open``/``mkdir`` would give.

Reading the umask: POSIX offers only ``os.umask(new)``, which sets it while reading it, so another
thread creating a file in between would get the wrong mode. Linux ≥ 4.7 reports it in
``/proc/self/status`` (``Umask:``), read here at each call (a test or a caller may change it); elsewhere
the value is read once, with the set-and-restore pair, when :mod:`prunecli.checkpoint` is imported:
every command imports it to resolve its CKPT argument, before it starts any thread.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["current_umask", "dir_mode", "file_mode", "publish_dir", "publish_file", "publish_tree"]


def _umask_from_proc() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_by_setting() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_HAS_PROC = _umask_from_proc() is not None
_AT_IMPORT = None if _HAS_PROC else _umask_by_setting()


def current_umask() -> int:
    """The process's umask, read without changing it where the platform allows (see the module docstring)."""
    if _HAS_PROC:
        mask = _umask_from_proc()
        if mask is not None:
            return mask
    return _AT_IMPORT if _AT_IMPORT is not None else _umask_by_setting()


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder: ``0o777 & ~umask``."""
    return 0o777 & ~current_umask()


def publish_file(path: str | Path) -> None:
    """Gives a temporary output file (``mkstemp``: 0600) the mode a plain ``open`` would have, before its rename."""
    os.chmod(path, file_mode())


def publish_dir(path: str | Path) -> None:
    """Gives a temporary output folder (``mkdtemp``: 0700) the mode ``mkdir`` would have, before its rename."""
    os.chmod(path, dir_mode())


def publish_tree(path: str | Path) -> None:
    """:func:`publish_dir` on a temporary output folder and everything in it.

    For folders filled by other libraries too: safetensors' own ``save_file`` (which peft's
    ``save_pretrained`` calls) writes through a 0600 temporary of its own.
    """
    root = Path(path)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            publish_file(Path(dirpath) / name)
        for name in dirnames:
            publish_dir(Path(dirpath) / name)
    publish_dir(root)

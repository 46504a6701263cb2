"""Progress bars on stderr, shown only when stderr is a terminal (docs/records.md).

The CLI turns them off with ``--quiet``; ``PRUNECLI_NO_PROGRESS=1`` turns them off everywhere.
Library callers get no bars unless they call :func:`set_enabled`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress", "set_enabled"]

T = TypeVar("T")
_state = {"enabled": False}


def set_enabled(enabled: bool) -> None:
    """Turns bars on (when stderr is a TTY and ``PRUNECLI_NO_PROGRESS`` is unset) or off."""
    _state["enabled"] = enabled


def _active() -> bool:
    return _state["enabled"] and sys.stderr.isatty() and not os.environ.get("PRUNECLI_NO_PROGRESS")


def progress(items: Iterable[T], *, total: int | None = None, description: str = "") -> Iterator[T]:
    """Yields ``items``, drawing a transient rich progress bar on stderr when active."""
    if not _active():
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)

"""A command-line run as one transaction: its outputs, its ``--metrics`` line and its record, all or none.

Every file a run writes is created as a temporary beside its final path and renamed into place
(:func:`temporary`, :func:`publish`); both steps run with SIGINT/SIGTERM deferred, so a signal never
lands between creating a temporary and registering it for removal. Until the run commits
(:func:`commit`, called when the record is printed), everything published stays undoable: a file it
replaced (``--force``) is kept as a hard link beside it. :func:`rollback` — on any error, signal
or exception after the work — removes every temporary and published output and puts replaced ones
back, so a failed or interrupted run leaves the directory as it found it.

Signals (:func:`install_signal_handlers`, called first thing by the console entry): the first SIGINT
or SIGTERM raises :class:`Interrupted` in the main thread (exit 130/143); while signals are deferred
(during imports, before the command starts, inside :func:`deferred`) it is remembered and raised
when the deferral ends. A signal that library code swallowed (a bare ``except`` inside an import) is
still remembered, and :func:`check` raises it before anything is committed. After the commit, signals
are ignored: the run has finished.

Outside the command line (``prunecli.api`` from Python) nothing is deferred or kept: :func:`publish`
replaces the old file at once, as a plain atomic rename does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunecli.errors import InputError

__all__ = [
    "Interrupted",
    "append_metrics",
    "begin",
    "check",
    "commit",
    "deferred",
    "install_signal_handlers",
    "interrupted",
    "open_metrics",
    "output_errors",
    "publish",
    "resume",
    "rollback",
    "temporary",
]

# Signal → (exit code, the one line printed): the shell's 128 + signal number.
SIGNALS: dict[int, tuple[int, str]] = {signal.SIGINT: (130, "Interrupted."), signal.SIGTERM: (143, "Terminated.")}


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: not an ``Exception``, so no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code, self.line = SIGNALS.get(signum, (128 + signum, "Interrupted."))


@dataclass
class _State:
    active: bool = False  # a command-line run is in progress (outputs stay undoable until commit)
    committed: bool = False
    defer: int = 0  # > 0: signals are remembered, not raised
    signum: int | None = None  # the first signal received (kept even when swallowed)
    pending: bool = False
    temps: list[Path] = field(default_factory=list)
    published: list[tuple[Path, Path | None]] = field(default_factory=list)  # (output, the file it replaced)
    metrics: tuple[Path, int, bool] | None = None  # (path, open fd, created by this run)
    appended: tuple[Path, int] | None = None  # (metrics file, its size before this run's line)
    installed: bool = False
    pid: int = 0  # the process that installed the handlers (forked workers inherit them)
    raised: bool = False  # Interrupted was raised once: later signals are ignored (cleanup runs undisturbed)


_state = _State()


def _handler(signum: int, frame: Any) -> None:
    if os.getpid() != _state.pid:  # a forked DataLoader worker: torch's worker loop stops on KeyboardInterrupt
        raise KeyboardInterrupt
    if _state.committed or _state.raised:
        return  # finished (the output and the record are complete), or already ending
    if _state.signum is None:
        _state.signum = signum
    if _state.defer:
        _state.pending = True
        return
    _state.raised = True
    raise Interrupted(_state.signum)


def install_signal_handlers(early: int | None = None) -> None:
    """SIGINT/SIGTERM raise :class:`Interrupted`; deferred until :func:`resume` (the command's start).

    ``early``: a signal the console entry caught before this module was imported.
    """
    if _state.installed or threading.current_thread() is not threading.main_thread():
        return
    _state.installed, _state.pid = True, os.getpid()
    _state.defer += 1
    if early is not None and _state.signum is None:
        _state.signum, _state.pending = early, True
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def resume() -> None:
    """Ends the start-up deferral of :func:`install_signal_handlers`; raises a signal that came meanwhile."""
    if _state.installed and _state.defer:
        _leave()


def interrupted() -> Interrupted | None:
    """The signal received and not yet committed past, as an exception (None: none came)."""
    return Interrupted(_state.signum) if _state.signum is not None and not _state.committed else None


def _leave() -> None:
    _state.defer = max(0, _state.defer - 1)
    if _state.defer == 0 and _state.pending and not _state.committed and not _state.raised:
        _state.pending, _state.raised = False, True
        raise Interrupted(_state.signum or signal.SIGINT)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Signals arriving inside the block are raised when it ends (never half-way through it)."""
    _state.defer += 1
    try:
        yield
    finally:
        _leave()


def check() -> None:
    """Raises :class:`Interrupted` when a signal arrived (even one that library code swallowed)."""
    exc = interrupted()
    if exc is not None:
        _state.raised = True
        raise exc


def begin() -> None:
    """Starts a command-line run: from here on outputs stay undoable until :func:`commit`."""
    _state.active, _state.committed = True, False
    _state.temps, _state.published, _state.appended = [], [], None


def temporary(make: Any) -> Any:
    """Calls ``make()`` (``mkstemp``/``mkdtemp``, returning the path, or (fd, path)) with signals deferred,
    and registers the path for removal; returns what ``make`` returned."""
    with deferred():
        made = make()
        path = made[1] if isinstance(made, tuple) else made
        _state.temps.append(Path(path))
    return made


def discard(path: str | Path) -> None:
    """Removes a temporary now (a failed write) and forgets it."""
    p = Path(path)
    with deferred():
        _remove(p)
        with contextlib.suppress(ValueError):
            _state.temps.remove(p)


def publish(tmp: str | Path, path: Path) -> None:
    """Renames ``tmp`` (a file or a folder) to ``path`` with signals deferred; keeps what it replaces
    until :func:`commit` during a command-line run."""
    tmp = Path(tmp)
    with deferred():
        backup: Path | None = None
        if os.path.lexists(path) and _state.active:
            backup = path.parent / f".{path.name}.{os.getpid()}.old"
            _remove(backup)
            if path.is_dir() and not path.is_symlink():
                os.replace(path, backup)  # a folder cannot be hard-linked: moved aside (as before)
            else:
                try:
                    os.link(path, backup, follow_symlinks=False)  # the old file stays in place until the rename
                except OSError:
                    backup = None  # no hard links here: the old file cannot be restored
        elif path.is_dir() and not path.is_symlink():
            old = path.parent / f".{path.name}.{os.getpid()}.old"
            os.replace(path, old)
            _remove(old)
        os.replace(tmp, path)
        with contextlib.suppress(ValueError):
            _state.temps.remove(tmp)
        if _state.active:
            _state.published.append((path, backup))


def open_metrics(path: Path) -> None:
    """Opens the ``--metrics`` file for appending before any work (so an unwritable one fails first).

    Raises:
        OSError: the file cannot be opened for appending (its folder is missing or read-only, it is a folder…).
    """
    path = Path(path)
    existed = os.path.lexists(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    if _state.metrics is not None:
        os.close(_state.metrics[1])
    _state.metrics = (path, fd, not existed)


def append_metrics(path: Path, line: str) -> None:
    """Appends one line to the ``--metrics`` file (through the descriptor :func:`open_metrics` opened)."""
    held = _state.metrics
    data = (line + "\n").encode()
    if held is not None and held[0] == Path(path):
        fd, own = held[1], False
    else:
        fd, own = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666), True
    try:
        _state.appended = (Path(path), os.fstat(fd).st_size)
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(28, "No space left on device")
    finally:
        if own:
            os.close(fd)


def commit() -> None:
    """The run finished: drop the replaced files, keep the outputs; later signals are ignored."""
    with deferred():
        _state.committed = True
        if _state.installed and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:  # SIG_IGN survives interpreter teardown (a Python handler would be reset)
                signal.signal(sig, signal.SIG_IGN)
        for _, backup in _state.published:
            if backup is not None:
                _remove(backup)
        _state.published, _state.appended = [], None
        _close_metrics(remove=False)
        _state.active = False


def rollback() -> None:
    """Undoes the run: temporaries and published outputs removed, replaced files restored."""
    with deferred():
        for tmp in reversed(_state.temps):
            _remove(tmp)
        for path, backup in reversed(_state.published):
            _remove(path)
            if backup is not None:
                with contextlib.suppress(OSError):
                    os.replace(backup, path)
        _state.temps, _state.published = [], []
        if _state.appended is not None:  # a partly written --metrics line: the file is cut back to its old size
            with contextlib.suppress(OSError):
                os.truncate(*_state.appended)
            _state.appended = None
        _close_metrics(remove=True)
        _state.active = False


def _close_metrics(*, remove: bool) -> None:
    held, _state.metrics = _state.metrics, None
    if held is None:
        return
    path, fd, created = held
    with contextlib.suppress(OSError):
        os.close(fd)
    if remove and created:
        with contextlib.suppress(OSError):
            if os.path.getsize(path) == 0:
                os.unlink(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            path.unlink()


# errno of a failed write → the hint of its one-line error (the message names the path and the OS's words).
_WRITE_HINTS: dict[int, str] = {
    errno.ENOSPC: "free space on that disk, or write the output elsewhere",
    errno.EDQUOT: "free space in your quota, or write the output elsewhere",
    errno.EROFS: "the folder is on a read-only file system: write the output elsewhere",
    errno.EACCES: "write the output to a folder you may write to",
    errno.EPERM: "write the output to a folder you may write to",
    errno.ENOENT: "the output folder disappeared during the run; create it and run again",
    errno.ENOTDIR: "a part of the output path is a file, not a folder",
    errno.EISDIR: "the output path is a folder",
}


@contextlib.contextmanager
def output_errors(path: str | Path) -> Iterator[None]:
    """Turns an ``OSError`` while writing the output ``path`` into one line naming it (full disk, read-only
    or vanished folder…); whatever was half-written is removed by the writer before this runs."""
    try:
        yield
    except OSError as exc:
        words = (exc.strerror or str(exc)).rstrip(".")
        raise InputError(f"cannot write {str(path)!r}: {words}", hint=_WRITE_HINTS.get(exc.errno or 0)) from None

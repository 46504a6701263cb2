"""stdout is a contract (one JSON record), stderr is for people (docs/records.md).

Also the single place that turns exceptions into exit codes: 1 with a one-line ``Error:`` (and
``Hint:``) for bad input, 130 when interrupted; a traceback only with ``PRUNECLI_DEBUG=1``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import typer

from prunecli.errors import PrunecliError
from prunecli.record import Result, dumps, make_record

__all__ = ["console", "emit", "error", "run_command", "setup_stderr", "warn"]

_state: dict[str, Any] = {"quiet": False, "console": None}


def console() -> Any:
    """The rich Console on stderr (created on first use; honours NO_COLOR, TERM=dumb)."""
    if _state["console"] is None:
        from rich.console import Console

        _state["console"] = Console(stderr=True, highlight=False, soft_wrap=True)
    return _state["console"]


def _plain(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def error(message: str, hint: str | None = None) -> None:
    """One line ``Error: …`` (and ``Hint: …``) on stderr; never silenced by --quiet."""
    _plain(f"Error: {message}")
    if hint:
        _plain(f"Hint: {hint}")


def warn(message: str) -> None:
    """A warning on stderr unless --quiet."""
    if not _state["quiet"]:
        _plain(f"Warning: {message}")


class _WarnHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            warn(record.getMessage())
        elif not _state["quiet"]:
            _plain(record.getMessage())


def setup_stderr(quiet: bool) -> None:
    """Routes the library's logging to stderr and enables progress bars on a TTY unless quiet."""
    from prunecli.progress import set_enabled

    _state["quiet"] = quiet
    set_enabled(not quiet)
    logger = logging.getLogger("prunecli")
    logger.handlers[:] = [_WarnHandler()]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    import warnings

    warnings.filterwarnings("ignore")  # third-party deprecation chatter is not for users
    logging.captureWarnings(False)


def emit(record: Mapping[str, Any], metrics_file: Path | None) -> None:
    """Prints the record as one JSON line on stdout; appends it to ``metrics_file`` too."""
    line = dumps(record)
    if metrics_file is not None:
        with Path(metrics_file).open("a") as fh:
            fh.write(line + "\n")
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: exit quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def run_command(
    command: str,
    work: Callable[[], Result],
    *,
    input: str | None,
    options: Mapping[str, Any],
    metrics_file: Path | None = None,
    quiet: bool = False,
    summary: Callable[[Result], None] | None = None,
) -> None:
    """Runs one subcommand's library call and prints its record; maps errors to exit codes."""
    setup_stderr(quiet)
    start = time.perf_counter()
    try:
        result = work()
    except PrunecliError as exc:
        if os.environ.get("PRUNECLI_DEBUG") == "1":
            raise
        error(exc.message, exc.hint)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        _plain("Interrupted.")
        raise typer.Exit(130) from None
    except MemoryError:
        error("out of memory", "lower --batch-size, or run on a machine with more memory")
        raise typer.Exit(1) from None
    except Exception as exc:
        if os.environ.get("PRUNECLI_DEBUG") == "1":
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error(f"{command} failed: {exc.__class__.__name__}: {text[:300]}", "rerun with PRUNECLI_DEBUG=1 for details")
        raise typer.Exit(1) from None
    if input == "-":  # name the checkpoint the pipe delivered, so records still join on file names
        from prunecli.checkpoint.sources import stdin_checkpoint

        input = stdin_checkpoint() or input
    elif input and os.path.exists(input):  # absolute, as `checkpoint` is: records join on file names
        input = os.path.abspath(input)
    record = make_record(command, input, result, options, time.perf_counter() - start)
    if summary is not None and not quiet:
        with contextlib.suppress(Exception):  # a failed pretty table must never fail the run
            summary(result)
    emit(record, metrics_file)

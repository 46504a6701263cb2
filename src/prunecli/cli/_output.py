"""stdout is a contract (one JSON record), stderr is for people (docs/records.md).

Also the single place that turns exceptions into exit codes: 1 with a one-line ``Error:`` (and
``Hint:``) for bad input, 130 when interrupted; a traceback only with ``PRUNECLI_DEBUG=1``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import typer

from prunecli.checkpoint import transaction
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
    """Prints the record as one JSON line on stdout; appends it to ``metrics_file`` too; commits the run.

    Signals wait until the record is out (then the run has finished: exit 0); a write that fails
    raises ``OSError`` before the commit, so the caller undoes the run (the metrics file is cut back).
    """
    line = dumps(record)
    with transaction.deferred():
        transaction.check()  # a signal that library code swallowed ends the run before anything is final
        if metrics_file is not None:
            transaction.append_metrics(Path(metrics_file), line)
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: exit quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        transaction.commit()


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
    transaction.begin()  # outputs stay undoable until emit() commits: a failure anywhere below removes them
    start = time.perf_counter()
    try:
        result = work()
    except PrunecliError as exc:
        transaction.rollback()
        if os.environ.get("PRUNECLI_DEBUG") == "1":
            raise
        error(exc.message, exc.hint)
        raise typer.Exit(1) from None
    except (KeyboardInterrupt, transaction.Interrupted) as exc:
        _interrupted(exc)
    except MemoryError:
        transaction.rollback()
        error("out of memory", "lower --batch-size, or run on a machine with more memory")
        raise typer.Exit(1) from None
    except Exception as exc:
        transaction.rollback()
        if transaction.interrupted() is not None:  # a swallowed signal surfaced as another error
            _interrupted(transaction.interrupted())
        if os.environ.get("PRUNECLI_DEBUG") == "1":
            raise
        described = _describe(exc)
        if described is not None:
            error(f"{command} failed: {described}")
            raise typer.Exit(1) from None
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error(f"{command} failed: {exc.__class__.__name__}: {text[:300]}", "rerun with PRUNECLI_DEBUG=1 for details")
        raise typer.Exit(1) from None
    if input == "-":  # name the checkpoint the pipe delivered, so records still join on file names
        from prunecli.checkpoint.sources import stdin_checkpoint

        input = stdin_checkpoint() or input
    elif input and os.path.exists(input):  # absolute, as `checkpoint` is: records join on file names
        input = os.path.abspath(input)
    record = make_record(command, input, result, options, time.perf_counter() - start)
    try:
        emit(record, metrics_file)
    except transaction.Interrupted as exc:
        _interrupted(exc)
    except OSError as exc:  # the --metrics file or stdout could not take the record: nothing is kept
        transaction.rollback()
        where = f"--metrics {metrics_file}" if metrics_file is not None else "stdout"
        error(f"cannot write the record to {where}: {exc.strerror or exc}", "the run's output was removed")
        raise typer.Exit(1) from None
    if summary is not None and not quiet:  # after the commit: a failed run prints only its Error: line
        with contextlib.suppress(Exception):  # a failed pretty table must never fail the run
            summary(result)


# Exceptions that third-party code (PIL inside a DataLoader worker, an empty dataset's average) raises about
# the input before any prunecli check could: class name → what is wrong with the input, in words.
_DESCRIBE: dict[str, str] = {
    "UnidentifiedImageError": "a file of the data is not a readable image",
    "DecompressionBombError": "an image of the data is too large to decode safely",
    "ZeroDivisionError": "the data holds no usable samples (an empty folder or split, or zero-size data)",
}


def _describe(exc: BaseException) -> str | None:
    """The input problem behind ``exc`` (also when a DataLoader worker re-raised it), or None."""
    text = str(exc).strip()
    name = exc.__class__.__name__
    if text.startswith("Caught ") and " in DataLoader worker" in text:  # the worker's own last line says which file
        text = text.splitlines()[-1].strip()
        name = text.partition(":")[0].rpartition(".")[2] or name
        text = text.partition(":")[2].strip()
    what = _DESCRIBE.get(name)
    if what is None:
        return None
    detail = text.splitlines()[0][:300] if text and name != "ZeroDivisionError" else ""
    detail = re.sub(r"<_io\.\w+ name='([^']*)'>", r"'\1'", detail)  # PIL names the open file object
    return f"{what} ({detail})" if detail else what


def _interrupted(exc: BaseException | None) -> None:
    """Undoes the run and exits 130 (SIGINT, Ctrl-C) or 143 (SIGTERM) with one line."""
    transaction.rollback()
    signum = exc.signum if isinstance(exc, transaction.Interrupted) else 2
    code, line = transaction.SIGNALS.get(signum, (130, "Interrupted."))
    _plain(line)
    raise typer.Exit(code) from None

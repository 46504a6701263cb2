"""The ``prunecli`` Typer application: one thin module per subcommand, registered below."""

from __future__ import annotations

import os
import signal
import sys

_EARLY: list[int] = []  # signals that arrived before prunecli.checkpoint.transaction took over
_CONSOLE = os.path.basename(sys.argv[0]) == "prunecli" or sys.argv[0].endswith(os.path.join("prunecli", "__main__.py"))
if _CONSOLE:  # the console entry: signals are remembered from the first line on, raised once main() starts
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, lambda signum, frame: _EARLY.append(signum))

import importlib  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

from prunecli.checkpoint import transaction  # noqa: E402

if _CONSOLE:
    # From here on SIGINT/SIGTERM end the run with 130/143 and one line, even while typer, torch and
    # timm import (deferred until main() starts the command, then raised there).
    transaction.install_signal_handlers(early=_EARLY[0] if _EARLY else None)

import typer  # noqa: E402

from prunecli import __version__  # noqa: E402

__all__ = ["COMMANDS", "app", "main"]

# Subcommand modules in help order; each defines ``register(app)``.
COMMANDS: tuple[str, ...] = (
    "score", "prune", "restore", "finetune-lora", "finetune", "eval", "inspect", "report",
)  # fmt: skip

app = typer.Typer(
    name="prunecli",
    help="Prune saved vision checkpoints. Each subcommand reads a checkpoint, does one step, writes a new "
    "checkpoint and prints one JSON record on stdout, so steps chain in pipes and Makefiles.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prunecli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = None,
) -> None:
    """Prune saved vision checkpoints from the shell."""


for _name in COMMANDS:
    importlib.import_module(f"prunecli.cli.{_name.replace('-', '_')}").register(app)


def main() -> None:
    """Console-script entry point: SIGINT/SIGTERM at any instant end in exit 130/143, one line, nothing written."""
    transaction.install_signal_handlers()  # no-op when the import above did it
    if os.environ.get("NO_COLOR"):
        os.environ.setdefault("TERM", "dumb")
    try:
        transaction.resume()  # a signal that came while importing ends the run here
        app(prog_name="prunecli")
    except SystemExit as exc:
        late = transaction.interrupted() if exc.code == 0 else None  # a signal swallowed by library code
        if late is None:
            raise
        _interrupted(late)
    except (transaction.Interrupted, KeyboardInterrupt) as exc:
        _interrupted(exc if isinstance(exc, transaction.Interrupted) else transaction.Interrupted(2))


def _interrupted(exc: transaction.Interrupted) -> None:
    transaction.rollback()
    sys.stderr.write(exc.line + "\n")
    sys.stderr.flush()
    os._exit(exc.exit_code)  # no interpreter teardown: a second signal, or a thread, cannot add a traceback


if __name__ == "__main__":
    main()

"""The ``prunecli`` Typer application: one thin module per subcommand, registered below."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Annotated, Optional

import typer

from prunecli import __version__

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
    """Console-script entry point."""
    if os.environ.get("NO_COLOR"):
        os.environ.setdefault("TERM", "dumb")
    try:
        app(prog_name="prunecli")
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        sys.exit(130)


if __name__ == "__main__":
    main()

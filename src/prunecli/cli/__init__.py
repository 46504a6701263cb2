"""The command line: thin Typer commands over :mod:`prunecli.api`."""

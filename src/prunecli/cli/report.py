"""``prunecli report``: tables (markdown/CSV/JSON) and PNG plots from many runs' records."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prunecli.cli._options import QuietOpt

EXAMPLES = [
    "prunecli report results.jsonl",
    "prunecli report results.jsonl --format csv > results.csv",
    "prunecli report results.jsonl -o plots/ --format md > table.md",
]


def report(
    results: Annotated[Path, typer.Argument(metavar="RESULTS.jsonl", help="JSON Lines file of prunecli records.")],
    fmt: Annotated[str, typer.Option("--format", help="Table format: md, csv or json.")] = "md",
    output: Annotated[
        Optional[Path], typer.Option("-o", "--output", help="Directory for the PNG plots (needs matplotlib).")
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Tabulate and plot the records of many runs (accuracy vs ratio, before/after LoRA, sparsity, MACs).

    The table goes to stdout (it is the data this command produces), warnings to stderr.
    """
    from prunecli.api.report import report as api_report
    from prunecli.cli._output import error, setup_stderr
    from prunecli.errors import PrunecliError

    setup_stderr(quiet)
    try:
        text, _ = api_report(results, fmt=fmt, out_dir=output)
    except PrunecliError as exc:  # report prints a table, not a record, so it maps errors itself
        error(exc.message, exc.hint)
        raise typer.Exit(1) from None
    typer.echo(text, nl=False)


def register(app: typer.Typer) -> None:
    app.command("report", epilog="Examples:  " + "  |  ".join(EXAMPLES))(report)

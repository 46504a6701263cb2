"""``prunecli report``: tables (markdown/CSV/JSON) and PNG plots from many runs' records."""

from __future__ import annotations

import typer

from prunecli.cli._build import register_command
from prunecli.requests import ReportRequest

EXAMPLES = [
    "prunecli report results.jsonl",
    "prunecli report results.jsonl --format csv > results.csv",
    "prunecli report results.jsonl -o plots/ --format md > table.md",
]


def run(req: ReportRequest) -> None:
    """Prints the table itself: report's product is text on stdout, not a record."""
    from prunecli.api.report import report
    from prunecli.cli._output import error, setup_stderr
    from prunecli.errors import PrunecliError

    setup_stderr(req.quiet)
    try:
        text, _ = report(req)
    except PrunecliError as exc:
        error(exc.message, exc.hint)
        raise typer.Exit(1) from None
    typer.echo(text, nl=False)


def register(app: typer.Typer) -> None:
    register_command(
        app, "report", ReportRequest, "prunecli.api.report:report", examples=EXAMPLES, runner=run,
        help="Tabulate and plot the records of many runs (accuracy vs ratio, before/after LoRA, sparsity, MACs).\n\n"
        "The table goes to stdout (it is the data this command produces), warnings to stderr.",
    )  # fmt: skip

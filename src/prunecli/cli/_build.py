"""Typer commands generated from the typed requests of :mod:`prunecli.requests`.

A command module says only what is particular to it: its request class, the api function that
serves it, its examples and how its result reads on a terminal. This module turns the request's
fields into Typer parameters (flags, help, defaults, panels), turns the parsed command line back
into the request (``parse``, ``collect``, validation), and runs the api call through
:func:`prunecli.cli._output.run_command`, so every command parses, validates and reports alike:

- an invalid value or a conflicting pair of options: ``Error: …`` (+ ``Hint: …``), exit 2, before
  torch is imported;
- a missing checkpoint file: ``Error: …``, exit 1, before torch is imported;
- the record's ``options`` are ``request.to_json()``, the same object the api writes into the lineage.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer

from prunecli.cli._output import error, run_command
from prunecli.errors import InputError, PrunecliError
from prunecli.requests import Request, RequestError, Spec, leaves

__all__ = ["epilog", "register_command"]


def epilog(examples: list[str]) -> str:
    """The help's examples, one per line (``\\b`` keeps Click from re-flowing them into one paragraph)."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {e}" for e in examples)


def _typer_param(spec: Spec, default: Any) -> tuple[Any, Any]:
    """(annotation, default) of one Typer parameter for a request field."""
    required = default is dataclasses.MISSING
    base = bool if spec.cli_type is bool else spec.cli_type
    if spec.multiple:
        annotation: Any = Optional[list[base]]
        cli_default: Any = None
    elif required:
        annotation, cli_default = base, ...
    else:
        annotation = base if base is bool and default is not None else Optional[base]
        cli_default = default if spec.parse is None and not isinstance(default, tuple) else None
    kw: dict[str, Any] = {"help": spec.help, "show_default": spec.show_default and cli_default is not None}
    if spec.metavar:
        kw["metavar"] = spec.metavar
    if spec.argument:
        info = typer.Argument(**kw)
    else:
        if spec.panel:
            kw["rich_help_panel"] = spec.panel
        info = typer.Option(*spec.flags, **kw)
    if spec.argument and spec.multiple:
        cli_default = None
    return Annotated[annotation, info], cli_default


def _build_request(cls: type, values: dict[str, Any]) -> Request:
    """The request from the command line's values (keyed by leaf name); raises RequestError."""
    parsed: dict[str, Any] = {}
    for path, _f, spec, default in leaves(cls):
        raw = values.get(path[-1])
        if spec.multiple:
            items = [spec.parse(x) if spec.parse else x for x in (raw or ())]
            parsed[path[-1]] = spec.collect(items) if spec.collect else tuple(items)
        elif raw is not None:
            parsed[path[-1]] = spec.parse(raw) if spec.parse else raw
        elif default is not dataclasses.MISSING:
            parsed[path[-1]] = default
    return cls.build(**parsed)


def register_command(
    app: typer.Typer,
    name: str,
    request_cls: type,
    api: str,
    *,
    help: str,
    examples: list[str],
    summary: Callable[[Any], None] | None = None,
    distributed: bool = False,
    runner: Callable[[Any], None] | None = None,
) -> None:
    """Adds command ``name`` to ``app``: its options are ``request_cls``'s fields.

    Args:
        api: ``"module:function"`` of the api call that takes the request (imported on use, so ``--help``
            and usage errors never import torch).
        help: the command's help text (first line: the summary in ``prunecli --help``).
        summary: prints a short human summary of the result on stderr.
        distributed: the command runs under torchrun: only rank 0 prints and appends ``--metrics``.
        runner: replaces the api call and the record (``report``, whose product is a table, not a record).
    """
    names: list[str] = []
    params: list[inspect.Parameter] = []
    for path, _f, spec, default in leaves(request_cls):
        if not spec.flags and not spec.argument:
            continue  # library-only field
        annotation, cli_default = _typer_param(spec, default)
        kind = inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(path[-1], kind, default=cli_default, annotation=annotation))
        names.append(path[-1])
    if len(set(names)) != len(names):  # a programming error: two pieces declare the same option name
        raise RuntimeError(f"{request_cls.__name__}: duplicate option names {sorted(names)}")
    # Required parameters first: Typer lists arguments in signature order, and Python wants no default before them.
    params.sort(key=lambda p: p.default is not inspect.Parameter.empty and p.default is not ...)

    def command(**values: Any) -> None:
        try:
            request = _build_request(request_cls, values)
        except PrunecliError as exc:  # a usage error exits 2; a bad -p item is bad input to the method: 1
            error(exc.message, exc.hint)
            raise typer.Exit(2 if isinstance(exc, RequestError) else 1) from None
        if runner is not None:
            runner(request)
        else:
            _run(name, request, api, summary, distributed)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = help
    command.__name__ = f"{name.replace('-', '_')}_cmd"
    command.__module__ = f"prunecli.cli.{name.replace('-', '_')}"  # the command module it is generated for
    app.command(name, epilog=epilog(examples))(command)


def _run(name: str, request: Any, api: str, summary: Callable[[Any], None] | None, distributed: bool) -> None:
    reporting = getattr(request, "reporting", None)
    metrics = reporting.metrics if reporting else None
    quiet = bool(reporting.quiet) if reporting else False
    checkpoint = getattr(request, "checkpoint", None) if getattr(request, "mode", "score") == "score" else None
    try:
        _preflight(checkpoint, metrics)
    except PrunecliError as exc:
        if os.environ.get("PRUNECLI_DEBUG") == "1":
            raise
        error(exc.message, exc.hint)
        raise typer.Exit(1) from None
    module, _, func = api.partition(":")

    def work() -> Any:
        return getattr(importlib.import_module(module), func)(request)

    def go(main: bool = True) -> None:
        run_command(name, work, input=checkpoint, options=request.to_json(), metrics_file=metrics if main else None,
                    quiet=quiet or not main, summary=summary)  # fmt: skip

    if not distributed:
        go()
        return
    from prunecli.distributed import main_only_output

    with main_only_output() as main:
        go(main)


def _preflight(checkpoint: str | None, metrics: Any = None) -> None:
    """Torch-free checks before the api call: a missing file fails in milliseconds, not seconds, and an
    unwritable ``--metrics`` file fails before any work (it is held open until the record is appended)."""
    if checkpoint is not None:
        from prunecli.checkpoint.sources import resolve_source

        resolve_source(checkpoint)
    if metrics is not None:
        from prunecli.checkpoint.transaction import open_metrics

        try:
            open_metrics(metrics)
        except OSError as exc:
            raise InputError(f"--metrics {metrics}: cannot append to it ({exc.strerror or exc})",
                             hint="name a writable file in an existing folder") from None  # fmt: skip

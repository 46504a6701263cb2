#!/usr/bin/env python3
"""Generate the prunecli man pages from the Typer app (click-man's layout, without click-man).

click-man cannot discover a Typer >= 0.26 application (its commands are no longer ``click.Command``
instances), so this walks ``typer.main.get_command(app)`` itself and writes ``prunecli.1`` plus one
``prunecli-<command>.1`` per subcommand (``prunecli-<command>-<sub>.1`` for nested groups): .TH, NAME,
SYNOPSIS, DESCRIPTION, OPTIONS (grouped by help panel), COMMANDS, EXAMPLES (each CLI module's
``EXAMPLES`` list), EXIT STATUS, ENVIRONMENT, SEE ALSO.

The output depends only on the app and ``SOURCE_DATE_EPOCH`` (the page date; 0 when unset), so the
committed pages can be checked for drift:

    SOURCE_DATE_EPOCH=0 python tools/gen_man.py man          # (re)write man/
    SOURCE_DATE_EPOCH=0 python tools/gen_man.py --check man  # exit 1 when man/ differs from the CLI
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ENVIRONMENT", "EXIT_STATUS", "check_pages", "render_pages", "write_pages"]

PROG = "prunecli"

EXIT_STATUS: tuple[tuple[str, str], ...] = (
    ("0", "Success; the JSON record was printed on stdout."),
    ("1", "Bad input: a missing or corrupt checkpoint, a shape that does not fit the architecture, NaN weights, "
          "an unknown name or data spec, an existing output without --force. One line 'Error: ...' (and "
          "'Hint: ...') on stderr; no output file is left behind."),
    ("2", "Usage error: an unknown option, a missing argument, an invalid option value or two options that "
          "conflict; found before anything is loaded. One line 'Error: ...' (and 'Hint: ...') for invalid values "
          "and conflicts; Click's usage text for unknown options and missing arguments."),
    ("130", "Interrupted (Ctrl-C)."),
)  # fmt: skip

ENVIRONMENT: tuple[tuple[str, str], ...] = (
    ("NO_COLOR", "When set, no colour is used on stderr (stdout never carries colour)."),
    ("PRUNECLI_DEBUG", "Set to 1 to show the Python traceback of an error instead of the one-line message."),
    ("PRUNECLI_NO_PROGRESS", "Set to 1 to turn progress bars off (they are only drawn when stderr is a terminal)."),
    ("CUDA_VISIBLE_DEVICES", "Restricts the GPUs that --device auto and cuda[:N] can use."),
    ("HF_HUB_CACHE, HF_HOME", "Where timm:NAME[.TAG] looks for cached Hugging Face weights "
     "(default ~/.cache/huggingface/hub); nothing is ever downloaded."),
)  # fmt: skip


def _esc(text: str) -> str:
    """Escapes text for roff: backslashes, hyphens (so options copy-paste), non-ASCII, leading dots."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)  # groff needs no preconv
    return "\n".join(("\\&" + ln) if ln.startswith((".", "'")) else ln for ln in text.split("\n"))


def _para(text: str) -> str:
    """Paragraphs (blank-line separated) of help text as roff, each re-flowed by the formatter."""
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    return "\n.PP\n".join(_esc(p) for p in paras)


def _help_text(cmd: Any) -> str:
    return (cmd.help or "").split("\f")[0].strip()  # click: text after \f is not help


def _summary(cmd: Any) -> str:
    """The first sentence of the help, for NAME and the COMMANDS list."""
    first = " ".join(re.split(r"\n\s*\n", _help_text(cmd), maxsplit=1)[0].split())
    return re.split(r"(?<=\.)\s+(?=[A-Z])", first, maxsplit=1)[0] or (cmd.short_help or "")


def _date(epoch: int | None) -> str:
    if epoch is None:
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
    return _dt.datetime.fromtimestamp(epoch, tz=_dt.timezone.utc).strftime("%Y-%m-%d")


def _examples(cmd: Any, name: str) -> list[str]:
    """The command module's ``EXAMPLES`` (or ``<NAME>_EXAMPLES``) list, if it has one."""
    module = sys.modules.get(getattr(cmd.callback, "__module__", "") or "")
    if module is None:
        try:
            module = importlib.import_module(f"prunecli.cli.{name.replace('-', '_')}")
        except ImportError:
            return []
    for attr in ("EXAMPLES", f"{name.upper().replace('-', '_')}_EXAMPLES"):
        value = getattr(module, attr, None)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
    return []


def _term(record: str, argument: bool) -> str:
    """``-b, --batch-size <int range>`` → bold option names, then the metavar in italics."""
    names, rest = [], record.split(" ")
    while not argument and rest and (rest[0].rstrip(",").startswith("-") or rest[0] == "/") and rest[0] != "-":
        tok = rest.pop(0)
        bare = tok.rstrip(",")
        names.append(tok if tok == "/" else f"\\fB{_esc(bare)}\\fR" + ("," if tok.endswith(",") else ""))
    metavar = " ".join(rest).strip()
    return " ".join([*names, f"\\fI{_esc(metavar)}\\fR"] if metavar else names)


def _options(cmd: Any, ctx: Any) -> list[str]:
    """OPTIONS lines, the general panel first, then each rich_help_panel in order of first use."""
    panels: dict[str | None, list[str]] = {}
    for param in cmd.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        term, text = record
        argument = getattr(param, "param_type_name", "") == "argument"
        panel = getattr(param, "rich_help_panel", None) or ("Arguments" if argument else None)
        lines = [".TP", _term(term, argument)]
        lines.append(_esc(" ".join(text.split())) if text else "")
        panels.setdefault(panel, []).extend(lines)
    out: list[str] = []
    named = [p for p in panels if p not in (None, "Arguments")]
    for panel in ["Arguments", None, *named]:
        if panel not in panels:
            continue
        if panel is not None or len(panels) > 1:
            out.append(f".SS {_esc(panel or 'Options')}")
        out.extend(panels[panel])
    return out


def _walk(cmd: Any, ctx: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    """Yields (name path, command, context) for the app and every visible (sub)command, depth first."""
    import typer

    yield path, cmd, ctx
    for name in sorted(getattr(cmd, "commands", {}) or {}):
        sub = cmd.commands[name]
        if getattr(sub, "hidden", False):
            continue
        yield from _walk(sub, typer.Context(sub, info_name=name, parent=ctx), (*path, name))


def _page(path: tuple[str, ...], cmd: Any, ctx: Any, *, date: str, version: str, all_pages: list[str]) -> str:
    title = "-".join(path)
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    lines = [
        f'.TH "{_esc(title.upper())}" "1" "{date}" "{PROG} {version}" "{PROG} Manual"',
        ".SH NAME",
        f"{_esc(title)} \\- {_esc(_summary(cmd))}",
        ".SH SYNOPSIS",
        f".B {_esc(' '.join(path))}",
        _esc(usage),
    ]
    if getattr(cmd, "deprecated", False):
        lines += [".PP", "This command is deprecated."]
    lines += [".SH DESCRIPTION", _para(_help_text(cmd))]
    examples = _examples(cmd, path[-1]) if len(path) > 1 else []
    if cmd.epilog and not examples:
        lines += [".PP", _para(cmd.epilog)]
    options = _options(cmd, ctx)
    if options:
        lines += [".SH OPTIONS", *options]
    subs = sorted(n for n, c in (getattr(cmd, "commands", {}) or {}).items() if not getattr(c, "hidden", False))
    if subs:
        lines.append(".SH COMMANDS")
        for name in subs:
            page = "-".join((*path, name))
            lines += [".TP", f"\\fB{_esc(name)}\\fR", _esc(_summary(cmd.commands[name])),
                      f"See \\fB{_esc(page)}\\fR(1)."]  # fmt: skip
    if examples:
        lines += [".SH EXAMPLES", ".nf", ".RS"]
        lines += [_esc(e) for e in examples]
        lines += [".RE", ".fi"]
    lines.append(".SH EXIT STATUS")
    for code, text in EXIT_STATUS:
        lines += [".TP", f"\\fB{code}\\fR", _esc(text)]
    lines.append(".SH ENVIRONMENT")
    for var, text in ENVIRONMENT:
        lines += [".TP", f"\\fB{_esc(var)}\\fR", _esc(text)]
    see = [p for p in all_pages if p != title]
    lines += [".SH SEE ALSO", ", ".join(f"\\fB{_esc(p)}\\fR(1)" for p in see) + ("." if see else "")]
    return "\n".join(lines) + "\n"


def render_pages(app: Any = None, *, epoch: int | None = None) -> dict[str, str]:
    """All man pages of ``app`` (default: prunecli's) as {file name: roff text}."""
    import typer

    from prunecli import __version__

    if app is None:
        from prunecli.cli.main import app
    root = typer.main.get_command(app)
    settings = dict(getattr(app, "info", None).context_settings or {}) if getattr(app, "info", None) else {}
    ctx = typer.Context(root, info_name=PROG, **settings)
    walked = list(_walk(root, ctx, (PROG,)))
    names = ["-".join(path) for path, _, _ in walked]
    date = _date(epoch)
    return {f"{'-'.join(p)}.1": _page(p, c, x, date=date, version=__version__, all_pages=names) for p, c, x in walked}


def _stale(directory: Path, pages: dict[str, str]) -> list[Path]:
    return sorted(p for p in directory.glob(f"{PROG}*.1") if p.name not in pages)


def write_pages(directory: Path, pages: dict[str, str]) -> list[str]:
    """Writes changed pages and removes pages of commands that no longer exist; returns what changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, text in sorted(pages.items()):
        target = directory / name
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            changed.append(name)
    for old in _stale(directory, pages):
        old.unlink()
        changed.append(f"-{old.name}")
    return changed


def check_pages(directory: Path, pages: dict[str, str]) -> list[str]:
    """Differences between ``directory`` and ``pages``: one line per missing, changed or stale page."""
    problems = []
    for name, text in sorted(pages.items()):
        target = directory / name
        if not target.is_file():
            problems.append(f"missing: {target}")
        elif target.read_text(encoding="utf-8") != text:
            problems.append(f"out of date: {target}")
    problems += [f"stale (no such command): {p}" for p in _stale(directory, pages)]
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate (or check) the prunecli man pages.")
    parser.add_argument("directory", type=Path, help="folder of the pages, e.g. man")
    parser.add_argument("--check", action="store_true", help="exit 1 if the folder differs from the CLI")
    args = parser.parse_args(argv)
    pages = render_pages()
    if args.check:
        problems = check_pages(args.directory, pages)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("man pages drifted from the CLI; run 'make man' and commit man/", file=sys.stderr)
            return 1
        print(f"{len(pages)} man pages up to date", file=sys.stderr)
        return 0
    changed = write_pages(args.directory, pages)
    print(f"{len(pages)} man pages in {args.directory} ({len(changed)} changed)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

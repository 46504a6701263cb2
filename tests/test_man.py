"""The committed man pages are exactly what tools/gen_man.py makes from the CLI (drift check)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
MAN = ROOT / "man"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_man", ROOT / "tools" / "gen_man.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands(group, prefix: tuple[str, ...] = ("prunecli",)) -> list[str]:
    names = ["-".join(prefix)]
    for name, cmd in sorted(getattr(group, "commands", {}).items()):
        if not cmd.hidden:
            names += _commands(cmd, (*prefix, name))
    return names


def test_committed_pages_match_the_cli(gen, tmp_path: Path) -> None:
    """Regenerate into tmp and compare byte for byte; run 'make man' after changing any help text."""
    pages = gen.render_pages(epoch=0)
    gen.write_pages(tmp_path, pages)
    fresh = sorted(p.name for p in tmp_path.glob("*.1"))
    committed = sorted(p.name for p in MAN.glob("*.1"))
    assert fresh == committed, "man pages missing or stale: run 'make man'"
    for name in fresh:
        assert (tmp_path / name).read_bytes() == (MAN / name).read_bytes(), f"{name} drifted: run 'make man'"


def test_every_command_has_a_page(gen) -> None:
    from prunecli.cli.main import app

    expected = {f"{n}.1" for n in _commands(typer.main.get_command(app))}
    assert set(gen.render_pages(epoch=0)) == expected
    assert expected <= {p.name for p in MAN.glob("*.1")}


def test_page_sections(gen) -> None:
    pages = gen.render_pages(epoch=0)
    for name, text in pages.items():
        assert text.startswith(f'.TH "{name[:-2].upper().replace("-", chr(92) + "-")}" "1" "1970-01-01" "prunecli ')
        for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "ENVIRONMENT", "SEE ALSO"):
            assert f"\n.SH {section}\n" in text, (name, section)
        for code in ("0", "1", "2", "130"):
            assert f"\\fB{code}\\fR" in text
        for var in ("NO_COLOR", "PRUNECLI_DEBUG", "PRUNECLI_NO_PROGRESS", "CUDA_VISIBLE_DEVICES"):
            assert var in text
        assert text.isascii()  # non-ASCII goes through \[uXXXX], so groff needs no preconv
    if shutil.which("groff"):
        for name in pages:
            p = subprocess.run(["groff", "-man", "-Tutf8", "-ww", str(MAN / name)],
                               capture_output=True, text=True, check=False)  # fmt: skip
            assert p.returncode == 0 and p.stderr == "", (name, p.stderr)
    main = pages["prunecli.1"]
    assert "\n.SH COMMANDS\n" in main and "See \\fBprunecli\\-eval\\fR(1)." in main
    from prunecli.cli import eval as cli_eval

    assert "\n.SH EXAMPLES\n" in pages["prunecli-eval.1"]
    for example in cli_eval.EXAMPLES:
        assert example.replace("-", "\\-") in pages["prunecli-eval.1"]
    assert "\\fB\\-\\-reference\\fR" in pages["prunecli-eval.1"]


def test_date_from_source_date_epoch(gen) -> None:
    assert '"2021-01-01"' in gen.render_pages(epoch=1609459200)["prunecli.1"].splitlines()[0]


def test_generator_handles_any_app(gen, tmp_path: Path) -> None:
    """Nested groups, hidden commands, flags, arguments, roff-hostile help text all render."""
    app = typer.Typer(help=".starts with a dot\n\nback\\slash and 'quote' -- dashes, λ ≈ 1e-5 … ‖x‖")
    sub = typer.Typer(help="A group.")
    app.add_typer(sub, name="grp")

    @app.command("visible")
    def visible(path: str, flag: bool = typer.Option(False, "--flag/--no-flag", help="A switch.")) -> None:
        """Do things.

        .Second paragraph starting with a dot.\f
        Hidden from help.
        """

    @app.command("secret", hidden=True)
    def secret() -> None:
        """Hidden."""

    @sub.command("leaf")
    def leaf(n: int = typer.Option(3, "-n", help="Count.")) -> None:
        """A leaf."""

    pages = gen.render_pages(app, epoch=0)
    assert sorted(pages) == ["prunecli-grp-leaf.1", "prunecli-grp.1", "prunecli-visible.1", "prunecli.1"]
    assert (
        "\\&.Second paragraph" in pages["prunecli-visible.1"] and "Hidden from help" not in pages["prunecli-visible.1"]
    )
    assert "\\fB\\-\\-flag\\fR / \\fB\\-\\-no\\-flag\\fR" in pages["prunecli-visible.1"]
    assert "back\\eslash" in pages["prunecli.1"]
    if shutil.which("groff"):
        for name, text in pages.items():
            (tmp_path / name).write_text(text)
            p = subprocess.run(["groff", "-man", "-Tutf8", "-ww", str(tmp_path / name)],
                               capture_output=True, text=True, check=False)  # fmt: skip
            assert p.returncode == 0 and "warning" not in p.stderr, (name, p.stderr)


def test_check_mode_detects_drift(gen, tmp_path: Path) -> None:
    pages = gen.render_pages(epoch=0)
    gen.write_pages(tmp_path, pages)
    env = {**os.environ, "SOURCE_DATE_EPOCH": "0"}
    cmd = [sys.executable, str(ROOT / "tools" / "gen_man.py"), "--check", str(tmp_path)]
    assert subprocess.run(cmd, env=env, capture_output=True, check=False).returncode == 0
    (tmp_path / "prunecli-eval.1").write_text("edited\n")
    (tmp_path / "prunecli-gone.1").write_text("old command\n")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert p.returncode == 1
    assert "out of date" in p.stderr and "prunecli-eval.1" in p.stderr and "prunecli-gone.1" in p.stderr
    gen.write_pages(tmp_path, pages)  # regenerating repairs it and removes the stale page
    assert not (tmp_path / "prunecli-gone.1").exists()
    assert gen.check_pages(tmp_path, pages) == []

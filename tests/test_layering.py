"""The import graph of ``src/prunecli`` has no cycle, and the layers import only downwards.

Read from the source with :mod:`ast`; nothing is imported or executed, so the test sees every file that
exists (including modules other changes are adding) and costs milliseconds.

How the graph is built (the rule the assertions rely on):

- One node per module; a package is the node of its ``__init__.py``.
- An edge ``M -> T`` for every ``import``/``from … import`` in ``M`` that names a ``prunecli`` module,
  at module level **and** inside functions and classes (a deferred import still has to succeed when it
  runs, and a cycle through one is only hidden until then). Imports in the body of ``if TYPE_CHECKING:``
  are skipped: they never run.
- ``from pkg import name`` is an import of ``pkg.name`` when that is a module, else of ``pkg``; relative
  imports are resolved against ``M``'s package.
- Importing ``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py``, so ``M`` gets an edge to each
  such ancestor package as well, **except** the packages ``M`` itself lies in: those are initialised
  before ``M`` runs. This is why a package ``__init__`` that imports its own submodules (re-exports) is
  not a cycle with them, while a submodule that imports a name back from its package's ``__init__``
  (an explicit edge) is one: whether it works depends on the order of lines in ``__init__``.
- Imports by name at run time (``importlib.import_module``: the lazy attributes of ``prunecli`` and
  ``prunecli.api``) are not import statements and are not in the graph; they run when the attribute
  is first used, inside the caller's functions, not while modules initialise.

A cycle is reported as the chain of modules that closes it, so the fix (move the shared helper to the
lower module) can be read off the message.

:data:`KNOWN` lists the few imports that break these rules today, each with the move that removes it;
they are left out of the graph so that the test guards against every *new* cycle or upward import.
The list only shrinks: :func:`test_known_violations_still_exist` fails once an entry is fixed, so the
line is deleted with the fix.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest

import prunecli

SRC = Path(prunecli.__file__).parent
ROOT = "prunecli"


def _module_names() -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` under the package (``pkg/__init__.py`` → ``pkg``)."""
    out: dict[str, Path] = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = [ROOT, *path.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _module_names()

# (importer, imported) → the fix, for an import that breaks a rule and cannot be fixed at once. None today.
KNOWN: dict[tuple[str, str], str] = {}
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, at any depth, except in ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield from _imports_stmt(stmt)
            continue
        yield from _imports_stmt(child)


def _imports_stmt(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from _imports(node)


def _resolve(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The prunecli modules one import statement names (explicit targets only)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in MODULES}
    base = node.module or ""
    if node.level:
        package = module if module in PACKAGES else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    if base.split(".")[0] != ROOT:
        return set()
    out: set[str] = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.add(sub if sub in MODULES else base)
    return {t for t in out if t in MODULES}


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _graph(skip: Collection[tuple[str, str]] = ()) -> dict[str, set[str]]:
    """Module → the modules importing it runs (the rule in the module docstring), less the ``skip`` imports."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        own = {name, *_ancestors(name)}  # the importer's own packages, already initialising
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            for target in _resolve(name, node):
                if (name, target) in skip:
                    continue
                edges.add(target)
                edges.update(a for a in _ancestors(target) if a not in own and a in MODULES)
        edges.discard(name)
        graph[name] = edges
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[m0, m1, …, m0]``, or None (iterative depth-first search)."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if color[start] != WHITE:
            continue
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        color[start] = GREY
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = BLACK
                stack.pop()
            elif color[nxt] == GREY:
                path = [n for n, _ in stack]
                return [*path[path.index(nxt) :], nxt]
            elif color[nxt] == WHITE:
                color[nxt] = GREY
                stack.append((nxt, iter(sorted(graph[nxt]))))
    return None


GRAPH = _graph(skip=KNOWN)


def test_graph_sees_imports_the_way_python_runs_them() -> None:
    """The builder on known edges of this code base (a broken builder would pass the no-cycle test vacuously)."""
    assert "prunecli.checkpoint.header" in GRAPH["prunecli.checkpoint.sources"]  # module level
    assert "prunecli.models" in GRAPH["prunecli.checkpoint.loaders"]  # function level, inside the loaders
    assert "prunecli.checkpoint.adapters" in GRAPH["prunecli.checkpoint.loaders"]  # a nested function-level import
    assert "prunecli.checkpoint.loaders" not in GRAPH["prunecli.checkpoint.writer"]  # under TYPE_CHECKING only
    # ``import a.b.c`` runs ``a.b``'s __init__ too, but not the importer's own package.
    assert "prunecli.checkpoint" in GRAPH["prunecli.models"]
    assert "prunecli.checkpoint" not in GRAPH["prunecli.checkpoint.sources"]


def test_cycle_finder_on_hand_built_graphs() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_resolve_relative_and_from_imports() -> None:
    def targets(module: str, code: str) -> set[str]:
        return _resolve(module, ast.parse(code).body[0])  # type: ignore[arg-type]

    assert targets("prunecli.checkpoint.loaders", "from . import header") == {"prunecli.checkpoint.header"}
    assert targets("prunecli.checkpoint", "from .header import read_header") == {"prunecli.checkpoint.header"}
    assert targets("prunecli.checkpoint.loaders", "from ..errors import CheckpointError") == {"prunecli.errors"}
    assert targets("prunecli.models", "from prunecli import __version__") == {"prunecli"}
    assert targets("prunecli.models", "import torch") == set()


def test_known_violations_still_exist() -> None:
    """An entry of KNOWN that no longer occurs must be deleted (the list only shrinks)."""
    full = _graph()
    gone = [pair for pair in KNOWN if pair[1] not in full.get(pair[0], set())]
    assert not gone, f"fixed, delete from KNOWN: {gone}"


def test_no_import_cycle() -> None:
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _importers_of(prefix: str) -> dict[str, set[str]]:
    return {
        m: {t for t in targets if t == prefix or t.startswith(prefix + ".")}
        for m, targets in GRAPH.items()
        if any(t == prefix or t.startswith(prefix + ".") for t in targets)
    }


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_only_the_cli_and_the_api_import_the_api() -> None:
    """``prunecli.api`` is the top layer: library modules must not reach up into it."""
    allowed = ("prunecli.api", "prunecli.cli")
    bad = {m: t for m, t in _importers_of("prunecli.api").items() if not any(_inside(m, p) for p in allowed)}
    assert not bad, f"modules below the api import it: {bad}"


@pytest.mark.parametrize(("lower", "upper"), [("prunecli.checkpoint", "prunecli.lora")])
def test_lower_layer_never_imports_upper(lower: str, upper: str) -> None:
    """The checkpoint format is read by everything; LoRA training builds on it, never the reverse."""
    bad = {m: t for m, t in _importers_of(upper).items() if _inside(m, lower)}
    assert not bad, f"{lower} imports {upper}: {bad}"

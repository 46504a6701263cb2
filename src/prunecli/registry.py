"""A small named registry, the one extension mechanism of prunecli.

Criteria, restoration methods, data sources and optimizers are all looked up by name, list themselves
in ``--help`` and fail with "unknown X 'foo'; choose from …" (the timm registry and PEFT's
``register_peft_method`` are the models for this).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from prunecli.errors import UnknownNameError

__all__ = ["Registry", "class_key"]

T = TypeVar("T")


def class_key(obj: object) -> str:
    """``module.qualname`` of ``obj``'s class: the name under which rules for third-party classes
    (timm's blocks) are registered, so that a user's own class of the same name is not taken for one."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


class Registry(Generic[T]):
    """Maps names (and aliases) to entries of one kind.

    Args:
        kind: what the entries are, used in error messages ("method", "data source", …).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator that registers an entry under ``name`` (and ``aliases``)."""

        def deco(entry: T) -> T:
            self.add(name, entry, aliases=aliases)
            return entry

        return deco

    def add(self, name: str, entry: T, *, aliases: tuple[str, ...] = ()) -> None:
        """Registers ``entry``; a second registration of the same name is a programming error."""
        if name in self._entries or name in self._aliases:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        for alias in aliases:
            self._aliases[alias] = name

    def canonical(self, name: str) -> str:
        """Returns the registered name that ``name`` (possibly an alias) refers to."""
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise UnknownNameError(f"unknown {self.kind} {name!r}; choose from {', '.join(self.names(with_aliases=True))}")

    def get(self, name: str) -> T:
        """Returns the entry for ``name`` or raises :class:`UnknownNameError` listing the choices."""
        return self._entries[self.canonical(name)]

    def names(self, *, with_aliases: bool = False) -> list[str]:
        """Sorted names, optionally with aliases, for help texts and errors."""
        names = list(self._entries)
        if with_aliases:
            names += list(self._aliases)
        return sorted(names)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def items(self) -> list[tuple[str, T]]:
        """Registered (name, entry) pairs in sorted order."""
        return [(n, self._entries[n]) for n in sorted(self._entries)]

"""Importance criteria: a registry of named :class:`Criterion` classes (README.md, Subcommands ``score --method``).

Each criterion declares its options, what it ``requires`` (``data``, ``grads``) and its granularity;
:mod:`prunecli.scoring` supplies batches and backward passes. Higher scores mean more important (kept
first). Adding one = a module with a :class:`Criterion` subclass plus one ``CRITERIA.add`` line here.

Example:
    >>> from prunecli.criteria import get_criterion
    >>> crit = get_criterion("taylor", {"agg": "sq_mean"})
    >>> crit.requires, crit.granularity
    (frozenset({'data', 'grads'}), 'weight')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prunecli.criteria._base import Criterion, CriterionOutput, ScoreContext, option_help, parse_options
from prunecli.criteria.biascomp import BiasComp
from prunecli.criteria.bnscale import BnScale
from prunecli.criteria.fpgm import Fpgm
from prunecli.criteria.magnitude import Magnitude
from prunecli.criteria.proscore import ProScore
from prunecli.criteria.random import Random
from prunecli.criteria.snip import Snip
from prunecli.criteria.taylor import Taylor
from prunecli.criteria.wanda import Wanda
from prunecli.registry import Registry
from prunecli.requests import KeyValues

__all__ = [
    "CRITERIA",
    "Criterion",
    "CriterionOutput",
    "ScoreContext",
    "check_params",
    "get_criterion",
    "list_criteria",
]

CRITERIA: Registry[type[Criterion]] = Registry("method")

for _cls in (Random, Magnitude, Taylor, Snip, ProScore, BiasComp, Wanda, Fpgm, BnScale):
    CRITERIA.add(_cls.name, _cls, aliases=tuple(_cls.presets))


def get_criterion(name: str, params: Mapping[str, Any] | None = None) -> Criterion:
    """The criterion ``name`` (or an alias such as ``l1``) with ``-p`` options applied and validated.

    Raises:
        UnknownNameError: unknown method or option key.
        InputError: an option value of the wrong type or outside its choices.
    """
    cls = CRITERIA.get(name)
    options = parse_options(cls.Options, params or {}, method=name, preset=cls.presets.get(name))
    return cls(options)


def check_params(name: str, params: Mapping[str, Any] | None) -> None:
    """Refuses an unknown method, and a ``-p`` key the method does not have or that is given twice.

    Raises:
        UnknownNameError: unknown method.
        InputError: unknown or repeated key; the hint lists the method's keys.
    """
    cls = CRITERIA.get(name)
    KeyValues.of(params).check(list(option_help(cls.Options)), f"method {name!r}")


def list_criteria() -> list[dict[str, Any]]:
    """Name, aliases, requirements, granularity and option help of every criterion (sorted by name)."""
    out = []
    for name, cls in CRITERIA.items():
        out.append(
            {
                "name": name,
                "aliases": sorted(cls.presets),
                "requires": sorted(cls.requires),
                "granularity": cls.granularity if "granularity" not in option_help(cls.Options) else "weight|channel",
                "default_batches": cls.default_batches,
                "options": option_help(cls.Options),
                "help": (cls.__doc__ or "").strip().splitlines()[0],
            }
        )
    return out

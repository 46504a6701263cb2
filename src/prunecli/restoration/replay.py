"""Partial forward passes that resume from cached activations instead of starting at the image.

The data-aware methods work layer by layer in forward order, and each step needs the activations that
reach one layer on every calibration batch: ``lstsq`` the input of the consumer it refits (pruned
model) and its dense output, exact ``bn`` the input of the BatchNorm it re-estimates. Run from the
image each time, step ``k`` repeats the whole prefix before layer ``k``: about ``K / 2`` full forward
passes over the calibration set for ``K`` layers (``K ≈ 50`` on a ResNet-50). Yet the prefix only
changes where an earlier step changed a layer.

A :class:`Chain` splits a model's forward into module calls each fed *only* by the previous call's
output (a timm ResNet: stem conv, BN, act, pool, each residual block, pooling, head). It is read off
one recorded forward, conservatively: a module's call is split into its children's calls only when
the first child receives the parent's very input tensor, each next child receives the previous child's
very output tensor — same object, unchanged since (PyTorch's version counter catches an in-place
``x += shortcut`` between two calls) — and the last child's output is the parent's output. Anything
else (a residual add, a functional op between two calls, keyword arguments) keeps the parent whole;
a model whose top call cannot be split is one element, and a :class:`Replay` then runs it from the
image, as before.

A :class:`Replay` keeps the output of one chain element for every calibration batch (a *cut*) and
runs a step from the latest cut before the element holding the layer: the same operations on the same
tensors as the full forward, hence bit-identical activations. The cut moves forward as the steps do,
within a memory budget per model (an element whose outputs for all batches do not fit is never a
cut); a layer change at or before the cut (:meth:`Replay.changed`) drops the cache. With cuts at every
residual block the prefix work of a whole run falls from ``K / 2`` full passes to about the number of
steps per block, in block-sized pieces.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["CACHE_BYTES", "Chain", "Replay", "Stop", "build_chain"]

CACHE_BYTES = 2 << 30  # per model: the cached activations of one cut for every calibration batch


class Stop(Exception):
    """Raised by a hook once the wanted activation is captured: the rest of the forward is not needed."""


@dataclass
class _Call:
    name: str
    seq: int
    inp: Any = None
    in_version: int = -1
    out: Any = None
    out_version: int = -1
    end: int = -1
    mutates_input: bool = False
    children: list[_Call] = field(default_factory=list)


@dataclass
class Chain:
    """A model's forward as consecutive module calls (module ``names``), each fed by the previous output.

    Attributes:
        names: module names of the elements, in call order (``""`` is the model itself: no split).
        spans: per element, the range ``[first, last]`` of call numbers (recorded forward) it covers.
        first_call: module name → number of its first call in the recorded forward.
        out_bytes: per element, the bytes of its output for one sample.
        mutates_input: per element, whether it changes its input in place (the previous output is then
            no cut: a cached tensor must survive being replayed from).
    """

    names: list[str]
    spans: list[tuple[int, int]]
    first_call: dict[str, int]
    out_bytes: list[int]
    mutates_input: list[bool]

    def owner(self, name: str) -> int | None:
        """Index of the element whose call contains ``name``'s first call (None: never called)."""
        seq = self.first_call.get(name)
        if seq is None:
            return None
        for i, (a, b) in enumerate(self.spans):
            if a <= seq <= b:
                return i
        return None


def _single_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    return args[0]


def _splits(call: _Call) -> bool:
    """True when ``call`` is exactly its children's calls in sequence (see the module docstring)."""
    kids = call.children
    if not kids or call.inp is None or not isinstance(call.out, torch.Tensor):
        return False
    if kids[0].inp is not call.inp or kids[0].in_version != call.in_version:
        return False
    for a, b in itertools.pairwise(kids):
        if b.inp is None or b.inp is not a.out or b.in_version != a.out_version:
            return False
    return kids[-1].out is call.out and kids[-1].out_version == call.out_version


def _flatten(call: _Call) -> list[_Call]:
    if _splits(call):
        return [leaf for kid in call.children for leaf in _flatten(kid)]
    return [call]


@torch.no_grad()
def build_chain(model: nn.Module, x: torch.Tensor) -> Chain:
    """Records one forward of ``model`` on ``x`` (one sample is enough) and returns its :class:`Chain`."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[_Call] = []
    stack: list[_Call] = []
    first: dict[str, int] = {}

    def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inp = _single_tensor(args, kwargs)
        call = _Call(names[mod], len(calls), inp, inp._version if inp is not None else -1)
        first.setdefault(call.name, call.seq)
        calls.append(call)
        if stack:
            stack[-1].children.append(call)
        stack.append(call)

    def post(_mod: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
        call = stack.pop()
        call.out = out
        call.out_version = out._version if isinstance(out, torch.Tensor) else -1
        call.end = len(calls) - 1
        call.mutates_input = call.inp is not None and call.inp._version != call.in_version

    hooks = []
    for mod in names:
        hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(mod.register_forward_hook(post))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    if not calls or calls[0].name != "":
        return Chain([""], [(0, max(len(calls) - 1, 0))], first, [0], [False])
    elements = _flatten(calls[0])
    out_bytes = [
        (e.out.numel() // max(len(x), 1)) * e.out.element_size() if isinstance(e.out, torch.Tensor) else 0
        for e in elements
    ]
    spans = [(e.seq, e.end) for e in elements]
    return Chain([e.name for e in elements], spans, first, out_bytes, [e.mutates_input for e in elements])


class Replay:
    """Runs ``model`` up to a layer on every calibration batch, resuming from the latest affordable cut.

    ``model`` must keep its structure (not its weights) while the replay is used; weights or statistics
    changed at or before the cut must be announced with :meth:`changed`. ``budget``: bytes of cached
    activations (default :data:`CACHE_BYTES`, read at construction; 0 replays every pass from the image).
    Captured tensors may alias the cache: callers must not change them in place.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[torch.Tensor],
        *,
        budget: int | None = None,
        chain: Chain | None = None,
    ) -> None:
        self.model = model
        self.batches = list(batches)
        self.chain = chain if chain is not None else build_chain(model, self.batches[0][:1])
        samples = sum(len(b) for b in self.batches)
        nxt = [*self.chain.mutates_input[1:], True]  # the last element's output feeds nothing we replay
        budget = CACHE_BYTES if budget is None else budget
        self._cut_ok = [b * samples <= budget and not m for b, m in zip(self.chain.out_bytes, nxt, strict=True)]
        self._modules = [model.get_submodule(n) if n else model for n in self.chain.names]
        self.pos = -1  # the cached element (-1: the calibration batches themselves)
        self.cache: list[torch.Tensor] = self.batches
        self.element_calls = 0  # element forwards run, a measure of the work done

    def changed(self, name: str) -> None:
        """Drops the cache when module ``name`` (just rewritten) lies at or before the cut."""
        i = self.chain.owner(name)
        if i is None or i <= self.pos:
            self.pos, self.cache = -1, self.batches

    def _run(self, start: int, stop: int, h: torch.Tensor) -> torch.Tensor:
        """Elements ``start..stop-1`` on ``h``."""
        for i in range(start, stop):
            h = self._modules[i](h)
            self.element_calls += 1
        return h

    @torch.no_grad()
    def _prepare(self, i: int) -> None:
        """Moves the cut to the latest affordable element before element ``i``."""
        if self.pos >= i:
            self.pos, self.cache = -1, self.batches
        target = max([k for k in range(self.pos + 1, i) if self._cut_ok[k]], default=self.pos)
        if target > self.pos:
            self.cache = [self._run(self.pos + 1, target + 1, h) for h in self.cache]
            self.pos = target

    def forward_to(self, name: str, b: int, *, whole: bool = False) -> None:
        """Runs batch ``b`` as far as module ``name`` — the whole model when ``whole`` (a module called more
        than once) — and stops there if a hook raises :class:`Stop`."""
        i = None if whole else self.chain.owner(name)
        with torch.no_grad(), contextlib.suppress(Stop):
            if i is None:
                self.model(self.batches[b])
                self.element_calls += len(self._modules)
                return
            self._prepare(i)
            self._run(self.pos + 1, i + 1, self.cache[b])

    def capture(self, name: str, b: int, want: str) -> torch.Tensor:
        """The input (``want="input"``) or output of module ``name`` (its first call) on batch ``b``."""
        mod = self.model.get_submodule(name)
        box: dict[str, torch.Tensor] = {}

        def pre(_m: nn.Module, args: tuple[Any, ...]) -> None:
            box["t"] = args[0].detach()
            raise Stop

        def post(_m: nn.Module, _a: tuple[Any, ...], out: torch.Tensor) -> None:
            box["t"] = out.detach()
            raise Stop

        hook = mod.register_forward_pre_hook(pre) if want == "input" else mod.register_forward_hook(post)
        try:
            self.forward_to(name, b)
        finally:
            hook.remove()
        if "t" not in box:
            raise RuntimeError(f"{name} was not reached by the forward pass")
        return box["t"]

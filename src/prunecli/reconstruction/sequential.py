"""Layer-by-layer reconstruction of a model in forward order (docs/obs.md, "Sequential").

Each layer is solved from the inputs that the model produces *after* the layers before it have been
reconstructed, so a later layer sees, and partly absorbs, the error of the earlier ones.

Schedule. Rerunning the model up to every layer costs about half a forward pass of the calibration set
per layer. Instead, one recording pass over the first batch finds *chains*: modules whose forward only
passes one tensor from child to child (``nn.Sequential``, timm's stage lists, a ResNet's top level).
Checked by tensor identity and version counter, with no other argument: the child's output *is* the
next child's input and nothing changed it in place in between, so running the children one after
another gives the module's output. Inside a chain the children are *units*; a unit that is itself a
chain and holds target layers is split further. Per chain, the calibration batches' inputs of the
chain are captured once (one forward stopped at the chain), then for each unit in turn: its target
layers are solved from the cached unit inputs (the unit is rerun on them, stopped at each target in
turn, so each target sees the already solved layers before it), and the cache is replaced by the
unit's outputs. A run of units without targets is applied as one step. A target that receives its
unit's input itself (same tensor, unchanged: a unit that is a layer, a ResNet block's first conv and its
downsample) takes its Gram matrix straight from the cache, without a rerun. Inside a unit, the calls
whose outputs are final (every target in them solved) are kept and stood in for in the unit's later
reruns (``_Settled``), so each layer of a unit runs about once: the whole model costs about one forward
pass. Targets outside any chain (a ViT's patch embedding and head, whose parents do functional work
between children) and models with no chains at all use the fallback: one forward pass per target,
stopped at it; in those passes a finished chain (called once per pass) returns its cached output
instead of running again (``_Replay``), so a ViT's head costs the work after its blocks. The recording
pass also checks what the cached schedule assumes; if a target is called from two units (weight sharing
across units) or the chains do not cover the targets in the order the forward calls them, the whole
model uses the fallback.

Memory: the model, one layer's Gram matrix (and the solver's one work matrix of the same size), one
batch of activations, and the cache: per calibration batch, one tensor at the current unit boundary
(the input of the unit being solved), i.e. one activation of the calibration set at a time; it is
replaced, batch by batch, as the units advance, and freed when the chain ends. Inside the unit being
solved, the kept outputs of its settled calls (its solved layers or sub-blocks), freed when it is left.

Multi-process (``torchrun``): give each process its shard of the calibration batches; each layer's Gram
matrix and position count are summed over the processes before the solve, so every process computes
the same weights, equal to the one-process result up to float summation order. Every process must have
at least one batch, and the forward must call the layers in the same order on every batch.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunecli.distributed import all_reduce_tensors, is_distributed
from prunecli.errors import InputError
from prunecli.progress import progress
from prunecli.reconstruction.hessian import GramAccumulator, supports
from prunecli.reconstruction.obs import NM, obs_prune, selector

__all__ = ["LayerResult", "ReconstructionReport", "Target", "reconstruct"]

Target = torch.Tensor | float | NM | tuple[int, int]
Forward = Callable[[nn.Module, Any, torch.device], Any]


@dataclass(frozen=True)
class LayerResult:
    """What happened to one layer.

    Attributes:
        name: module name.
        status: ``reconstructed``, ``unreached`` (the forward never called it; unchanged) or
            ``skipped`` (unsupported; unchanged, see ``note``).
        error_mask: ``‖(W − W⊙keep) X‖²`` summed over the calibration positions (plain mask, no update).
        error_obs: ``‖(W − Ŵ) X‖²`` for the reconstructed weight; ``X`` are the layer's inputs in the
            partially reconstructed model, ``W`` its weight before this call.
        positions: calibration positions (columns of ``X``) seen.
        sparsity: fraction of exact zeros in the weight afterwards.
        fallback_rows: rows (over all groups) left at the plain mask because the update was worse.
        note: why a layer was skipped.
        signal: ``‖W X‖²`` on the same inputs: ``error / signal`` is the relative error.
    """

    name: str
    status: str
    error_mask: float = 0.0
    error_obs: float = 0.0
    positions: int = 0
    sparsity: float = 0.0
    fallback_rows: int = 0
    note: str = ""
    signal: float = 0.0


@dataclass
class ReconstructionReport:
    """Per-layer results in the order solved (unreached and skipped layers last) and warnings."""

    layers: dict[str, LayerResult] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class _Stop(BaseException):
    """Raised by a hook to end a forward pass once the layer being solved has seen its inputs.

    A BaseException, so that model code catching ``Exception`` cannot swallow it and run on.
    """


def _default_forward(model: nn.Module, batch: Any, device: torch.device) -> Any:
    """Runs ``model`` on a batch: a tensor, or a (tensor, label, …) sequence as data loaders yield."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return model(x.to(device))


def _module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    mod = modules.get(name) or modules.get(name.removesuffix(".weight"))
    if mod is None or getattr(mod, "weight", None) is None:
        raise InputError(f"the model has no layer {name!r} to reconstruct")
    return mod


def _skip_reason(mod: nn.Module, target: Target) -> str:
    """Why a layer cannot be solved ('' when it can); mismatched masks are input errors instead."""
    if not supports(mod):
        return f"{type(mod).__name__} layers are not supported"
    w = mod.weight
    if isinstance(target, torch.Tensor):
        if tuple(target.shape) != tuple(w.shape):
            raise InputError(f"the mask of {tuple(target.shape)} does not match the weight {tuple(w.shape)}")
        return ""
    cols = w[0].numel()
    try:
        selector(target, cols)
    except InputError as exc:
        if isinstance(target, (NM, tuple)):
            return str(exc)
        raise
    return ""


def _first_calls(
    model: nn.Module, modules: Mapping[str, nn.Module], batch: Any, forward: Forward, device: torch.device
) -> dict[str, int]:
    """Layer name → calls in one forward pass, in the order of each layer's first call."""
    calls: dict[str, int] = {}
    handles = []
    for name, mod in modules.items():

        def count(_m: nn.Module, _a: Any, name: str = name) -> None:
            calls[name] = calls.get(name, 0) + 1

        handles.append(mod.register_forward_pre_hook(count))
    try:
        forward(model, batch, device)
    finally:
        for h in handles:
            h.remove()
    return calls


def _gram(mod: nn.Module, calls: int, runs: Iterable[Callable[[], Any]], device: torch.device) -> GramAccumulator:
    """The layer's Gram matrix over all ``runs`` (one per calibration batch); each run stops after the layer's
    last call. Under torchrun the matrix and the position count are summed over the processes."""
    acc = GramAccumulator(mod, device)
    seen = [0]

    def hook(m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        acc.hook(m, args)
        seen[0] += 1
        if seen[0] >= calls:
            raise _Stop

    handle = mod.register_forward_pre_hook(hook)
    try:
        for run in runs:
            seen[0] = 0
            with contextlib.suppress(_Stop):
                run()
    finally:
        handle.remove()
    return _summed(acc)


def _gram_of(mod: nn.Module, inputs: Iterable[torch.Tensor], device: torch.device) -> GramAccumulator:
    """The layer's Gram matrix from its inputs themselves (no forward pass), summed like :func:`_gram`."""
    acc = GramAccumulator(mod, device)
    for x in inputs:
        acc.add(x)
    return _summed(acc)


def _summed(acc: GramAccumulator) -> GramAccumulator:
    if is_distributed():  # each rank saw its shard of the batches: the one-process H is the sum
        summed = all_reduce_tensors({"h": acc.h, "positions": torch.tensor(acc.positions, device=acc.h.device)})
        acc.h, acc.positions = summed["h"], int(summed["positions"])
    return acc


# ---------------------------------------------------------------- the cached schedule (module docstring)


@dataclass
class _Call:
    """One module call of the recording pass; ``children`` are the calls made while it ran."""

    module: nn.Module
    parent: int | None
    children: list[int] = field(default_factory=list)
    single: bool = False  # exactly one positional tensor argument and no keyword arguments
    link: int | None = None  # the call whose output is this call's input, unchanged since it was returned
    from_parent: bool = False  # the input is the parent call's input, unchanged
    to_parent: bool = False  # the output is the last child's output, unchanged (a tensor)
    mutates: bool = False  # the call changed its input in place (reruns then get a copy)
    in_size: int = 0  # elements of the single tensor input (0: none)
    out_size: int = 0  # elements of the output tensor (0: not a tensor)


def _record(model: nn.Module, batch: Any, forward: Forward, device: torch.device) -> list[_Call]:
    """Every module call of one forward pass, in call order, with the links the chains need.

    Identity alone is not enough (an in-place op keeps the object, e.g. a residual ``x += shortcut``
    on a child's output), so each link also compares the tensor's version counter.
    """
    calls: list[_Call] = []
    stack: list[int] = []
    seen_in: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
    seen_out: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
    producers: dict[int, tuple[int, weakref.ref[torch.Tensor], int]] = {}

    def same(ref: tuple[Any, int] | None, x: torch.Tensor) -> bool:
        return ref is not None and ref[0]() is x and ref[1] == x._version

    def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        idx, parent = len(calls), (stack[-1] if stack else None)
        call = _Call(mod, parent)
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            x = args[0]
            call.single = True
            prod = producers.get(id(x))
            if prod is not None and same(prod[1:], x):
                call.link = prod[0]
            call.from_parent = parent is not None and same(seen_in.get(parent), x)
            seen_in[idx] = (weakref.ref(x), x._version)
            call.in_size = x.numel()
        if parent is not None:
            calls[parent].children.append(idx)
        calls.append(call)
        stack.append(idx)

    def post(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        idx = stack.pop()
        call = calls[idx]
        if idx in seen_in:
            call.mutates = seen_in[idx][1] != args[0]._version
        if isinstance(out, torch.Tensor):
            call.to_parent = bool(call.children) and same(seen_out.get(call.children[-1]), out)
            seen_out[idx] = (weakref.ref(out), out._version)
            call.out_size = out.numel()
            producers[id(out)] = (idx, weakref.ref(out), out._version)

    handles = []
    for mod in model.modules():
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        forward(model, batch, device)
    finally:
        for h in handles:
            h.remove()
    return calls


@dataclass(frozen=True)
class _Chain:
    """A chain call and its units (calls), in order; ``targets[k]`` are the target names of unit ``k``
    in first-call order, with their call counts."""

    call: int
    units: list[int]
    targets: list[list[tuple[str, int]]]
    record: list[_Call] = field(repr=False, default_factory=list)
    direct: frozenset[str] = frozenset()  # targets called once, on their unit's input itself (see _direct)
    once: bool = False  # the chain's module is called once per forward pass: later passes may replay it
    inside: dict[int, frozenset[str]] = field(repr=False, default_factory=dict)  # call → targets in its subtree


Step = _Chain | str  # a chain, or a target solved by the fallback (one forward pass stopped at it)


def _schedule(
    calls: list[_Call], names: Mapping[int, str], order: list[str], counts: Mapping[str, int]
) -> list[Step] | None:
    """The steps solving ``order`` (target names in first-call order), or None when the cached schedule
    does not apply (a target called from two units, steps out of the forward order)."""
    tgt: list[list[str]] = [[] for _ in calls]  # per call: target names called in its subtree, in call order
    for i in reversed(range(len(calls))):
        own = names.get(id(calls[i].module))
        sub = ([own] if own is not None else []) + [n for k in calls[i].children for n in tgt[k]]
        tgt[i] = sub

    def chainable(i: int) -> bool:
        c = calls[i]
        kids = [calls[k] for k in c.children]
        return (
            c.single
            and c.to_parent
            and id(c.module) not in names
            and bool(kids)
            and kids[0].from_parent
            and all(k.single for k in kids)
            and all(kids[j].link == c.children[j - 1] for j in range(1, len(kids)))
        )

    def units(i: int) -> list[int]:
        out: list[int] = []
        for k in calls[i].children:
            out.extend(units(k) if tgt[k] and chainable(k) else [k])
        return out

    def plan(i: int) -> list[Step]:
        if not tgt[i]:
            return []
        if chainable(i):
            us = units(i)
            per_unit = []
            for u in us:
                firsts = list(dict.fromkeys(tgt[u]))
                if any(tgt[u].count(n) != counts[n] for n in firsts):  # some calls happen outside the unit
                    raise _NotCached
                per_unit.append([(n, counts[n]) for n in firsts])
            once = sum(c.module is calls[i].module for c in calls) == 1
            inside = {k: frozenset(tgt[k]) for k in range(len(calls)) if tgt[k]}
            return [_Chain(i, us, per_unit, calls, _direct(calls, names, us, counts), once, inside)]
        own = names.get(id(calls[i].module))
        steps: list[Step] = [own] if own is not None else []
        for k in calls[i].children:
            steps.extend(plan(k))
        return steps

    steps: list[Step] = []
    try:
        for i, c in enumerate(calls):
            if c.parent is None:
                steps.extend(plan(i))
    except _NotCached:
        return None
    flat: list[str] = []
    for step in steps:
        flat.extend([step] if isinstance(step, str) else [n for unit in step.targets for n, _ in unit])
    return steps if flat == order else None


def _direct(
    calls: list[_Call], names: Mapping[int, str], units: list[int], counts: Mapping[str, int]
) -> frozenset[str]:
    """Targets whose input *is* their unit's input: called once per pass, and every call from the unit
    down to the layer handed its own input on unchanged (same tensor, same version counter), like a
    ResNet block's first conv and its downsample. Their Gram matrix comes from the cached unit inputs
    directly: no rerun of the unit up to them (for the downsample, a rerun of the whole block)."""
    out: set[str] = set()
    for u in units:
        stack = [u]  # the unit itself may be the target (a stem conv in a chain)
        while stack:
            i = stack.pop()
            name = names.get(id(calls[i].module))
            if name is not None and counts.get(name) == 1:
                j = i
                while j != u and calls[j].from_parent:
                    j = calls[j].parent  # type: ignore[assignment]
                if j == u:
                    out.add(name)
            stack.extend(calls[i].children)
    return frozenset(out)


class _NotCached(Exception):
    """A target is called from more than one unit: the cached schedule does not apply."""


def _run_unit(mod: nn.Module, x: torch.Tensor, copy: bool) -> Any:
    return mod(x.clone() if copy else x)


def _capture(mod: nn.Module, runs: list[Callable[[], Any]]) -> list[torch.Tensor] | None:
    """``mod``'s input on every calibration batch (one run per batch, each stopped there), or None if some
    batch never reaches it."""
    cache: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        cache.append(args[0].detach())
        raise _Stop

    handle = mod.register_forward_pre_hook(hook)
    try:
        for n, run in enumerate(runs, 1):
            with contextlib.suppress(_Stop):
                run()
            if len(cache) != n:
                return None
    finally:
        handle.remove()
    return cache


class _Replay:
    """The latest finished chain, standing in for itself in later full forward passes.

    Once a chain's targets are solved, its output on each calibration batch no longer changes (every
    layer it depends on comes earlier in the forward order, so is solved already). A later step that
    needs a full pass (a fallback target such as a ViT's head, or the capture of the next chain) runs
    the model from the image, but the chain's module returns its cached output for that batch (a copy:
    the code after it may write into its input) instead of recomputing it, so the pass costs what lies
    outside the chain. Only for a chain called once per forward pass.
    """

    def __init__(self) -> None:
        self.module: nn.Module | None = None
        self.outputs: list[torch.Tensor] = []

    def keep(self, module: nn.Module, outputs: list[torch.Tensor]) -> None:
        self.module, self.outputs = module, outputs

    def runs(
        self, model: nn.Module, calib: Iterable[Any], forward: Forward, device: torch.device
    ) -> list[Callable[[], Any]]:
        """One full pass per calibration batch, each with this replay standing in for its chain."""
        return [functools.partial(self._run, k, model, batch, forward, device) for k, batch in enumerate(calib)]

    def _run(self, k: int, model: nn.Module, batch: Any, forward: Forward, device: torch.device) -> Any:
        with _stubbed({self.module: self.outputs[k]} if self.module is not None else {}):
            return forward(model, batch, device)


@contextlib.contextmanager
def _stubbed(outputs: Mapping[nn.Module, torch.Tensor]) -> Iterator[None]:
    """Each module returns a copy of its given output instead of computing it (hooks still run)."""
    saved = {mod: mod.__dict__.get("forward") for mod in outputs}
    for mod, out in outputs.items():
        mod.forward = functools.partial(_copy_of, out)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for mod, fwd in saved.items():
            if fwd is None:
                del mod.forward
            else:
                mod.forward = fwd  # type: ignore[method-assign]


def _copy_of(out: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
    return out.clone()  # the code after the module may write into its output


class _Settled:
    """Inside one unit, the calls whose outputs no longer change, kept and stood in for in later reruns.

    The unit is rerun once per non-direct target; without this, every rerun recomputes everything
    before the target (a bottleneck's first conv three times, a ViT block's qkv four times). A call
    below the unit whose subtree holds targets, all of them solved, and whose module the unit calls once
    has a final output: every target called before it is solved too (targets are solved in call order),
    so its input is final. Its output is recorded (per batch) the first time such a call runs, and the
    later reruns and the advance past the unit get it back instead of running it. Only the topmost such
    calls are kept (an attention module once its qkv and proj are solved, not also its qkv), and only
    calls holding targets: the layers and blocks where the work is; norms and activations run again.
    Memory: the kept outputs of a unit together stay within the size of its cached inputs (sizes from
    the recording pass): a bottleneck keeps its narrow convs' outputs, a transformer block its attention
    output but not the 3× wide ``qkv`` or 4× wide MLP hidden outputs, which are recomputed instead.
    Freed when the unit is left.
    """

    def __init__(self, chain: _Chain, unit: int, batches: int) -> None:
        rec = chain.record
        self.rec, self.inside, self.batches = rec, chain.inside, batches
        self.unit = unit
        below: list[int] = []
        stack = list(rec[unit].children)
        while stack:
            i = stack.pop()
            below.append(i)
            stack.extend(rec[i].children)
        self.once = {i for i in below if sum(rec[j].module is rec[i].module for j in below) == 1}
        self.outputs: dict[int, list[torch.Tensor]] = {}
        self.budget = rec[unit].in_size  # elements per pass (the recording pass's batch)

    def _final(self, solved: set[str]) -> tuple[list[int], list[int]]:
        """(final calls with kept outputs, final calls to record): topmost first; inside a call still to
        be recorded, its own kept calls are used."""
        have: list[int] = []
        grab: list[int] = []
        stack = list(self.rec[self.unit].children)
        while stack:
            i = stack.pop()
            names = self.inside.get(i)
            if not names:
                continue
            if names <= solved and i in self.once:
                if i in self.outputs:
                    have.append(i)
                    continue
                grab.append(i)
            stack.extend(self.rec[i].children)
        room = self.budget - sum(self.rec[i].out_size for i in self.outputs)
        fits = []
        for i in grab:  # topmost first; a call stood in for by a new one frees its room only later
            size = self.rec[i].out_size
            if 0 < size <= room:
                fits.append(i)
                room -= size
        return have, fits

    def runs(self, cache: list[torch.Tensor], unit: _Call, solved: set[str], record: bool) -> list[Callable[[], Any]]:
        """One run of the unit per cached batch with the known final outputs stood in; with ``record``,
        the final calls not yet kept are recorded during these runs."""
        have, grab = self._final(solved)
        if not record:
            grab = []
        taken: dict[int, list[torch.Tensor]] = {i: [] for i in grab}

        def keep(i: int, _m: nn.Module, _a: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):  # a copy: the code after the call may write into it
                taken[i].append(out.detach().clone())

        def run(k: int, x: torch.Tensor) -> Any:
            hooks = [self.rec[i].module.register_forward_hook(functools.partial(keep, i)) for i in grab]
            try:
                with _stubbed({self.rec[i].module: self.outputs[i][k] for i in have}):
                    return _run_unit(unit.module, x, unit.mutates)
            finally:
                for h in hooks:
                    h.remove()
                if k == len(cache) - 1:  # the last batch: keep the calls every batch gave an output for
                    for i, outs in taken.items():
                        if len(outs) == self.batches:
                            self.outputs[i] = outs
                            for j in [j for j in self.outputs if self._within(j, i)]:
                                del self.outputs[j]  # stood in for by ``i`` from now on

        return [functools.partial(run, k, x) for k, x in enumerate(cache)]

    def _within(self, j: int, i: int) -> bool:
        """Whether call ``j`` runs inside call ``i`` (strictly)."""
        p = self.rec[j].parent
        while p is not None and p != self.unit:
            if p == i:
                return True
            p = self.rec[p].parent
        return False


def _solve_layer(
    name: str,
    mod: nn.Module,
    target: Target,
    acc: GramAccumulator,
    *,
    damp: float,
    blocksize: int,
    guard: bool,
    refit: bool,
) -> LayerResult:
    """Solves every group of the layer and writes the weight back in place."""
    w = mod.weight.detach()
    groups = acc.h.shape[0]
    w2 = w.reshape(w.shape[0], -1)
    rows = w2.shape[0] // groups
    keep = (target != 0).reshape(w2.shape) if isinstance(target, torch.Tensor) else None
    out = torch.empty_like(w2)
    err_mask = err_obs = signal = 0.0
    fallback = 0
    for g in range(groups):
        sl = slice(g * rows, (g + 1) * rows)
        tgt = keep[sl].to(w.device) if keep is not None else target
        h = acc.h[g].to(w.device)  # owned here: the solver may dampen it in place
        res = obs_prune(w2[sl], h, tgt, damp=damp, blocksize=blocksize, guard=guard, refit=refit, overwrite=True)
        out[sl] = res.weight
        err_mask += res.error_mask
        err_obs += res.error_obs
        fallback += res.fallback_rows
        signal += res.signal
    with torch.no_grad():
        mod.weight.copy_(out.view_as(mod.weight))
    sparsity = float((out == 0).sum()) / max(1, out.numel())
    return LayerResult(name, "reconstructed", err_mask, err_obs, acc.positions, sparsity, fallback, signal=signal)


def _probe(batch: Any, forward: Forward) -> Any:
    """Two images of the first batch for the recording pass when the default forward runs: the modules
    called and their order do not depend on the batch size, and a whole calibration batch would cost a
    full forward pass just to plan. A custom ``forward`` gets the batch as it is."""
    if forward is not _default_forward:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch[:2]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0][:2], *batch[1:])
    return batch


def _plan(
    model: nn.Module,
    todo: Mapping[str, nn.Module],
    first: Any,
    forward: Forward,
    device: torch.device,
    cache: bool,
) -> tuple[dict[str, int], list[Step]]:
    """(target name → calls per forward pass, in first-call order; the steps), from one pass over ``first``.

    The recording pass gives both the call order and the chains; without ``cache`` (or when one module
    has two target names) a lighter pass counts the calls and every target uses the fallback.
    """
    names = {id(mod): name for name, mod in todo.items()}
    if not cache or len(names) != len(todo):
        calls = _first_calls(model, todo, first, forward, device)
        return calls, list(calls)
    record = _record(model, _probe(first, forward), forward, device)
    calls: dict[str, int] = {}
    for call in record:
        name = names.get(id(call.module))
        if name is not None:
            calls[name] = calls.get(name, 0) + 1
    steps = _schedule(record, names, list(calls), calls)
    return calls, list(calls) if steps is None else steps


def _run_steps(
    model: nn.Module,
    steps: list[Step],
    todo: Mapping[str, nn.Module],
    layers: Mapping[str, Target],
    calls: Mapping[str, int],
    calib: Iterable[Any],
    forward: Forward,
    device: torch.device,
    solve: Callable[..., LayerResult],
) -> Iterator[LayerResult]:
    """Solves the targets step by step, in forward order; yields each layer's result as it is done."""
    replay = _Replay()

    def fallback(name: str) -> LayerResult:
        runs = replay.runs(model, calib, forward, device)
        return solve(name, todo[name], layers[name], _gram(todo[name], calls[name], runs, device))

    for i, step in enumerate(steps):
        if isinstance(step, str):
            yield fallback(step)
            continue
        later = i + 1 < len(steps)
        yield from _run_chain(model, step, todo, layers, calib, forward, device, solve, fallback, replay, later)


def _run_chain(
    model: nn.Module,
    chain: _Chain,
    todo: Mapping[str, nn.Module],
    layers: Mapping[str, Target],
    calib: Iterable[Any],
    forward: Forward,
    device: torch.device,
    solve: Callable[..., LayerResult],
    fallback: Callable[[str], LayerResult],
    replay: _Replay,
    later: bool,
) -> Iterator[LayerResult]:
    """One chain: capture its inputs once, then per unit solve its targets from the cache and advance it.
    With ``later`` steps, the cache is advanced to the chain's output and kept in ``replay``."""
    rec = chain.record
    cache = _capture(rec[chain.call].module, replay.runs(model, calib, forward, device))
    if cache is None:  # some batch does not reach the chain: nothing is solved yet, so the fallback is exact
        for unit in chain.targets:
            for name, _ in unit:
                yield fallback(name)
        return
    pending: list[_Call] = []  # units passed since the cache was last advanced
    settled: _Settled | None = None  # the last solved unit's final inner outputs, for advancing past it
    solved: set[str] = set()
    for u, targets in zip(chain.units, chain.targets, strict=True):
        if not targets:
            pending.append(rec[u])
            continue
        _advance(cache, pending, settled, solved)
        unit, settled = rec[u], _Settled(chain, u, len(cache))
        for name, count in targets:
            if name in chain.direct:
                acc = _gram_of(todo[name], cache, device)
            else:
                acc = _gram(todo[name], count, settled.runs(cache, unit, solved, record=True), device)
            yield solve(name, todo[name], layers[name], acc)
            solved.add(name)
        pending = [unit]
    if later and chain.once:
        _advance(cache, pending, settled, solved)  # the chain's output (its last unit's output) on every batch
        replay.keep(rec[chain.call].module, cache)
    else:
        cache.clear()


def _advance(cache: list[torch.Tensor], units: list[_Call], settled: _Settled | None, solved: set[str]) -> None:
    """Runs every cached batch through ``units`` in place of the cached inputs; the first unit (the one
    just solved) with its final inner outputs stood in."""
    for k, run in enumerate(settled.runs(cache, units[0], solved, record=False) if settled and units else []):
        cache[k] = run()
    rest = units[1:] if settled and units else units
    for k, x in enumerate(cache):
        for unit in rest:
            x = _run_unit(unit.module, x, unit.mutates)
        cache[k] = x


def reconstruct(
    model: nn.Module,
    layers: Mapping[str, Target],
    calib: Iterable[Any],
    *,
    damp: float = 0.01,
    blocksize: int = 128,
    device: torch.device | str | None = None,
    forward: Forward | None = None,
    guard: bool = True,
    refit: bool = False,
    cache: bool = True,
) -> ReconstructionReport:
    """Prunes and reconstructs ``layers`` of ``model`` in place, in forward order, from calibration batches.

    Args:
        model: the model (dense for a joint mask; for a given mask, the dense parent whose outputs the
            masked layers should reproduce). Run in eval mode; its training flag is restored.
        layers: module name → target: a keep mask (tensor of the weight's shape, kept where ``!= 0``),
            a per-row sparsity in ``[0, 1)``, or N:M as ``NM(n, m)`` / ``(n, m)``.
        calib: re-iterable calibration batches (a DataLoader; tensors or (tensor, label) pairs). It is
            iterated more than once (per chain, per fallback layer), so it must yield the same batches each time.
        damp: relative dampening λ > 0 of the Gram matrices.
        blocksize: columns per lazy-update block.
        device: where the forward passes and the solves run (default: the model's device); the model
            is moved there and back.
        forward: ``forward(model, batch, device)``; default: ``model(batch[0])`` or ``model(batch)``.
        guard: per row, keep the plain mask where the update does worse on the calibration data.
        refit: per row, the optimum on the chosen mask instead of the schedule's weights (obs.py).
        cache: the cached schedule (module docstring); False reruns the model up to every layer (the
            fallback for every layer; same result, about half a forward pass per layer).

    Returns:
        per-layer errors before/after, statuses and warnings (layers the forward never reaches are left
        unchanged and warned about).

    Raises:
        InputError: ``damp <= 0``, an unknown layer, a mask of the wrong shape, a one-shot iterator,
            or no calibration batches.

    Example:
        >>> report = reconstruct(model, {"fc1": 0.5, "fc2": (2, 4)}, loader)
    """
    if not damp > 0:
        raise InputError(f"damp={damp}: dampening must be a positive number", hint="e.g. -p damp=0.01")
    if iter(calib) is calib:
        raise InputError("the calibration batches must be re-iterable (a DataLoader or a list), not an iterator")
    forward = forward or _default_forward
    modules = {name: _module(model, name) for name in layers}
    report = ReconstructionReport()
    todo: dict[str, nn.Module] = {}
    for name, mod in modules.items():
        reason = _skip_reason(mod, layers[name])
        if reason:
            report.layers[name] = LayerResult(name, "skipped", note=reason)
            report.warnings.append(f"{name}: skipped, {reason}")
        else:
            todo[name] = mod
    first = next(iter(calib), None)
    if first is None:
        raise InputError("no calibration batches")
    params = list(model.parameters())
    home = params[0].device if params else torch.device("cpu")
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.to(device).eval()
    solve = functools.partial(_solve_layer, damp=damp, blocksize=blocksize, guard=guard, refit=refit)
    try:
        with torch.no_grad():
            calls, steps = _plan(model, todo, first, forward, device, cache)
            run = _run_steps(model, steps, todo, layers, calls, calib, forward, device, solve)
            for res in progress(run, total=len(calls), description="obs reconstruction"):
                report.layers[res.name] = res
    finally:
        model.train(was_training)
        model.to(home)
    for name in todo:
        if name not in calls:
            report.layers[name] = LayerResult(name, "unreached", note="the forward pass never calls it")
            report.warnings.append(f"{name}: the forward pass never reaches it; left unchanged")
    return report

"""``prunecli prune``: remove weights (unstructured, N:M) or channels from a checkpoint (README.md, Subcommands).

Scores come from a scores file (``--scores``, written by ``prunecli score``) or are computed in
process (``--method M [--data SPEC]``). Magnitude (``magnitude``/``l1``/``l2``) for unstructured and
N:M pruning is computed per layer on the fly (``|w|``; the L1 and L2 norms of a single weight rank
identically), so pruning a large model never holds a second copy of its weights.

Default scope (``--scope`` not given): ``global`` for criteria whose scores estimate the change of
the loss and are therefore comparable across layers (``taylor``, ``snip``, ``biascomp``,
``proscore``; paper A ranks Taylor and SNIP globally, paper E ranks globally), ``layer`` for every
other criterion (magnitude as in paper A's ``l1_unstructured``, ``random``, ``wanda``, whose scale
differs from layer to layer).

The layers pruned are the prunable ones (:mod:`prunecli.prunable`) minus the classifier head (unless
``include_head``) minus those matching an ``exclude`` glob. ``layer_ratios`` (``GLOB=R``; the last
matching pattern wins) gives matching layers their own ratio and scope.

Fast path: unstructured and N:M pruning of a checkpoint whose layer table is known
(:mod:`prunecli.layertable`: every checkpoint prunecli saves from a model carries one; a third-party
timm folder, train.py file or bare state dict gets it from the layer-table cache,
:mod:`prunecli.checkpoint.table_cache`), with magnitude scores or a scores file and without
``--compensate``/``--input-size``/model args, never rebuilds the model: the table gives the prunable
weights, the head and the MACs; magnitude pruning maps the file read-only and masks each pruned tensor
as it is written (no copy of the weights), scores files and N:M read the file once into a buffer and
prune it in place; both hash the input and the output on a worker thread without a second pass over
either. timm is not imported (on a cache miss: once per architecture). The output — checkpoint bytes
and metrics — is the one the model path writes (tests compare them); ``PRUNECLI_FAST_PRUNE=0`` forces
the model path.

Shape of a run: load → score → plan → apply → save. The fast path and the model path are the two
implementations of :class:`PruneTarget` (weights, trace, params, state, what to save); each structure
is an engine (:data:`_ENGINES`) that first computes a plan — plain data from
:mod:`prunecli.pruning.plan`, serialisable with ``to_json()`` — and then applies it. A dry run
(``PruneRequest.dry_run``) applies the plan in memory only, to report the same metrics plus
``metrics["plan"]``, and writes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from prunecli.api._common import DataOptions, load_input, save_output
from prunecli.errors import InputError
from prunecli.pruning.fast_input import MAGNITUDE, FastInput, fast_input
from prunecli.record import Result
from prunecli.requests import PruneRequest

__all__ = ["GLOBAL_SCOPE_METHODS", "default_scope", "prune"]

_LOG = logging.getLogger("prunecli")

GLOBAL_SCOPE_METHODS = frozenset({"taylor", "snip", "biascomp", "proscore"})
"""Criteria pruned with ``--scope global`` by default (their scores are comparable across layers)."""


def default_scope(method: str | None) -> str:
    """The scope used when ``--scope`` is not given (see the module docstring)."""
    return "global" if (method or "").lower() in GLOBAL_SCOPE_METHODS else "layer"


def prune(req: PruneRequest) -> Result:
    """Prunes CKPT and writes the result to ``req.output`` (or, with ``req.dry_run``, only plans it).

    Scores come from ``req.scores`` (a scores file of this checkpoint) or are computed in process by
    criterion ``req.method`` on ``req.data``. The request is validated when it is built
    (:class:`prunecli.requests.PruneRequest`); here the inputs are read and checked against it.

    The run reads as its five steps: load (:func:`_open_target`: the layer table or the model) →
    score (:func:`_score`) → plan (the engine's :meth:`_Engine.plan`, plain data of
    :mod:`prunecli.pruning.plan`) → apply (:meth:`_Engine.apply`, in memory) → save. A dry run stops
    before saving: it writes nothing (the output path is still validated) and reports the plan as
    ``metrics["plan"]``, with the summary numbers the real run would report. ``--restore`` is not
    run by a dry run.

    Returns:
        The written checkpoint (None for a dry run), its sha256 and the metrics (``sparsity``,
        ``target_ratio``, ``params``, ``params_nonzero``, ``macs``, ``macs_nonzero``, ``layers``,
        ``bitmask_bytes``, …; ``plan`` for a dry run).

    Example:
        >>> req = PruneRequest(checkpoint="base.safetensors", output="p50.safetensors", method="magnitude", ratio=0.5)
        >>> prune(req).metrics["selected_sparsity"]
        0.5
    """
    from prunecli.checkpoint.hashing import file_sha256
    from prunecli.checkpoint.writer import check_output

    out, force, run = req.output, req.force, req.runtime
    criterion_params = _check_params(req)
    if req.restore:  # a method that does not restore channels (obs) is refused before any work
        from prunecli.restoration import check_kind, parse_methods

        check_kind(parse_methods(req.restore), "channel", "the output of --structure channel")
    if req.reconstruct:
        from prunecli import distributed as D
        from prunecli.device import resolve_device

        D.init(resolve_device(run.device))  # under torchrun: each process solves from its calibration shard
    scores_path = Path(req.scores).expanduser().resolve() if req.scores is not None else None
    if scores_path is not None and not scores_path.is_file():
        raise InputError(f"scores file {str(req.scores)!r} does not exist")
    check_output(out, force=force, inputs=[scores_path])

    target = _open_target(req, scores_path)  # 1. load
    check_output(out, force=force, inputs=[target.loaded.source.path, target.loaded.source.weights, scores_path])
    job = _Job.create(req, target, scores_path)
    _score(req, job, criterion_params)  # 2. score
    engine = _ENGINES[req.kind]
    if req.reconstruct:  # the criterion's plan gives the per-layer targets; the solver chooses the mask
        engine = _RECONSTRUCTORS[req.reconstruct](engine)
    before = _before(job) if req.dry_run else None
    searched = _to_target(engine, job) if req.target is not None else None  # --target: the ratio is searched for
    plan = searched.plan if searched is not None else engine.plan(job)  # 3. plan
    metrics, manifest = engine.apply(job, plan, restore=not req.dry_run)  # 4. apply (in memory)
    if searched is not None:
        metrics.update(searched.record(metrics, plan))
    from prunecli.device import describe, resolve_device

    dev = describe(resolve_device(run.device)) if job.computed_scores else "cpu"
    if req.dry_run:
        target.finish()
        metrics["plan"] = engine.report(plan, before, metrics)
        if searched is not None:
            metrics["plan"].update({k: metrics[k] for k in ("target", "achieved", "steps")})
        return Result(checkpoint=None, sha256=None, metrics=metrics, device=dev)
    provenance = {"scores_sha256": file_sha256(scores_path) if scores_path else None}  # 5. save
    target.finish()  # the lineage names the input's digest
    state, transform = target.to_save()
    from prunecli import distributed as D

    written = None
    if D.is_main():  # under torchrun (--reconstruct shards its calibration data) only rank 0 writes
        written = save_output(
            out, state, target.loaded, command="prune", options=req.to_json(), force=force, manifest=manifest,
            transform=transform, provenance=provenance,
        )  # fmt: skip
    path, sha = D.broadcast_object(written)
    return Result(checkpoint=path, sha256=sha, metrics=metrics, device=dev)


def _check_params(req: PruneRequest) -> dict[str, str]:
    """Refuses unknown or repeated ``-p`` keys and bad reconstruction values; returns the criterion's keys.

    With ``--reconstruct obs`` the valid keys are the criterion's plus the solver's (``damp``,
    ``blocksize``, ``samples``, ``refit``); the solver's are split off here and read by the engine.
    """
    from prunecli.requests import KeyValues

    kv = KeyValues.of(req.params)
    if not req.reconstruct:
        if req.method is not None:
            from prunecli.criteria import check_params

            check_params(req.method, kv)
        return dict(kv)
    from prunecli.reconstruction.joint import PRUNE_DEFAULTS, obs_params

    own: list[str] = []
    if req.method is not None:
        from prunecli.criteria import CRITERIA, option_help

        own = list(option_help(CRITERIA.get(req.method).Options))
    what = (
        f"method {req.method!r} with --reconstruct {req.reconstruct}"
        if req.method
        else f"--reconstruct {req.reconstruct}"
    )
    kv.check([*own, *PRUNE_DEFAULTS], what)
    obs_params(kv)  # converted and checked before any work
    if not req.data:
        raise InputError(f"--reconstruct {req.reconstruct} needs calibration data",
                         hint="pass --data SPEC (e.g. --data digits:train)")  # fmt: skip
    return {k: v for k, v in kv.items() if k not in PRUNE_DEFAULTS or k in own}


# ------------------------------------------------------------------------------------------------ 1. load


class PruneTarget(Protocol):
    """What pruning reads and writes: the rebuilt model, or the checkpoint's tensors and layer table.

    Attributes:
        loaded: the checkpoint as read (``Loaded``; ``model`` is None for the table target).
        layers: parameter name → the prunable layer (module, or layer-table entry), in layer order.
        head: parameter names of the classifier head.
    """

    loaded: Any
    layers: dict[str, Any]
    head: list[str]

    def weights(self) -> dict[str, Any]:
        """Parameter name → the prunable weight tensor (pruned in place unless :meth:`to_save` masks it)."""
        ...

    def trace(self, input_size: Callable[[], tuple[int, ...]]) -> Any:
        """MAC positions (and BatchNorm successors) per layer: a :class:`prunecli.tracing.LayerTrace`.

        ``input_size()`` gives one sample's shape where a forward pass is traced (the table has its own).
        """
        ...

    def params(self) -> dict[str, int]:
        """Parameter name → numel, deduplicated as ``model.parameters()`` is."""
        ...

    def state(self) -> dict[str, Any]:
        """Every tensor the output will hold."""
        ...

    def to_cpu(self) -> None:
        """Scoring may have moved the model to a GPU: pruning and saving work on CPU tensors."""
        ...

    def finish(self) -> None:
        """Waits for background work on the input (hashing) to end."""
        ...

    def to_save(self) -> tuple[Any, Any]:
        """(what :func:`save_output` writes, its per-tensor transform or None)."""
        ...

    def mask_on_write(self, plan: Any, names: Sequence[str]) -> Any:
        """Where the weights are read-only views of the input: masks ``plan`` as each tensor is written.

        Returns the :class:`~prunecli.pruning.unstructured.MagnitudeMasks` that will do it, or None: the
        weights of ``names`` are then writable and the caller prunes them in place.
        """
        ...


class _ModelTarget:
    """The model path: the checkpoint rebuilt as an ``nn.Module``."""

    def __init__(self, loaded: Any) -> None:
        from prunecli.prunable import classifier_modules, prunable_layers

        self.loaded = loaded
        self.model = loaded.model
        self.layers: dict[str, Any] = {f"{n}.weight": m for n, m in prunable_layers(self.model).items()}
        self.head = [f"{n}.weight" for n in classifier_modules(self.model)]

    def weights(self) -> dict[str, Any]:
        return {n: m.weight.data for n, m in self.layers.items()}

    def trace(self, input_size: Callable[[], tuple[int, ...]]) -> Any:
        from prunecli.tracing import trace_layers

        return trace_layers(self.model, input_size())

    def params(self) -> dict[str, int]:
        return {n: p.numel() for n, p in self.model.named_parameters()}

    def state(self) -> dict[str, Any]:
        return self.model.state_dict()

    def to_cpu(self) -> None:
        self.model.cpu()

    def finish(self) -> None:
        pass

    def to_save(self) -> tuple[Any, Any]:
        return self.model, None

    def mask_on_write(self, plan: Any, names: Sequence[str]) -> Any:
        return None  # the model's weights are its own: pruned in place


class _TableTarget:
    """The fast path (module docstring): tensors straight from the file, the model described by its layer table."""

    def __init__(self, fast: FastInput) -> None:
        self.fast = fast
        self.loaded = fast.loaded
        self.model = None
        entries = fast.table.layers
        self.layers: dict[str, Any] = {e.name: e for e in entries}
        self.head = [e.name for e in entries if e.head]
        self._weights = {e.name: fast.tensors[e.name] for e in entries}

    def weights(self) -> dict[str, Any]:
        return self._weights

    def trace(self, input_size: Callable[[], tuple[int, ...]]) -> Any:
        from prunecli.tracing import LayerTrace

        return LayerTrace(positions={e.module: e.macs_per_weight for e in self.fast.table.layers}, device="table")

    def params(self) -> dict[str, int]:
        buffers = set(self.fast.table.buffers)
        return {n: t.numel() for n, t in self.fast.tensors.items() if n not in buffers}

    def state(self) -> dict[str, Any]:
        return self.fast.tensors

    def to_cpu(self) -> None:
        pass

    def finish(self) -> None:
        self.fast.input_sha256()

    def to_save(self) -> tuple[Any, Any]:
        return self.fast.tensors, self.fast.transform

    def mask_on_write(self, plan: Any, names: Sequence[str]) -> Any:
        if not self.fast.mapped:
            return None  # a private copy of the file: pruned in place
        from prunecli.pruning.unstructured import MagnitudeMasks

        masks = MagnitudeMasks.from_plan(self._weights, plan)
        if masks is not None:
            self.fast.transform = masks.transform()
            return masks
        self.fast.writable(names)  # rare: a threshold among the zeros; prune private copies in place
        self._weights.update({n: self.fast.tensors[n] for n in names})
        return None


def _open_target(req: PruneRequest, scores_path: Path | None) -> PruneTarget:
    """The table target when the run allows the fast path (:mod:`prunecli.pruning.fast_input`), else the model.

    ``--reconstruct`` always takes the model path: the solver runs the model on calibration data.
    """
    if req.reconstruct:
        return _ModelTarget(load_input(req.checkpoint, req.source))
    fast = fast_input(
        req.checkpoint,
        kind=req.kind,
        method=req.method,
        scores=scores_path,
        compensate=req.compensate,
        inputs=req.source,
        dopts=req.transforms,
        out=(req.output, req.force),
        no_cache=req.no_cache,
    )
    return _TableTarget(fast) if fast is not None else _ModelTarget(load_input(req.checkpoint, req.source))


# ------------------------------------------------------------------------------------------------ the job


@dataclasses.dataclass
class _Job:
    """The resolved inputs of one prune run, shared by the engines.

    Attributes:
        target: the model or the layer table (:class:`PruneTarget`).
        req: the request (options the engines read: ratio, structure, round_to, data, …).
        ratio: the effective ratio (N:M implies it).
        scope: ``layer`` or ``global`` (default per criterion).
        method: the criterion's name (the scores file's, or ``req.method``).
        sf: the scores (a loaded or computed scores file), None for magnitude on the fly.
        selected: parameter names pruned, in layer order.
        excluded: prunable parameter names not pruned (head, ``--exclude``).
        per_layer: parameter name → its ``--layer-ratio``.
        computed_scores: the scores were computed in process (the device is then reported).
    """

    target: PruneTarget
    req: PruneRequest
    ratio: float
    scope: str
    method: str
    sf: Any
    selected: list[str]
    excluded: list[str]
    per_layer: dict[str, float]
    computed_scores: bool = False

    @classmethod
    def create(cls, req: PruneRequest, target: PruneTarget, scores_path: Path | None) -> _Job:
        """Loads the scores file (checked against the checkpoint) and resolves the layer selection."""
        sf = _load_scores(scores_path, target.loaded, req.kind) if scores_path else None
        name = sf.method if sf else str(req.method)
        selected, excluded, per_layer = _select_layers(target, req.exclude, req.include_head, req.layer_ratios)
        scope = req.scope or default_scope(name)
        return cls(target, req, req.effective_ratio, scope, name, sf, selected, excluded, per_layer)

    @property
    def kind(self) -> str:
        return self.req.kind

    def score_of(self) -> Callable[[str], Any] | None:
        """Parameter name → scores from the scores file; None for magnitude (``|w|`` on the fly)."""
        if self.sf is None:
            return None
        table = self.sf.scores

        def lookup(n: str) -> Any:
            if n not in table:
                raise InputError(
                    f"the scores file has no scores for {n!r}", hint=f"--exclude {n.removesuffix('.weight')}"
                )
            return table[n]

        return lookup

    def compensation(self, trace: Any) -> Any:
        """The ``on_mask`` callback of ``--compensate bias``, or None."""
        if not self.req.compensate:
            return None
        from prunecli.pruning.compensate import BiasCompensation

        shifts = (self.sf.extras.get("bias_shift") if self.sf is not None else None) or {}
        if not shifts:
            raise InputError(
                f"--compensate bias needs the bias shifts of a biascomp scores file ({self.method} has none)",
                hint="score with --method biascomp first, or prune with --method biascomp --data SPEC",
            )
        model = self.target.loaded.model
        return BiasCompensation(self.target.layers, shifts, trace.bn_after, dict(model.named_modules()))

    def input_size(self) -> tuple[int, ...]:
        """One sample's shape for the MAC count: the data config's input size (with overrides)."""
        from prunecli.data import data_config

        opts = self.req.transforms or DataOptions()
        manifest = self.target.loaded.manifest
        cfg = data_config(manifest.pretrained_cfg, input_size=opts.input_size, mean=opts.mean, std=opts.std)
        return tuple(int(s) for s in cfg["input_size"])

    def trace(self) -> Any:
        """The target's :class:`prunecli.tracing.LayerTrace` (MAC positions, BatchNorm after each layer)."""
        return self.target.trace(self.input_size)


def _select_layers(
    target: PruneTarget, exclude: Sequence[str], include_head: bool, pairs: Sequence[tuple[str, float]]
) -> tuple[list[str], list[str], dict[str, float]]:
    """(selected, excluded, per-layer ratios): head/exclude/layer-ratio globs resolved to parameter names.

    Warns on globs that match nothing.
    """
    from prunecli.prunable import match_any

    head = [] if include_head else target.head
    for pattern in exclude:
        if not any(match_any(n, [pattern]) for n in target.layers):
            _LOG.warning("--exclude %r matches no prunable layer", pattern)
    excluded = [n for n in target.layers if n in head or match_any(n, exclude)]
    selected = [n for n in target.layers if n not in excluded]
    if not selected:
        raise InputError("no prunable layer is left after --exclude", hint="loosen --exclude or --include-head")
    per_layer: dict[str, float] = {}
    for pattern, r in pairs:
        hits = [n for n in selected if match_any(n, [pattern])]
        if not hits:
            _LOG.warning("--layer-ratio %r matches no layer being pruned", pattern)
        per_layer.update({n: r for n in hits})
    return selected, excluded, per_layer


# ------------------------------------------------------------------------------------------------ 2. score


def _score(req: PruneRequest, job: _Job, params: Mapping[str, str]) -> None:
    """Computes the scores in process when neither a scores file nor magnitude-on-the-fly gives them.

    ``params``: the criterion's ``-p`` keys (``--reconstruct``'s own keys taken out).
    """
    name = job.method
    if job.sf is not None or (name.lower() in MAGNITUDE and (req.kind != "channel" or not params)):
        return
    try:
        from prunecli.scoring import compute_scores
    except ModuleNotFoundError:
        raise InputError(f"--method {name} is not available in this build", hint="pass --scores FILE") from None
    run = req.runtime
    sf = compute_scores(
        job.target.loaded,
        name,
        data=req.data,
        data_options=req.transforms,
        batches=req.batches,
        fraction=req.fraction,
        params=dict(params),
        device=run.device,
        batch_size=run.batch_size,
        workers=run.workers,
        seed=run.seed,
        score_mode=req.score_mode,
        precision=run.precision,
    )
    _check_granularity(sf, req.kind)
    job.target.to_cpu()
    sf.scores = {n: t.cpu() for n, t in sf.scores.items()}
    sf.extras = {k: {n: t.cpu() for n, t in g.items()} for k, g in sf.extras.items()}
    job.sf, job.computed_scores = sf, True


def _load_scores(path: Path, loaded: Any, kind: str) -> Any:
    from prunecli.scores import load_scores

    sf = load_scores(path)
    sf.check_checkpoint(loaded.sha256, where=f"scores {path.name}")
    _check_granularity(sf, kind)
    return sf


def _check_granularity(sf: Any, kind: str) -> None:
    if kind != "channel" and sf.granularity != "weight":
        raise InputError(
            f"{sf.method} scores are per {sf.granularity}; unstructured and N:M pruning need per-weight scores",
            hint="use --structure channel with these scores, or score with a weight criterion",
        )


# ------------------------------------------------------------------------------------------------ 3-4. engines


class _Engine(Protocol):
    """One structure's pruning: a plan (plain data), its application, and the plan as a dry run shows it."""

    def plan(self, job: _Job) -> Any:
        """The plan (:mod:`prunecli.pruning.plan`); reads the weights, modifies nothing."""
        ...

    def apply(self, job: _Job, plan: Any, *, restore: bool) -> tuple[dict[str, Any], Any]:
        """Applies ``plan`` in memory; returns the run's metrics and the output manifest."""
        ...

    def report(self, plan: Any, before: Mapping[str, int] | None, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """``metrics["plan"]`` of a dry run: the plan with params and MACs before and after."""
        ...


def _before(job: _Job) -> dict[str, int]:
    """Params and MACs of the input (a dry run reports them beside the plan's)."""
    state = job.target.state()
    nnz = _nonzero(state)
    params = job.target.params()
    weights = job.target.weights()
    positions = _positions(job, weights)
    return {
        "params_before": sum(params.values()),
        "params_nonzero_before": sum(nnz[n] for n in params),
        "macs_before": sum(positions[n] * w.numel() for n, w in weights.items()),
        "macs_nonzero_before": sum(positions[n] * nnz[n] for n in weights),
    }


def _positions(job: _Job, weights: Mapping[str, Any]) -> dict[str, int]:
    trace = job.trace()
    return {n: trace.positions.get(n.removesuffix(".weight"), 0) for n in weights}


def _masked_report(plan: Any, before: Mapping[str, int] | None, metrics: Mapping[str, Any]) -> dict[str, Any]:
    after = {k: metrics[k] for k in ("params", "params_nonzero", "macs", "macs_nonzero")}
    return {**plan.summary(), **(before or {}), **after}


class _Unstructured:
    """``--structure unstructured``: exact ``round(r·N)`` per scope (:mod:`prunecli.pruning.unstructured`)."""

    report = staticmethod(_masked_report)

    def plan(self, job: _Job) -> Any:
        from prunecli.pruning.unstructured import plan_scopes, plan_unstructured

        weights = job.target.weights()
        sizes = {n: weights[n].numel() for n in job.selected}
        scopes = plan_scopes(sizes, job.ratio, job.scope, job.per_layer)
        return plan_unstructured(weights, job.score_of(), scopes)

    def apply(self, job: _Job, plan: Any, *, restore: bool) -> tuple[dict[str, Any], Any]:
        from prunecli.pruning.unstructured import apply_unstructured

        weights = job.target.weights()
        trace = job.trace()
        comp = job.compensation(trace)
        target = sum(s.k for s in plan.scopes) / max(sum(weights[n].numel() for n in job.selected), 1)
        masks = job.target.mask_on_write(plan, job.selected)
        if masks is not None:  # the weights stay read-only; each pruned one is masked as it is written
            return _finish(job, trace, masks.removed, target, comp, masks.nonzero)
        weights = job.target.weights()
        known: dict[str, int] = {}
        removed = apply_unstructured(weights, job.score_of(), plan, on_mask=comp, nonzero=known)
        return _finish(job, trace, removed, target, comp, known)


class _NM:
    """``--structure N:M``: keep n of every m consecutive weights (:mod:`prunecli.pruning.nm`)."""

    report = staticmethod(_masked_report)

    def plan(self, job: _Job) -> Any:
        from prunecli.pruning.nm import plan_nm

        if job.per_layer:
            raise InputError("--layer-ratio does not apply to N:M sparsity", hint="--exclude layers instead")
        assert job.req.nm is not None
        n, m = job.req.nm
        return plan_nm(job.target.weights(), job.selected, n, m)

    def apply(self, job: _Job, plan: Any, *, restore: bool) -> tuple[dict[str, Any], Any]:
        from prunecli.pruning.nm import apply_nm

        trace = job.trace()
        comp = job.compensation(trace)
        removed = apply_nm(job.target.weights(), job.score_of(), plan, on_mask=comp)
        job.selected = [s for s in job.selected if s not in plan.skipped]
        assert job.req.nm is not None
        n, m = job.req.nm
        metrics, manifest = _finish(job, trace, removed, (m - n) / m, comp)
        metrics["nm_skipped"] = list(plan.skipped)
        return metrics, manifest


class _Channel:
    """``--structure channel``: remove channels through the dependency graph (:mod:`prunecli.pruning.channel`)."""

    def _example(self, job: _Job) -> Any:
        import torch

        return torch.zeros(1, *job.input_size())

    def options(self, job: _Job) -> dict[str, Any]:
        """The keyword arguments of :func:`~prunecli.pruning.channel.plan_channels` other than the ratio."""
        sf = job.sf
        ratios: dict[str, float] = {}
        for pattern, r in reversed(job.req.layer_ratios):  # plan_channels takes the first match; ours is the last
            ratios.setdefault(pattern, r)
        return {
            "example_input": self._example(job),
            "channel_scores": sf.scores if sf is not None and sf.granularity == "channel" else None,
            "weight_scores": sf.scores if sf is not None and sf.granularity == "weight" else None,
            "scope": job.scope,
            "layer_ratios": ratios,
            "exclude": [n.removesuffix(".weight") for n in job.excluded],
            "round_to": job.req.round_to if job.req.round_to > 1 else None,
            "min_channels": job.req.min_channels,
            **({"heads": True} if job.req.heads else {}),  # whole attention heads (--heads)
        }

    def plan(self, job: _Job, keeps: Mapping[tuple[str, str], int] | None = None) -> Any:
        """The plan at ``job.ratio``; ``keeps`` overrides the kept count of some groups (``--target``'s fill)."""
        from prunecli.pruning.channel import plan_channels

        return plan_channels(job.target.loaded.model, ratio=job.ratio, keeps=keeps, **self.options(job))

    def apply(self, job: _Job, plan: Any, *, restore: bool) -> tuple[dict[str, Any], Any]:
        from prunecli.prunable import prunable_params
        from prunecli.pruning.channel import apply_channels, channel_metrics

        model = job.target.loaded.model
        before = sum(w.numel() for w in job.target.weights().values())
        example = self._example(job)
        dense = copy.deepcopy(model) if job.req.restore and restore else None  # restore needs the dense filters
        structure = apply_channels(model, plan, example_input=example)
        restored = _restore(job, dense, structure, example) if dense is not None else None
        weights = prunable_params(model)
        state = model.state_dict()
        nnz = _nonzero(state)
        manifest = dataclasses.replace(job.target.loaded.manifest, structure=structure)
        cm = channel_metrics(plan, model)
        counts = _counts(state, nnz, weights)
        metrics = {
            "structure": "channel",
            "method": job.method,
            "scope": job.scope,
            "target_ratio": job.ratio,
            "channel_ratio": job.ratio,  # a fraction of the channels of each pruned group
            "excluded": job.excluded,
            **cm,
            "params_removed": 1 - counts["params"] / max(cm.get("params_before", before), 1),
            **counts,  # sparsity: the exact zeros left among the (narrower, dense) prunable weights
            "macs_before": plan.macs_before,
            "macs": sum(plan.positions.get(n.removesuffix(".weight"), 0) * w.numel() for n, w in weights.items()),
            "macs_nonzero": sum(plan.positions.get(n.removesuffix(".weight"), 0) * nnz[n] for n in weights),
            **_storage(state, nnz, set(job.target.loaded.manifest.masked)),
        }
        if restored is not None:
            metrics["restore"] = restored
        return metrics, manifest

    def report(self, plan: Any, before: Mapping[str, int] | None, metrics: Mapping[str, Any]) -> dict[str, Any]:
        return {**plan.summary(), **{k: metrics[k] for k in ("params_nonzero", "macs_nonzero")}}


class _Obs:
    """``--reconstruct obs``: the mask chosen jointly with OBS/SparseGPT updates of the kept weights (docs/obs.md).

    Wraps the structure's engine: its plan (the criterion's, exactly as without ``--reconstruct``) gives
    each layer's target — the fraction of the layer the plan removes (so ``--scope global`` keeps the
    criterion's global ranking of layers, and ``--layer-ratio``/``--exclude``/the head rule hold), or N:M —
    and :func:`prunecli.reconstruction.reconstruct` then chooses the mask and the updates layer by layer in
    forward order on the calibration images. Layers the calibration forward never reaches (or that the
    solver cannot handle) get the criterion's plain mask from the plan, with a warning. A dry run applies
    the plan without the solve and reports what the solve would remove.
    """

    def __init__(self, base: _Engine) -> None:
        self.base = base

    def plan(self, job: _Job) -> Any:
        return self.base.plan(job)

    def report(self, plan: Any, before: Mapping[str, int] | None, metrics: Mapping[str, Any]) -> dict[str, Any]:
        return self.base.report(plan, before, metrics)

    def apply(self, job: _Job, plan: Any, *, restore: bool) -> tuple[dict[str, Any], Any]:
        import time

        from prunecli.device import resolve_device
        from prunecli.reconstruction import reconstruct
        from prunecli.reconstruction.joint import layer_rows, obs_params, predicted_zeros, summary, targets_from_plan

        p = obs_params(job.req.params)
        targets = targets_from_plan(plan, job.req.nm)
        model = job.target.loaded.model
        modules = dict(model.named_modules())
        shown = {n: (f"{t.n}:{t.m}" if not isinstance(t, float) else t) for n, t in targets.items()}
        if not restore:  # dry run: the criterion's plan in memory, no solve
            metrics, manifest = self.base.apply(job, plan, restore=False)
            metrics["reconstruct"] = {
                "method": "obs", "solved": False, "params": p, "targets": shown,
                "removed_by_solver": {n: predicted_zeros(modules[n].weight, t) for n, t in targets.items()},
            }  # fmt: skip
            return metrics, manifest
        from prunecli import distributed as D

        calib, images = self._calibration(job, int(p["samples"]))
        zeros_before = {n: int((modules[n].weight == 0).sum()) for n in targets}
        start = time.perf_counter()
        report = reconstruct(model, targets, calib, damp=float(p["damp"]), blocksize=int(p["blocksize"]),
                             device=resolve_device(job.req.runtime.device), refit=bool(p["refit"]))  # fmt: skip
        model.cpu()
        seconds = round(time.perf_counter() - start, 4)
        rows = layer_rows(report)
        left = [n for n, r in rows.items() if r["status"] != "reconstructed"]
        removed = self._plain(job, plan, [f"{n}.weight" for n in left])
        for n in targets:
            rows[n]["target"] = shown[n]
            if n in left:
                rows[n]["note"] = f"{rows[n].get('note', '')}; pruned with the plan's mask, not reconstructed"
            else:
                removed[f"{n}.weight"] = max(0, int((modules[n].weight == 0).sum()) - zeros_before[n])
        for message in report.warnings:
            _LOG.warning("--reconstruct obs: %s", message)
        removed.update({lp.name: 0 for lp in plan.layers if lp.name not in removed})
        trace = job.trace()
        if job.req.nm is not None:
            n_, m_ = job.req.nm
            job.selected = [s for s in job.selected if s not in plan.skipped]
            metrics, manifest = _finish(job, trace, removed, (m_ - n_) / m_, None)
            metrics["nm_skipped"] = list(plan.skipped)
        else:
            sizes = sum(w.numel() for n, w in job.target.weights().items() if n in job.selected)
            metrics, manifest = _finish(job, trace, removed, sum(s.k for s in plan.scopes) / max(sizes, 1), None)
        metrics["reconstruct"] = {
            "method": "obs", "solved": True, "params": p, "calib_samples": images, "world_size": D.world_size(),
            "calib_shard": sum(len(b) for b in calib), "layers": rows,
            "warnings": list(report.warnings), "reconstruct_s": seconds, **summary(rows),
        }  # fmt: skip
        return metrics, manifest

    def _calibration(self, job: _Job, samples: int) -> tuple[list[Any], int]:
        """This process's calibration batches (its shard under torchrun) and the images over all processes."""
        from prunecli import distributed as D
        from prunecli.data import load_data, make_loader
        from prunecli.reconstruction.joint import calibration, shard

        req, run = job.req, job.req.runtime
        assert req.data is not None  # _check_params
        ds, _ = load_data(req.data, job.target.loaded, req.transforms, default_split="train")
        loader = make_loader(ds, batch_size=run.batch_size, workers=run.workers, shuffle=True, seed=run.seed)
        batches = calibration(loader, samples)
        return shard(batches, D.rank(), D.world_size()), sum(len(b) for b in batches)

    def _plain(self, job: _Job, plan: Any, names: list[str]) -> dict[str, int]:
        """The plan's own (criterion) mask on ``names`` only: the same weights the full plan removes there."""
        from prunecli.pruning.plan import UnstructuredPlan

        if not names:
            return {}
        weights = job.target.weights()
        layers = tuple(lp for lp in plan.layers if lp.name in names)
        if job.req.nm is not None:
            from prunecli.pruning.nm import apply_nm

            scopes = tuple(sc for sc in plan.scopes if sc.names[0] in names)
            return apply_nm(weights, job.score_of(), UnstructuredPlan(plan.structure, scopes, layers))
        from prunecli.pruning.unstructured import Scope, apply_unstructured, plan_unstructured

        # per layer, the plan's count: its k smallest keys are the weights a shared threshold takes there
        scopes = [Scope((lp.name,), lp.removed, lp.sparsity) for lp in layers]
        sub = plan_unstructured({lp.name: weights[lp.name] for lp in layers}, job.score_of(), scopes)
        return apply_unstructured(weights, job.score_of(), sub)


_RECONSTRUCTORS: dict[str, Callable[[_Engine], _Engine]] = {"obs": _Obs}
"""``--reconstruct`` method → the engine wrapper that runs it after the structure's plan."""


# ------------------------------------------------------------------------------------------------ --target


@dataclasses.dataclass
class _Searched:
    """A plan found for ``--target`` (:mod:`prunecli.pruning.budget`), and what the record says of it.

    ``metric``: the metrics key the target is measured on (``macs``/``params`` for channels,
    ``macs_nonzero``/``params_nonzero`` for masked structures); ``measured``: the achieved value when
    it is not a metric (latency).
    """

    plan: Any
    budget: Any
    steps: list[dict[str, Any]]
    metric: str | None
    measured: float | None = None

    def record(self, metrics: Mapping[str, Any], plan: Any) -> dict[str, Any]:
        """``target``, ``achieved``, ``steps``, per-group widths (channels), and a note when not within 1 %."""
        from prunecli.pruning.budget import TOLERANCE

        value = float(metrics[self.metric]) if self.metric is not None else float(self.measured or 0.0)
        out: dict[str, Any] = {
            "target": self.budget.record(),
            "achieved": self.budget.achieved(value),
            "steps": self.steps,
        }
        if hasattr(plan, "groups"):
            out["group_widths"] = {g.root: {"width": g.width * g.slices, "kept": len(g.kept) * g.slices}
                                   for g in plan.groups}  # fmt: skip
        if self.metric is not None and value < self.budget.absolute * (1 - TOLERANCE):
            note = (f"--target {self.budget.kind}={self.budget.value}: the closest value at or under it is "
                    f"{value / self.budget.dense:.2%} of dense (target {self.budget.absolute / self.budget.dense:.2%});"
                    " --round-to, --min-channels or the pattern allow no closer")  # fmt: skip
            _LOG.warning("%s", note)
            out["target_note"] = note
        return out


def _to_target(engine: _Engine, job: _Job) -> _Searched:
    """The plan that meets ``--target`` (bisection over the ratio; :mod:`prunecli.pruning.budget`)."""
    assert job.req.target is not None
    kind = job.req.target[0]
    if job.kind == "channel":
        return _latency_target(job) if kind == "latency" else _channel_target(job)
    if job.kind == "nm":
        return _nm_target(engine, job)
    return _masked_target(engine, job)


def _channel_target(job: _Job) -> _Searched:
    """Channel plans costed from their kept counts (:func:`~prunecli.pruning.budget.plan_channels_to`)."""
    from prunecli.pruning.budget import plan_channels_to

    assert job.req.target is not None
    kind, value = job.req.target
    channel = _ENGINES["channel"]
    assert isinstance(channel, _Channel)
    plan, budget, steps = plan_channels_to(job.target.loaded.model, kind, value, **channel.options(job))
    job.ratio = plan.notes["target_ratio"]
    return _Searched(plan, budget, steps, kind)


def _masked_amounts(job: _Job) -> tuple[dict[str, int], dict[str, int], int]:
    """(weight → non-zero count, weight → MAC positions, non-zero parameters outside the prunable weights)."""
    weights = job.target.weights()
    nnz = _nonzero(job.target.state())
    params = job.target.params()
    other = sum(nnz[n] for n in params if n not in weights)
    return {n: nnz[n] for n in weights}, _positions(job, weights), other


def _masked_cost(kind: str, nnz: Mapping[str, int], positions: Mapping[str, int], other: int) -> int:
    if kind == "params":
        return other + sum(nnz.values())
    return sum(positions[n] * c for n, c in nnz.items())


def _after(plan: Any, nnz: Mapping[str, int]) -> dict[str, int]:
    """Non-zero weights after ``plan``: the plan's count where known, else the removed taken from the non-zeros."""
    after = dict(nnz)
    for lp in plan.layers:
        after[lp.name] = lp.nonzero if lp.nonzero is not None else min(nnz[lp.name], lp.numel - lp.removed)
    return after


def _masked_target(engine: _Engine, job: _Job) -> _Searched:
    """Unstructured: bisection over the ratio, each step a plan (no weight is touched until the last)."""
    from prunecli.pruning.budget import TOLERANCE, resolve_budget, search

    assert job.req.target is not None
    kind, value = job.req.target
    nnz, positions, other = _masked_amounts(job)
    budget = resolve_budget(kind, value, _masked_cost(kind, nnz, positions, other))

    def cost(r: float) -> int:
        job.ratio = r
        return _masked_cost(kind, _after(engine.plan(job), nnz), positions, other)

    found = search(cost, budget, hi=_highest_ratio(engine, job), close=TOLERANCE / 4)
    job.ratio = found.ratio
    return _Searched(engine.plan(job), budget, found.steps, f"{kind}_nonzero")


def _highest_ratio(engine: _Engine, job: _Job, hi: float = 1.0 - 1e-9) -> float:
    """The largest ratio that plans: a global ranking refuses ratios that would empty a layer (bisection)."""
    job.ratio = hi
    try:
        engine.plan(job)
        return hi
    except InputError:
        pass
    lo = 0.0
    for _ in range(24):  # 2^-24 of the ratio: under one weight in 16 M
        mid = (lo + hi) / 2
        job.ratio = mid
        try:
            engine.plan(job)
            lo = mid
        except InputError:
            hi = mid
    return lo


def _nm_target(engine: _Engine, job: _Job) -> _Searched:
    """N:M: the fixed pattern on every selected layer, then layers left dense (largest first) while the budget allows.

    The pattern fixes each layer's sparsity, so the only freedom is which layers carry it: a target
    under the all-layers value is unreachable (one-line error naming that value).
    """
    from prunecli.pruning.budget import resolve_budget, search

    assert job.req.target is not None
    kind, value = job.req.target
    nnz, positions, other = _masked_amounts(job)
    budget = resolve_budget(kind, value, _masked_cost(kind, nnz, positions, other))
    plan = engine.plan(job)
    after = _after(plan, nnz)
    search(lambda r: _masked_cost(kind, after, positions, other), budget, iters=0, what=f" by {job.req.structure}")
    cost = _masked_cost(kind, after, positions, other)
    steps = [{"dense": [], "value": cost}]
    gain = {n: _masked_cost(kind, {n: nnz[n]}, positions, 0) - _masked_cost(kind, {n: after[n]}, positions, 0)
            for n in job.selected}  # fmt: skip
    dense: list[str] = []
    for n in sorted(job.selected, key=lambda n: -gain[n]):
        if 0 < gain[n] <= budget.absolute - cost:
            cost += gain[n]
            dense.append(n)
            steps.append({"dense": [*dense], "value": cost})
    if dense:
        job.selected = [n for n in job.selected if n not in dense]
        job.excluded = [*job.excluded, *dense]
        plan = engine.plan(job)
    return _Searched(plan, budget, steps, f"{kind}_nonzero")


def _latency_target(job: _Job) -> _Searched:
    """``latency``: bisection over the MAC budget, the pruned model measured at every step (module docstring of
    :mod:`prunecli.pruning.budget`); every step's latency and spread go into the record."""
    from prunecli import surgery
    from prunecli.device import resolve_device
    from prunecli.pruning.budget import Budget, ChannelCost, measure_latency, resolve_budget, search
    from prunecli.pruning.channel import apply_channels

    assert job.req.target is not None
    kind, value = job.req.target
    run = job.req.runtime
    model = job.target.loaded.model
    channel = _ENGINES["channel"]
    assert isinstance(channel, _Channel)
    device = resolve_device(run.device)
    size = job.input_size()

    def latency() -> dict[str, float]:
        out = measure_latency(model, size, device, batch_size=run.batch_size)
        model.cpu()
        return out

    dense = latency()
    budget = resolve_budget(kind, value, dense["latency_ms"])
    cost = ChannelCost(model, **channel.options(job))
    macs_dense = cost.dense("macs")
    steps: list[dict[str, Any]] = [{"macs_fraction": 1.0, "ratio": 0.0, **dense}]
    plans: dict[float, tuple[Any, float]] = {}

    def at(fraction: float) -> float:
        """Latency of the plan at ``fraction`` of the dense MACs (a MAC search inside a latency search)."""
        macs = Budget("macs", f"{fraction:g}", fraction * macs_dense, macs_dense)
        try:
            job.ratio = search(lambda r: cost.cost("macs", r), macs).ratio
        except InputError:
            job.ratio = 1.0 - 1e-9
        plan = channel.plan(job)
        snap = surgery.snapshot(model)
        apply_channels(model, plan, example_input=channel._example(job))
        measured = latency()
        surgery.revert(model, snap)
        steps.append({"macs_fraction": fraction, "ratio": job.ratio, "macs": plan.macs_after, **measured})
        plans[fraction] = (plan, measured["latency_ms"])
        return measured["latency_ms"]

    # latency falls as the MAC budget falls: bisect the removed fraction of MACs (0: dense, ~1: all removed)
    found = search(lambda removed: at(1.0 - removed), budget, hi=0.99, iters=8, close=0.02, what=" on this device")
    plan, measured = plans[1.0 - found.ratio]
    return _Searched(plan, budget, steps, None, measured)


def _restore(job: _Job, dense: Any, structure: Any, example: Any) -> dict[str, Any]:
    """``--restore METHOD``: training-free restoration in the same step (``prunecli restore``'s library call).

    Calibration data for ``lstsq``/``bn`` (and the reconstruction errors) come from ``--data`` (train split).
    """
    from prunecli.api.restore import restore_model
    from prunecli.data import load_data, make_loader
    from prunecli.device import resolve_device

    req, run, model = job.req, job.req.runtime, job.target.loaded.model
    calib = None
    if req.data:
        ds, _ = load_data(req.data, job.target.loaded, req.transforms, default_split="train")
        calib = make_loader(ds, batch_size=run.batch_size, workers=run.workers, shuffle=True, seed=run.seed)
    assert req.restore is not None
    report = restore_model(
        model, dense, structure, req.restore, calib=calib, device=resolve_device(run.device), example_input=example
    )
    model.cpu()
    return report.metrics()


_ENGINES: dict[str, _Engine] = {"unstructured": _Unstructured(), "nm": _NM(), "channel": _Channel()}
"""Pruning engine per structure kind (``PruneRequest.kind``)."""


def _finish(
    job: _Job,
    trace: Any,
    removed: Mapping[str, int],
    target: float,
    comp: Any,
    known: Mapping[str, int] | None = None,
) -> tuple[dict[str, Any], Any]:
    """Metrics of docs/records.md for a masked (dense-shape) result, and the manifest listing the masks.

    MACs follow :func:`prunecli.tracing.count_macs`: ``Σ positions · numel`` over the prunable layers,
    and ``Σ positions · nnz`` for ``macs_nonzero``.
    """
    loaded = job.target.loaded
    masked = sorted(set(loaded.manifest.masked) | {n for n, c in removed.items() if c > 0})
    manifest = dataclasses.replace(loaded.manifest, masked=masked)
    state = job.target.state()
    nnz = _nonzero(state, known)
    weights = job.target.weights()
    positions = {n: trace.positions.get(n.removesuffix(".weight"), 0) for n in weights}
    zeros = {n: weights[n].numel() - nnz[n] for n in weights}
    n_sel = sum(weights[n].numel() for n in job.selected)
    nm = job.req.nm
    metrics: dict[str, Any] = {
        "structure": "unstructured" if nm is None else f"{nm[0]}:{nm[1]}",
        "method": job.method,
        "scope": job.scope if nm is None else None,
        "target_ratio": job.ratio,
        "target_sparsity": target,
        "selected_sparsity": sum(zeros[n] for n in job.selected) / max(n_sel, 1),  # what the target is about
        "removed": sum(removed.values()),
        "prunable": n_sel,
        "excluded": job.excluded,
        "layers": {n: zeros[n] / max(w.numel(), 1) for n, w in weights.items()},
        **_counts(state, nnz, weights),  # params, params_nonzero, sparsity: prunecli.counting's convention
        "macs": sum(positions[n] * w.numel() for n, w in weights.items()),
        "macs_nonzero": sum(positions[n] * nnz[n] for n in weights),
        **_storage(state, nnz, set(masked)),
    }
    if comp is not None:
        metrics["compensated"] = comp.summary()
    return metrics, manifest


def _nonzero(state: Mapping[str, Any], known: Mapping[str, int] | None = None) -> dict[str, int]:
    """Non-zero entries per tensor (``count_nonzero`` of ``t != 0``: the float kernel is branchy and slow).

    ``known`` counts (from the selection, see ``prune_unstructured(nonzero=)``) are taken as they are.
    """
    import torch

    known = known or {}
    return {n: known[n] if n in known else int(torch.count_nonzero(t != 0)) for n, t in state.items()}


def _counts(state: Mapping[str, Any], nnz: Mapping[str, int], weights: Mapping[str, Any]) -> dict[str, Any]:
    """``params``, ``params_nonzero`` and ``sparsity`` by the one convention of :mod:`prunecli.counting`."""
    from prunecli.counting import TensorCount, count_tensors

    tensors = (TensorCount(n, tuple(t.shape), t.numel() - nnz[n]) for n, t in state.items())
    return count_tensors(tensors, set(weights)).metrics()


def _storage(state: Mapping[str, Any], nnz: Mapping[str, int], masked: set[str]) -> dict[str, int]:
    """Bytes of the dense checkpoint tensors, and with masked tensors stored as bitmask + nonzero values.

    ``bitmask_bytes`` = Σ over masked tensors of ``ceil(numel/8) + nnz·itemsize`` plus every other
    tensor at its dense size (no header, no compression).
    """
    dense = packed = 0
    for name, t in state.items():
        size = t.numel() * t.element_size()
        dense += size
        packed += math.ceil(t.numel() / 8) + nnz[name] * t.element_size() if name in masked else size
    return {"dense_bytes": dense, "bitmask_bytes": packed}

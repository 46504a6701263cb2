"""``prunecli restore``: training-free restoration after pruning (paper B, docs/restoration.md; OBS, docs/obs.md).

A channel-pruned checkpoint is restored by ``lbyl``, ``merge``, ``lstsq``, ``bn``; a masked one
(unstructured or N:M, ``manifest.masked``) by ``obs`` (its surviving weights refit to the dense parent's
layer outputs, masks kept exactly) and ``bn``. Which methods apply to which kind is declared in the
registry (``Restorer.kinds``); the kind is read from the checkpoint's manifest.

Three entry points:

``restore(spec, *, method, dense=None, data=None, val=None, params={}, out, force=False, ...) -> Result``
    The subcommand: reads a channel-pruned checkpoint, finds its dense parent through the lineage (the
    last ``prune`` step's ``input``, checked against its ``input_sha256``; ``dense=`` points elsewhere
    but must have the same sha256), restores, writes OUT and reports per-layer reconstruction errors
    (with ``data``) and accuracy before/after (with ``val``).

``restore_model(pruned_model, dense_model, structure, method="lbyl", *, params=None, calib=None, val=None,
device="cpu", example_input=None) -> RestoreReport``
    The library call that ``prune --restore METHOD`` uses in one step. ``pruned_model`` is rewritten in
    place; ``dense_model`` is the *unpruned* model (keep a ``copy.deepcopy`` before pruning in place);
    ``structure`` is ``manifest.structure`` (only ``structure["channels"]`` is read). ``calib`` is an
    iterable of input batches or ``(x, y)`` pairs (required by ``lstsq``/``bn``; also enables the
    reconstruction errors); ``val`` an iterable of ``(x, y)`` for accuracy before/after.
    ``example_input`` is one input batch for tracing (default: the first calibration batch, else
    ``dense_model.pretrained_cfg["input_size"]``). ``RestoreReport.metrics()`` is what the record shows.

``restore_masked_model(pruned_model, dense_model, masked, method="obs", *, params=None, calib=None, val=None,
device="cpu") -> MaskedRestoreReport``
    The same for a masked model (``obs``, ``bn``, ``obs+bn``); ``masked`` is ``manifest.masked``.

``method`` is a registry name (``lbyl``, ``merge``, ``lstsq``, ``bn``, ``obs``) or several joined by ``+``
(``lbyl+bn``, ``obs+bn``), applied in order.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prunecli.api._common import InputOptions, save_output
from prunecli.data import load_data
from prunecli.errors import CheckpointError, InputError
from prunecli.record import Result
from prunecli.requests import KeyValues, RestoreRequest

__all__ = ["MaskedRestoreReport", "RestoreReport", "restore", "restore_masked_model", "restore_model"]

_RECON_BATCHES = 4  # calibration batches used for the per-layer reconstruction errors


@dataclass
class RestoreReport:
    """What :func:`restore_model` did.

    Attributes:
        methods: the methods applied, in order.
        params: resolved parameters per method.
        layers: method → producer → details (consumers, kept/pruned counts, solve fallbacks, …).
        recon: consumer → {"before": rel. error, "after": rel. error} of its pre-activation output vs the
            dense model on calibration batches (empty without calibration data).
        refused: producer → why its pruned channels were left as they are.
        warnings: every warning emitted.
        accuracy: {"before": {...}, "after": {...}} evaluation metrics with ``val``.
        seconds: wall time per method.
        groups: one row per pruned group (every pruned conv/linear producer is in exactly one): kind
            (``block``, ``stream``, ``attention``), producers, consumers, and per method ``restored…`` or
            ``skipped: why`` (``restored_by`` lists the methods that restored it).
    """

    methods: list[str]
    params: dict[str, dict[str, Any]]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    recon: dict[str, dict[str, float]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    accuracy: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    groups: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        """Flat, JSON-able metrics for the record."""
        rows: list[dict[str, Any]] = []
        for method, layers in self.layers.items():
            for producer, info in sorted(layers.items()):
                row = {"method": method, "producer": producer, **{k: v for k, v in info.items() if k != "method"}}
                errs = {c: self.recon[c] for c in info.get("consumers", []) if c in self.recon}
                if errs:
                    row["recon_error_before"] = {c: e["before"] for c, e in errs.items()}
                    row["recon_error"] = {c: e["after"] for c, e in errs.items()}
                rows.append(row)
        out: dict[str, Any] = {
            "method": "+".join(self.methods),
            "params": self.params,
            "restored_layers": len(_restored_producers(rows)),
            "layers": rows,
            "groups": self.groups,
            "refused": self.refused,
            "warnings": self.warnings,
            "restore_s": self.seconds,
        }
        if self.recon:
            after = [e["after"] for e in self.recon.values()]
            before = [e["before"] for e in self.recon.values()]
            out["recon_error_mean"] = sum(after) / len(after)
            out["recon_error_before_mean"] = sum(before) / len(before)
        if self.accuracy:
            after, before = self.accuracy.get("after", {}), self.accuracy.get("before", {})
            out.update({k: v for k, v in after.items() if k in ("top1", "top5", "loss", "samples")})
            out.update({f"{k}_before": v for k, v in before.items() if k in ("top1", "top5", "loss")})
        return out


def _restored_producers(rows: list[dict[str, Any]]) -> set[str]:
    """Every producer a row restored (a stream row restores all its producers; ``*`` rows are not producers)."""
    return {p for r in rows if r["producer"] != "*" for p in r.get("producers", [r["producer"]])}


def _inputs_only(batches: Iterable[Any] | None, limit: int) -> list[Any]:
    out, n = [], 0
    if batches is None:
        return out
    for b in batches:
        x = b[0] if isinstance(b, (tuple, list)) else b
        out.append(x.detach().cpu())
        n += len(x)
        if n >= limit:
            break
    return out


def restore_model(
    pruned_model: Any,
    dense_model: Any,
    structure: Mapping[str, Any] | None,
    method: str = "lbyl",
    *,
    params: Mapping[str, Any] | None = None,
    calib: Iterable[Any] | None = None,
    val: Iterable[Any] | None = None,
    device: Any = "cpu",
    example_input: Any = None,
) -> RestoreReport:
    """Restores ``pruned_model`` in place from ``dense_model`` and the kept channels in ``structure``.

    Raises:
        InputError: unknown method or parameter, ``lstsq``/``bn`` without ``calib``, a repeated
            compensation method.
        CheckpointError: no channel structure, or a dense model that does not fit it.
    """
    import torch

    from prunecli.restoration import check_kind, parse_methods, resolve_params
    from prunecli.restoration.core import RestoreContext, channel_plan, pruned_producers, reconstruction_errors
    from prunecli.restoration.graph import find_pairs

    methods = parse_methods(method)
    check_kind(methods, "channel", "the model")
    resolved = resolve_params(methods, params)
    plan = channel_plan(structure)
    producers = pruned_producers(plan)
    if not producers:
        raise CheckpointError("the checkpoint's structure prunes no output channel: nothing to restore")
    needs_data = [m.name for m in methods if m.needs_data]
    limit = max([int(p.get("samples", 0)) for p in resolved] + [1])
    calib_list = _inputs_only(calib, limit)
    if needs_data and not calib_list:
        raise InputError(f"{needs_data[0]} needs calibration data", hint="pass --data SPEC (e.g. --data digits:train)")
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    needs_dense = any(m.needs_dense for m in methods)
    if needs_dense and dense_model is None:
        raise InputError(f"{methods[0].name} needs the dense parent model")
    pruned_model.eval()
    report = RestoreReport([m.name for m in methods], {m.name: p for m, p in zip(methods, resolved, strict=True)})
    ctx = RestoreContext(pruned_model, dense_model, plan, calib=calib_list or None, device=dev)
    # the structure also lists parameters and norms whose channels were pruned with the residual
    # stream (a ViT's cls_token/pos_embed, LayerNorms): only conv/linear layers can be producers
    traced = dense_model if dense_model is not None else pruned_model
    convlin = [n for n in producers if isinstance(_module(traced, n), (torch.nn.Conv2d, torch.nn.Linear))]
    x = example_input
    if x is None:
        x = calib_list[0][:1] if calib_list else _example(traced)
    if dense_model is not None:
        dense_model.eval()
        _check_dense(dense_model, producers)
        ctx.pairs = find_pairs(dense_model, x, convlin)
        report.refused = dict(sorted(ctx.pairs.refused.items()))
        groups = ctx.pairs.groups
    else:  # bn alone: the groups for the record, traced on the pruned model (same graph, fewer channels)
        groups = _groups_of(pruned_model, x, convlin)
    before = copy.deepcopy(pruned_model) if (calib_list and dense_model is not None) or val is not None else None
    for m, p in zip(methods, resolved, strict=True):
        ctx.layers, ctx.method = {}, m.name
        start = time.perf_counter()
        m.run(ctx, p)
        report.seconds[m.name] = round(time.perf_counter() - start, 4)
        report.layers[m.name] = ctx.layers
    pruned_model.to("cpu").eval()
    report.warnings = list(ctx.warnings)
    report.groups = _group_rows(groups, ctx, [m.name for m in methods])
    if calib_list and dense_model is not None and ctx.pairs is not None and before is not None:
        consumers = {c.name for n in producers if n in ctx.pairs.pairs for c in ctx.pairs.pairs[n].consumers}
        consumers |= {n for n, e in plan.items() if "in" in e and len(e["in"]["kept"]) < e["in"]["dense"]
                      and isinstance(_module(dense_model, n), (torch.nn.Conv2d, torch.nn.Linear))}  # fmt: skip
        batches = calib_list[:_RECON_BATCHES]
        report.recon = reconstruction_errors(
            dense_model, {"before": before, "after": pruned_model}, plan, sorted(consumers), batches, dev
        )
        for mod in (dense_model, before, pruned_model):
            mod.to("cpu")
    if val is not None:
        from prunecli.evaluation import evaluate_model

        val_list = list(val)
        report.accuracy = {
            "before": evaluate_model(before, val_list, dev),
            "after": evaluate_model(pruned_model, val_list, dev),
        }
        before.to("cpu")
        pruned_model.to("cpu")
    return report


def _groups_of(model: Any, x: Any, producers: list[str]) -> list[Any]:
    """The pruned groups of ``model`` for the record; one group per producer when it cannot be traced."""
    from prunecli.restoration.graph import Group, find_pairs

    try:
        return find_pairs(model, x, producers).groups
    except Exception:  # the record still lists every producer; only the stream grouping is lost
        return [Group([n]) for n in producers]


# what a method that does not compensate channels did to every group (bn re-estimates statistics only)
_NOT_COMPENSATING = "BatchNorm statistics re-estimated; the pruned channels themselves are not compensated"


def _group_rows(groups: list[Any], ctx: Any, methods: list[str]) -> list[dict[str, Any]]:
    """One row per pruned group: its producers, consumers and what each method did (or why it did not)."""
    from prunecli.restoration import RESTORERS

    pairs = ctx.pairs.pairs if ctx.pairs is not None else {}
    rows = []
    for g in groups:
        done = dict(ctx.outcomes.get(g.name, {}))
        for m in methods:
            if m in done:
                continue
            if not RESTORERS.get(m).needs_dense and not RESTORERS.get(m).compensates:
                done[m] = _NOT_COMPENSATING
            elif g.reason is not None:
                done[m] = f"skipped: {g.reason}"
            else:
                done[m] = "skipped: nothing to compensate"
        consumers = sorted({c.name for n in g.producers if n in pairs for c in pairs[n].consumers})
        if g.attention is not None:
            consumers = [g.attention.proj]
        rows.append({
            "group": g.name, "kind": g.kind, "producers": list(g.producers), "consumers": consumers,
            "methods": done, "restored_by": [m for m in methods if done[m].startswith("restored")],
        })  # fmt: skip
    return rows


def _module(model: Any, name: str) -> Any:
    """The submodule ``name`` of ``model``, or None when ``name`` is not a module (e.g. a parameter)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _tensor(model: Any, name: str) -> Any:
    """The parameter or buffer ``name`` of ``model`` (a ViT's ``cls_token``), or None."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        try:
            return model.get_buffer(name)
        except AttributeError:
            return None


def _check_dense(dense_model: Any, producers: Mapping[str, tuple[list[int], int]]) -> None:
    """The dense parent has every pruned module or tensor of the structure, at the recorded width.

    A structure entry names a module (its weight's dim 0 is the channel axis) or, for channels pruned
    with the residual stream, a direct parameter such as a ViT's ``cls_token`` (the width is one of
    its dimensions; Torch-Pruning prunes its last).
    """
    for name, (_, width) in producers.items():
        mod = _module(dense_model, name)
        if mod is None:
            t = _tensor(dense_model, name)
            if t is None:
                raise CheckpointError(
                    f"the dense parent has no layer or parameter {name!r}", hint="pass the right --dense"
                )
            if width not in tuple(t.shape):
                raise CheckpointError(
                    f"the dense parent's {name} has shape {tuple(t.shape)}, the structure says {width} channels",
                    hint="pass the checkpoint that was pruned as --dense",
                )
            continue
        w = getattr(mod, "weight", None)
        if w is not None and w.ndim >= 1 and w.shape[0] != width:
            raise CheckpointError(
                f"the dense parent's {name} has {w.shape[0]} output channels, the structure says {width}",
                hint="pass the checkpoint that was pruned as --dense",
            )


def _example(model: Any) -> Any:
    import torch

    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    if not size:
        raise InputError("cannot tell the model's input size to trace it", hint="pass calibration data")
    return torch.randn(1, *[int(s) for s in size])


def _prune_step(lineage: list[dict[str, Any]]) -> tuple[int, dict[str, Any]] | None:
    for i in range(len(lineage) - 1, -1, -1):
        if lineage[i].get("command") == "prune":
            return i, lineage[i]
    return None


def restore(req: RestoreRequest) -> Result:
    """Restores a channel-pruned or masked checkpoint and writes OUT.

    A masked checkpoint (unstructured/N:M) takes ``obs``, ``bn`` or ``obs+bn`` (default ``obs+bn`` with
    BatchNorms, else ``obs``; data needed) and goes to :func:`restore_masked_model`; the rest of this
    paragraph is about channel-pruned checkpoints (written by ``prune --structure channel``).

    ``req.method`` is ``lbyl``, ``merge``, ``lstsq``, ``bn``, or several joined by ``+``; None (the
    default) follows from the data: ``lstsq+bn`` with ``req.data`` (``lstsq`` without BatchNorms), else
    ``lbyl`` (:func:`prunecli.restoration.default_method`). The
    dense parent is ``req.dense`` or the lineage's prune input; its sha256 must match the lineage.
    ``req.data`` (split defaults to ``train``) is needed by ``lstsq``/``bn``; with any method it adds
    per-layer reconstruction errors to the record. ``req.val`` (split defaults to ``test``) adds top-1
    before and after restoration. The lineage step keeps, besides the request's options, the dense
    parent's path and digest and the method parameters as resolved.

    Example:
        >>> restore(RestoreRequest(checkpoint="p50.safetensors", output="p50r.safetensors")).metrics["restored_layers"]
    """
    from prunecli.checkpoint.loaders import load_checkpoint
    from prunecli.checkpoint.sources import resolve_source
    from prunecli.checkpoint.writer import check_output
    from prunecli.device import describe, resolve_device, seed_everything
    from prunecli.restoration import check_kind, default_method, parse_methods, resolve_params

    spec, out, force, opts, run = req.checkpoint, req.output, req.force, req.source, req.runtime
    method = req.method or default_method(None, bool(req.data))  # refined once the model is loaded
    methods = parse_methods(method)
    if req.method is not None:  # the default's keys are checked once the checkpoint tells which default
        KeyValues.of(req.params).check([k for m in methods for k in m.params], method)
        resolve_params(methods, req.params)  # convert and validate the values before any work
    needs_data = [m.name for m in methods if m.needs_data]
    if needs_data and not req.data:
        raise InputError(f"{needs_data[0]} needs calibration data", hint="pass --data SPEC (e.g. --data digits:train)")
    check_output(out, force=force)
    source = resolve_source(spec)
    check_output(out, force=force, inputs=[source.path, source.weights])
    dev = resolve_device(run.device)
    seed_everything(run.seed)
    loaded = load_checkpoint(spec, arch=opts.arch, num_classes=opts.num_classes, ema=opts.ema,
                             model_args=dict(opts.model_args), source=source)  # fmt: skip
    manifest = loaded.manifest
    structure = manifest.structure
    kind = _kind(manifest)
    if kind is None:
        raise InputError(
            f"{spec} is not channel-pruned and has no masked weights: nothing to restore",
            hint="prune first (--structure channel, unstructured or N:M)",
        )
    if req.method is None:
        if kind == "masked" and not req.data:
            raise InputError(f"{spec} is not channel-pruned but masked (unstructured or N:M): it is restored "
                             "with obs, which needs calibration data", hint="pass --data SPEC")  # fmt: skip
        method = default_method(loaded.model, bool(req.data), kind)
        methods = parse_methods(method)
        KeyValues.of(req.params).check([k for m in methods for k in m.params], method)
        resolve_params(methods, req.params)
    check_kind(methods, kind, spec)
    if kind == "masked":
        return _restore_masked(req, loaded, method, dev)
    lineage = list(manifest.lineage)
    found = _prune_step(lineage)
    if any(m.compensates for m in methods) and found is not None:
        for step in lineage[found[0] + 1 :]:
            prev = str(step.get("resolved_method") or (step.get("options") or {}).get("method") or "")
            if step.get("command") == "restore" and any(p in ("lbyl", "merge", "nm") for p in prev.split("+")):
                raise InputError(
                    f"{spec} was already restored with {prev}: folding the pruned channels again would double them",
                    hint="restore the output of prune, or use lstsq/bn on top",
                )
    dense_loaded, dense_path, dense_sha = None, None, None
    if any(m.needs_dense for m in methods):
        dense_loaded = _load_dense(spec, req.dense, found, manifest, opts)
        dense_path = str(dense_loaded.source.path or dense_loaded.source.spec)
        dense_sha = dense_loaded.sha256
    calib_loader, val_loader = _loaders(req, loaded, dev)
    report = restore_model(
        loaded.model, dense_loaded.model if dense_loaded else None, structure, method,
        params={k: v for k, v in req.params.items() if any(k in m.params for m in methods)},
        calib=calib_loader, val=val_loader, device=dev,
    )  # fmt: skip
    provenance = {"dense": dense_path, "dense_sha256": dense_sha, "resolved_params": report.params,
                  "resolved_method": method}  # fmt: skip
    path, sha = save_output(out, loaded.model, loaded, command="restore", options=req.to_json(), force=force,
                            provenance=provenance)  # fmt: skip
    metrics = report.metrics()
    metrics["arch"] = manifest.arch
    from prunecli.counting import count_model

    metrics.update(count_model(loaded.model).metrics())  # params, params_nonzero, sparsity (one convention)
    return Result(checkpoint=path, sha256=sha, metrics=metrics, device=describe(dev))


def _kind(manifest: Any) -> str | None:
    """``channel`` (a channel structure), ``masked`` (masked weights listed) or None (nothing pruned)."""
    structure = manifest.structure
    if isinstance(structure, dict) and structure.get("channels"):
        return "channel"
    return "masked" if manifest.masked else None


@dataclass
class MaskedRestoreReport:
    """What :func:`restore_masked_model` did.

    Attributes:
        methods: the methods applied, in order.
        params: resolved parameters per method.
        layers: method → what it did (``obs``: per masked layer, :func:`prunecli.reconstruction.joint.layer_rows`;
            ``bn``: ``"*"`` → the BN layers re-estimated).
        warnings: every warning emitted (unreached or skipped layers, …).
        accuracy: {"before": {...}, "after": {...}} evaluation metrics with ``val``.
        seconds: wall time per method.
        samples: calibration images read (every process reads the same).
        shard: of those, the images ``obs`` solved from in this process (its share under torchrun).
    """

    methods: list[str]
    params: dict[str, dict[str, Any]]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    accuracy: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    shard: int | None = None

    def metrics(self) -> dict[str, Any]:
        """Flat, JSON-able metrics for the record (the same top-level keys as channel restoration)."""
        from prunecli.reconstruction.joint import summary

        rows = [{"method": m, "layer": name, **info} for m, layers in self.layers.items()
                for name, info in layers.items()]  # fmt: skip
        obs = self.layers.get("obs", {})
        done = summary(obs) if obs else {"reconstructed": 0}
        out: dict[str, Any] = {
            "method": "+".join(self.methods),
            "params": self.params,
            "restored_layers": done["reconstructed"],
            "reconstructed": sorted(n for n, r in obs.items() if r["status"] == "reconstructed"),
            "layers": rows,
            "warnings": self.warnings,
            "restore_s": self.seconds,
        }
        if "error_obs_mean" in done:  # mean over the reconstructed layers of the relative errors
            out["recon_error_before_mean"] = done["error_mask_mean"]
            out["recon_error_mean"] = done["error_obs_mean"]
        if self.accuracy:
            after, before = self.accuracy.get("after", {}), self.accuracy.get("before", {})
            out.update({k: v for k, v in after.items() if k in ("top1", "top5", "loss", "samples")})
            out.update({f"{k}_before": v for k, v in before.items() if k in ("top1", "top5", "loss")})
        return out


def restore_masked_model(
    pruned_model: Any,
    dense_model: Any,
    masked: list[str],
    method: str = "obs",
    *,
    params: Mapping[str, Any] | None = None,
    calib: Iterable[Any] | None = None,
    val: Iterable[Any] | None = None,
    device: Any = "cpu",
) -> MaskedRestoreReport:
    """Restores a masked (unstructured or N:M) model in place: ``obs``, ``bn`` or ``obs+bn``.

    ``masked`` is ``manifest.masked``; every mask is kept exactly. ``calib`` is an iterable of input
    batches or ``(x, y)`` pairs (needed by both methods); under ``torchrun`` (an initialised process
    group) ``obs`` uses this process's share of its ``samples`` images. ``val`` adds accuracy before/after.

    Raises:
        InputError: a method that does not restore masked checkpoints, unknown or bad parameters, no data,
            ``obs`` without the dense parent.
        CheckpointError: the dense parent does not fit the masked weights.

    Example:
        >>> restore_masked_model(loaded.model, parent.model, loaded.manifest.masked, "obs+bn", calib=loader)
    """
    import torch

    from prunecli import distributed as D
    from prunecli.reconstruction.joint import calibration
    from prunecli.restoration import check_kind, parse_methods, resolve_params
    from prunecli.restoration.masked import MaskedContext

    methods = parse_methods(method)
    check_kind(methods, "masked", "the model")
    resolved = resolve_params(methods, params)
    if calib is None:
        raise InputError(
            f"{methods[0].name} needs calibration data", hint="pass --data SPEC (e.g. --data digits:train)"
        )
    if any(m.needs_dense for m in methods) and dense_model is None:
        raise InputError(f"{methods[0].name} needs the dense parent model", hint="pass --dense PATH")
    limit = max(int(p.get("samples", 0)) for p in resolved)
    batches = calibration(calib, max(limit, 1))
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    ctx = MaskedContext(pruned_model, dense_model, list(masked), batches, dev, rank=D.rank(), world=D.world_size())
    report = MaskedRestoreReport([m.name for m in methods], {m.name: p for m, p in zip(methods, resolved, strict=True)})
    report.samples = sum(len(b) for b in batches)
    before = copy.deepcopy(pruned_model) if val is not None else None
    for m, p in zip(methods, resolved, strict=True):
        assert m.masked is not None  # check_kind
        ctx.layers = {}
        start = time.perf_counter()
        m.masked(ctx, p)
        report.seconds[m.name] = round(time.perf_counter() - start, 4)
        report.layers[m.name] = ctx.layers
    pruned_model.to("cpu").eval()
    report.warnings = list(ctx.warnings)
    report.shard = ctx.shard
    if val is not None and before is not None:
        from prunecli.evaluation import evaluate_model

        val_list = list(val)
        report.accuracy = {"before": evaluate_model(before, val_list, dev),
                           "after": evaluate_model(pruned_model, val_list, dev)}  # fmt: skip
        before.to("cpu")
        pruned_model.to("cpu")
    return report


def _restore_masked(req: RestoreRequest, loaded: Any, method: str, dev: Any) -> Result:
    """``restore`` of a masked checkpoint (:func:`restore_masked_model`); under ``torchrun`` only rank 0 writes."""
    from prunecli import distributed as D
    from prunecli.counting import count_model
    from prunecli.device import describe
    from prunecli.restoration import parse_methods

    spec, manifest = req.checkpoint, loaded.manifest
    methods = parse_methods(method)
    dense_loaded = None
    if any(m.needs_dense for m in methods):
        dense_loaded = _load_dense(spec, req.dense, _prune_step(list(manifest.lineage)), manifest, req.source)
    D.init(dev)  # under torchrun: obs solves from this process's share of the calibration images
    calib, val = _loaders(req, loaded, dev)
    report = restore_masked_model(
        loaded.model, dense_loaded.model if dense_loaded else None, list(manifest.masked), method,
        params=dict(req.params), calib=calib, val=val, device=dev,
    )  # fmt: skip
    provenance = {"dense": str(dense_loaded.source.path or dense_loaded.source.spec) if dense_loaded else None,
                  "dense_sha256": dense_loaded.sha256 if dense_loaded else None, "resolved_params": report.params,
                  "resolved_method": method}  # fmt: skip
    written = None
    if D.is_main():
        written = save_output(req.output, loaded.model, loaded, command="restore", options=req.to_json(),
                              force=req.force, provenance=provenance)  # fmt: skip
    path, sha = D.broadcast_object(written)
    metrics = report.metrics()
    metrics["arch"] = manifest.arch
    metrics["calib_samples"] = report.samples
    if report.shard is not None:
        metrics["calib_shard"] = report.shard
    metrics["world_size"] = D.world_size()
    metrics.update(count_model(loaded.model).metrics())  # params, params_nonzero, sparsity (one convention)
    return Result(checkpoint=path, sha256=sha, metrics=metrics, device=describe(dev))


def _load_dense(
    spec: str, dense: str | None, found: tuple[int, dict[str, Any]] | None, manifest: Any, opts: InputOptions
) -> Any:
    from pathlib import Path

    from prunecli.checkpoint.loaders import load_checkpoint

    step = found[1] if found else {}
    want_sha = step.get("input_sha256")
    target = dense or step.get("input")
    if not target:
        raise CheckpointError(
            f"{spec}: the lineage names no dense parent (no prune step)", hint="pass --dense PATH to the unpruned model"
        )
    if dense is None and not str(target).startswith(("timm:", "arch:")) and not Path(str(target)).exists():
        raise CheckpointError(
            f"the dense parent {target} recorded in the lineage does not exist", hint="pass --dense PATH to it"
        )
    if str(target).startswith("arch:"):
        raise CheckpointError(f"the dense parent {target} is a random initialisation, not a file",
                              hint="pass --dense PATH to the weights that were pruned")  # fmt: skip
    loaded = load_checkpoint(str(target), arch=opts.arch or manifest.arch, num_classes=opts.num_classes or
                             manifest.num_classes)  # fmt: skip
    if want_sha and loaded.sha256 and loaded.sha256 != want_sha:
        raise CheckpointError(
            f"dense parent {target} has sha256 {loaded.sha256[:12]}…, the lineage's prune step read {want_sha[:12]}…",
            hint="pass the exact checkpoint that was pruned as --dense",
        )
    return loaded


def _loaders(req: RestoreRequest, loaded: Any, dev: Any) -> tuple[Any, Any]:
    """The calibration loader (``--data``, shuffled, train split by default) and the evaluation loader
    (``--val``, test split by default); None where the option is not given."""
    from prunecli.data import make_loader

    run = req.runtime
    loader = {"batch_size": run.batch_size, "workers": run.workers, "seed": run.seed, "device": dev}
    calib = val = None
    if req.data:
        ds, _ = load_data(req.data, loaded, req.transforms, default_split="train")
        calib = make_loader(ds, shuffle=True, **loader)
    if req.val:
        vs, _ = load_data(req.val, loaded, req.transforms, default_split="test")
        val = make_loader(vs, **loader)
    return calib, val

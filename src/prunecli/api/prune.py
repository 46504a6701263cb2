"""``prunecli prune``: remove weights (unstructured, N:M) or channels from a checkpoint (DESIGN §4).

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

Fast path: unstructured and N:M pruning of a prunecli checkpoint that carries a layer table
(:mod:`prunecli.layertable`; every checkpoint prunecli saves from a model has one), with magnitude
scores or a scores file and without ``--compensate``/``--input-size``/model args, never rebuilds the
model: the table gives the prunable weights, the head and the MACs; magnitude pruning maps the file
read-only and masks each pruned tensor as it is written (no copy of the weights), scores files and
N:M read the file once into a buffer and prune it in place; both hash the input and the output on
a worker thread without a second pass over either. timm is not imported. The output — checkpoint
bytes and metrics — is the one the model path writes (tests compare them); ``PRUNECLI_FAST_PRUNE=0``
forces the model path.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prunecli.api._common import DataOptions, InputOptions, load_input, save_output
from prunecli.errors import InputError
from prunecli.record import Result

__all__ = ["GLOBAL_SCOPE_METHODS", "default_scope", "parse_layer_ratio", "prune"]

_LOG = logging.getLogger("prunecli")

GLOBAL_SCOPE_METHODS = frozenset({"taylor", "snip", "biascomp", "proscore"})
"""Criteria pruned with ``--scope global`` by default (their scores are comparable across layers)."""

_MAGNITUDE = frozenset({"magnitude", "l1", "l2"})


def default_scope(method: str | None) -> str:
    """The scope used when ``--scope`` is not given (see the module docstring)."""
    return "global" if (method or "").lower() in GLOBAL_SCOPE_METHODS else "layer"


def parse_layer_ratio(text: str) -> tuple[str, float]:
    """``"blocks.0.*=0.2"`` → ``("blocks.0.*", 0.2)``.

    Raises:
        InputError: not of the form GLOB=R with a number R.
    """
    glob, sep, value = text.rpartition("=")
    try:
        ratio = float(value)
    except ValueError:
        ratio = math.nan
    if not sep or not glob or math.isnan(ratio):
        raise InputError(f"--layer-ratio {text!r} is not GLOB=R", hint="e.g. --layer-ratio 'blocks.0.*=0.2'")
    return glob, ratio


def prune(
    spec: str,
    *,
    out: str | Path,
    ratio: float | None = None,
    scores: str | Path | None = None,
    method: str | None = None,
    data: str | None = None,
    params: Mapping[str, Any] | None = None,
    batches: int | None = None,
    fraction: float | None = None,
    structure: str = "unstructured",
    scope: str | None = None,
    exclude: Sequence[str] = (),
    include_head: bool = False,
    layer_ratios: Sequence[tuple[str, float]] | Mapping[str, float] = (),
    round_to: int = 1,
    min_channels: int = 1,
    compensate: str | None = None,
    restore: str | None = None,
    inputs: InputOptions | None = None,
    data_options: DataOptions | None = None,
    device: str = "auto",
    batch_size: int = 128,
    workers: int = 0,
    seed: int = 0,
    score_mode: str = "eval",
    force: bool = False,
) -> Result:
    """Prunes CKPT and writes the result to ``out``.

    Args:
        spec: CKPT (any DESIGN §2 form).
        out: output checkpoint (``.safetensors`` file or ``DIR/``).
        ratio: fraction of weights (unstructured) or channels (channel) to remove, in [0, 1); implied
            by N:M (``(M−N)/M``) and may be omitted there.
        scores: a scores file of this checkpoint (``prunecli score``).
        method: a criterion to compute the scores in process instead (``magnitude``, ``taylor``, …).
        data: calibration data spec for data-driven ``method``.
        params: criterion options (``-p key=value``).
        batches: calibration batches for ``method``.
        fraction: calibration fraction of the data for ``method``.
        structure: ``unstructured``, ``channel`` or ``N:M`` (e.g. ``2:4``).
        scope: ``layer`` or ``global``; default per :func:`default_scope`.
        exclude: globs of layers (module or parameter names) not to prune.
        include_head: prune the classifier head too (excluded by default).
        layer_ratios: (glob, ratio) pairs giving matching layers their own ratio.
        round_to: channel pruning: keep channel counts a multiple of this.
        min_channels: channel pruning: keep at least this many channels per layer.
        compensate: ``bias`` applies paper E's bias shifts (needs biascomp scores).
        restore: channel pruning: run this training-free restoration afterwards (``lbyl``, …).
        inputs: how to read CKPT when it does not describe itself.
        data_options: input size / mean / std overrides (data and the MAC count).
        device: scoring device for ``method``.
        batch_size: scoring batch size for ``method``.
        workers: DataLoader workers for ``method``.
        seed: seed for ``method`` (random criterion, sampling).
        score_mode: ``eval`` or ``train`` model mode while scoring.
        force: overwrite an existing ``out``.

    Returns:
        The written checkpoint, its sha256 and the metrics of DESIGN §3 (``sparsity``,
        ``target_ratio``, ``params``, ``params_nonzero``, ``macs``, ``macs_nonzero``, ``layers``,
        ``bitmask_bytes``, …).

    Example:
        >>> prune("base.safetensors", method="magnitude", ratio=0.5, out="p50.safetensors").metrics["sparsity"]
        0.5
    """
    from prunecli.checkpoint.hashing import file_sha256
    from prunecli.checkpoint.writer import check_output
    from prunecli.pruning.nm import parse_nm

    if (scores is None) == (method is None):
        raise InputError("give exactly one of --scores FILE and --method M", hint="e.g. --method magnitude")
    if compensate not in (None, "bias"):
        raise InputError(f"unknown compensation {compensate!r}; choose from bias")
    nm = parse_nm(structure)
    kind = "nm" if nm else structure
    if kind not in _ENGINES:
        raise InputError(f"unknown structure {structure!r}; choose from unstructured, channel, N:M (e.g. 2:4)")
    if nm:
        implied = (nm[1] - nm[0]) / nm[1]
        if ratio is not None and not math.isclose(ratio, implied):
            raise InputError(
                f"--ratio {ratio:g} contradicts --structure {structure} (removes {implied:g})",
                hint="omit --ratio with N:M",
            )
        ratio = implied
    if ratio is None:
        raise InputError("--ratio is required", hint="e.g. --ratio 0.5")
    from prunecli.pruning.unstructured import check_ratio

    check_ratio(ratio)
    pairs = list(layer_ratios.items()) if isinstance(layer_ratios, Mapping) else list(layer_ratios)
    for _, r in pairs:
        check_ratio(r)
    if scope not in (None, "layer", "global"):
        raise InputError(f"unknown scope {scope!r}; choose from global, layer")
    if compensate and kind == "channel":
        raise InputError(
            "--compensate bias applies to removed weights, not to removed channels",
            hint="use it with --structure unstructured or N:M",
        )
    if restore and kind != "channel":
        raise InputError("--restore needs --structure channel", hint="restoration rebuilds removed channels")
    scores_path = Path(scores).expanduser().resolve() if scores is not None else None
    if scores_path is not None and not scores_path.is_file():
        raise InputError(f"scores file {str(scores)!r} does not exist")
    check_output(out, force=force, inputs=[scores_path])

    fast = _fast_input(
        spec,
        kind=kind,
        method=method,
        scores=scores_path,
        compensate=compensate,
        inputs=inputs,
        dopts=data_options,
        out=(out, force),
    )
    loaded = fast.loaded if fast else load_input(spec, inputs)
    check_output(out, force=force, inputs=[loaded.source.path, loaded.source.weights, scores_path])
    sf = _load_scores(scores_path, loaded, kind) if scores_path else None
    name = sf.method if sf else str(method)
    job = _Job(
        fast=fast,
        loaded=loaded,
        kind=kind,
        nm=nm,
        ratio=float(ratio),
        scope=scope or default_scope(name),
        method=name,
        sf=sf,
        compensate=compensate,
        data=data,
        data_options=data_options,
        round_to=round_to,
        min_channels=min_channels,
        restore=restore,
        device=device,
        batch_size=batch_size,
        workers=workers,
        seed=seed,
    )
    job.select_layers(exclude, include_head, pairs)
    if sf is None and not (name.lower() in _MAGNITUDE and (kind != "channel" or not params)):
        try:
            from prunecli.scoring import compute_scores
        except ModuleNotFoundError:
            raise InputError(f"--method {name} is not available in this build", hint="pass --scores FILE") from None
        job.sf = compute_scores(
            loaded,
            name,
            data=data,
            data_options=data_options,
            batches=batches,
            fraction=fraction,
            params=dict(params or {}),
            device=device,
            batch_size=batch_size,
            seed=seed,
            score_mode=score_mode,
        )
        _check_granularity(job.sf, kind)
        job.back_to_cpu()
    metrics, manifest = _ENGINES[kind](job)
    options = {
        "ratio": ratio,
        "structure": structure,
        "scope": job.scope,
        "scores": str(scores_path) if scores_path else None,
        "scores_sha256": file_sha256(scores_path) if scores_path else None,
        "method": name,
        "data": data,
        "params": dict(params or {}),
        "exclude": list(exclude),
        "include_head": include_head,
        "layer_ratios": [f"{g}={r:g}" for g, r in pairs],
        "compensate": compensate,
    }
    if kind == "channel":
        options.update(round_to=round_to, min_channels=min_channels, restore=restore)
    state = fast.tensors if fast else loaded.model
    if fast:
        fast.input_sha256()  # the lineage names the input's digest
    transform = fast.transform if fast else None
    path, sha = save_output(
        out, state, loaded, command="prune", options=options, force=force, manifest=manifest, transform=transform
    )
    from prunecli.device import describe, resolve_device

    dev = describe(resolve_device(device)) if job.sf is not None and sf is None else "cpu"
    return Result(checkpoint=path, sha256=sha, metrics=metrics, device=dev)


@dataclasses.dataclass
class _FastInput:
    """A checkpoint read for the fast path: tensors straight from the file, the model described by its table.

    ``mapped``: the tensors are read-only views of the file (magnitude pruning plans on them and masks
    each pruned tensor while writing it, ``transform``); otherwise they are a private copy, pruned in
    place. ``sha``: a future of the input's sha256 while it is being hashed.
    """

    loaded: Any  # prunecli.checkpoint.loaders.Loaded with model=None
    tensors: dict[str, Any]
    table: Any  # prunecli.layertable.LayerTable
    mapped: bool = False
    sha: Any = None
    transform: dict[str, Any] | None = None

    def input_sha256(self) -> str:
        """The input's digest (waits for the hashing thread); also what the lineage records."""
        if self.sha is not None:
            from prunecli.checkpoint.hashing import remember_sha256

            self.loaded._sha = self.sha.result()
            remember_sha256(self.loaded.source.weights, self.loaded._sha)
            self.sha = None
        return str(self.loaded._sha)

    def writable(self, names: Sequence[str]) -> None:
        """Private copies of ``names`` (for in-place pruning of a mapped input)."""
        self.tensors.update({n: self.tensors[n].clone() for n in names})


def _fast_input(
    spec: str,
    *,
    kind: str,
    method: str | None,
    scores: Path | None,
    compensate: str | None,
    inputs: InputOptions | None,
    dopts: DataOptions | None,
    out: tuple[str | Path, bool],
) -> _FastInput | None:
    """Reads CKPT for the fast path (module docstring) when the run allows it; None → the model path.

    Every condition is one under which the model path would compute exactly what the table and the
    raw tensors give: weight scores that need no model (magnitude on the fly, or a scores file), no
    bias compensation (it needs the BatchNorm modules), the MAC count at the table's input size,
    float32 tensors (the model path converts others to float32), and a table that fits the file.
    """
    if os.environ.get("PRUNECLI_FAST_PRUNE", "1") == "0" or kind not in ("unstructured", "nm") or compensate:
        return None
    if scores is None and (method or "").lower() not in _MAGNITUDE:
        return None
    if (inputs is not None and inputs.model_args) or (dopts is not None and dopts.input_size):
        return None
    from prunecli.checkpoint.manifest import METADATA_KEY, Manifest
    from prunecli.checkpoint.sources import SourceKind, resolve_source
    from prunecli.layertable import LayerTable

    source = resolve_source(spec)
    header = source.header
    if source.kind is not SourceKind.PRUNECLI or header is None:
        return None
    manifest = Manifest.from_json(header.metadata[METADATA_KEY], where=source.spec)
    table = LayerTable.parse(manifest.layer_table)
    if table is None or manifest.adapters or not table.fits({t.name: t.shape for t in header.tensors}):
        return None
    if any(t.dtype in _FLOAT_DTYPES and t.dtype != "F32" for t in header.tensors):
        return None
    from prunecli.checkpoint.hashing import remember_sha256
    from prunecli.checkpoint.loaders import Loaded
    from prunecli.checkpoint.loaders import check_finite as _check_finite
    from prunecli.checkpoint.safetensors_io import map_safetensors_hashed, read_safetensors_hashed
    from prunecli.checkpoint.writer import check_output

    check_output(out[0], force=out[1], inputs=[source.path, source.weights])  # before reading a large file
    assert source.weights is not None
    # Magnitude pruning needs no writable weights (MagnitudeMasks): map the file instead of copying it.
    mapped = map_safetensors_hashed(header) if kind == "unstructured" and scores is None else None
    if mapped is not None:
        tensors, future = mapped
        fast = _FastInput(Loaded(None, manifest, source), tensors, table, mapped=True, sha=future)  # type: ignore[arg-type]
    else:
        tensors, sha = read_safetensors_hashed(header)
        remember_sha256(source.weights, sha)
        fast = _FastInput(Loaded(None, manifest, source, _sha=sha), tensors, table)  # type: ignore[arg-type]
    try:
        _check_finite(tensors, source.spec)
    except BaseException:
        fast.input_sha256()  # let the hashing thread finish before the error unwinds
        raise
    return fast


_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4"})


class _Job:
    """The resolved inputs of one prune run, shared by the structure engines.

    On the model path the prunable weights, the head and the MAC trace come from the rebuilt model;
    on the fast path (``fast`` set) from the checkpoint's layer table and tensors.
    """

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)
        self.model = self.loaded.model
        if self.fast is not None:
            entries = self.fast.table.layers
            self.layers: dict[str, Any] = {e.name: e for e in entries}
            self.weights = {e.name: self.fast.tensors[e.name] for e in entries}
            self.head = [e.name for e in entries if e.head]
        else:
            from prunecli.prunable import classifier_modules, prunable_layers

            self.layers = {f"{n}.weight": m for n, m in prunable_layers(self.model).items()}
            self.weights = {n: m.weight.data for n, m in self.layers.items()}
            self.head = [f"{n}.weight" for n in classifier_modules(self.model)]
        self.selected: list[str] = []
        self.per_layer: dict[str, float] = {}

    def trace(self) -> Any:
        """Output positions per layer (MACs) and BatchNorm successors: from the table or a traced forward pass."""
        from prunecli.pruning import LayerTrace, trace_layers

        if self.fast is not None:
            return LayerTrace(positions={e.module: e.macs_per_weight for e in self.fast.table.layers}, device="table")
        return trace_layers(self.model, self.input_size())

    def state(self) -> dict[str, Any]:
        """Every tensor the output will hold."""
        return self.fast.tensors if self.fast is not None else self.model.state_dict()

    def params(self) -> dict[str, int]:
        """Parameter name → numel, deduplicated as ``model.parameters()`` is."""
        if self.fast is not None:
            buffers = set(self.fast.table.buffers)
            return {n: t.numel() for n, t in self.fast.tensors.items() if n not in buffers}
        return {n: p.numel() for n, p in self.model.named_parameters()}

    def back_to_cpu(self) -> None:
        """Scoring may have moved the model to a GPU: pruning and saving work on CPU tensors."""
        self.model.cpu()
        self.weights = {n: m.weight.data for n, m in self.layers.items()}
        self.sf.scores = {n: t.cpu() for n, t in self.sf.scores.items()}
        self.sf.extras = {k: {n: t.cpu() for n, t in g.items()} for k, g in self.sf.extras.items()}

    def select_layers(self, exclude: Sequence[str], include_head: bool, pairs: Sequence[tuple[str, float]]) -> None:
        """Resolves head/exclude/layer-ratio globs to parameter names; warns on globs matching nothing."""
        from prunecli.prunable import match_any

        head = [] if include_head else self.head
        for pattern in exclude:
            if not any(match_any(n, [pattern]) for n in self.layers):
                _LOG.warning("--exclude %r matches no prunable layer", pattern)
        self.excluded = [n for n in self.layers if n in head or match_any(n, exclude)]
        self.selected = [n for n in self.layers if n not in self.excluded]
        if not self.selected:
            raise InputError("no prunable layer is left after --exclude", hint="loosen --exclude or --include-head")
        for pattern, r in pairs:
            hits = [n for n in self.selected if match_any(n, [pattern])]
            if not hits:
                _LOG.warning("--layer-ratio %r matches no layer being pruned", pattern)
            self.per_layer.update({n: r for n in hits})
        self.ratio_pairs = list(pairs)

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
        if not self.compensate:
            return None
        from prunecli.pruning.compensate import BiasCompensation

        shifts = (self.sf.extras.get("bias_shift") if self.sf is not None else None) or {}
        if not shifts:
            raise InputError(
                f"--compensate bias needs the bias shifts of a biascomp scores file ({self.method} has none)",
                hint="score with --method biascomp first, or prune with --method biascomp --data SPEC",
            )
        return BiasCompensation(self.layers, shifts, trace.bn_after, dict(self.model.named_modules()))

    def input_size(self) -> tuple[int, ...]:
        """One sample's shape for the MAC count: the data config's input size (with overrides)."""
        from prunecli.data import data_config

        opts = self.data_options or DataOptions()
        cfg = data_config(self.loaded.manifest.pretrained_cfg, input_size=opts.input_size, mean=opts.mean, std=opts.std)
        return tuple(int(s) for s in cfg["input_size"])


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


def _unstructured(job: _Job) -> tuple[dict[str, Any], Any]:
    from prunecli.pruning.unstructured import MagnitudeMasks, plan_scopes, prune_unstructured

    sizes = {n: job.weights[n].numel() for n in job.selected}
    scopes = plan_scopes(sizes, job.ratio, job.scope, job.per_layer)
    trace = job.trace()
    comp = job.compensation(trace)
    target = sum(s.k for s in scopes) / max(sum(sizes.values()), 1)
    if job.fast is not None and job.fast.mapped:
        masks = MagnitudeMasks.plan(job.weights, scopes)
        if masks is not None:  # the weights stay read-only; each pruned one is masked as it is written
            job.fast.transform = masks.transform()
            return _finish(job, trace, masks.removed, target, comp, masks.nonzero)
        job.fast.writable(job.selected)  # rare: a threshold among the zeros; prune private copies in place
        job.weights.update({n: job.fast.tensors[n] for n in job.selected})
    known: dict[str, int] = {}
    removed = prune_unstructured(job.weights, job.score_of(), scopes, on_mask=comp, nonzero=known)
    return _finish(job, trace, removed, target, comp, known)


def _nm(job: _Job) -> tuple[dict[str, Any], Any]:
    from prunecli.pruning.nm import prune_nm

    if job.per_layer:
        raise InputError("--layer-ratio does not apply to N:M sparsity", hint="--exclude layers instead")
    trace = job.trace()
    comp = job.compensation(trace)
    n, m = job.nm
    removed, skipped = prune_nm(job.weights, job.score_of(), job.selected, n, m, on_mask=comp)
    job.selected = [s for s in job.selected if s not in skipped]
    metrics, manifest = _finish(job, trace, removed, (m - n) / m, comp)
    metrics["nm_skipped"] = skipped
    return metrics, manifest


def _channel(job: _Job) -> tuple[dict[str, Any], Any]:
    """Channel pruning through :func:`prunecli.pruning.channel.prune_channels` (torch-pruning's DepGraph)."""
    import torch

    from prunecli.pruning.channel import prune_channels

    before = sum(w.numel() for w in job.weights.values())
    sf = job.sf
    ratios: dict[str, float] = {}
    for pattern, r in reversed(job.ratio_pairs):  # prune_channels takes the first match; ours is the last
        ratios.setdefault(pattern, r)
    example = torch.zeros(1, *job.input_size())
    dense = copy.deepcopy(job.model) if job.restore else None  # restore needs the dense filters
    result = prune_channels(
        job.model,
        example_input=example,
        ratio=job.ratio,
        channel_scores=sf.scores if sf is not None and sf.granularity == "channel" else None,
        weight_scores=sf.scores if sf is not None and sf.granularity == "weight" else None,
        scope=job.scope,
        layer_ratios=ratios,
        exclude=[n.removesuffix(".weight") for n in job.excluded],
        round_to=job.round_to if job.round_to > 1 else None,
        min_channels=job.min_channels,
    )
    restored = _restore(job, dense, result.structure, example) if dense is not None else None
    from prunecli.prunable import prunable_params

    after = sum(p.numel() for p in prunable_params(job.model).values())
    state = job.model.state_dict()
    nnz = _nonzero(state)
    manifest = dataclasses.replace(job.loaded.manifest, structure=result.structure)
    metrics = {
        "structure": "channel",
        "method": job.method,
        "scope": job.scope,
        "target_ratio": job.ratio,
        "excluded": job.excluded,
        **result.metrics,
        "sparsity": 1.0 - after / max(before, 1),
        **_param_counts(job.model, nnz),
        **_storage(state, nnz, set(job.loaded.manifest.masked)),
    }
    if restored is not None:
        metrics["restore"] = restored
    return metrics, manifest


def _restore(job: _Job, dense: Any, structure: Any, example: Any) -> dict[str, Any]:
    """``--restore METHOD``: training-free restoration in the same step (``prunecli restore``'s library call).

    Calibration data for ``lstsq``/``bn`` (and the reconstruction errors) come from ``--data`` (train split).
    """
    from prunecli.api._common import load_data
    from prunecli.api.restore import restore_model
    from prunecli.data import make_loader
    from prunecli.device import resolve_device

    calib = None
    if job.data:
        ds, _ = load_data(job.data, job.loaded, job.data_options, default_split="train")
        calib = make_loader(ds, batch_size=job.batch_size, workers=job.workers, shuffle=True, seed=job.seed)
    report = restore_model(
        job.model,
        dense,
        structure,
        job.restore,
        calib=calib,
        device=resolve_device(job.device),
        example_input=example,
    )
    job.model.cpu()
    return report.metrics()


_ENGINES: dict[str, Callable[[_Job], tuple[dict[str, Any], Any]]] = {
    "unstructured": _unstructured,
    "nm": _nm,
    "channel": _channel,
}


def _finish(
    job: _Job,
    trace: Any,
    removed: Mapping[str, int],
    target: float,
    comp: Any,
    known: Mapping[str, int] | None = None,
) -> tuple[dict[str, Any], Any]:
    """Metrics of DESIGN §3 for a masked (dense-shape) result, and the manifest listing the masks.

    MACs follow :func:`prunecli.pruning.count_macs`: ``Σ positions · numel`` over the prunable layers,
    and ``Σ positions · nnz`` for ``macs_nonzero``.
    """
    masked = sorted(set(job.loaded.manifest.masked) | {n for n, c in removed.items() if c > 0})
    manifest = dataclasses.replace(job.loaded.manifest, masked=masked)
    state = job.state()
    nnz = _nonzero(state, known)
    params = job.params()
    positions = {n: trace.positions.get(n.removesuffix(".weight"), 0) for n in job.weights}
    zeros = {n: job.weights[n].numel() - nnz[n] for n in job.weights}
    n_sel = sum(job.weights[n].numel() for n in job.selected)
    n_all = sum(w.numel() for w in job.weights.values())
    metrics: dict[str, Any] = {
        "structure": "unstructured" if job.kind == "unstructured" else f"{job.nm[0]}:{job.nm[1]}",
        "method": job.method,
        "scope": job.scope if job.kind == "unstructured" else None,
        "target_ratio": job.ratio,
        "target_sparsity": target,
        "sparsity": sum(zeros[n] for n in job.selected) / max(n_sel, 1),
        "sparsity_all": sum(zeros.values()) / max(n_all, 1),
        "removed": sum(removed.values()),
        "prunable": n_sel,
        "excluded": job.excluded,
        "layers": {n: zeros[n] / max(w.numel(), 1) for n, w in job.weights.items()},
        "params": sum(params.values()),
        "params_nonzero": sum(nnz[n] for n in params),
        "macs": sum(positions[n] * w.numel() for n, w in job.weights.items()),
        "macs_nonzero": sum(positions[n] * nnz[n] for n in job.weights),
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


def _param_counts(model: Any, nnz: Mapping[str, int]) -> dict[str, int]:
    named = dict(model.named_parameters())  # deduplicated, as model.parameters()
    return {"params": sum(p.numel() for p in named.values()), "params_nonzero": sum(nnz[n] for n in named)}


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

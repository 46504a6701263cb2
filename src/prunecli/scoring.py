"""The scoring engine: calibration batches in, a :class:`~prunecli.scores.ScoresFile` out.

Criteria (:mod:`prunecli.criteria`) declare what they need; this module supplies it. It picks the
calibration samples (``--batches N`` of a seeded shuffled loader, or ``--fraction F`` as a
class-balanced subset, paper D App. E), puts the model in eval mode (docs/criteria.md; ``score_mode='train'``
for paper reproduction), runs the forward passes and, for gradient criteria, one ``autograd.grad`` per
objective w.r.t. exactly the tensors the criterion asks for (so e.g. biascomp never pays for weight
gradients it does not use). Parameters are never updated. ``precision`` bf16/fp16 runs the forward
passes under autocast only for the criteria in :data:`REDUCED_PRECISION_OK`, whose statistics are parameter
gradients (float32: autocast casts copies of the float32 weights, the gradient reaches the weights in
float32) or activations they upcast first; their accumulators stay float32/float64. Every other criterion
runs in fp32 and the scores file says so.
``prune --method M`` calls :func:`compute_scores` directly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from prunecli.criteria import Criterion, CriterionOutput, ScoreContext, get_criterion
from prunecli.criteria._base import options_dict
from prunecli.errors import InputError
from prunecli.prunable import prunable_layers
from prunecli.scores import ScoresFile

__all__ = [
    "REDUCED_PRECISION_OK",
    "SCORE_MODES",
    "balanced_indices",
    "compute_scores",
    "layer_stats",
    "run_criterion",
    "scoring_precision",
    "zero_score_warning",
]

_LOG = logging.getLogger("prunecli")
SCORE_MODES = ("eval", "train")
ZERO_SCORE_WARN_FRACTION = 0.5  # "most": above this share of live weights scored exactly 0, ranking is moot

# Criteria that may score under autocast, and why their statistics survive it.
REDUCED_PRECISION_OK: dict[str, str] = {
    "taylor": "(w·g)² from float32 parameter gradients, float32/float64 accumulators",
    "snip": "|w·g| from float32 parameter gradients, float32 accumulator",
    "wanda": "activations upcast to float32 before the float64 sums of squares",
}


def scoring_precision(method: str, precision: str) -> str:
    """The precision a criterion scores in: ``precision`` where :data:`REDUCED_PRECISION_OK` allows, else fp32."""
    if precision == "fp32" or method in REDUCED_PRECISION_OK:
        return precision
    _LOG.warning("%s scores in fp32 (--precision %s applies to %s only): its per-sample activations and output "
                 "gradients would lose precision", method, precision, ", ".join(REDUCED_PRECISION_OK))  # fmt: skip
    return "fp32"


def balanced_indices(targets: list[int] | None, n: int, fraction: float, seed: int) -> list[int]:
    """A class-balanced random subset: ``max(1, round(F·n_c))`` samples of every class ``c``.

    Without labels (``synthetic``) it is a uniform subset of ``max(1, round(F·n))``. The result is
    shuffled (seeded) so every batch mixes classes.
    """
    g = torch.Generator().manual_seed(seed)
    if targets is None:
        k = max(1, round(fraction * n))
        picked = torch.randperm(n, generator=g)[:k].tolist()
    else:
        by_class: dict[int, list[int]] = {}
        for i, t in enumerate(targets):
            by_class.setdefault(int(t), []).append(i)
        picked = []
        for c in sorted(by_class):
            idx = by_class[c]
            k = max(1, round(fraction * len(idx)))
            perm = torch.randperm(len(idx), generator=g)[:k].tolist()
            picked += [idx[j] for j in perm]
    order = torch.randperm(len(picked), generator=g).tolist()
    return [picked[j] for j in order]


def layer_stats(scores: Mapping[str, torch.Tensor], notes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per-parameter min/max/mean/std/count of the scores (float64), plus the criterion's notes."""
    out: dict[str, Any] = {}
    for name, s in scores.items():
        d = s.detach().double().flatten()
        entry = {
            "count": d.numel(),
            "min": float(d.min()) if d.numel() else None,
            "max": float(d.max()) if d.numel() else None,
            "mean": float(d.mean()) if d.numel() else None,
            "std": float(d.std(unbiased=False)) if d.numel() else None,
        }
        entry.update(notes.get(name, {}))
        out[name] = entry
    return out


def run_criterion(
    model: torch.nn.Module,
    criterion: Criterion,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    seed: int = 0,
    example: torch.Tensor | None = None,
    score_mode: str = "eval",
    precision: str = "fp32",
    channels_last: bool = False,
) -> tuple[CriterionOutput, int, int]:
    """Drives one criterion over ``batches`` (ignored for data-free criteria).

    Args:
        model: the model, already on ``device``.
        criterion: a criterion instance (:func:`prunecli.criteria.get_criterion`).
        batches: ``(images, labels)`` pairs (moved to ``device`` here).
        device: where the model runs.
        seed: for the random criterion and Hutchinson probes.
        example: one input batch for structure tracing; defaults to the first calibration batch.
        score_mode: ``eval`` (docs/criteria.md) or ``train``.
        precision: forward passes under autocast (``bf16``/``fp16``); the caller checks the criterion allows it
            (:func:`scoring_precision`).
        channels_last: NHWC weights and inputs.

    Returns:
        The criterion's output, the number of samples and the number of batches used.
    """
    from prunecli.device import autocast, input_to, model_to

    model_to(model, device, channels_last=channels_last)
    needs_data = "data" in criterion.requires
    needs_grads = "grads" in criterion.requires
    was_training = model.training
    model.train(score_mode == "train")
    layers = prunable_layers(model)
    params = {f"{n}.weight": m.weight for n, m in layers.items()}
    it: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(batches) if needs_data else iter(())
    first = next(it, None) if needs_data else None
    if needs_data and first is None:
        raise InputError("the calibration data holds no samples")

    def example_input() -> torch.Tensor:
        if example is not None:
            return example.to(device)
        if first is not None:
            return first[0][:2].to(device)
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        if size:
            return torch.zeros(1, *size, device=device)
        raise InputError(f"method {criterion.name!r} needs an example input; pass --data")

    from prunecli import distributed as D

    ctx = ScoreContext(
        model=model, layers=layers, params=params, device=device, seed=seed, example=example_input,
        rank=D.rank(), world_size=D.world_size(),
    )  # fmt: skip
    sharded = D.is_distributed()
    samples = n_batches = 0
    was_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        if needs_grads:
            model.requires_grad_(True)
        criterion.begin(ctx)
        if first is not None:
            for x, y in _chain(first, it):
                x, y = input_to(x, device, channels_last=channels_last), y.to(device, non_blocking=True)
                n = int(x.shape[0])
                ctx.batch_rows = round(D.all_reduce_sums({"n": n})["n"]) if sharded else n
                with torch.set_grad_enabled(needs_grads):
                    with autocast(device, precision):
                        logits = model(x)
                    if precision != "fp32":  # the objectives (losses) in float32, as timm's AMP loop does
                        logits = logits.float()  # (only under autocast: a float64 model keeps float64)
                    if needs_grads:
                        objectives = list(criterion.objectives(logits, y))
                        if sharded and criterion.objective_reduction == "mean":
                            # this rank's share of the global batch's mean: Σ over ranks = the one-process mean
                            objectives = [obj * (n / ctx.batch_rows) for obj in objectives]
                        targets = list(criterion.grad_targets(ctx))
                        for k, obj in enumerate(objectives):
                            grads = torch.autograd.grad(
                                obj, targets, retain_graph=k < len(objectives) - 1, allow_unused=True
                            )
                            if sharded and criterion.sync_grads:
                                grads = tuple(D.sum_grads(grads))
                            criterion.on_grads(ctx, grads)
                    criterion.end_batch(ctx, n)
                samples += ctx.batch_rows
                n_batches += 1
        if sharded:
            criterion.reduce_state(D.all_reduce_tensors)
        with torch.no_grad():
            out = criterion.finish(ctx)
    finally:
        criterion.close()
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(was_grad.get(n, p.requires_grad))
    _check_output(out, params, criterion)
    return out, samples, n_batches


# ------------------------------------------------------------------------------ degenerate scores
def _zero_gammas(model: torch.nn.Module, criterion: Criterion) -> str | None:
    """Normalisation layers whose scale γ is 0 everywhere: they block every gradient and zero |γ|."""
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm))
        and isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.numel()
        and not bool(m.weight.detach().any())
    ]
    if not names:
        return None
    return (
        f"{len(names)} normalisation layer(s) have γ = 0 everywhere (e.g. {names[0]!r}; a freshly created timm "
        "ResNet zero-initialises the last BatchNorm of every residual block), so nothing reaches the layers "
        "before them"
    )


def _dead_units(model: torch.nn.Module, criterion: Criterion) -> str | None:
    """Gradient and activation criteria see zeros where no signal flows on the calibration data."""
    if not criterion.requires & {"data", "grads"}:
        return None
    return "or units are dead on the calibration data (ReLUs that never fire, all-zero weights downstream)"


# Each entry names one cause of exactly-zero scores it can see in the model; all that apply are reported.
_ZERO_SCORE_CAUSES = (_zero_gammas, _dead_units)


def zero_score_warning(
    criterion: Criterion,
    scores: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    model: torch.nn.Module,
) -> str | None:
    """A warning when most weights that are not already zero got a score of exactly 0, else None.

    Exactly-zero scores tie: pruning then ranks them by position, and a global selection can empty
    whole layers. Weights that are already zero (a pruned checkpoint) are not counted: their score of 0
    is right. The message gives the causes :data:`_ZERO_SCORE_CAUSES` find in the model.
    """
    zero = live = 0
    for name, s in scores.items():
        w = params[name].detach()
        alive = w != 0 if criterion.granularity == "weight" else w.reshape(w.shape[0], -1).ne(0).any(1)
        per = w[0].numel() if criterion.granularity == "channel" else 1  # count weights, not channels
        zero += int(((s == 0) & alive.to(s.device)).sum()) * per
        live += int(alive.sum()) * per
    if not live or zero <= ZERO_SCORE_WARN_FRACTION * live:
        return None
    causes = [c for cause in _ZERO_SCORE_CAUSES if (c := cause(model, criterion))]
    why = f": {'; '.join(causes)}" if causes else ""
    return (
        f"{criterion.name}: {zero:,} of {live:,} weights ({zero / live:.1%}) score exactly 0{why}. Their order is "
        "arbitrary and a global prune may remove whole layers; train the model first (prunecli finetune) or "
        "use a data-free criterion (--method magnitude)"
    )


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _check_output(out: CriterionOutput, params: Mapping[str, torch.Tensor], criterion: Criterion) -> None:
    for name, w in params.items():
        s = out.scores.get(name)
        want = tuple(w.shape) if criterion.granularity == "weight" else (w.shape[0],)
        if s is None or tuple(s.shape) != want:  # a bug in the criterion, not the user's input
            raise RuntimeError(f"{criterion.name}: score of {name} has shape {None if s is None else tuple(s.shape)}")
        if not torch.isfinite(s).all():
            raise InputError(
                f"{criterion.name}: scores of {name} are not finite",
                hint="check the checkpoint for NaN/inf weights (prunecli inspect --layers)",
            )


def _calibration(
    loaded: Any,
    data: str,
    data_options: Any,
    *,
    batches: int | None,
    fraction: float | None,
    default_batches: int | None,
    batch_size: int,
    workers: int | None,
    seed: int,
    device: torch.device | None = None,
) -> tuple[Iterable[tuple[torch.Tensor, torch.Tensor]], int]:
    """This process's calibration batches and the number of global batches.

    One seeded order of sample indices (a permutation, or the class-balanced subset of ``--fraction``)
    is cut into global batches of ``batch_size``. Under torchrun rank ``r`` reads rows ``r::N`` of every
    global batch (per-process batches of ``batch_size / N``), so the ranks together see exactly the
    batches of a one-process run.
    """
    from prunecli import distributed as D
    from prunecli.data import load_data, make_loader
    from prunecli.progress import progress

    world, rank = D.world_size(), D.rank()
    if batch_size % world:
        raise InputError(
            f"--batch-size {batch_size} is not a multiple of the {world} torchrun processes",
            hint="each process reads an equal share of every calibration batch",
        )
    ds, _ = load_data(data, loaded, data_options, default_split="train")
    n = len(ds.dataset)
    if fraction is not None:
        order = balanced_indices(ds.targets, n, fraction, seed)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        limit = batches if batches is not None else default_batches
        if batches is not None and batches * batch_size > n + batch_size - 1:
            _LOG.warning("--batches %d: the data holds only %d batches of %d; using all", batches,
                         math.ceil(n / batch_size), batch_size)  # fmt: skip
        if limit is not None:
            order = order[: limit * batch_size]
    tail = len(order) % batch_size
    if world > 1 and 0 < tail < world:  # some rank would have no row of the last batch: drop it
        _LOG.warning("the last calibration batch (%d samples) is smaller than the %d processes; dropped", tail, world)
        order = order[: len(order) - tail]
    if not order:
        raise InputError("the calibration data holds no samples")
    total = math.ceil(len(order) / batch_size)
    loader = make_loader(ds, batch_size=batch_size // world, workers=workers, seed=seed, sampler=order[rank::world],
                         device=device)  # fmt: skip
    return progress(loader, total=total, description="scoring"), total


def _example_from_config(loaded: Any, data_options: Any) -> torch.Tensor:
    from prunecli.data import data_config

    dopts = data_options
    cfg = data_config(
        loaded.manifest.pretrained_cfg or {},
        input_size=getattr(dopts, "input_size", None),
        mean=getattr(dopts, "mean", None),
        std=getattr(dopts, "std", None),
    )
    return torch.zeros(1, *cfg["input_size"])


def compute_scores(
    loaded: Any,
    method: str,
    *,
    data: str | None = None,
    data_options: Any = None,
    batches: int | None = None,
    fraction: float | None = None,
    params: Mapping[str, Any] | None = None,
    device: str = "auto",
    batch_size: int = 64,
    workers: int | None = 0,
    seed: int = 0,
    score_mode: str = "eval",
    precision: str = "fp32",
    channels_last: bool = False,
) -> ScoresFile:
    """Scores every prunable parameter of ``loaded.model`` with criterion ``method``.

    Args:
        loaded: a :class:`prunecli.checkpoint.loaders.Loaded` (its model is moved to ``device``).
        method: criterion name or alias (``taylor``, ``l1``, …).
        data: calibration data spec (split defaults to ``train``); required by data-driven methods.
        data_options: :class:`prunecli.api._common.DataOptions` transform overrides.
        batches: use the first N batches of a seeded shuffled loader.
        fraction: use a class-balanced subset of this fraction of the split, in (0, 1].
        params: ``-p`` options (strings or Python values), checked against the criterion's options.
        device: ``auto``, ``cpu``, ``cuda[:i]``.
        batch_size: calibration batch size.
        workers: DataLoader workers (None: :func:`prunecli.data.default_workers`).
        seed: sampling, shuffling, random scores, Hutchinson probes.
        score_mode: ``eval`` (default, docs/criteria.md) or ``train`` (BN batch statistics, dropout on).
        precision: ``fp32``/``bf16``/``fp16`` forward passes for the criteria of :data:`REDUCED_PRECISION_OK`
            (others fall back to fp32 with a warning); ``options["precision"]`` says which was used.
        channels_last: NHWC weights and inputs.

    Returns:
        The scores with their metadata (method, granularity, options, data, samples, checkpoint sha256,
        per-layer stats); write it with :func:`prunecli.scores.save_scores`.

    Raises:
        InputError: missing ``data`` for a data-driven method, bad ``batches``/``fraction``/``score_mode``.
        UnknownNameError: unknown method or option.

    Example:
        >>> sf = compute_scores(load_input("base.safetensors"), "taylor", data="digits:train", batches=4)
        >>> save_scores("taylor.scores", sf)
    """
    from prunecli.device import describe, resolve_device, seed_everything

    criterion = get_criterion(method, params or {})
    validate_request(criterion, data=data, batches=batches, fraction=fraction, score_mode=score_mode)
    if data is not None and "data" not in criterion.requires:
        _LOG.warning("method %r is data-free; --data is ignored", criterion.name)
        data = None
    dev = resolve_device(device)
    from prunecli.device import check_precision

    check_precision(precision, dev)
    precision = scoring_precision(criterion.name, precision) if data is not None else "fp32"
    seed_everything(seed)
    model = loaded.model.to(dev)
    example = None
    if data is not None:
        it, _ = _calibration(
            loaded, data, data_options, batches=batches, fraction=fraction,
            default_batches=criterion.default_batches, batch_size=batch_size, workers=workers, seed=seed, device=dev,
        )  # fmt: skip
    else:
        it, example = [], _example_from_config(loaded, data_options)
    _LOG.debug("scoring with %s on %s", criterion.name, describe(dev))
    out, samples, n_batches = run_criterion(
        model, criterion, it, device=dev, seed=seed, example=example, score_mode=score_mode, precision=precision,
        channels_last=channels_last,
    )  # fmt: skip
    params = {f"{n}.weight": m.weight for n, m in prunable_layers(model).items()}
    if warning := zero_score_warning(criterion, out.scores, params, model):
        _LOG.warning("%s", warning)
    stats = layer_stats(out.scores, out.notes)
    options = options_dict(criterion.options)
    if data is not None:
        options.update({"batches": n_batches, "batch_size": batch_size, "score_mode": score_mode,
                        "precision": precision})  # fmt: skip
        if fraction is not None:
            options["fraction"] = fraction
    options["seed"] = seed
    return ScoresFile(
        method=criterion.name,
        granularity=criterion.granularity,  # type: ignore[arg-type]
        scores={k: v.detach().float().cpu() for k, v in out.scores.items()},
        extras={kind: {k: v.detach().float().cpu() for k, v in g.items()} for kind, g in out.extras.items()},
        options=options,
        data=data,
        samples=samples,
        checkpoint_sha256=loaded.sha256,
        stats=stats,
    )


def validate_request(
    criterion: Criterion,
    *,
    data: str | None,
    batches: int | None,
    fraction: float | None,
    score_mode: str = "eval",
) -> None:
    """Checks the data options against the criterion before any model or data is loaded."""
    if "data" in criterion.requires and not data:
        raise InputError(
            f"method {criterion.name!r} needs calibration data", hint="pass --data SPEC (e.g. --data digits:train)"
        )
    if batches is not None and fraction is not None:
        raise InputError("--batches and --fraction are exclusive", hint="give one of them")
    if batches is not None and (isinstance(batches, bool) or batches < 1):
        raise InputError(f"--batches must be a positive integer, got {batches}")
    if fraction is not None and not (0.0 < fraction <= 1.0):
        raise InputError(f"--fraction must be in (0, 1], got {fraction}")
    if score_mode not in SCORE_MODES:
        raise InputError(f"--score-mode {score_mode!r}: choose from {', '.join(SCORE_MODES)}")

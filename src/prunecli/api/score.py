"""``prunecli score``: importance scores of every prunable parameter under one criterion, and their
rank correlation across criteria (``--compare``, paper D Table 4)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from prunecli.api._common import DataOptions, InputOptions, load_input
from prunecli.errors import InputError
from prunecli.record import Result

__all__ = ["compare", "parse_params", "score"]

_LOG = logging.getLogger("prunecli")


def parse_params(items: Sequence[str] | None) -> dict[str, str]:
    """``["agg=sq_mean", "lambda=0.1"]`` → ``{"agg": "sq_mean", "lambda": "0.1"}`` (``-p`` values).

    Raises:
        InputError: an item without ``=``, an empty key, or a key given twice.
    """
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"-p {item!r} is not key=value", hint="e.g. -p agg=sq_mean")
        if key in out:
            raise InputError(f"-p {key} is given twice")
        out[key] = value.strip()
    return out


def _check_scores_output(out: str | Path | None, force: bool) -> Path:
    if out is None:
        raise InputError("score needs an output file", hint="pass -o FILE.scores")
    path = Path(out).expanduser().resolve()
    if path.is_dir():
        raise InputError(f"output {str(out)!r} is a directory", hint="pass -o FILE.scores")
    if path.exists() and not force:
        raise InputError(f"output {str(out)!r} exists", hint="pass --force to overwrite it")
    if not path.parent.is_dir():
        raise InputError(f"output directory {str(path.parent)!r} does not exist")
    return path


def score(
    spec: str,
    method: str,
    *,
    out: str | Path | None,
    force: bool = False,
    data: str | None = None,
    batches: int | None = None,
    fraction: float | None = None,
    params: Mapping[str, Any] | None = None,
    inputs: InputOptions | None = None,
    data_options: DataOptions | None = None,
    device: str = "auto",
    batch_size: int = 64,
    workers: int = 0,
    seed: int = 0,
    score_mode: str = "eval",
) -> Result:
    """Scores CKPT with criterion ``method`` and writes the scores file ``out``.

    Under ``torchrun`` every rank scores its share of each calibration batch, the statistics are summed
    over ranks (:mod:`prunecli.scoring`) and only rank 0 writes ``out``.

    Args:
        spec: CKPT (any DESIGN §2 form).
        method: criterion name or alias (:func:`prunecli.criteria.list_criteria`).
        out: the scores file to write (safetensors).
        force: overwrite an existing ``out``.
        data: calibration data spec (split defaults to ``train``); required by data-driven methods.
        batches: first N batches of a seeded shuffled loader (default: the criterion's own).
        fraction: a class-balanced subset of this fraction of the split, in (0, 1].
        params: criterion options (``-p key=value``).
        inputs: how to read CKPT when it does not describe itself.
        data_options: input size / mean / std overrides.
        device: ``auto``, ``cpu``, ``cuda[:i]``.
        batch_size: calibration batch size.
        workers: DataLoader worker processes.
        seed: sampling and random scores.
        score_mode: ``eval`` (default) or ``train`` (paper reproduction).

    Returns:
        A :class:`Result` without checkpoint; ``extra["scores"]`` is the file written, ``metrics`` holds
        method, granularity, samples and per-layer score statistics.

    Example:
        >>> score("base.safetensors", "taylor", data="digits:train", batches=10, out="taylor.scores")
    """
    from prunecli import distributed as D
    from prunecli.criteria import get_criterion
    from prunecli.device import describe, resolve_device
    from prunecli.scores import save_scores
    from prunecli.scoring import compute_scores, validate_request

    crit = get_criterion(method, params or {})  # unknown method/option or bad value: fail before loading
    validate_request(crit, data=data, batches=batches, fraction=fraction, score_mode=score_mode)
    path = _check_scores_output(out, force)
    loaded = load_input(spec, inputs)
    if loaded.source.weights is not None and Path(loaded.source.weights).resolve() == path:
        raise InputError(f"output {str(out)!r} is the input checkpoint", hint="write to a new path")
    dev = resolve_device(device)
    D.init(dev)  # under torchrun: each rank scores its share of every calibration batch
    sf = compute_scores(
        loaded, method, data=data, data_options=data_options, batches=batches, fraction=fraction,
        params=params or {}, device=str(dev), batch_size=batch_size, workers=workers, seed=seed,
        score_mode=score_mode,
    )  # fmt: skip
    written = D.broadcast_object(save_scores(path, sf, force=force) if D.is_main() else None)
    metrics = {
        "method": sf.method,
        "granularity": sf.granularity,
        "options": sf.options,
        "data": sf.data,
        "samples": sf.samples,
        "checkpoint_sha256": sf.checkpoint_sha256,
        "layers": sf.stats,
        "scored_params": sum(int(v["count"]) for v in sf.stats.values()),
        "arch": loaded.manifest.arch,
    }
    return Result(checkpoint=None, sha256=None, metrics=metrics, device=describe(dev), extra={"scores": written})


def _spearman(a: Any, b: Any) -> float | None:
    """Spearman rank correlation with average ranks for ties; None when a side is constant."""
    import numpy as np
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else None


def compare(paths: Sequence[str | Path]) -> Result:
    """Spearman rank correlation between scores files, per layer and overall (paper D, Table 4).

    ``overall`` ranks all scored elements of all common layers together (global ranking, as global
    pruning uses it); ``mean_layer`` is the mean of the per-layer correlations (layer-wise ranking).

    Raises:
        InputError: fewer than two files, or files of different granularity / no common layer.

    Example:
        >>> compare(["taylor.scores", "proscore.scores"]).metrics["pairs"][0]["overall"]
    """
    import numpy as np

    from prunecli.scores import load_scores

    if len(paths) < 2:
        raise InputError("--compare needs at least two scores files")
    files = [load_scores(p) for p in paths]
    labels = [f"{f.method}:{Path(p).name}" for f, p in zip(files, paths, strict=True)]
    shas = {f.checkpoint_sha256 for f in files if f.checkpoint_sha256}
    if len(shas) > 1:
        _LOG.warning("--compare: the scores files were computed on different checkpoints")
    pairs = []
    for (i, a), (j, b) in combinations(enumerate(files), 2):
        if a.granularity != b.granularity:
            raise InputError(
                f"cannot compare {a.granularity} scores ({paths[i]}) with {b.granularity} scores ({paths[j]})",
                hint="compare files of the same granularity (-p granularity=channel for magnitude/taylor/random)",
            )
        common = [n for n in a.scores if n in b.scores and a.scores[n].shape == b.scores[n].shape]
        if not common:
            raise InputError(f"{paths[i]} and {paths[j]} share no scored parameter of the same shape")
        layers = {}
        for n in common:
            layers[n] = _spearman(a.scores[n].double().flatten().numpy(), b.scores[n].double().flatten().numpy())
        va = np.concatenate([a.scores[n].double().flatten().numpy() for n in common])
        vb = np.concatenate([b.scores[n].double().flatten().numpy() for n in common])
        finite = [r for r in layers.values() if r is not None]
        pairs.append(
            {
                "a": labels[i],
                "b": labels[j],
                "overall": _spearman(va, vb),
                "mean_layer": float(np.mean(finite)) if finite else None,
                "layers": layers,
            }
        )
    metrics = {"files": [str(Path(p).resolve()) for p in paths], "methods": labels, "pairs": pairs}
    return Result(checkpoint=None, sha256=None, metrics=metrics, device="none")

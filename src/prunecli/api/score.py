"""``prunecli score``: importance scores of every prunable parameter under one criterion, and their
rank correlation across criteria (``--compare``, paper D Table 4)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from prunecli.api._common import load_input
from prunecli.errors import InputError
from prunecli.record import Result
from prunecli.requests import ScoreRequest

__all__ = ["compare", "score"]

_LOG = logging.getLogger("prunecli")


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


def score(req: ScoreRequest) -> Result:
    """Serves ``prunecli score``: one of its three jobs, by ``req.mode``.

    - ``score``: scores CKPT with criterion ``req.method`` and writes the scores file ``req.output``;
    - ``compare``: Spearman rank correlation of the scores files ``req.paths`` (:func:`compare`);
    - ``list``: every criterion with its needs and options.

    Example:
        >>> score(ScoreRequest(paths=("base.safetensors",), method="taylor", data="digits:train", batches=10,
        ...                    output=Path("taylor.scores")))
    """
    return _MODES[req.mode](req)


def _list(req: ScoreRequest) -> Result:
    from prunecli.criteria import list_criteria

    return Result(metrics={"methods": list_criteria()})


def _score(req: ScoreRequest) -> Result:
    """Scores CKPT and writes the scores file.

    Under ``torchrun`` every rank scores its share of each calibration batch, the statistics are summed
    over ranks (:mod:`prunecli.scoring`) and only rank 0 writes the file. ``batches`` takes the first N
    batches of a seeded shuffled loader (default: the criterion's own); ``fraction`` a class-balanced
    subset of the split.

    Returns:
        A :class:`Result` without checkpoint; ``extra["scores"]`` is the file written, ``metrics`` holds
        method, granularity, samples and per-layer score statistics.
    """
    from prunecli import distributed as D
    from prunecli.criteria import check_params, get_criterion
    from prunecli.device import describe, resolve_device
    from prunecli.scores import save_scores
    from prunecli.scoring import compute_scores, validate_request

    run = req.runtime
    method = str(req.method)
    check_params(method, req.params)
    crit = get_criterion(method, req.params)  # unknown method or bad value: fail before loading
    validate_request(crit, data=req.data, batches=req.batches, fraction=req.fraction, score_mode=req.score_mode)
    path = _check_scores_output(req.output, req.force)
    loaded = load_input(req.checkpoint, req.source)
    if loaded.source.weights is not None and Path(loaded.source.weights).resolve() == path:
        raise InputError(f"output {str(req.output)!r} is the input checkpoint", hint="write to a new path")
    dev = resolve_device(run.device)
    D.init(dev)  # under torchrun: each rank scores its share of every calibration batch
    sf = compute_scores(
        loaded, method, data=req.data, data_options=req.transforms, batches=req.batches, fraction=req.fraction,
        params=req.params, device=str(dev), batch_size=run.batch_size, workers=run.workers, seed=run.seed,
        score_mode=req.score_mode, precision=run.precision, channels_last=run.channels_last,
    )  # fmt: skip
    written = D.broadcast_object(save_scores(path, sf, force=req.force) if D.is_main() else None)
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
        "precision": sf.options.get("precision", "fp32"),
        "channels_last": run.channels_last,
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


_MODES = {"list": _list, "compare": lambda req: compare(req.paths), "score": _score}

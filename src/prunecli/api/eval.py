"""``prunecli eval``: accuracy and loss on a data spec; fidelity to a reference; latency."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from prunecli.api._common import load_input
from prunecli.data import load_data
from prunecli.errors import InputError
from prunecli.record import Result
from prunecli.requests import EvalRequest

_LOG = logging.getLogger("prunecli")

__all__ = ["evaluate"]


def evaluate(req: EvalRequest) -> Result:
    """Evaluates CKPT on ``req.data``: top-1, top-5, mean loss and sample count.

    Under ``torchrun`` each rank evaluates every N-th sample and the sums are joined, so the metrics
    equal those of one process (``--benchmark`` latency is rank 0's own). Without ``data`` the
    ``--val`` spec of the last training step in the checkpoint's lineage is used (and said), since
    evaluating on anything the user did not name would report a number about the wrong data.
    The reference shares ``--arch``/``--num-classes`` (a bare parent state dict) but not ``--ema``, so
    that ``eval run.pth.tar --ema --reference run.pth.tar`` compares the EMA weights with the plain ones.

    Example:
        >>> evaluate(EvalRequest(checkpoint="p50.safetensors", data="digits:test")).metrics["top1"]
    """
    from prunecli import distributed as D
    from prunecli.data import loader_info
    from prunecli.device import check_precision, describe, resolve_device, seed_everything
    from prunecli.evaluation import benchmark_model, eval_loader, evaluate_sharded

    run = req.runtime
    dev = resolve_device(run.device)
    seed_everything(run.seed)
    loaded = load_input(req.checkpoint, req.source)
    data = req.data or _data_from_lineage(loaded.manifest.lineage)
    ds, cfg = load_data(data, loaded, req.transforms)
    ref_model = load_input(req.reference, dataclasses.replace(req.source, ema=False)).model if req.reference else None
    check_precision(run.precision, dev)
    D.init(dev)  # under torchrun: each rank evaluates its shard, the sums are joined
    loader = eval_loader(ds, dev, batch_size=run.batch_size, workers=run.workers)
    fast = {"precision": run.precision, "channels_last": run.channels_last}
    metrics = evaluate_sharded(loaded.model, ds, dev, loader=loader, reference=ref_model, **fast)
    if D.world_size() > 1:
        metrics["world_size"] = D.world_size()
    metrics["data"] = data
    metrics.update(fast, loader=loader_info(loader))
    if req.benchmark:
        metrics.update(benchmark_model(loaded.model, tuple(cfg["input_size"]), dev, batch_size=run.batch_size, **fast))
    metrics["arch"] = loaded.manifest.arch
    return Result(checkpoint=None, sha256=None, metrics=metrics, device=describe(dev))


def _data_from_lineage(lineage: Sequence[Mapping[str, Any]]) -> str:
    """The ``--val`` data of the newest training step in the lineage; else eval needs ``--data``."""
    for step in reversed(lineage):
        val = (step.get("options") or {}).get("val")
        if step.get("command") in ("finetune", "finetune-lora") and isinstance(val, str) and val:
            _LOG.warning("no --data given: evaluating on %s, the --val data of the checkpoint's %s step",
                         val, step["command"])  # fmt: skip
            return val
    raise InputError("eval needs --data", hint="e.g. --data imagefolder:val/ (no training step in the checkpoint's "
                     "lineage names its --val data)")  # fmt: skip

"""Accuracy, loss, fidelity to a reference model, and latency/throughput measurements."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunecli.progress import progress

__all__ = ["benchmark_model", "count_params", "eval_loader", "evaluate_model", "evaluate_sharded"]


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameter count and the number of non-zero parameters."""
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p != 0)) for p in model.parameters())  # bool path: ~20x faster
    return {"params": params, "params_nonzero": nonzero}


@torch.inference_mode()
def evaluate_model(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    reference: nn.Module | None = None,
    total: int | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
) -> dict[str, Any]:
    """Top-1/top-5 accuracy and mean cross-entropy, plus agreement and KL against ``reference``.

    KL is ``KL(p_reference ‖ p_model)`` averaged over samples (nats): how much information about
    the reference's predictions the pruned model loses. ``precision`` runs the forward passes under
    autocast (:func:`prunecli.device.autocast`); logits are cast to float32 before any loss or
    comparison, and the sums are Python floats/ints, so only the forward pass is reduced-precision.
    """
    from prunecli.device import autocast, input_to, model_to

    model_to(model.eval(), device, channels_last=channels_last)
    if reference is not None:
        model_to(reference.eval(), device, channels_last=channels_last)
    n = correct1 = correct5 = agree = 0
    loss_sum = kl_sum = 0.0
    for x, y in progress(batches, total=total, description="eval"):
        x, y = input_to(x, device, channels_last=channels_last), torch.as_tensor(y).to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x).float()
            ref = reference(x).float() if reference is not None else None
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(dim=1).sum())
        if ref is not None:
            agree += int((ref.argmax(1) == top[:, 0]).sum())
            logp, logq = F.log_softmax(ref, 1), F.log_softmax(logits, 1)
            kl_sum += float((logp.exp() * (logp - logq)).sum())
        n += y.numel()
    out: dict[str, Any] = {
        "top1": correct1 / n if n else float("nan"),
        "top5": correct5 / n if n else float("nan"),
        "loss": loss_sum / n if n else float("nan"),
        "samples": n,
    }
    if reference is not None:
        out["agreement"] = agree / n if n else float("nan")
        out["kl"] = kl_sum / n if n else float("nan")
    return out


def eval_loader(data: Any, device: torch.device, *, batch_size: int, workers: int | None = 0) -> Any:
    """The loader :func:`evaluate_sharded` reads: this rank's samples ``r, r+N, …`` in order.

    Build it once per command and pass it to every evaluation of the same data (its workers persist).
    """
    from prunecli import distributed as D
    from prunecli.data import make_loader

    world = D.world_size()
    sampler = D.ShardSampler(len(data.dataset), shuffle=False, rank=D.rank(), world_size=world) if world > 1 else None
    return make_loader(data, batch_size=batch_size, workers=workers, sampler=sampler, device=device)


def evaluate_sharded(
    model: nn.Module,
    data: Any,
    device: torch.device,
    *,
    batch_size: int = 256,
    workers: int | None = 0,
    reference: nn.Module | None = None,
    loader: Any = None,
    precision: str = "fp32",
    channels_last: bool = False,
) -> dict[str, Any]:
    """:func:`evaluate_model` over a dataset, split across torchrun processes when there are several.

    Rank ``r`` of ``N`` evaluates samples ``r, r+N, …`` (no sample repeated, none dropped) and the
    per-rank sums are joined (:func:`prunecli.distributed.reduce_eval_metrics`), so the metrics equal a
    one-process evaluation of the whole dataset; in a single process this is a plain in-order pass.

    Args:
        model: the model to evaluate.
        data: a :class:`prunecli.data.LoadedData`.
        device: where the model runs.
        batch_size: per-process batch size.
        workers: DataLoader worker processes (None: :func:`prunecli.data.default_workers`).
        reference: adds agreement and KL against this model.
        loader: a loader from :func:`eval_loader` to reuse (then ``data``, ``batch_size``, ``workers`` are unused).
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast of the forward passes).
        channels_last: NHWC weights and inputs.
    """
    from prunecli import distributed as D

    if loader is None:
        loader = eval_loader(data, device, batch_size=batch_size, workers=workers)
    metrics = evaluate_model(model, loader, device, reference=reference, total=len(loader), precision=precision,
                             channels_last=channels_last)  # fmt: skip
    return D.reduce_eval_metrics(metrics)


@torch.inference_mode()
def benchmark_model(
    model: nn.Module,
    input_size: tuple[int, ...],
    device: torch.device,
    *,
    batch_size: int,
    warmup: int = 3,
    iters: int = 10,
    precision: str = "fp32",
    channels_last: bool = False,
) -> dict[str, float]:
    """Median latency of one batch and the resulting throughput, on random inputs.

    Uses the median of ``iters`` timed runs after ``warmup`` runs, synchronising the GPU around each,
    with the same precision and memory format as the evaluation.
    """
    from prunecli.device import autocast, input_to, model_to

    model_to(model.eval(), device, channels_last=channels_last)
    x = input_to(torch.randn(batch_size, *input_size), device, channels_last=channels_last)

    def run() -> Any:
        with autocast(device, precision):
            return model(x)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {
        "latency_ms": median * 1e3,
        "throughput_ips": batch_size / median,
        "benchmark_batch_size": batch_size,
        "benchmark_iters": iters,
    }

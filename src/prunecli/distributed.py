"""Multi-process runs under ``torchrun`` (DDP): process group, sharding, reductions, rank-0 output.

``torchrun --nproc-per-node N -m prunecli <command> …`` starts N copies of a command. Each copy
calls :func:`init` (reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; gloo on CPU, nccl on
GPU), reads its shard of the data through :class:`ShardSampler`, and joins its partial results
with the reductions below; only rank 0 writes checkpoints, scores files and the JSON record
(:func:`main_only_output`). Without torchrun every helper degrades to the single-process identity,
so commands call them unconditionally.

How a run with N processes reproduces a one-process run (what ``tests/test_ddp.py`` checks):

- **Same global batches.** :class:`ShardSampler` draws one permutation per epoch from
  ``seed + epoch`` (the same on every rank and in a single process) and gives rank ``r`` the
  positions ``r, r+N, r+2N, …``. With a per-process batch of ``B/N``, step ``k`` of rank ``r``
  holds exactly the rank-``r`` share of the one-process batch ``perm[kB:(k+1)B]``, so the union
  over ranks is the same global batch. Training drops the last incomplete global batch
  (``drop_last``) so that every rank's shard of every step has the same size, which makes DDP's
  gradient average equal the one-process mean over the global batch.
- **Same sums.** Metrics are reduced as sums and counts (:func:`all_reduce_sums`), never as
  averages of averages; scores accumulated over batches are summed (:func:`all_reduce_tensors`).
- **What cannot match exactly.** Per-sample random augmentation and dropout draw from each
  process's own RNG stream, and train-mode BatchNorm normalises over the local ``B/N`` samples (no
  SyncBatchNorm on CPU). Runs that must agree with one process use no augmentation, no dropout and
  frozen BatchNorm statistics (``--bn eval``) or no BatchNorm; otherwise the runs agree in
  distribution, not bit for bit. Float summation order differs, so agreement is within float
  tolerance.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

__all__ = [
    "DistContext",
    "ShardSampler",
    "all_reduce_sums",
    "all_reduce_tensors",
    "average_grads",
    "barrier",
    "broadcast_object",
    "init",
    "is_distributed",
    "is_main",
    "main_only_output",
    "mean_over_ranks",
    "rank",
    "reduce_eval_metrics",
    "sum_grads",
    "sync_buffers",
    "world_size",
    "wrap_ddp",
]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run.

    Attributes:
        rank: global rank (0 in a single process).
        world_size: number of processes (1 in a single process).
        local_rank: rank on this node (selects the GPU).
        backend: ``gloo``, ``nccl``, or None when not distributed.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on the process that writes outputs (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """True inside an initialised multi-process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0: the only process that writes files and prints the record."""
    return rank() == 0


def init(device: torch.device) -> DistContext:
    """Joins torchrun's process group when ``WORLD_SIZE > 1`` (idempotent); else a single-process context.

    The backend follows the device: nccl for CUDA, gloo for CPU. ``prunecli.device.resolve_device``
    already maps ``auto``/``cuda`` to this process's ``LOCAL_RANK`` GPU.

    Example:
        >>> ctx = init(resolve_device("auto"))
        >>> sampler = ShardSampler(len(ds), shuffle=True, seed=0, rank=ctx.rank, world_size=ctx.world_size)
    """
    if _env_world() <= 1:
        return DistContext()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), backend)


def barrier() -> None:
    """Waits for every process (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (e.g. the path and sha256 that rank 0 wrote)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_tensors(tensors: Mapping[str, torch.Tensor], op: str = "sum") -> dict[str, torch.Tensor]:
    """Sums (or maxes) each tensor across processes, in sorted-name order; returns new tensors.

    Use it for scores accumulated over each rank's batches (``score`` under torchrun): the sum over
    ranks equals the one-process sum over all batches. Tensors are reduced in float64 on their
    device (gloo on CPU, nccl on GPU) and cast back.
    """
    if not is_distributed():
        return {k: v for k, v in tensors.items()}
    red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    out: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        t = tensors[name]
        buf = t.detach().to(torch.float64 if t.is_floating_point() else torch.int64).clone()
        dist.all_reduce(buf, op=red)
        out[name] = buf.to(t.dtype)
    return out


def all_reduce_sums(values: Mapping[str, float], device: torch.device | None = None) -> dict[str, float]:
    """Sums scalar totals (loss sums, correct counts, sample counts) across processes in one call."""
    if not is_distributed():
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    dev = device if device is not None and dist.get_backend() == "nccl" else torch.device("cpu")
    buf = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=dev)
    dist.all_reduce(buf)
    return dict(zip(keys, buf.tolist(), strict=True))


def mean_over_ranks(values: Sequence[float]) -> list[float]:
    """The element-wise mean over processes of equal-length lists (e.g. per-epoch train losses).

    Equals the one-process value when every rank averaged over the same number of samples (the
    training shards of :class:`ShardSampler` with ``drop_last``).
    """
    if not is_distributed():
        return [float(v) for v in values]
    sums = all_reduce_sums({f"{i:08d}": v for i, v in enumerate(values)})
    return [sums[f"{i:08d}"] / world_size() for i in range(len(values))]


def average_grads(grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The mean over processes of per-batch gradients (None stays None), in place and returned.

    For statistics that are non-linear in a batch's gradient (Taylor ``|θ·g|``, SNIP): with each rank
    holding the mean loss of its equal share of the global batch, the average over ranks is the
    gradient of the global batch's mean loss, so every rank then scores exactly as one process would.
    """
    if not is_distributed():
        return list(grads)
    n = world_size()
    for g in grads:
        if g is not None:
            dist.all_reduce(g)
            g.div_(n)
    return list(grads)


def sum_grads(grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The sum over processes of per-batch gradients in one coalesced all-reduce (None stays None).

    ``score`` under torchrun scales each rank's mean loss by its share of the global batch, so the sum
    over ranks is the gradient of the global batch's mean loss even when the last batch splits unevenly.
    The gradients are packed into one flat buffer so a model with hundreds of layers costs one collective
    per batch, not hundreds.
    """
    if not is_distributed():
        return list(grads)
    live = [g for g in grads if g is not None]
    if not live:
        return list(grads)
    flat = torch.cat([g.reshape(-1) for g in live])
    dist.all_reduce(flat)
    out: list[torch.Tensor | None] = []
    offset = 0
    for g in grads:
        if g is None:
            out.append(None)
            continue
        n = g.numel()
        out.append(flat[offset : offset + n].view_as(g).to(g.dtype))
        offset += n
    return out


_MEAN_KEYS = ("top1", "top5", "loss", "agreement", "kl")


def reduce_eval_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Joins per-rank ``prunecli.evaluation.evaluate_model`` results into the whole-data metrics.

    Each rank's means are turned back into sums with its ``samples`` count, summed over ranks and
    divided by the total count, so the result equals a one-process evaluation of all shards.
    """
    if not is_distributed():
        return dict(metrics)
    n = float(metrics.get("samples", 0))
    sums = {k: (float(metrics[k]) * n if n and metrics[k] is not None and math.isfinite(metrics[k]) else 0.0)
            for k in _MEAN_KEYS if k in metrics}  # fmt: skip
    sums["samples"] = n
    total = all_reduce_sums(sums)
    out = dict(metrics)
    count = total["samples"]
    for k in _MEAN_KEYS:
        if k in metrics:
            out[k] = total[k] / count if count else float("nan")
    out["samples"] = round(count)
    return out


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``N`` gets positions ``r, r+N, …`` of one seeded permutation, without padding.

    Unlike ``torch.utils.data.DistributedSampler`` it never repeats samples to even out the shards
    (eval sums stay exact) unless ``drop_last`` trims the permutation to a multiple of
    ``global_batch`` first. The epoch advances by itself on every ``iter()`` (and can be set with
    :meth:`set_epoch`), so a training loop that knows nothing about distribution still reshuffles
    each epoch exactly as a single process would.

    Args:
        n: dataset length.
        shuffle: draw a new permutation each epoch from ``seed + epoch``; else index order.
        seed: base seed (the same on every rank).
        rank: this process's rank.
        world_size: number of processes.
        global_batch: with ``drop_last``, the one-process batch size whose incomplete last batch is
            dropped (must be a multiple of ``world_size``).
        drop_last: drop the incomplete last global batch (training).
    """

    def __init__(
        self,
        n: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        global_batch: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if global_batch is not None and global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not a multiple of {world_size} processes")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch, self.drop_last = global_batch, drop_last
        self.epoch = 0
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Uses ``epoch``'s permutation for the next iteration."""
        self._next_epoch = epoch

    def _order(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.drop_last:
            unit = self.global_batch or self.world_size
            order = order[: self.n - self.n % unit]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        self.epoch = self._next_epoch
        self._next_epoch += 1
        return iter(self._order(self.epoch))

    def __len__(self) -> int:
        return len(self._order(self._next_epoch))


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` when distributed, else ``model`` itself.

    Only parameters that require gradients are synchronised (frozen base weights of a LoRA run cost
    nothing). The caller keeps a reference to the unwrapped model for saving.
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def sync_buffers(model: nn.Module) -> None:
    """Copies rank 0's buffers (BatchNorm running statistics) to every rank.

    Train-mode BatchNorm updates each rank's statistics from its own shard; rank 0's are the ones
    saved, so evaluating after training must use them everywhere.
    """
    if not is_distributed():
        return
    for _, buf in sorted(model.named_buffers(), key=lambda kv: kv[0]):
        dist.broadcast(buf.data, src=0)


@contextlib.contextmanager
def main_only_output() -> Iterator[bool]:
    """On ranks other than 0, sends stdout and stderr to /dev/null for the block; yields ``is_main()``.

    torchrun forwards every process's stdout: without this, N processes would print N JSON records.
    Errors still reach the terminal from rank 0, which hits the same (deterministic) input checks.
    """
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        yield True
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield False
    sys.stdout.flush()

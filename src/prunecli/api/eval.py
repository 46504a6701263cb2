"""``prunecli eval``: accuracy and loss on a data spec; fidelity to a reference; latency."""

from __future__ import annotations

import dataclasses

from prunecli.api._common import DataOptions, InputOptions, load_data, load_input
from prunecli.record import Result

__all__ = ["evaluate"]


def evaluate(
    spec: str,
    data: str,
    *,
    inputs: InputOptions | None = None,
    data_options: DataOptions | None = None,
    reference: str | None = None,
    benchmark: bool = False,
    device: str = "auto",
    batch_size: int = 128,
    workers: int = 0,
    seed: int = 0,
) -> Result:
    """Evaluates CKPT on ``data``: top-1, top-5, mean loss and sample count.

    Under ``torchrun`` each rank evaluates every N-th sample and the sums are joined, so the metrics
    equal those of one process (``--benchmark`` latency is rank 0's own).

    Args:
        spec: CKPT (any DESIGN §2 form).
        data: a data spec; the split defaults to ``test``.
        inputs: how to read CKPT when it does not describe itself.
        data_options: input size / mean / std overrides.
        reference: a second checkpoint (e.g. the dense parent): adds ``agreement`` and ``kl``. It is
            read with ``inputs`` except ``ema``.
        benchmark: add median latency and throughput at ``batch_size`` on the device.
        device: ``auto``, ``cpu``, ``cuda[:i]``.
        batch_size: evaluation batch size.
        workers: DataLoader worker processes.
        seed: seeds the (unshuffled) loader and the benchmark inputs.

    Example:
        >>> evaluate("p50.safetensors", "digits:test").metrics["top1"]
    """
    from prunecli import distributed as D
    from prunecli.device import describe, resolve_device, seed_everything
    from prunecli.evaluation import benchmark_model, evaluate_sharded

    dev = resolve_device(device)
    seed_everything(seed)
    loaded = load_input(spec, inputs)
    ds, cfg = load_data(data, loaded, data_options)
    # The reference shares --arch/--num-classes (a bare parent state dict) but not --ema, so that
    # `eval run.pth.tar --ema --reference run.pth.tar` compares the EMA weights with the plain ones.
    ref_inputs = dataclasses.replace(inputs, ema=False) if inputs else None
    ref_model = load_input(reference, ref_inputs).model if reference else None
    D.init(dev)  # under torchrun: each rank evaluates its shard, the sums are joined
    metrics = evaluate_sharded(loaded.model, ds, dev, batch_size=batch_size, workers=workers, reference=ref_model)
    if D.world_size() > 1:
        metrics["world_size"] = D.world_size()
    metrics["data"] = data
    if benchmark:
        metrics.update(benchmark_model(loaded.model, tuple(cfg["input_size"]), dev, batch_size=batch_size))
    metrics["arch"] = loaded.manifest.arch
    return Result(checkpoint=None, sha256=None, metrics=metrics, device=describe(dev))

"""Pruning engines behind ``prunecli prune``: each computes a plan (plain data) and applies it.

* :mod:`prunecli.pruning.plan` — the plans: :class:`~prunecli.pruning.plan.UnstructuredPlan` (per-scope
  thresholds and removal counts, also N:M) and :class:`~prunecli.pruning.plan.ChannelPlan` (groups with
  their kept indices, widths, params and MACs before/after); JSON via ``to_json()``;
* :mod:`prunecli.pruning.unstructured` — exact ``round(r·N)`` per layer or globally (dense shapes,
  zeros listed in ``manifest.masked``);
* :mod:`prunecli.pruning.nm` — N:M semi-structured sparsity (``--structure 2:4``);
* channel pruning through Torch-Pruning's dependency graph, one concern per module:
  :mod:`~prunecli.pruning.importance` (scores → channel importance), :mod:`~prunecli.pruning.counts`
  (how many channels each group keeps), :mod:`~prunecli.pruning.groups` (which groups exist and may be
  pruned), :mod:`~prunecli.pruning.apply` (remove the planned channels, record the structure),
  :mod:`~prunecli.pruning.safety` (run the pruned model, freeze what breaks, retry) and
  :mod:`~prunecli.pruning.channel` (the entry points ``plan_channels``/``apply_channels``/``prune_channels``);
* :mod:`prunecli.pruning.fast_input` — the fast path's input (raw tensors and the layer table, no model);
* :mod:`prunecli.pruning.compensate` — paper E's bias shifts (``--compensate bias``);
* :mod:`prunecli.pruning.budget` — ``--target macs=…|params=…|latency=…``: the ratio bisected over plans
  (channel plans costed from their kept counts), the latency harness with an injectable clock.

MACs and the BatchNorm after each layer come from the one tracer, :mod:`prunecli.tracing`; Torch-Pruning
is imported only by :mod:`prunecli.depgraph`.
"""

"""One-shot second-order reconstruction for unstructured and N:M pruning (docs/obs.md).

* :mod:`~prunecli.reconstruction.hessian` — Gram matrices of a layer's inputs (Linear, Conv1d/2d,
  grouped and depthwise convs per group), accumulated in float64 batch by batch;
* :mod:`~prunecli.reconstruction.obs` — the per-layer solver: Optimal Brain Surgeon updates on
  SparseGPT's column schedule, with the mask given or chosen jointly (unstructured or N:M);
* :mod:`~prunecli.reconstruction.sequential` — layers solved in forward order, each from the inputs of
  the already reconstructed prefix;
* :mod:`~prunecli.reconstruction.masked` — a masked checkpoint's weights refit to its dense parent
  (``restore --method obs``);
* :mod:`~prunecli.reconstruction.joint` — what ``prune --reconstruct obs`` and ``restore --method obs``
  share: parameters, calibration batches and their shards, targets from a prune plan, the record.

Example:
    >>> from prunecli.reconstruction import NM, reconstruct
    >>> report = reconstruct(model, {"fc1": 0.7, "fc2": NM(2, 4)}, loader, damp=0.01)
"""

from __future__ import annotations

from prunecli.reconstruction.hessian import GramAccumulator, input_columns
from prunecli.reconstruction.masked import restore_masked
from prunecli.reconstruction.obs import NM, ObsResult, dampen, obs_prune
from prunecli.reconstruction.sequential import LayerResult, ReconstructionReport, Target, reconstruct

__all__ = [
    "NM",
    "GramAccumulator",
    "LayerResult",
    "ObsResult",
    "ReconstructionReport",
    "Target",
    "dampen",
    "input_columns",
    "obs_prune",
    "reconstruct",
    "restore_masked",
]

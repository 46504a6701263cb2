"""LoRA recovery on peft: target selection, B = 0 start, BN modes, merges that keep the sparsity.

Paper A (docs/lora.md) recovers a pruned network by training low-rank adapters ``ΔW = (α/r)·B A``
beside every Linear layer while all original weights stay frozen. This module is the thin layer
between prunecli and peft:

- :func:`select_targets` turns globs into the exact module names to adapt (every ``nn.Linear`` by
  default, as in paper A; ``targets`` adds e.g. conv layers, ``exclude`` removes), and refuses what
  peft cannot adapt, a glob that matches nothing, and a rank that is 0 or larger than a layer;
- :func:`attach_lora` wraps the model with peft (``init_lora_weights=True``: A Kaiming-uniform,
  **B = 0**, so training starts exactly at the pruned model) and freezes everything else;
- :data:`BN_MODES` says whether BatchNorm statistics keep updating while the adapters train;
- :data:`MERGE_MODES` ends training: ``masked`` merges and re-applies each tensor's pruning mask
  (``mask = weight != 0`` for tensors listed in ``Manifest.masked``) so the sparsity survives
  exactly; ``dense`` merges and reports the sparsity lost; ``none`` keeps the adapter beside the
  weights in peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``);
- :func:`mask_updates` makes masked layers train through their mask, ``(W + scale·B A) ⊙ M``, so that
  the ``masked`` merge writes exactly the model that was trained;
- :func:`effective_weights` gives the weights the adapted model really computes with
  (``W + scale·B A``, or DoRA's rescaled form) for the WCR term (docs/wcr.md);
- :func:`attach_adapters` re-attaches a kept adapter when a checkpoint is loaded, so ``eval`` gives
  the same logits as peft's ``PeftModel.from_pretrained``.

peft is imported inside the functions: only ``finetune-lora`` and loading a checkpoint that carries
an adapter pay for it.

One module per step, in the order a run takes them: :mod:`.targets`, :mod:`.bn`, :mod:`.attach`,
:mod:`.masks`, :mod:`.masked_update`, :mod:`.merge`, :mod:`.adapter_files` (re-attaching a kept adapter
is part of reading a checkpoint: :mod:`prunecli.checkpoint.adapters`). Everything callers use is
re-exported here, so ``from prunecli.lora import X`` does not depend on that layout.
"""

from __future__ import annotations

import logging

from prunecli.checkpoint.adapters import ADAPTER_NAME, attach_adapters
from prunecli.lora.adapter_files import adapter_dir_for, commit_adapter, stage_adapter
from prunecli.lora.attach import attach_lora, effective_weight_fns, effective_weights, lora_layers, trainable_params
from prunecli.lora.bn import BN_MODES
from prunecli.lora.masked_update import mask_updates
from prunecli.lora.masks import masks_of
from prunecli.lora.merge import MERGE_MODES, MergeOutcome, merge_adapters, merge_kept_adapters
from prunecli.lora.targets import LoraOptions, select_targets

__all__ = [
    "ADAPTER_NAME",
    "BN_MODES",
    "MERGE_MODES",
    "LoraOptions",
    "MergeOutcome",
    "adapter_dir_for",
    "attach_adapters",
    "attach_lora",
    "commit_adapter",
    "effective_weight_fns",
    "effective_weights",
    "lora_layers",
    "mask_updates",
    "masks_of",
    "merge_adapters",
    "merge_kept_adapters",
    "select_targets",
    "stage_adapter",
    "trainable_params",
]

log = logging.getLogger(__name__)  # "prunecli.lora": merge warnings are logged under this name

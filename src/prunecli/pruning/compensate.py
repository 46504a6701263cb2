"""``--compensate bias``: apply paper E's optimal bias shifts after removing weights (docs/bias-compensation.md).

A biascomp scores file carries, next to the importance of every weight ``w_ij``, the optimal shift
``δ*_ij = w_ij · Σ_s a_si x_sj / Σ_s a_si`` of the bias of output unit ``i`` that best absorbs the
removal of ``w_ij`` on the calibration data. Shifts of the weights removed from one row add up
exactly at first order (docs/bias-compensation.md), so after pruning every output unit gets

    b_i += Σ_{j removed} δ*_ij                       (conv: over the flattened filter of channel i)

Where the shift goes, in this order:

1. the layer's own bias, when it has one;
2. otherwise the BatchNorm that consumes the layer's output directly: a pre-BN shift ``+δ`` equals
   ``running_mean -= δ`` in eval mode (docs/bias-compensation.md). "Directly" is decided by a traced forward
   pass (:func:`prunecli.tracing.trace_layers`): the BN whose input *is* the layer's output tensor —
   timm's conv→BN pairs (``ConvNormAct``, ResNet's ``conv1``/``bn1``, ``BatchNormAct2d``) all
   qualify. If that output also feeds another consumer (rare for a bias-free conv), the other
   consumer does not see the shift; no timm block we know of does this.
3. otherwise the layer is skipped (a warning names it): adding a new bias parameter would change the
   state-dict keys so that the checkpoint no longer reloads into its timm architecture, and a
   LayerNorm cannot absorb a per-channel shift exactly.

Train-mode BatchNorm (fine-tuning, BN re-calibration) re-estimates ``running_mean`` and so undoes a
shift folded into it; a shift in a real bias survives.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["BiasCompensation"]

_LOG = logging.getLogger("prunecli")


class BiasCompensation:
    """Mask callback that moves ``Σ δ*`` of the removed weights into a bias or a BN running mean.

    Args:
        layers: parameter name (``fc1.weight``) → its conv/linear module.
        shifts: parameter name → ``δ*`` tensor of the weight's shape (biascomp ``bias_shift`` extras).
        bn_after: module name → name of the BatchNorm that directly consumes its output.
        modules: module name → module (to look the BatchNorm up).

    Example:
        >>> comp = BiasCompensation(layers, sf.extras["bias_shift"], trace.bn_after, dict(model.named_modules()))
        >>> prune_unstructured(weights, score_of, scopes, on_mask=comp)
        >>> comp.summary()
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        shifts: Mapping[str, torch.Tensor],
        bn_after: Mapping[str, str],
        modules: Mapping[str, nn.Module],
    ) -> None:
        self.layers = layers
        self.shifts = shifts
        self.bn_after = bn_after
        self.modules = modules
        self.into_bias: list[str] = []
        self.into_bn: dict[str, str] = {}
        self.skipped: list[str] = []
        self.missing: list[str] = []

    def __call__(self, name: str, removed: torch.Tensor) -> None:
        """Applies the shift of the weights ``removed`` (boolean, the weight's shape) of ``name``."""
        if name not in self.shifts:
            self.missing.append(name)
            return
        delta = self.shifts[name]
        if tuple(delta.shape) != tuple(removed.shape):
            from prunecli.errors import InputError

            raise InputError(
                f"bias shifts of {name!r} have shape {list(delta.shape)}, the weight has {list(removed.shape)}",
                hint="the scores file belongs to another model",
            )
        shift = (delta.to(torch.float64) * removed).flatten(1).sum(1)  # Σ_{j removed} δ*_ij per output unit
        layer = self.layers[name]
        mod_name = name.removesuffix(".weight")
        with torch.no_grad():
            if getattr(layer, "bias", None) is not None:
                layer.bias.add_(shift.to(layer.bias.dtype))
                self.into_bias.append(name)
                return
            bn = self.modules.get(self.bn_after.get(mod_name, ""))
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
                bn.running_mean.sub_(shift.to(bn.running_mean.dtype))
                self.into_bn[name] = self.bn_after[mod_name]
                return
        self.skipped.append(name)

    def summary(self) -> dict[str, object]:
        """What went where (for the record); warns about layers that got no compensation."""
        if self.skipped:
            _LOG.warning(
                "--compensate bias: %d layer(s) have neither a bias nor a following BatchNorm, left uncompensated: %s",
                len(self.skipped),
                ", ".join(self.skipped),
            )
        if self.missing:
            _LOG.warning(
                "--compensate bias: the scores file has no bias shifts for %d pruned layer(s): %s",
                len(self.missing),
                ", ".join(self.missing),
            )
        return {
            "bias": sorted(self.into_bias),
            "running_mean": dict(sorted(self.into_bn.items())),
            "skipped": sorted(self.skipped + self.missing),
        }

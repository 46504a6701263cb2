"""Paper C's Weight Concentration Regularizer (WCR), exactly as docs/wcr.md.

For every regularised tensor ``w`` (a trainable tensor with ``ndim > 1`` and at least two entries:
conv kernels and linear weights including the classifier; never biases or norm parameters)::

    u_i = sqrt(w_i² + ε)                      smooth |w|
    V   = mean((u − mean(u))²)                per-layer population variance
    R   = Σ_layers 1 / (V + δ)                the penalty; L_total = L_task + λ·R

Lowering ``R`` means raising each layer's spread of magnitudes: weights above the layer's mean
magnitude grow and those below shrink toward zero (docs/wcr.md), which is what makes one-shot
magnitude pruning hurt less afterwards. ``R`` is always computed in float32, also under AMP, because
``V`` of a wide layer is ~1e-5 and its reciprocal loses all precision in half precision.

Tensors with fewer than two entries are skipped: their variance is 0 and the term would be ``1/δ``
(docs/wcr.md).

Example:
    >>> reg = WCR.for_model(model, lam=1e-4)
    >>> loss = task_loss + reg()          # λ·R, a float32 scalar with autograd
    >>> reg.stats()["var_abs"]["fc1.weight"]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["DEFAULT_DELTA", "DEFAULT_EPS", "WCR", "abs_variance", "wcr_params", "wcr_penalty"]

DEFAULT_EPS = 1e-8
DEFAULT_DELTA = 1e-8


def abs_variance(w: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Population variance of the smooth magnitudes ``sqrt(w² + eps)`` of one tensor, in float32."""
    u = torch.sqrt(w.float().square() + eps)
    return (u - u.mean()).square().mean()


def wcr_penalty(
    tensors: Iterable[torch.Tensor], eps: float = DEFAULT_EPS, delta: float = DEFAULT_DELTA
) -> torch.Tensor:
    """``R = Σ 1/(V_l + δ)`` over ``tensors`` (unscaled by λ); float32, differentiable.

    Tensors with ``numel < 2`` contribute nothing (see the module docstring).
    """
    terms = [1.0 / (abs_variance(w, eps) + delta) for w in tensors if w.numel() >= 2]
    if not terms:
        return torch.zeros((), dtype=torch.float32)
    return torch.stack(terms).sum()


def wcr_params(
    model: nn.Module, trainable: Callable[[str, nn.Parameter], bool] | None = None
) -> dict[str, nn.Parameter]:
    """The tensors WCR regularises: trainable parameters with ``ndim > 1`` and ``numel >= 2``, by name.

    Args:
        model: the network.
        trainable: optional extra filter (the training loop's parameter filter); by default every
            parameter with ``requires_grad``.
    """
    out: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or p.ndim <= 1 or p.numel() < 2:
            continue
        if trainable is not None and not trainable(name, p):
            continue
        out[name] = p
    return out


@dataclass
class WCR:
    """λ·R over a fixed set of named tensors; callable as the training loop's ``extra_loss``.

    ``tensors`` maps names to tensors or to zero-argument callables returning a tensor — the latter
    lets LoRA fine-tuning regularise *effective* weights (``W + B·A·scale``) that are recomputed at
    every step.

    Attributes:
        tensors: name → tensor (or tensor factory).
        lam: λ, the weight of the penalty.
        eps: ε inside the smooth absolute value.
        delta: δ added to each variance.
    """

    tensors: Mapping[str, torch.Tensor | Callable[[], torch.Tensor]]
    lam: float
    eps: float = DEFAULT_EPS
    delta: float = DEFAULT_DELTA

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        lam: float,
        *,
        eps: float = DEFAULT_EPS,
        delta: float = DEFAULT_DELTA,
        trainable: Callable[[str, nn.Parameter], bool] | None = None,
    ) -> WCR:
        """WCR over :func:`wcr_params` of ``model``."""
        return cls(wcr_params(model, trainable), lam, eps, delta)

    def _resolve(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, t() if callable(t) else t) for n, t in sorted(self.tensors.items())]

    def penalty(self) -> torch.Tensor:
        """R (without λ), float32, differentiable."""
        return wcr_penalty((t for _, t in self._resolve()), self.eps, self.delta)

    def __call__(self) -> torch.Tensor:
        """λ·R computed in float32 (autocast is disabled around it)."""
        dev = next(iter(self.tensors.values()), None)
        dev_type = dev.device.type if isinstance(dev, torch.Tensor) else "cpu"
        with torch.autocast(dev_type, enabled=False):
            return self.lam * self.penalty()

    @torch.no_grad()
    def stats(self) -> dict[str, Any]:
        """The record's WCR block: λ, ε, δ, the value of R, λ·R, and each layer's Var(|w|)_ε."""
        resolved = self._resolve()
        var = {n: float(abs_variance(t.detach(), self.eps)) for n, t in resolved}
        r = float(sum(1.0 / (v + self.delta) for v in var.values()))
        return {
            "lambda": self.lam,
            "eps": self.eps,
            "delta": self.delta,
            "R": r,
            "value": self.lam * r,
            "layers": len(var),
            "var_abs": var,
        }

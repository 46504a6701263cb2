"""Weight-gradient-shaped statistics of convolutions: Σ_{s,p} a[s,o,p]·U[s,k,p] without im2col.

The weight gradient of the convolution with ``a`` in place of the output gradient is exactly that sum
(docs/bias-compensation.md); it is computed with ``aten.convolution_backward`` as ``torch.nn.grad.conv{1,2,3}d_weight``
do, but without their weight-sized copy. This module
only reproduces how the layer pads its input (``padding='same'``, non-zero padding modes, timm's
``Conv2dSame``), so the statistics see the same im2col columns as the forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["conv_weight_stat", "padded_input"]


def padded_input(conv: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(x', padding)`` such that ``conv(x) == F.convNd(x', w, padding=padding, …)``."""
    k = conv.weight.shape[2:]
    if type(conv).__name__ == "Conv2dSame":  # timm: pads in forward(), module padding is 0
        from timm.layers.padding import pad_same

        return pad_same(x, list(k), list(conv.stride), list(conv.dilation)), (0,) * len(k)
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * len(k)
        else:  # 'same' (stride 1): total d·(k−1) per dim, the extra one on the right as torch does
            pads: list[int] = []
            for d, kk in zip(reversed(conv.dilation), reversed(k), strict=True):
                total = d * (kk - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
            return x, (0,) * len(k)
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0,) * len(k)
    return x, tuple(padding)


def conv_weight_stat(
    conv: nn.Module, x: torch.Tensor, a: torch.Tensor, *, out_channels: int | None = None, groups: int | None = None
) -> torch.Tensor:
    """``Σ_{s,p} a[s,o,p] U[s,k,p]`` shaped like the weight (``[out_channels or O, C/g, *k]``)."""
    xp, padding = padded_input(conv, x)
    k = conv.weight.shape[2:]
    g = conv.groups if groups is None else groups
    o = conv.weight.shape[0] if out_channels is None else out_channels
    size = (o, xp.shape[1] // g, *k)
    # the weight only gives the shape: an uninitialised tensor, not torch.nn.grad's expanded scalar, which
    # the kernel first copies into a dense weight-sized tensor (a full extra pass per call)
    shape_only = torch.empty(size, dtype=xp.dtype, device=xp.device)
    n = len(k)
    return torch.ops.aten.convolution_backward(
        a, xp, shape_only, None, _tuple(conv.stride, n), _tuple(padding, n), _tuple(conv.dilation, n),
        False, [0] * n, g, (False, True, False),
    )[1]  # fmt: skip


def _tuple(v: int | tuple[int, ...], n: int) -> list[int]:
    return [v] * n if isinstance(v, int) else list(v)

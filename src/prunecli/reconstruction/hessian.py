"""Gram matrices ``H = X Xᵀ`` of a layer's inputs, summed batch by batch into float64 (docs/obs.md).

``X`` has one column per calibration position and one row per input of a weight row:

* Linear: every leading index (batch, tokens) is a position; the inputs are the features;
* Conv1d/Conv2d: the input is padded as the layer pads it and unfolded into patches; a position is
  (image, output location) and the inputs are ``in/groups × kh × kw`` in the order of the flattened
  filter, so ``w · x`` is the conv's output. A grouped (or depthwise) conv gets one Gram matrix per
  group, built from that group's input channels only.

Only ``H`` (``groups × d × d``) is kept between batches.

Precision. Float64 inputs are multiplied in float64. Lower-precision inputs (a float32 model, the usual
case) are multiplied in float32 over blocks of at most ``BLOCK`` positions, and each block's product is
added to the float64 sum. A float32 dot product of ``k`` terms is off by at most ``k·u·Σ|x_i||x_j|``
(``u = 2⁻²⁴``), so every entry of a block's product is within ``BLOCK·u ≈ 2.4e-4`` of ``Σ|x_i||x_j| ≤
√(H_ii H_jj)`` (worst case; rounding errors of random sign give ``√BLOCK·u ≈ 4e-6``), and the float64
sum adds no error of its own across blocks, however many positions there are. The solver adds
``λ·mean(diag H)`` with ``λ = 0.01`` to the diagonal before it inverts anything, so the perturbation is
at most a few percent of the dampening in the worst case and ~1e-4 of it typically: it cannot change
which directions the solve trusts. What float64 is needed for is the sum over hundreds of thousands of
positions (a float32 running sum would lose ``n·u``, 1 % at 10⁵ positions) and the factorisations,
which stay in float64. The float32 products run about twice as fast as float64 ones and need no
float64 copy of the patches (tests/test_obs_schedule.py checks the bound entry by entry).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from prunecli.errors import InputError

__all__ = ["GramAccumulator", "input_columns", "supports"]

_CHUNK_ELEMENTS = 1 << 24  # float64 elements converted at once (128 MiB), for float64 inputs
BLOCK = 4096  # positions per float32 product (the precision bound in the module docstring)
_PATCH_ELEMENTS = 1 << 23  # unfolded patch elements of the images converted at once (32 MiB in float32)


def _timm_same(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``Conv2dSame`` pads inside ``forward`` (TensorFlow 'SAME'), after the pre-hook sees the input."""
    from timm.layers.padding import pad_same

    return pad_same(x, list(module.kernel_size), list(module.stride), list(module.dilation))


# conv subclasses that pad in their own forward: class name → the padding they apply
_PRE_PAD: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {"Conv2dSame": _timm_same}


def _pad(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    extra = _PRE_PAD.get(type(module).__name__)
    if extra is not None:
        x = extra(module, x)
    pad = list(module._reversed_padding_repeated_twice)  # torch's own resolved padding ('same' included)
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    return x


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(1, -1, x.shape[-1])


def _conv2d(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = _pad(module, x)
    g = module.groups
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)  # B × (C·kh·kw) × L
    b, d, n = patches.shape
    return patches.view(b, g, d // g, n).permute(1, 0, 3, 2).reshape(g, b * n, d // g)


def _conv1d(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = _pad(module, x).unsqueeze(2)  # B × C × 1 × L
    g = module.groups
    patches = F.unfold(x, (1, module.kernel_size[0]), dilation=(1, module.dilation[0]), stride=(1, module.stride[0]))
    b, d, n = patches.shape
    return patches.view(b, g, d // g, n).permute(1, 0, 3, 2).reshape(g, b * n, d // g)


# layer type → ``columns(module, input) → groups × positions × inputs``; most specific types first
_COLUMNS: dict[type[nn.Module], Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv2d,
    nn.Conv1d: _conv1d,
}


def supports(module: nn.Module) -> bool:
    """True for the layer types whose inputs can be unfolded (Linear, Conv1d, Conv2d and subclasses)."""
    return any(isinstance(module, kind) for kind in _COLUMNS)


def input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``groups × positions × inputs`` (inputs in the flattened-filter order).

    Raises:
        InputError: the layer type is not supported (e.g. Conv3d).
    """
    for kind, fn in _COLUMNS.items():
        if isinstance(module, kind):
            return fn(module, x)
    raise InputError(f"{type(module).__name__} layers cannot be reconstructed (Linear, Conv1d, Conv2d only)")


class GramAccumulator:
    """Sums ``X Xᵀ`` over calibration batches for one layer, per group, into float64 (see the module's precision note).

    Attributes:
        h: ``groups × d × d`` float64 sum of outer products (zeros before the first batch).
        positions: number of positions (columns of ``X``) added so far.
    """

    def __init__(self, module: nn.Module, device: torch.device | None = None) -> None:
        if not supports(module):
            raise InputError(f"{type(module).__name__} layers cannot be reconstructed (Linear, Conv1d, Conv2d only)")
        self.module = module
        groups = int(getattr(module, "groups", 1))
        d = module.weight[0].numel()
        self.h = torch.zeros((groups, d, d), dtype=torch.float64, device=device or module.weight.device)
        self.positions = 0

    def add(self, x: torch.Tensor) -> None:
        """Adds one batch of the layer's input (as the layer receives it)."""
        x = x.detach()
        if x.ndim < 2 or not x.numel():
            self._add_columns(input_columns(self.module, x))
            return
        per_image = max(1, input_columns(self.module, x[:1]).numel())
        step = max(1, _PATCH_ELEMENTS // per_image)
        for i in range(0, x.shape[0], step):  # a few images at a time: the unfolded patches stay small
            self._add_columns(input_columns(self.module, x[i : i + step]))

    def _add_columns(self, cols: torch.Tensor) -> None:
        g, n, d = cols.shape
        if cols.dtype == torch.float64:
            step = max(1, _CHUNK_ELEMENTS // max(1, g * d))
            for i in range(0, n, step):
                chunk = cols[:, i : i + step].to(device=self.h.device)
                self.h.baddbmm_(chunk.transpose(1, 2), chunk)
        else:
            part = torch.empty((g, d, d), dtype=torch.float32, device=self.h.device)
            for i in range(0, n, BLOCK):
                chunk = cols[:, i : i + BLOCK].to(device=self.h.device, dtype=torch.float32)
                torch.bmm(chunk.transpose(1, 2), chunk, out=part)
                self.h.add_(part)
        self.positions += n

    def hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        """A forward pre-hook that feeds the layer's first positional input to :meth:`add`."""
        self.add(args[0])

"""Channel pruning, after step 4: split sizes that a block stores itself, kept in step with its pruned layers.

Some blocks cut a tensor into chunks along the channels with sizes they stored at construction
(``torch.split(x, self.width, 1)``). Torch-Pruning traces the split and prunes each chunk together with
the layers that read it, so after pruning the chunks have new, possibly unequal, widths — but the
stored sizes are still the dense ones and the block's forward breaks. Without a rule the safety net
then freezes the whole class, which in these families is every block: nothing is left to prune.

A rule reads the chunk widths back from the pruned layers that consume each chunk and writes them into
the attribute. The attribute is a number or a tuple/list of numbers, so :mod:`prunecli.surgery` records
it in the structure and a rebuilt checkpoint gets the same sizes. Rules are looked up by the class's
module and name (``timm.models.res2net.Bottle2neck``), so a user's own block of the same name is left
to the safety net.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from prunecli.registry import Registry, class_key

__all__ = ["SPLIT_RULES", "fix_splits"]

SplitRule = Callable[[nn.Module], None]
SPLIT_RULES: Registry[SplitRule] = Registry("split rule")


@SPLIT_RULES.register("timm.models.res2net.Bottle2neck")
def _res2net_bottleneck(m: nn.Module) -> None:
    """timm's Res2Net block: ``conv1``'s output is split into ``scale`` chunks of ``width``.

    Chunk ``i < len(convs)`` is the input of ``convs[i]`` (added to the previous branch's output first,
    which Torch-Pruning couples); the last chunk, when ``scale > 1``, goes straight (or pooled) to the
    concatenation. ``width`` becomes the list of chunk widths when they differ.
    """
    sizes = [int(c.in_channels) for c in m.convs]
    total = int(m.conv1.out_channels)
    if int(m.scale) > 1:
        sizes.append(total - sum(sizes))
    if sum(sizes) != total or min(sizes) < 1:
        return
    m.width = sizes[0] if len(set(sizes)) == 1 else sizes


def fix_splits(model: nn.Module) -> None:
    """Applies the rule of every module whose class has one in :data:`SPLIT_RULES`."""
    for m in model.modules():
        key = class_key(m)
        if key in SPLIT_RULES:
            SPLIT_RULES.get(key)(m)

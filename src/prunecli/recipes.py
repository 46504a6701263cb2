"""Training recipes: the defaults ``finetune`` and ``finetune-lora`` use, chosen by what a run starts from.

A fresh ``arch:NAME`` model has random weights and needs paper A's from-scratch recipe: Adam at 1e-3,
random crop (padding 4) + horizontal flip. A trained checkpoint does not: the first Adam updates have
the full step size whatever the gradient's scale, so at 1e-3 they push a converged network out of its
minimum, and a flip it was not trained with (digits) is a distribution shift. One epoch of the
from-scratch recipe took a ResNet-18 trained on digits from 0.994 to 0.853 top-1; the fine-tuning
recipe here (lower peak LR, linear warm-up, crop without flip) keeps it (docs/finetuning.md has the
measurement).

Each recipe's ``augment`` is its choice for small (CIFAR/digits-sized) inputs. Left unset, the run
uses timm's training transform instead for inputs of 64 px or more
(:func:`prunecli.data.resolve_augment`): an ImageNet checkpoint was trained with random resized
crops, not a padding-4 crop of the whole image. The record's ``recipe.augment`` and
``recipe.augment_because`` say which applied.

``recipe="auto"`` picks ``scratch`` for ``arch:`` sources and ``finetune`` (``lora`` for adapters)
otherwise; every option the caller leaves at ``None`` is taken from the recipe, and
:func:`resolve_recipe` reports which came from where, for the record's ``metrics.recipe``.

Torch-free, so the command line can list the recipes without importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from prunecli.errors import InputError
from prunecli.registry import Registry

__all__ = ["RECIPES", "Recipe", "resolve_recipe", "warmup_steps"]


@dataclass(frozen=True)
class Recipe:
    """Defaults for one kind of training run.

    Attributes:
        optimizer: name in :data:`prunecli.training.OPTIMIZERS`.
        lr: peak learning rate.
        schedule: name in :data:`prunecli.training.SCHEDULES` (after the warm-up).
        warmup: fraction of the run's optimizer steps spent on a linear warm-up (0 = none).
        augment: training augmentation for small inputs, a name in :data:`prunecli.data.AUGMENTATIONS`
            (ImageNet-style inputs get ``timm`` unless the user chooses).
        why: one line for people (``--help``, the record).
    """

    optimizer: str
    lr: float
    schedule: str
    warmup: float
    augment: str
    why: str

    def options(self) -> dict[str, Any]:
        """The recipe's option values (without ``why``)."""
        return {k: v for k, v in asdict(self).items() if k != "why"}


RECIPES: Registry[Recipe] = Registry("recipe")
RECIPES.add(
    "scratch",
    Recipe("adam", 1e-3, "cosine", 0.0, "crop-flip", "paper A's from-scratch recipe (random initial weights)"),
)
RECIPES.add(
    "finetune",
    Recipe("adam", 1e-4, "cosine", 0.1, "crop", "a trained network: 10x lower peak LR, 10 % warm-up, no flip"),
)
RECIPES.add(
    "lora",
    Recipe("adam", 1e-3, "none", 0.1, "crop",
           "LoRA on a trained network: paper A's adapter LR (B starts at 0), 10 % warm-up, no flip"),
)  # fmt: skip
RECIPES.add(
    "lora-paper",
    Recipe("adam", 1e-3, "none", 0.0, "crop-flip", "paper A's LoRA recipe exactly (constant 1e-3, crop + flip)"),
)

# What "auto" resolves to: (starts from a fresh arch: model?, adapters?) → recipe name.
_AUTO = {(True, False): "scratch", (False, False): "finetune", (True, True): "lora-paper", (False, True): "lora"}


def resolve_recipe(
    name: str, *, fresh: bool, adapters: bool = False, given: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Resolves a recipe and the caller's explicit options into the values a run uses.

    Args:
        name: ``auto`` or a name in :data:`RECIPES`.
        fresh: the run starts from a freshly initialised ``arch:`` model.
        adapters: the run trains LoRA adapters (``finetune-lora``).
        given: option → value as the caller passed it; ``None`` means "from the recipe".

    Returns:
        (values, report): the resolved option values, and the record's ``recipe`` block: the recipe's
        name, why it was chosen, every resolved value, and which options the caller set.

    Raises:
        UnknownNameError: an unknown recipe name.
        InputError: a warm-up fraction outside [0, 1).
    """
    chosen = _AUTO[(fresh, adapters)] if name == "auto" else RECIPES.canonical(name)
    recipe = RECIPES.get(chosen)
    values = recipe.options()
    explicit = {k: v for k, v in (given or {}).items() if v is not None}
    values.update(explicit)
    warm = values["warmup"]
    if not (isinstance(warm, (int, float)) and math.isfinite(warm) and 0 <= warm < 1):
        raise InputError(f"--warmup must be a fraction of the run in [0, 1), got {warm}")
    reason = ("fresh arch: model" if fresh else "trained checkpoint") if name == "auto" else "requested"
    report = {"name": chosen, "requested": name, "chosen_because": reason, "why": recipe.why, **values,
              "set_by_user": sorted(explicit)}  # fmt: skip
    return values, report


def warmup_steps(fraction: float, total_steps: int) -> int:
    """Warm-up length in optimizer steps: ``ceil(fraction · total)``, 0 when ``fraction`` is 0."""
    return math.ceil(fraction * total_steps) if fraction > 0 else 0

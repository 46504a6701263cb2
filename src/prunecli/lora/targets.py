"""Which layers get adapters: paper A's defaults (every ``nn.Linear``) plus globs, checked up front."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from prunecli.errors import InputError
from prunecli.prunable import match_any

__all__ = ["LoraOptions", "select_targets"]

# Module types peft's default LoRA dispatcher adapts (``peft.tuners.lora.layer.dispatch_default``).
_ADAPTABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


@dataclass(frozen=True)
class LoraOptions:
    """What to adapt and how (paper A's defaults).

    Attributes:
        rank: adapter rank r (paper A: 8).
        alpha: scaling numerator; the update is ``(alpha / rank) · B A`` (paper A: 16, scale 2).
        dropout: dropout on the adapter input (paper A: not stated → 0).
        linear: adapt every ``nn.Linear`` layer (paper A); False adapts only ``targets``.
        targets: extra module globs to adapt (e.g. ``features.*.conv`` for the convolutions).
        exclude: module globs never adapted (applied last).
        dora: weight-decomposed LoRA (DoRA, peft ``use_dora``).
        bn: ``train`` (BatchNorm running statistics update while training) or ``eval`` (frozen).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    linear: bool = True
    targets: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    dora: bool = False
    bn: str = "train"

    @property
    def scale(self) -> float:
        """The LoRA scaling factor α / r."""
        return self.alpha / self.rank


def _min_dim(module: nn.Module) -> int:
    """The largest rank a layer's update can have: min(fan-out, fan-in)."""
    w = module.weight
    if isinstance(module, nn.Embedding):
        return min(w.shape)
    return min(int(w.shape[0]), int(w[0].numel()))


def select_targets(model: nn.Module, opts: LoraOptions) -> list[str]:
    """Module names to adapt, in definition order.

    Every ``nn.Linear`` (paper A) when ``opts.linear``, plus modules matching ``opts.targets``,
    minus modules matching ``opts.exclude``.

    Raises:
        InputError: rank or alpha out of range, a ``targets``/``exclude`` glob that matches no
            module, a matched module that peft cannot adapt, nothing left to adapt, or a rank larger
            than a selected layer.

    Example:
        >>> select_targets(timm.create_model("improved_cnn"), LoraOptions())
        ['fc1', 'fc2']
    """
    if opts.rank < 1:
        raise InputError(f"--rank must be at least 1, got {opts.rank}")
    if opts.alpha <= 0:
        raise InputError(f"--alpha must be positive, got {opts.alpha}")
    if not 0.0 <= opts.dropout < 1.0:
        raise InputError(f"--dropout must be in [0, 1), got {opts.dropout}")
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    for kind, globs in (("--targets", opts.targets), ("--exclude", opts.exclude)):
        for g in globs:
            if not any(match_any(n, [g]) for n in names):
                raise InputError(
                    f"{kind} {g!r} matches no module of the model",
                    hint="module names look like " + ", ".join(names[:6]) + "; see `prunecli inspect --layers`",
                )
    chosen: list[str] = []
    for name in names:
        mod = modules[name]
        wanted = (opts.linear and isinstance(mod, nn.Linear)) or match_any(name, opts.targets)
        if not wanted or match_any(name, opts.exclude):
            continue
        if not isinstance(mod, _ADAPTABLE) or getattr(mod, "weight", None) is None:
            raise InputError(
                f"--targets: module {name!r} is a {type(mod).__name__}; LoRA adapts Linear, Conv1d/2d/3d and "
                "Embedding layers",
                hint="narrow the glob to the layers themselves (e.g. 'features.*.conv')",
            )
        chosen.append(name)
    if not chosen:
        raise InputError("no layer to adapt", hint="the model has no Linear layer left: pass --targets GLOB")
    for name in chosen:
        limit = _min_dim(modules[name])
        if opts.rank > limit:
            raise InputError(
                f"--rank {opts.rank} is larger than layer {name!r} allows (min(fan-out, fan-in) = {limit})",
                hint=f"use --rank {limit} or less, or --exclude {name}",
            )
    return chosen

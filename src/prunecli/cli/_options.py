"""Option aliases shared by every subcommand, so each option's help is written once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

CkptArg = Annotated[
    str,
    typer.Argument(
        metavar="CKPT",
        help="Checkpoint: FILE.safetensors, a timm folder, a .pth/.pth.tar/.bin file, timm:NAME[.TAG], "
        "arch:NAME, or '-' for the previous step's JSON record on stdin.",
        show_default=False,
    ),
]
ArchOpt = Annotated[
    Optional[str], typer.Option("--arch", help="timm architecture of a bare state dict.", rich_help_panel="Input")
]
NumClassesOpt = Annotated[
    Optional[int],
    typer.Option("--num-classes", min=1, help="Classifier width of a bare state dict or arch: model.",
                 rich_help_panel="Input"),
]  # fmt: skip
EmaOpt = Annotated[
    bool, typer.Option("--ema", help="Use the EMA weights of a timm train.py checkpoint.", rich_help_panel="Input")
]
# A str, not a Path: Path() drops the trailing "/" that asks for a timm folder output.
OutputOpt = Annotated[
    str,
    typer.Option(
        "-o", "--output", metavar="OUT", help="Output checkpoint: FILE.safetensors, or DIR/ for a timm folder.",
        show_default=False,
    ),
]  # fmt: skip
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="Data spec: digits[:train|test], imagefolder:PATH, "
        "cifar10:PATH[:split], cifar100:…, mnist:…, fashionmnist:…, synthetic[:N].",
    ),
]
OptDataOpt = Annotated[Optional[str], typer.Option("--data", help="Data spec (see --data of eval).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (GPU when present), cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (sampling, initialisation, shuffling).")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Batch size.")]
WorkersOpt = Annotated[int, typer.Option("--workers", "-j", min=0, help="DataLoader worker processes.")]
MetricsOpt = Annotated[
    Optional[Path], typer.Option("--metrics", help="Also append the JSON record to this file (JSON Lines).")
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Silence stderr except errors.")]
InputSizeOpt = Annotated[
    Optional[str],
    typer.Option("--input-size", help="Override the input size: S, HxW or CxHxW.", rich_help_panel="Transforms"),
]
MeanOpt = Annotated[
    Optional[str],
    typer.Option("--mean", help="Override normalisation mean, e.g. 0.5,0.5,0.5.", rich_help_panel="Transforms"),
]
StdOpt = Annotated[
    Optional[str],
    typer.Option("--std", help="Override normalisation std, e.g. 0.5,0.5,0.5.", rich_help_panel="Transforms"),
]


def floats(text: str | None, name: str) -> tuple[float, ...] | None:
    """Parses ``a,b,c`` into floats (None stays None)."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=name) from None


def ints(text: str | None, name: str) -> tuple[int, ...] | None:
    """Parses ``S``, ``HxW`` or ``CxHxW`` into ints."""
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not S, HxW or CxHxW", param_hint=name) from None


def model_inputs(
    arch: str | None,
    num_classes: int | None,
    ema: bool,
    input_size: str | None,
    mean: str | None,
    std: str | None,
) -> tuple[Any, Any, dict[str, Any]]:
    """The options every model-reading command shares, parsed once.

    Returns:
        ``(InputOptions, DataOptions, record entries)``: how to read CKPT, the transform overrides, and
        the raw values for the record's ``options`` (as the user typed them).
    """
    from prunecli.api._common import DataOptions, InputOptions  # here: --help must not import torch

    inputs = InputOptions(arch=arch, num_classes=num_classes, ema=ema)
    dopts = DataOptions(ints(input_size, "--input-size"), floats(mean, "--mean"), floats(std, "--std"))
    record = {"arch": arch, "num_classes": num_classes, "ema": ema, "input_size": input_size, "mean": mean, "std": std}
    return inputs, dopts, record

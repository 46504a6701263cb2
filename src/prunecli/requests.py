"""Typed requests: what each subcommand is asked to do, each option declared once.

One frozen dataclass per subcommand (:class:`PruneRequest`, …), built from shared pieces
(:class:`ModelSource`, :class:`Transforms`, :class:`Runtime`, :class:`Reporting`, :class:`Training`,
:class:`Wcr`, :class:`LoraOptions`). A field carries everything about one option: its flags, help
text, default, how the command line's text becomes the value (``parse``) and which values are valid
(``check``). From that one declaration

- :mod:`prunecli.cli._build` generates the Typer command (so ``--help`` and the man pages follow),
- the api function takes the request as its one argument (``api.prune(PruneRequest(...))``),
- :meth:`Request.to_json` is the one JSON form written both as the record's ``options`` and as the
  checkpoint lineage's ``options``, so the two can never drift apart.

Validation runs when a request is built, before torch is imported: a bad value or a conflicting
pair of options is a :class:`RequestError` (exit 2 on the command line, with one ``Error:`` line).
This module imports nothing heavy; ``prunecli --help`` and every usage error stay fast.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunecli.errors import InputError, PrunecliError

__all__ = [
    "EvalRequest",
    "FinetuneLoraRequest",
    "FinetuneRequest",
    "InspectRequest",
    "KeyValues",
    "LoraOptions",
    "ModelSource",
    "PruneRequest",
    "ReportRequest",
    "Reporting",
    "Request",
    "RequestError",
    "RestoreRequest",
    "Runtime",
    "ScoreRequest",
    "Spec",
    "Training",
    "Transforms",
    "Wcr",
    "leaves",
]


class RequestError(PrunecliError):
    """An invalid option value or a conflicting combination: a usage error (exit 2)."""


# ----------------------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Spec:
    """How one request field appears on the command line.

    Attributes:
        flags: option names (``("--ratio", "-r")``), or ``("--x/--no-x",)`` for an on/off pair; empty
            for a field that has no command-line form (library only).
        help: the help text (``--help`` and the man page).
        panel: the help panel the option is listed under.
        metavar: the placeholder shown in help.
        argument: a positional argument rather than an option.
        multiple: repeatable; the value is a tuple of the parsed items.
        parse: command-line text → value (None: Typer's own conversion of ``cli_type``); for a repeatable
            option, applied to each item.
        collect: for a repeatable option, the list of items (after ``parse``) → the value (default: a tuple).
        check: value → None when valid, else the reason it is not (one short clause).
        cli_type: what Typer parses before ``parse`` (str, int, float, bool).
        record: part of the JSON form (record and lineage ``options``).
        show_default: show the default in help.
    """

    flags: tuple[str, ...] = ()
    help: str = ""
    panel: str | None = None
    metavar: str | None = None
    argument: bool = False
    multiple: bool = False
    parse: Callable[[str], Any] | None = None
    collect: Callable[[list[Any]], Any] | None = None
    check: Callable[[Any], str | None] | None = None
    cli_type: type = str
    record: bool = True
    show_default: bool = True

    @property
    def flag(self) -> str:
        """The name used in error messages: the first long flag, or the metavar of an argument."""
        if self.argument or not self.flags:
            return self.metavar or "argument"
        names = self.flags[0].split("/")[0], *self.flags[1:]
        return next((n for n in names if n.startswith("--")), names[0])


_REQUIRED = dataclasses.MISSING


def option(default: Any = _REQUIRED, *flags: str, help: str, **spec: Any) -> Any:
    """A request field: its default (omit it for a required one) and its :class:`Spec`."""
    meta = {"spec": Spec(flags=flags, help=help, **spec)}
    if default is _REQUIRED:
        return field(metadata=meta)
    if isinstance(default, dict):  # a mutable default: each request gets its own
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def argument(metavar: str, *, help: str, **spec: Any) -> Any:
    """A required positional argument."""
    return field(metadata={"spec": Spec(help=help, metavar=metavar, argument=True, show_default=False, **spec)})


def piece(cls: type, **defaults: Any) -> Any:
    """A nested group of fields (its own dataclass), with per-command defaults."""
    return field(default_factory=lambda: cls(**defaults), metadata={"piece": cls, "defaults": defaults})


def leaves(cls: type) -> Iterator[tuple[tuple[str, ...], dataclasses.Field, Spec, Any]]:
    """Every option field of a request class, pieces flattened: ``(path, field, spec, default)``.

    ``path`` is the attribute path (``("runtime", "batch_size")``); ``default`` is the per-command
    default (``dataclasses.MISSING`` for a required field).
    """
    yield from _leaves(cls, (), {})


def _leaves(cls: type, prefix: tuple[str, ...], overrides: Mapping[str, Any]) -> Iterator[Any]:
    for f in _ordered_fields(cls):
        if "piece" in f.metadata:
            yield from _leaves(f.metadata["piece"], (*prefix, f.name), f.metadata["defaults"])
        elif "spec" in f.metadata:
            default = overrides.get(f.name, f.default)
            yield (*prefix, f.name), f, f.metadata["spec"], default


def _ordered_fields(cls: type) -> list[dataclasses.Field]:
    """Fields in help order: the command's own options, its own pieces, then the pieces every command shares."""
    fields = dataclasses.fields(cls)
    plain = [f for f in fields if "piece" not in f.metadata]
    pieces = [f for f in fields if "piece" in f.metadata]
    shared = [f for name in _SHARED_PIECES for f in pieces if f.name == name]
    own = set(vars(cls).get("__annotations__", {}))  # the class's own pieces before those it inherits
    rest = sorted((f for f in pieces if f.name not in _SHARED_PIECES), key=lambda f: f.name not in own)
    return plain + rest + shared


_SHARED_PIECES = ("source", "transforms", "runtime", "reporting")


# ----------------------------------------------------------------------------------------- parsing


class KeyValues(Mapping[str, str]):
    """The ``-p KEY=VALUE`` items of a request, in the order given: the one ``-p`` parser.

    A mapping (the last value of a key wins) that still knows which keys were repeated, so that the
    method receiving them can refuse unknown *and* repeated keys in one place (:meth:`check`), naming
    its valid keys. Values stay strings: the method converts them against its own option table.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]] = ()) -> None:
        self.pairs = tuple((str(k), str(v)) for k, v in pairs)
        self._map = dict(self.pairs)

    @classmethod
    def parse(cls, items: Sequence[str] | None) -> KeyValues:
        """``["agg=sq_mean", "lambda=0.1"]`` → KeyValues; an item without ``=`` or key is an input error."""
        pairs = []
        for item in items or ():
            key, sep, value = str(item).partition("=")
            if not sep or not key.strip():
                raise InputError(f"-p {item!r} is not key=value", hint="e.g. -p lambda=0.1")
            pairs.append((key.strip(), value.strip()))
        return cls(pairs)

    @classmethod
    def of(cls, params: Mapping[str, Any] | Sequence[str] | None) -> KeyValues:
        """A KeyValues from what a library caller passes: KeyValues, a plain mapping, or ``k=v`` strings."""
        if isinstance(params, KeyValues):
            return params
        if isinstance(params, Mapping):
            return cls(list(params.items()))
        return cls.parse(params)

    def check(self, valid: Sequence[str], what: str) -> None:
        """Refuses a key that is not in ``valid`` or that is given twice (exit 1, the valid keys in the hint)."""
        keys = ", ".join(sorted(valid)) or "none"
        seen: set[str] = set()
        for key, _ in self.pairs:
            if key not in valid:
                raise InputError(f"unknown -p key {key!r} for {what}", hint=f"valid keys: {keys}")
            if key in seen:
                raise InputError(f"-p {key} is given twice", hint=f"give each key once; valid keys: {keys}")
            seen.add(key)

    def __getitem__(self, key: str) -> str:
        return self._map[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self) == dict(other)

    def __hash__(self) -> int:
        return hash(self.pairs)

    def __repr__(self) -> str:
        return f"KeyValues({list(self.pairs)!r})"


def _numbers(kind: type, what: str) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(kind(v) for v in text.replace("x", ",").split(",") if v.strip())
        except ValueError:
            raise RequestError(f"{text!r} is not {what}") from None
        if not values:
            raise RequestError(f"{text!r} is not {what}")
        return values

    return parse


def parse_structure(text: str) -> str:
    """``unstructured``, ``channel`` or ``N:M`` with 1 <= N < M (returned as given, validated)."""
    if text in ("unstructured", "channel"):
        return text
    n, sep, m = text.partition(":")
    if not sep:
        raise RequestError(f"unknown structure {text!r}; choose from unstructured, channel, N:M (e.g. 2:4)")
    try:
        ni, mi = int(n), int(m)
    except ValueError:
        raise RequestError(f"--structure {text!r}: N and M must be integers (e.g. 2:4)") from None
    if not 1 <= ni < mi:
        raise RequestError(f"--structure {text!r}: N:M needs 1 <= N < M")
    return text


def nm_of(structure: str) -> tuple[int, int] | None:
    """``"2:4"`` → ``(2, 4)``; None for unstructured and channel."""
    if ":" not in structure:
        return None
    n, _, m = structure.partition(":")
    return int(n), int(m)


def parse_layer_ratio(text: str) -> tuple[str, float]:
    """``"blocks.0.*=0.2"`` → ``("blocks.0.*", 0.2)`` (the last ``=`` splits, so globs may hold ``=``)."""
    glob, sep, value = text.rpartition("=")
    try:
        ratio = float(value)
    except ValueError:
        ratio = math.nan
    if not sep or not glob or math.isnan(ratio):
        raise RequestError(f"--layer-ratio {text!r} is not GLOB=R", hint="e.g. --layer-ratio 'blocks.0.*=0.2'")
    return glob, ratio


_TARGET_KINDS = ("macs", "params", "latency")
_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_target(text: str) -> tuple[str, str]:
    """``"macs=0.5"`` / ``"params=6M"`` → ``(kind, value as given)``, checked (``prune --target``).

    VALUE is a fraction of the dense model's amount, strictly between 0 and 1, or (not for
    ``latency``) an absolute amount with a unit suffix K, M, G or T. A bad target is bad input (an
    ``InputError``, exit 1, as issue 16 asks for every refused target), found before torch is imported.
    """
    kind, sep, value = text.partition("=")
    kind, value = kind.strip().lower(), value.strip()
    if not sep or kind not in _TARGET_KINDS:
        raise InputError(f"--target {text!r} is not KIND=VALUE with KIND one of {', '.join(_TARGET_KINDS)}",
                         hint="e.g. --target macs=0.5 or --target params=6M")  # fmt: skip
    target_amount(kind, value)
    return kind, value


def target_amount(kind: str, value: str) -> tuple[float, bool]:
    """``(amount, is_fraction)`` of a ``--target`` VALUE; raises InputError for a bad one (see :func:`parse_target`)."""
    unit = value[-1:].upper() if value[-1:].isalpha() else ""
    number = value[: len(value) - len(unit)]
    try:
        amount = float(number)
    except ValueError:
        amount = math.nan
    if unit not in _UNITS or not math.isfinite(amount):
        raise InputError(f"--target {kind}={value}: not a number with an optional unit K, M, G or T",
                         hint="e.g. macs=0.5 (a fraction of the dense model) or macs=1.8G")  # fmt: skip
    if unit and kind == "latency":
        raise InputError(f"--target latency={value}: latency is given as a fraction of the dense model's",
                         hint="e.g. --target latency=0.5")  # fmt: skip
    if not unit and not 0 < amount < 1:
        raise InputError(
            f"--target {kind}={value}: a fraction must be strictly between 0 and 1",
            hint=f"an absolute amount needs a unit, e.g. {kind}={value}G" if amount >= 1 else None,
        )
    if unit and amount <= 0:
        raise InputError(f"--target {kind}={value}: the amount must be positive")
    return (amount * _UNITS[unit], False) if unit else (amount, True)


# ----------------------------------------------------------------------------------------- checks


def one_of(*choices: str) -> Callable[[Any], str | None]:
    """Valid when the value is one of ``choices`` (None passes: an unset optional)."""
    return lambda v: None if v is None or v in choices else f"unknown value {v!r}; choose from {', '.join(choices)}"


def at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or v >= low else f"{v!r} is below {low:g}"


def fraction_open_closed(v: Any) -> str | None:
    """In (0, 1]: calibration fractions."""
    return None if v is None or 0 < v <= 1 else f"{v!r} is outside (0, 1]"


def ratio_check(v: Any) -> str | None:
    """A pruning ratio: in [0, 1); 1 would remove every weight."""
    return None if v is None or (0 <= v < 1) else f"ratio {v:g} is outside [0, 1)"


def _layer_ratios_check(pairs: Any) -> str | None:
    return next((f"{g}={r:g}: ratio outside [0, 1)" for g, r in pairs if not 0 <= r < 1), None)


def _device_check(v: Any) -> str | None:
    head, _, index = str(v).partition(":")
    if (head in ("auto", "cpu") and not index) or (head == "cuda" and (not index or index.isdigit())):
        return None
    return f"{v!r} is not auto, cpu, cuda or cuda:N"


# ----------------------------------------------------------------------------------------- base


@dataclass(frozen=True, kw_only=True)
class Request:
    """Base of every request and piece: validation on construction, and the one JSON form."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            spec = f.metadata.get("spec")
            if spec is None or spec.check is None:
                continue
            value = getattr(self, f.name)
            items = value if spec.multiple and spec.collect is None else (value,)
            for item in items:
                reason = spec.check(item)
                if reason:
                    raise RequestError(f"invalid value for {spec.flag}: {reason}")
        self.validate()

    def validate(self) -> None:
        """Checks between fields (overridden by requests that have such rules)."""

    @classmethod
    def build(cls, **values: Any) -> Any:
        """The request from flat option names, as the command line gives them (pieces filled in).

        ``PruneRequest.build(checkpoint="a.safetensors", output="b.safetensors", method="l1", ratio=0.5,
        batch_size=64)`` puts ``batch_size`` into the ``runtime`` piece; a piece may also be passed whole
        (``runtime=Runtime(...)``). Unknown names are a programming error (TypeError).
        """
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        owner = {path[-1]: path[:-1] for path, *_ in leaves(cls)}
        multiple = {path[-1] for path, _f, spec, _d in leaves(cls) if spec.multiple and spec.collect is None}
        for name, value in values.items():
            if name in multiple and not isinstance(value, tuple):  # lists and mappings of pairs from callers
                value = tuple(value.items() if isinstance(value, Mapping) else value)
            if name not in owner:
                if name not in {f.name for f in dataclasses.fields(cls)}:
                    raise TypeError(f"{cls.__name__} has no option {name!r}")
                top[name] = value
            elif owner[name]:
                nested.setdefault(owner[name][0], {})[name] = value
            else:
                top[name] = value
        for f in dataclasses.fields(cls):
            if f.name in nested and "piece" in f.metadata:
                top[f.name] = f.metadata["piece"](**{**f.metadata["defaults"], **nested[f.name]})
        return cls(**top)

    def to_json(self) -> dict[str, Any]:
        """The options as plain JSON values, pieces flattened: the record's and the lineage's ``options``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if "piece" in f.metadata:
                out.update(value.to_json())
            elif f.metadata.get("spec") is not None and f.metadata["spec"].record:
                out[f.name] = _plain(value)
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


# ----------------------------------------------------------------------------------------- shared fields

_INPUT = "Input"
_TRANSFORMS = "Transforms"
_RUN = "Runtime"
_DATA_HELP = (
    "Data spec: digits[:train|test], imagefolder:PATH, cifar10:PATH[:split], cifar100:…, mnist:…, "
    "fashionmnist:…, synthetic[:N]."
)


def checkpoint_arg() -> Any:
    return argument(
        "CKPT",
        help="Checkpoint: FILE.safetensors, a timm folder, a .pth/.pth.tar/.bin file, timm:NAME[.TAG], "
        "arch:NAME, or '-' for the previous step's JSON record on stdin.",
        record=False,
    )


def output_option(what: str = "Output checkpoint: FILE.safetensors, or DIR/ for a timm folder.") -> Any:
    # A str, not a Path: Path() drops the trailing "/" that asks for a timm folder output.
    return option(_REQUIRED, "-o", "--output", help=what, metavar="OUT", show_default=False, record=False)


def force_option() -> Any:
    return option(False, "--force", "-f", help="Overwrite an existing output.", cli_type=bool, record=False)


def arch_option() -> Any:
    return option(None, "--arch", help="timm architecture of a bare state dict.", panel=_INPUT)


def params_option(what: str) -> Any:
    return option(
        KeyValues(), "-p", "--param", help=f"{what} option KEY=VALUE, repeatable.", metavar="KEY=VALUE",
        multiple=True, collect=KeyValues.parse, show_default=False,
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ModelSource(Request):
    """How to read CKPT when it does not describe itself (a bare state dict, a train.py file)."""

    arch: str | None = arch_option()
    num_classes: int | None = option(
        None, "--num-classes", help="Classifier width of a bare state dict or arch: model.", panel=_INPUT,
        cli_type=int, check=at_least(1),
    )  # fmt: skip
    ema: bool = option(False, "--ema", help="Use the EMA weights of a timm train.py checkpoint.", panel=_INPUT,
                       cli_type=bool)  # fmt: skip
    model_args: Mapping[str, Any] = field(default_factory=dict)  # library only: extra timm.create_model kwargs


@dataclass(frozen=True, kw_only=True)
class Transforms(Request):
    """Overrides of the checkpoint's data config (else taken from its pretrained_cfg)."""

    input_size: tuple[int, ...] | None = option(
        None, "--input-size", help="Override the input size: S, HxW or CxHxW.", panel=_TRANSFORMS,
        parse=_numbers(int, "S, HxW or CxHxW"),
    )  # fmt: skip
    mean: tuple[float, ...] | None = option(
        None, "--mean", help="Override normalisation mean, e.g. 0.5,0.5,0.5.", panel=_TRANSFORMS,
        parse=_numbers(float, "a comma-separated list of numbers"),
    )  # fmt: skip
    std: tuple[float, ...] | None = option(
        None, "--std", help="Override normalisation std, e.g. 0.5,0.5,0.5.", panel=_TRANSFORMS,
        parse=_numbers(float, "a comma-separated list of numbers"),
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Runtime(Request):
    """Where and how batches run. Only ``batch_size`` and ``seed`` change results, so only they are recorded."""

    device: str = option("auto", "--device", help="auto (GPU when present), cpu, cuda or cuda:N.", panel=_RUN,
                         check=_device_check, record=False)  # fmt: skip
    batch_size: int = option(128, "--batch-size", "-b", help="Batch size (global: split over torchrun processes).",
                             panel=_RUN, cli_type=int, check=at_least(1))  # fmt: skip
    workers: int | None = option(None, "--workers", "-j", help="DataLoader worker processes. Default: min(8, usable "
                                 "CPUs ÷ torchrun processes on the node), 0 below 2 CPUs per process, never more "
                                 "than the batches: decoding in workers keeps the model fed, as timm's loaders do. "
                                 "0 decodes in the main process.", panel=_RUN, cli_type=int, check=at_least(0),
                                 record=False, show_default=False)  # fmt: skip
    precision: str = option("fp32", "--precision", help="Forward passes of eval, score (taylor, snip, wanda; "
                            "prune --method too), finetune and finetune-lora under autocast: fp32 (exact, the "
                            "default), bf16, or fp16 (CUDA only). Losses, gradients, accumulators and weights stay "
                            "float32/64; other steps run fp32.", panel=_RUN,
                            check=one_of("fp32", "bf16", "fp16"))  # fmt: skip
    channels_last: bool = option(False, "--channels-last", help="NHWC memory format for 4-D weights and inputs in "
                                 "eval, score, finetune and finetune-lora (faster convolutions on GPUs; same results "
                                 "up to summation order).", panel=_RUN, cli_type=bool)  # fmt: skip
    seed: int = option(0, "--seed", help="Random seed (sampling, initialisation, shuffling).", panel=_RUN,
                       cli_type=int)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Reporting(Request):
    """Where the record goes besides stdout, and how talkative stderr is (never recorded)."""

    metrics: Path | None = option(
        None, "--metrics", help="Also append the JSON record to this file (JSON Lines).", parse=Path, record=False,
    )  # fmt: skip
    quiet: bool = option(False, "--quiet", "-q", help="Silence stderr except errors.", cli_type=bool, record=False)


@dataclass(frozen=True, kw_only=True)
class ModelCommand(Request):
    """What every command that reads one model shares: CKPT, how to read it, its transforms, the runtime, stderr.

    A command's own batch size default is a redeclared ``runtime`` piece (``piece(Runtime, batch_size=64)``).
    """

    checkpoint: str = checkpoint_arg()
    source: ModelSource = piece(ModelSource)
    transforms: Transforms = piece(Transforms)
    runtime: Runtime = piece(Runtime)
    reporting: Reporting = piece(Reporting)


# ----------------------------------------------------------------------------------------- inspect, report, eval


@dataclass(frozen=True, kw_only=True)
class InspectRequest(Request):
    """``prunecli inspect``: read a checkpoint's description (header only where possible)."""

    checkpoint: str = checkpoint_arg()
    layers: bool = option(False, "--layers", help="Add per-layer shape, params and sparsity.", cli_type=bool)
    arch: str | None = arch_option()
    reporting: Reporting = piece(Reporting)


@dataclass(frozen=True, kw_only=True)
class ReportRequest(Request):
    """``prunecli report``: a table (and plots) from many runs' records."""

    results: Path = argument("RESULTS.jsonl", help="JSON Lines file of prunecli records.", parse=Path)
    fmt: str = option("md", "--format", help="Table format: md, csv or json.", check=one_of("md", "csv", "json"))
    output: Path | None = option(None, "-o", "--output", help="Directory for the PNG plots (needs matplotlib).",
                                 parse=Path, show_default=False)  # fmt: skip
    quiet: bool = option(False, "--quiet", "-q", help="Silence stderr except errors.", cli_type=bool, record=False)


@dataclass(frozen=True, kw_only=True)
class EvalRequest(ModelCommand):
    """``prunecli eval``: accuracy, loss, fidelity to a reference and latency of a checkpoint."""

    data: str | None = option(
        None, "--data", help=_DATA_HELP + " Default: the --val data of the last training step in the checkpoint's "
        "lineage (said on stderr); required when there is none.", show_default=False,
    )  # fmt: skip
    reference: str | None = option(None, "--reference", help="Reference checkpoint: adds top-1 agreement and KL.")
    benchmark: bool = option(False, "--benchmark", help="Add latency and throughput on the device.", cli_type=bool)


# ----------------------------------------------------------------------------------------- score

_SCORES = "Scores"
_SELECT = "Selection"
_METHODS_HELP = (
    "Criterion: random, magnitude (aliases l1, l2), taylor, snip, proscore, biascomp, wanda, fpgm, bnscale. "
    "--list-methods shows their options."
)


def method_option(help: str = _METHODS_HELP, default: str | None = None) -> Any:
    return option(default, "--method", "-m", help=help, panel=_SCORES, show_default=default is not None)


def batches_option() -> Any:
    return option(None, "--batches", help="Calibration batches (default: the method's own).", panel=_SCORES,
                  cli_type=int, check=at_least(1), show_default=False)  # fmt: skip


def fraction_option() -> Any:
    return option(None, "--fraction", help="Class-balanced fraction of the data in (0, 1] (paper D App. E).",
                  panel=_SCORES, cli_type=float, check=fraction_open_closed, show_default=False)  # fmt: skip


def score_mode_option() -> Any:
    return option("eval", "--score-mode", help="Model mode while scoring: eval, or train (paper reproduction).",
                  panel=_SCORES, check=one_of("eval", "train"))  # fmt: skip


def data_option(help: str = _DATA_HELP) -> Any:
    return option(None, "--data", help=help, show_default=False)


@dataclass(frozen=True, kw_only=True)
class ScoreRequest(Request):
    """``prunecli score``: scores of one criterion, or (``--compare``) rank correlations, or the criteria list."""

    paths: tuple[str, ...] = option(
        (), help="Checkpoint to score (any form eval takes, '-' for the previous step's record); with --compare, "
        "two or more scores files.", argument=True, multiple=True, metavar="CKPT | SCORES...", show_default=False,
        record=False,
    )  # fmt: skip
    method: str | None = method_option()
    data: str | None = data_option("Calibration data spec (split defaults to train); see --data of eval.")
    batches: int | None = batches_option()
    fraction: float | None = fraction_option()
    params: Mapping[str, str] = params_option("Criterion")
    score_mode: str = score_mode_option()
    compare: bool = option(False, "--compare", help="Spearman rank correlation of the given scores files, per "
                           "layer and overall.", cli_type=bool)  # fmt: skip
    list_methods: bool = option(False, "--list-methods", help="List the criteria, their needs and options, and exit.",
                                cli_type=bool)  # fmt: skip
    output: Path | None = option(None, "-o", "--output", help="Scores file to write (safetensors).", parse=Path,
                                 show_default=False, record=False)  # fmt: skip
    force: bool = force_option()
    source: ModelSource = piece(ModelSource)
    transforms: Transforms = piece(Transforms)
    runtime: Runtime = piece(Runtime, batch_size=64)
    reporting: Reporting = piece(Reporting)

    @property
    def mode(self) -> str:
        """``list``, ``compare`` or ``score``: which of the command's three jobs this is."""
        return "list" if self.list_methods else "compare" if self.compare else "score"

    def validate(self) -> None:
        if self.mode == "compare" and len(self.paths) < 2:
            raise RequestError("--compare needs two or more scores files")
        if self.mode != "score":
            return
        if len(self.paths) != 1:
            raise RequestError(f"score takes one checkpoint, got {len(self.paths)}",
                               hint="pass --compare to compare scores files")  # fmt: skip
        if not self.method:
            raise RequestError("score needs --method", hint="e.g. --method taylor; --list-methods lists them")
        if self.output is None:
            raise RequestError("score needs an output file", hint="pass -o FILE.scores")

    @property
    def checkpoint(self) -> str:
        return self.paths[0]


# ----------------------------------------------------------------------------------------- prune


@dataclass(frozen=True, kw_only=True)
class PruneRequest(ModelCommand):
    """``prunecli prune``: remove the lowest-scoring weights (exactly round(r·N) per scope) or channels."""

    output: str = output_option()
    ratio: float | None = option(
        None, "--ratio", "-r", help="Fraction of weights (or channels) to remove, in [0, 1); implied by N:M.",
        panel=_SELECT, cli_type=float, check=ratio_check, show_default=False,
    )  # fmt: skip
    scores: str | None = option(None, "--scores", help="Scores file of this checkpoint (prunecli score).",
                                panel=_SCORES, show_default=False)  # fmt: skip
    method: str | None = method_option(
        "Compute scores in process with this criterion instead of --scores (magnitude, taylor, snip, biascomp, …)."
    )
    data: str | None = data_option("Calibration data for --method (split defaults to train); see --data of eval.")
    params: Mapping[str, str] = params_option("Criterion")
    batches: int | None = batches_option()
    fraction: float | None = fraction_option()
    score_mode: str = score_mode_option()
    structure: str = option(
        "unstructured", "--structure", help="unstructured, channel, or N:M (e.g. 2:4).", panel=_SELECT,
        parse=parse_structure, check=lambda v: parse_structure(v) and None,
    )  # fmt: skip
    scope: str | None = option(
        None, "--scope", help="layer or global ranking. Default: global for taylor, snip, biascomp, proscore; "
        "layer otherwise.", panel=_SELECT, check=one_of("layer", "global"), show_default=False,
    )  # fmt: skip
    exclude: tuple[str, ...] = option(
        (), "--exclude", "-x", help="Glob of layers not to prune (repeatable); the classifier head is always "
        "excluded unless --include-head.", panel=_SELECT, multiple=True, show_default=False,
    )  # fmt: skip
    include_head: bool = option(False, "--include-head", help="Prune the classifier head too.", panel=_SELECT,
                                cli_type=bool)  # fmt: skip
    layer_ratios: tuple[tuple[str, float], ...] = option(
        (), "--layer-ratio", help="GLOB=R: own ratio (and scope) for matching layers; repeatable, the last "
        "matching pattern wins.", panel=_SELECT, multiple=True, parse=parse_layer_ratio,
        check=lambda pair: ratio_check(pair[1]) and f"{pair[0]}={pair[1]:g}: ratio outside [0, 1)",
        show_default=False,
    )  # fmt: skip
    round_to: int = option(1, "--round-to", help="Channel pruning: keep channel counts a multiple of N.",
                           panel=_SELECT, cli_type=int, check=at_least(1))  # fmt: skip
    min_channels: int = option(1, "--min-channels", help="Channel pruning: keep at least N channels per layer.",
                               panel=_SELECT, cli_type=int, check=at_least(1))  # fmt: skip
    compensate: str | None = option(
        None, "--compensate", help="bias: apply paper E's optimal bias shifts (biascomp scores).", panel=_SELECT,
        check=lambda v: None if v in (None, "bias") else f"unknown compensation {v!r}; choose from bias",
        show_default=False,
    )  # fmt: skip
    restore: str | None = option(None, "--restore", help="Channel pruning: training-free restoration afterwards "
                                 "(lbyl, …).", panel=_SELECT, show_default=False)  # fmt: skip
    reconstruct: str | None = option(
        None, "--reconstruct", help="obs: choose the mask jointly with second-order (OBS / SparseGPT) updates of "
        "the kept weights on --data (unstructured and N:M; -p damp, blocksize, samples).", panel=_SELECT,
        check=one_of("obs"), show_default=False,
    )  # fmt: skip
    heads: bool = option(
        False, "--heads", help="Channel pruning of attention: remove whole heads (num_heads shrinks, head_dim "
        "stays) instead of dimensions inside every head.", panel=_SELECT, cli_type=bool,
    )  # fmt: skip
    no_cache: bool = option(
        False, "--no-cache", help="Do not read or write the layer-table cache of third-party checkpoints (also: "
        "PRUNECLI_NO_CACHE=1).", cli_type=bool, record=False,
    )  # fmt: skip
    dry_run: bool = option(
        False, "--dry-run", help="Print the plan (per-layer widths or sparsities, params and MACs before/after) as "
        "the record and write nothing.", cli_type=bool, record=False,
    )  # fmt: skip
    target: tuple[str, str] | None = option(
        None, "--target", help="KIND=VALUE: prune to a budget instead of a ratio; KIND macs, params or latency, "
        "VALUE a fraction of the dense model's (macs=0.5) or an amount with a unit (macs=1.8G, params=6M).",
        panel=_SELECT, parse=parse_target, metavar="KIND=VALUE", show_default=False,
    )  # fmt: skip
    force: bool = force_option()

    @property
    def nm(self) -> tuple[int, int] | None:
        return nm_of(self.structure)

    @property
    def kind(self) -> str:
        """``unstructured``, ``nm`` or ``channel``: which pruning engine runs."""
        return "nm" if self.nm else self.structure

    @property
    def effective_ratio(self) -> float:
        """``--ratio``, or the ratio N:M implies, (M−N)/M."""
        if self.nm:
            n, m = self.nm
            return (m - n) / m
        if self.ratio is None:  # --target: the ratio is searched for; 0 until then
            return 0.0
        return float(self.ratio)

    def validate(self) -> None:
        if (self.scores is None) == (self.method is None):
            raise RequestError("give exactly one of --scores FILE and --method M", hint="e.g. --method magnitude")
        if self.target is not None:
            self._validate_target()
        elif self.nm:
            n, m = self.nm
            implied = (m - n) / m
            if self.ratio is not None and not math.isclose(self.ratio, implied):
                raise RequestError(f"--ratio {self.ratio:g} contradicts --structure {self.structure} "
                                   f"(removes {implied:g})", hint="omit --ratio with N:M")  # fmt: skip
        elif self.ratio is None:
            raise RequestError("--ratio is required", hint="e.g. --ratio 0.5")
        if self.compensate and self.kind == "channel":
            raise RequestError("--compensate bias applies to removed weights, not to removed channels",
                               hint="use it with --structure unstructured or N:M")  # fmt: skip
        if self.restore and self.kind != "channel":
            raise RequestError("--restore needs --structure channel", hint="restoration rebuilds removed channels")
        if self.layer_ratios and self.nm:
            raise RequestError("--layer-ratio does not apply to N:M sparsity", hint="--exclude layers instead")
        if self.reconstruct and self.kind == "channel":
            raise RequestError("--reconstruct obs applies to unstructured and N:M pruning",
                               hint="for channel pruning use --restore or prunecli restore")  # fmt: skip
        if self.reconstruct and self.compensate:
            raise RequestError("--reconstruct obs and --compensate bias both rewrite the kept weights",
                               hint="choose one")  # fmt: skip
        if self.heads and self.kind != "channel":
            raise RequestError("--heads needs --structure channel", hint="whole heads are removed as channels")

    def _validate_target(self) -> None:
        """``--target`` rules; refusals are InputErrors (exit 1), as issue 16 asks for every refused target."""
        assert self.target is not None
        kind, value = self.target
        target_amount(kind, value)  # a request built in Python is checked as the command line's
        if self.ratio is not None:
            raise InputError(f"--target {kind}={value} and --ratio are mutually exclusive",
                             hint="the ratio is what --target searches for; drop --ratio")  # fmt: skip
        if kind == "latency" and self.kind != "channel":
            raise InputError("--target latency needs --structure channel",
                             hint="masked (unstructured, N:M) weights run at dense speed")  # fmt: skip


# ----------------------------------------------------------------------------------------- restore

_RESTORE_METHODS_HELP = (
    "Restoration method. Channel-pruned checkpoints: lbyl (LBYL closed form, data-free), merge (Neuron Merging), "
    "lstsq (ridge refit of the consumers on --data), bn (BatchNorm re-estimation on --data). Masked (unstructured, "
    "N:M) checkpoints: obs (OBS/SparseGPT refit of the kept weights to the dense parent on --data, masks kept), bn. "
    "Join with + to chain (lbyl+bn, obs+bn). Default: lstsq+bn with --data (lstsq without BatchNorms), lbyl "
    "without; obs+bn (obs) for a masked checkpoint."
)


@dataclass(frozen=True, kw_only=True)
class RestoreRequest(ModelCommand):
    """``prunecli restore``: training-free restoration of a channel-pruned checkpoint."""

    output: str = output_option()
    method: str | None = option(None, "--method", "-m", help=_RESTORE_METHODS_HELP, show_default=False)
    dense: str | None = option(None, "--dense", help="The dense parent (default: the prune step's input in the "
                               "lineage; its sha256 must match).", show_default=False)  # fmt: skip
    data: str | None = data_option("Calibration data (split defaults to train): needed by lstsq/bn; adds "
                                   "per-layer reconstruction errors.")  # fmt: skip
    val: str | None = option(None, "--val", help="Evaluation data (split defaults to test): adds top-1 before "
                             "and after.", show_default=False)  # fmt: skip
    params: Mapping[str, str] = params_option(
        "Method (lbyl lambda1, lambda2, mode=math|compat; merge threshold, lambda, mode; lstsq ridge, samples; "
        "bn samples, scope=downstream|all, exact=true|false; obs damp, blocksize, refit=true|false, samples)"
    )
    force: bool = force_option()
    runtime: Runtime = piece(Runtime, batch_size=64)


# ----------------------------------------------------------------------------------------- finetune, finetune-lora

_TRAIN = "Training"
_WCR = "WCR (paper C)"
_LORA = "LoRA"


def _from_recipe(key: str) -> str:
    """Help text of an option whose default comes from the recipe: each recipe's value, from the registry."""
    from prunecli.recipes import RECIPES

    values = ", ".join(f"{name} {recipe.options()[key]}" for name, recipe in RECIPES.items())
    return f" Default: the recipe's ({values})."


def _recipe_help() -> str:
    from prunecli.recipes import RECIPES

    listed = "; ".join(f"{name}: {recipe.why}" for name, recipe in RECIPES.items())
    return (
        "Where the training defaults come from. auto: scratch for a fresh arch: model, finetune for a trained "
        f"checkpoint (lora / lora-paper for finetune-lora). {listed}."
    )


def _recipe_names() -> tuple[str, ...]:
    from prunecli.recipes import RECIPES

    return ("auto", *RECIPES.names(with_aliases=True))


@dataclass(frozen=True, kw_only=True)
class Training(Request):
    """The training loop's options, shared by ``finetune`` and ``finetune-lora``.

    Optimizer, learning rate, schedule, warm-up and augmentation default to None: the recipe
    (:mod:`prunecli.recipes`) fills them in by what the run starts from, and the record says which.
    """

    recipe: str = option("auto", "--recipe", help=_recipe_help(), panel=_TRAIN, check=one_of(*_recipe_names()))
    epochs: int = option(10, "--epochs", help="Passes over the training data.", panel=_TRAIN, cli_type=int,
                         check=at_least(1))  # fmt: skip
    optimizer: str | None = option(None, "--optimizer", "--opt", help="adam, adamw or sgd (with --momentum)."
                                   + _from_recipe("optimizer"), panel=_TRAIN, show_default=False)  # fmt: skip
    lr: float | None = option(None, "--lr", help="Peak learning rate." + _from_recipe("lr"), panel=_TRAIN,
                              cli_type=float, check=at_least(0), show_default=False)  # fmt: skip
    weight_decay: float = option(0.0, "--weight-decay", "--wd", help="Weight decay on conv/linear weights.",
                                 panel=_TRAIN, cli_type=float, check=at_least(0))  # fmt: skip
    momentum: float = option(0.9, "--momentum", help="SGD momentum.", panel=_TRAIN, cli_type=float,
                             check=at_least(0))  # fmt: skip
    schedule: str | None = option(None, "--schedule", help="LR schedule per step after the warm-up: cosine, step "
                                  "(÷10 at 1/3, 2/3) or none." + _from_recipe("schedule"), panel=_TRAIN,
                                  show_default=False)  # fmt: skip
    warmup: float | None = option(
        None, "--warmup", help="Fraction of the optimizer steps spent warming the LR up linearly, in [0, 1)."
        + _from_recipe("warmup"), panel=_TRAIN, cli_type=float,
        check=lambda v: None if v is None or 0 <= v < 1 else f"{v!r} is outside [0, 1)", show_default=False,
    )  # fmt: skip
    augment: str | None = option(
        None, "--augment", help="Training augmentation: timm (timm's training transform from the checkpoint's data "
        "config: random resized crop, flip, colour jitter, its interpolation/mean/std), crop-flip or its alias cifar "
        "(random crop with padding 4 + flip, paper A), crop (no flip), or none. Inputs of 64 px or more "
        "(ImageNet-style) default to timm; smaller ones to the recipe's CIFAR-style choice"
        + _from_recipe("augment").removeprefix(" Default: the recipe's"), panel=_TRAIN,
        show_default=False,
    )  # fmt: skip
    label_smoothing: float = option(
        0.0, "--label-smoothing", help="Cross-entropy label smoothing, in [0, 1).", panel=_TRAIN, cli_type=float,
        check=lambda v: None if 0 <= v < 1 else f"{v!r} is outside [0, 1)",
    )  # fmt: skip
    clip_grad: float | None = option(None, "--clip-grad", help="Clip the gradient L2 norm to this value.",
                                     panel=_TRAIN, cli_type=float, check=at_least(0))  # fmt: skip
    amp: bool = option(False, "--amp/--no-amp", help="Same as --precision bf16 on CUDA (fp16 without bf16 "
                       "support); ignored on CPU and when --precision is set.", panel=_TRAIN,
                       cli_type=bool)  # fmt: skip
    max_steps: int | None = option(None, "--max-steps", help="Stop after this many optimizer steps.", panel=_TRAIN,
                                   cli_type=int, check=at_least(1))  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Wcr(Request):
    """Paper C's Weight Concentration Regularizer."""

    wcr: float = option(0.0, "--wcr", help="λ of the Weight Concentration Regularizer Σ 1/(Var|w|+δ) (0 = off; "
                        "CNNs: 1e-5).", panel=_WCR, cli_type=float, check=at_least(0))  # fmt: skip
    wcr_eps: float = option(1e-8, "--wcr-eps", help="ε in |w| ≈ sqrt(w²+ε).", panel=_WCR, cli_type=float,
                            check=at_least(0))  # fmt: skip
    wcr_delta: float = option(1e-8, "--wcr-delta", help="δ added to each layer's variance.", panel=_WCR,
                              cli_type=float, check=at_least(0))  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TrainingCommand(ModelCommand):
    """What ``finetune`` and ``finetune-lora`` share: training data, validation data, the loop and WCR."""

    output: str = output_option()
    data: str = option("digits:train", "--data", help="Training data spec (split defaults to train); see --data of "
                       "eval.")  # fmt: skip
    val: str | None = option(None, "--val", help="Validation data spec (split defaults to test): finetune evaluates "
                             "it after every epoch, finetune-lora before and after (the recovery report).",
                             show_default=False)  # fmt: skip
    force: bool = force_option()
    training: Training = piece(Training)
    wcr: Wcr = piece(Wcr)


@dataclass(frozen=True, kw_only=True)
class FinetuneRequest(TrainingCommand):
    """``prunecli finetune``: full fine-tuning, or training from scratch from ``arch:NAME``."""

    runtime: Runtime = piece(Runtime, batch_size=64)


@dataclass(frozen=True, kw_only=True)
class LoraOptions(Request):
    """Which layers get adapters, their shape, and how they are merged."""

    rank: int = option(8, "--rank", "-r", help="Adapter rank r.", panel=_LORA, cli_type=int, check=at_least(1))
    alpha: float = option(16.0, "--alpha", help="LoRA α; the update is (α/r)·B A.", panel=_LORA, cli_type=float)
    dropout: float = option(0.0, "--dropout", help="Dropout on the adapter input.", panel=_LORA, cli_type=float,
                            check=lambda v: None if 0 <= v < 1 else f"{v!r} is outside [0, 1)")  # fmt: skip
    linear: bool = option(True, "--linear/--no-linear", help="--no-linear adapts only --targets (the same as "
                          "--target-preset none).", panel=_LORA, cli_type=bool)  # fmt: skip
    target_preset: str = option(
        "auto", "--target-preset", help="Layers adapted besides --targets: auto (every Linear layer, plus the pruned "
        "layers when some pruned layer is not Linear, e.g. a pruned CNN's convs), linear (paper A: every Linear "
        "layer), pruned, linear+pruned, or none.", panel=_LORA,
    )  # fmt: skip
    targets: tuple[str, ...] = option((), "--targets", "-t", help="Also adapt modules matching this glob "
                                      "(repeatable), e.g. 'features.*.conv'.", panel=_LORA, multiple=True,
                                      show_default=False)  # fmt: skip
    exclude: tuple[str, ...] = option((), "--exclude", help="Never adapt modules matching this glob (repeatable).",
                                      panel=_LORA, multiple=True, show_default=False)  # fmt: skip
    dora: bool = option(False, "--dora", help="Weight-decomposed LoRA (DoRA).", panel=_LORA, cli_type=bool)
    bn: str = option("train", "--bn", help="BatchNorm while training: train (statistics update) or eval (frozen).",
                     panel=_LORA)  # fmt: skip
    merge: str = option(
        "masked", "--merge", help="masked: merge and re-apply the pruning masks (sparsity kept); dense: merge; "
        "none: keep the adapter beside the weights in peft's format (OUT.adapter/).", panel=_LORA,
    )  # fmt: skip
    masked_update: bool | None = option(
        None, "--masked-update/--no-masked-update", help="Train masked layers through their pruning mask, "
        "(W + (α/r)·B A) ⊙ M, so the merged checkpoint is exactly the trained model. Default: on with --merge "
        "masked; --no-masked-update trains paper A's plain W + (α/r)·B A.", panel=_LORA, cli_type=bool,
        show_default=False,
    )  # fmt: skip

    def validate(self) -> None:
        if self.masked_update and self.merge != "masked":
            raise RequestError(f"--masked-update needs --merge masked (got --merge {self.merge})",
                               hint="--merge dense and none keep the whole update; drop --masked-update")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class FinetuneLoraRequest(TrainingCommand):
    """``prunecli finetune-lora``: LoRA recovery of a pruned checkpoint that keeps its sparsity (paper A)."""

    lora: LoraOptions = piece(LoraOptions)

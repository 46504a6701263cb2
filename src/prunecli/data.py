"""Data specs (README.md, Subcommands): a registry of named sources, each yielding (image tensor, label).

``digits[:train|test]`` is scikit-learn's bundled UCI digits (no download), rendered as 32×32 RGB
images with a fixed stratified 80/20 split; ``imagefolder:PATH``; ``cifar10:``, ``cifar100:``,
``mnist:``, ``fashionmnist:`` in torchvision's on-disk formats (never downloaded);
``synthetic[:N]`` random tensors for timing. Eval transforms come from the checkpoint's
``pretrained_cfg`` through timm's data config, with ``--input-size/--mean/--std`` overrides.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from prunecli.errors import DataError
from prunecli.registry import Registry

__all__ = [
    "AUGMENTATIONS",
    "DATA_SOURCES",
    "DataSpec",
    "LoadedData",
    "augmentation_name",
    "build_dataset",
    "check_num_classes",
    "data_config",
    "eval_transform",
    "load_data",
    "make_loader",
    "parse_data_spec",
    "train_transform",
]

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: source name, optional path/count argument, optional split."""

    name: str
    arg: str | None
    split: str | None

    def __str__(self) -> str:
        return ":".join(p for p in (self.name, self.arg, self.split) if p)


@dataclass
class LoadedData:
    """A dataset ready for a DataLoader, with its class count."""

    dataset: Dataset
    num_classes: int
    spec: DataSpec
    split: str | None
    targets: list[int] | None = None  # labels in index order, for class-balanced sampling


SourceFn = Callable[[DataSpec, str, Callable[[Any], torch.Tensor], dict[str, Any]], LoadedData]
DATA_SOURCES: Registry[SourceFn] = Registry("data source")


def parse_data_spec(spec: str) -> DataSpec:
    """Parses ``name[:arg][:split]``; raises :class:`DataError` for unknown names."""
    if not spec:
        raise DataError("empty data spec", hint=f"choose from {', '.join(DATA_SOURCES.names())}")
    name, _, rest = spec.partition(":")
    if name not in DATA_SOURCES:
        raise DataError(
            f"unknown data spec {spec!r}",
            hint=f"choose from {', '.join(s + ':…' for s in DATA_SOURCES.names())}",
        )
    arg, split = rest or None, None
    if arg and arg in SPLITS:
        arg, split = None, arg
    elif arg and ":" in arg and arg.rsplit(":", 1)[1] in SPLITS:
        arg, split = arg.rsplit(":", 1)
    return DataSpec(name, arg, split)


def data_config(
    pretrained_cfg: dict[str, Any],
    *,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """timm's data config for a checkpoint, with the user's overrides applied."""
    from timm.data import resolve_data_config

    args: dict[str, Any] = {}
    if input_size:
        size = tuple(int(s) for s in input_size)
        if len(size) == 1:
            chans = (pretrained_cfg.get("input_size") or (3,))[0]
            size = (chans, size[0], size[0])
        elif len(size) == 2:
            size = ((pretrained_cfg.get("input_size") or (3,))[0], *size)
        args["input_size"] = size
    if mean:
        args["mean"] = tuple(mean)
    if std:
        args["std"] = tuple(std)
    cfg = resolve_data_config(args, pretrained_cfg=dict(pretrained_cfg))
    return cfg


class _ToMode:
    """Converts a PIL image to the channel mode the model expects (picklable for workers)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Any) -> Any:
        return img.convert(self.mode) if getattr(img, "mode", self.mode) != self.mode else img


def _mode(cfg: dict[str, Any]) -> str:
    return "L" if cfg["input_size"][0] == 1 else "RGB"


def eval_transform(cfg: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    """timm's eval transform (resize, center crop, normalise) for ``cfg``."""
    from timm.data import create_transform
    from torchvision import transforms as T

    tf = create_transform(
        input_size=cfg["input_size"],
        interpolation=cfg.get("interpolation", "bilinear"),
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=cfg.get("crop_pct"),
        crop_mode=cfg.get("crop_mode", "center"),
        is_training=False,
    )
    return T.Compose([_ToMode(_mode(cfg)), tf])


AUGMENTATIONS: dict[str, tuple[bool, bool]] = {
    # name: (random crop with padding 4, horizontal flip)
    "crop-flip": (True, True),  # paper A (CIFAR-style), the from-scratch recipe
    "crop": (True, False),  # fine-tuning: a flip the network was not trained with is a distribution shift
    "none": (False, False),
}


def augmentation_name(augment: bool | str) -> str:
    """``True`` → ``crop-flip`` (paper A), ``False`` → ``none``; names are checked against :data:`AUGMENTATIONS`."""
    if isinstance(augment, bool):
        return "crop-flip" if augment else "none"
    if augment not in AUGMENTATIONS:
        raise DataError(f"unknown augmentation {augment!r}; choose from {', '.join(AUGMENTATIONS)}")
    return augment


def train_transform(cfg: dict[str, Any], *, augment: bool | str = True) -> Callable[[Any], torch.Tensor]:
    """Training transform: paper A's random crop with padding 4 and horizontal flip, or a lighter variant.

    ``augment`` is a name in :data:`AUGMENTATIONS` (or True = ``crop-flip``, False = ``none``). Images
    are first resized to the model's input size, so the augmentation works the same on digits' 32×32
    images and on larger image folders.
    """
    from torchvision import transforms as T

    crop, flip = AUGMENTATIONS[augmentation_name(augment)]
    if not crop and not flip:
        return eval_transform(cfg)
    _, h, w = cfg["input_size"]
    steps: list[Any] = [_ToMode(_mode(cfg)), T.Resize((h, w))]
    if crop:
        steps.append(T.RandomCrop((h, w), padding=4))
    if flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])


class _ImageList(Dataset):
    def __init__(self, images: Sequence[Any], labels: Sequence[int], transform: Callable[[Any], torch.Tensor]) -> None:
        self.images, self.labels, self.transform = images, list(labels), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), self.labels[i]


@functools.lru_cache(maxsize=1)
def _digits() -> dict[str, tuple[list[Any], list[int]]]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataError(
            "the digits data needs scikit-learn", hint="pip install 'prunecli[demo]' (or scikit-learn)"
        ) from None
    import numpy as np
    from PIL import Image

    bunch = load_digits()
    images = [
        Image.fromarray(np.round(img * (255.0 / 16.0)).astype(np.uint8), mode="L")
        .resize((32, 32), Image.Resampling.BILINEAR)
        .convert("RGB")
        for img in bunch.images
    ]
    idx = np.arange(len(images))
    tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=bunch.target)
    pick = lambda ids: ([images[i] for i in sorted(ids)], [int(bunch.target[i]) for i in sorted(ids)])  # noqa: E731
    return {"train": pick(tr), "test": pick(te)}


@DATA_SOURCES.register("digits")
def _digits_source(spec: DataSpec, split: str, tf: Callable[[Any], torch.Tensor], _: dict[str, Any]) -> LoadedData:
    if spec.arg:
        raise DataError(f"digits takes no path ({spec}); use digits, digits:train or digits:test")
    images, labels = _digits()[split]
    return LoadedData(_ImageList(images, labels, tf), 10, spec, split, labels)


@DATA_SOURCES.register("imagefolder")
def _imagefolder(spec: DataSpec, split: str, tf: Callable[[Any], torch.Tensor], _: dict[str, Any]) -> LoadedData:
    from torchvision.datasets import ImageFolder

    if not spec.arg:
        raise DataError("imagefolder needs a path: imagefolder:PATH")
    root = Path(spec.arg).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder: {root} is not a directory")
    try:
        ds = ImageFolder(str(root), transform=tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"imagefolder: {root} holds no images ({str(exc).splitlines()[0][:120]})") from None
    if len(ds) == 0:
        raise DataError(f"imagefolder: {root} holds no images")
    return LoadedData(ds, len(ds.classes), spec, None, list(ds.targets))


def _torchvision(cls_name: str, num_classes: int) -> SourceFn:
    def source(spec: DataSpec, split: str, tf: Callable[[Any], torch.Tensor], _: dict[str, Any]) -> LoadedData:
        import torchvision.datasets as tvd

        if not spec.arg:
            raise DataError(f"{spec.name} needs the folder that holds it: {spec.name}:PATH[:train|test]")
        try:
            ds = getattr(tvd, cls_name)(spec.arg, train=(split == "train"), transform=tf, download=False)
        except (RuntimeError, FileNotFoundError, OSError) as exc:
            raise DataError(
                f"{spec.name}: not found under {spec.arg} ({str(exc).splitlines()[0][:120]})",
                hint="prunecli never downloads data; put torchvision's files there first",
            ) from None
        targets = [int(t) for t in getattr(ds, "targets", [])]
        return LoadedData(ds, num_classes, spec, split, targets or None)

    return source


for _name, _cls, _n in (
    ("cifar10", "CIFAR10", 10),
    ("cifar100", "CIFAR100", 100),
    ("mnist", "MNIST", 10),
    ("fashionmnist", "FashionMNIST", 10),
):
    DATA_SOURCES.add(_name, _torchvision(_cls, _n))


class _Synthetic(Dataset):
    def __init__(self, n: int, input_size: Sequence[int], num_classes: int, seed: int) -> None:
        self.n, self.size, self.num_classes, self.seed = n, tuple(input_size), num_classes, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(self.size, generator=g), int(torch.randint(self.num_classes, (1,), generator=g))


@DATA_SOURCES.register("synthetic")
def _synthetic(spec: DataSpec, split: str, _: Callable[[Any], torch.Tensor], ctx: dict[str, Any]) -> LoadedData:
    try:
        n = int(spec.arg) if spec.arg else 256
    except ValueError:
        raise DataError(f"synthetic[:N] takes a sample count, got {spec.arg!r}") from None
    if n <= 0:
        raise DataError(f"synthetic needs a positive sample count, got {n}")
    k = int(ctx.get("num_classes") or 10)
    ds = _Synthetic(n, ctx["cfg"]["input_size"], k, 0 if split == "train" else 1)
    return LoadedData(ds, k, spec, split)


def build_dataset(
    spec: str,
    cfg: dict[str, Any],
    *,
    default_split: str = "test",
    train: bool = False,
    augment: bool | str = True,
    num_classes: int | None = None,
) -> LoadedData:
    """Builds the dataset of ``spec`` with eval (or training) transforms for ``cfg``.

    Args:
        spec: the ``--data`` value.
        cfg: timm data config (:func:`data_config`).
        default_split: split used when the spec names none (eval: test, training: train).
        train: use the training transform instead of the eval transform.
        augment: with ``train``, the augmentation: a name in :data:`AUGMENTATIONS`, True (paper A's
            crop + flip) or False.
        num_classes: the model's class count (``synthetic`` draws labels in this range).
    """
    parsed = parse_data_spec(spec)
    split = parsed.split or default_split
    tf = train_transform(cfg, augment=augment) if train else eval_transform(cfg)
    return DATA_SOURCES.get(parsed.name)(parsed, split, tf, {"cfg": cfg, "num_classes": num_classes})


def check_num_classes(data: LoadedData, model_classes: int | None) -> None:
    """Refuses data whose labels the model's head cannot produce."""
    if model_classes and data.num_classes != model_classes:
        raise DataError(
            f"data {data.spec} has {data.num_classes} classes but the model's head has {model_classes}",
            hint="use matching data, or a checkpoint trained for these classes (finetune from arch:NAME "
            "with --num-classes)",
        )


def load_data(
    spec: str,
    loaded: Any,
    opts: Any = None,
    *,
    default_split: str = "test",
    train: bool = False,
    augment: bool = True,
):
    """Builds ``spec`` with the checkpoint's transforms (``opts`` overrides them); refuses a class-count mismatch.

    ``loaded`` is a :class:`prunecli.checkpoint.loaders.Loaded` (its manifest's pretrained_cfg and its
    model's head width are read).
    """
    from prunecli.requests import Transforms

    opts = opts or Transforms()
    cfg = data_config(loaded.manifest.pretrained_cfg, input_size=opts.input_size, mean=opts.mean, std=opts.std)
    data = build_dataset(
        spec,
        cfg,
        default_split=default_split,
        train=train,
        augment=augment,
        num_classes=loaded.manifest.num_classes,
    )
    check_num_classes(data, _head_classes(loaded.model) or loaded.manifest.num_classes)
    return data, cfg


def _head_classes(model: Any) -> int | None:
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def make_loader(
    data: LoadedData,
    *,
    batch_size: int,
    workers: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    sampler: Any = None,
) -> DataLoader:
    """A deterministic DataLoader (seeded shuffling, fixed worker seeds)."""
    if batch_size <= 0:
        raise DataError(f"--batch-size must be positive, got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        data.dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        generator=g,
        drop_last=drop_last,
        persistent_workers=False,
    )

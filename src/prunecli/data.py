"""Data specs (README.md, Subcommands): a registry of named sources, each yielding (image tensor, label).

``digits[:train|test]`` is scikit-learn's bundled UCI digits (no download), rendered as 32×32 RGB
images with a fixed stratified 80/20 split; ``imagefolder:PATH``; ``cifar10:``, ``cifar100:``,
``mnist:``, ``fashionmnist:`` in torchvision's on-disk formats (never downloaded);
``synthetic[:N]`` random tensors for timing. Eval transforms come from the checkpoint's
``pretrained_cfg`` through timm's data config, with ``--input-size/--mean/--std`` overrides.
"""

from __future__ import annotations

import functools
import os
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
    "AUGMENTATION_CHOICES",
    "DATA_SOURCES",
    "BatchNormalizer",
    "DataSpec",
    "LoadedData",
    "augmentation_name",
    "build_dataset",
    "check_num_classes",
    "data_config",
    "default_workers",
    "eval_transform",
    "load_data",
    "loader_info",
    "make_loader",
    "parse_data_spec",
    "resolve_augment",
    "resolve_workers",
    "train_transform",
    "usable_cpus",
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
    # (mean, std) when the transform stops at uint8 images: make_loader normalises each batch (BatchNormalizer)
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None


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


def eval_transform(cfg: dict[str, Any], *, normalize: bool = True) -> Callable[[Any], torch.Tensor]:
    """timm's eval transform (resize, center crop, normalise) for ``cfg``.

    ``normalize=False`` stops at the resized, cropped image as a uint8 tensor. The loaders of ``eval``,
    ``score``, ``restore`` and the calibration passes use that, and :class:`BatchNormalizer` converts
    and normalises whole batches in the model's process, as timm's prefetching loader does. The workers
    then decode and crop only, and send a quarter of the bytes. That matters on a small machine, where
    every millisecond a worker spends on a core stalls the model's threads. On a GPU the conversion runs
    on the device. The values are the same bits either way: the same float32 operations (÷255, −mean,
    ÷std) applied in the same order.
    """
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
        use_prefetcher=not normalize,  # timm's split: the transform stops at uint8, normalisation follows the batch
    )
    return T.Compose([_ToMode(_mode(cfg)), tf])


class BatchNormalizer:
    """Iterates a DataLoader and converts uint8 image batches to normalised float32 ones.

    ``torchvision``'s ``ToTensor`` + ``Normalize`` applied to a batch: ``x.float() / 255``, then
    ``(x - mean) / std`` per channel, on ``device``. Float batches (synthetic data, training transforms)
    pass through unchanged. Everything else (``len``, ``num_workers``, ``pin_memory``, ``sampler``) is
    the wrapped loader's.
    """

    def __init__(
        self, loader: DataLoader, mean: Sequence[float], std: Sequence[float], device: torch.device | str | None
    ) -> None:
        self.loader = loader
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Any:
        for x, *rest in self.loader:
            if x.dtype == torch.uint8:
                x = x.to(self.device, non_blocking=True).float().div_(255).sub_(self.mean).div_(self.std)
            yield (x, *rest)


AugmentFn = Callable[[dict[str, Any]], Callable[[Any], torch.Tensor]]
AUGMENTATIONS: Registry[AugmentFn] = Registry("augmentation")
TIMM_AUGMENT_MIN_PX = 64  # inputs at least this large are ImageNet-style: timm's transform; smaller: CIFAR-style


def _padded_crop(cfg: dict[str, Any], *, flip: bool) -> Callable[[Any], torch.Tensor]:
    """Paper A's CIFAR-style augmentation: resize to the input size, random crop with padding 4, [flip]."""
    from torchvision import transforms as T

    _, h, w = cfg["input_size"]
    steps: list[Any] = [_ToMode(_mode(cfg)), T.Resize((h, w)), T.RandomCrop((h, w), padding=4)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])


@AUGMENTATIONS.register("timm")
def _timm_augment(cfg: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    """timm's own training transform for the data config: random resized crop (scale 0.08–1), horizontal
    flip, colour jitter 0.4, then the config's interpolation, mean and std (``create_transform(is_training=True)``
    with timm's defaults, as timm's ``train.py`` builds it)."""
    from timm.data import create_transform
    from torchvision import transforms as T

    tf = create_transform(
        input_size=cfg["input_size"],
        is_training=True,
        interpolation=cfg.get("interpolation", "bilinear"),
        mean=cfg["mean"],
        std=cfg["std"],
    )
    return T.Compose([_ToMode(_mode(cfg)), tf])


@AUGMENTATIONS.register("crop-flip", aliases=("cifar",))
def _crop_flip(cfg: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    """Paper A (CIFAR-style), the from-scratch recipe on small inputs: random crop (padding 4) + flip."""
    return _padded_crop(cfg, flip=True)


@AUGMENTATIONS.register("crop")
def _crop(cfg: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    """Fine-tuning on small inputs: a flip the network was not trained with (digits) is a distribution shift."""
    return _padded_crop(cfg, flip=False)


@AUGMENTATIONS.register("none")
def _no_augment(cfg: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    """The eval transform (deterministic)."""
    return eval_transform(cfg)


def augmentation_name(augment: bool | str) -> str:
    """``True`` → ``crop-flip`` (paper A), ``False`` → ``none``; names (and ``cifar``) → the canonical name."""
    if isinstance(augment, bool):
        return "crop-flip" if augment else "none"
    if augment not in AUGMENTATIONS:
        raise DataError(f"unknown augmentation {augment!r}; choose from {', '.join(AUGMENTATION_CHOICES)}")
    return AUGMENTATIONS.canonical(augment)


AUGMENTATION_CHOICES = ("timm", "crop-flip", "cifar", "crop", "none")


def resolve_augment(augment: bool | str, cfg: dict[str, Any], *, explicit: bool) -> tuple[str, str]:
    """The augmentation a training run uses, and why.

    An explicit ``--augment`` is used as given. Otherwise the recipe's choice holds for small inputs
    (below :data:`TIMM_AUGMENT_MIN_PX` on the shorter side: paper A's CIFAR-style crop[-flip]), and
    ImageNet-style inputs get ``timm``: a checkpoint trained on 224-px images was trained with random
    resized crops, which a padding-4 crop of the whole image does not resemble.
    """
    name = augmentation_name(augment)
    if explicit:
        return name, "requested"
    side = min(int(s) for s in cfg["input_size"][1:])
    if side >= TIMM_AUGMENT_MIN_PX and name != "none":
        return "timm", f"input {side} px >= {TIMM_AUGMENT_MIN_PX}: ImageNet-style, timm's training transform"
    return name, f"input {side} px < {TIMM_AUGMENT_MIN_PX}: the recipe's CIFAR-style augmentation"


def train_transform(cfg: dict[str, Any], *, augment: bool | str = True) -> Callable[[Any], torch.Tensor]:
    """The training transform of augmentation ``augment`` (a name in :data:`AUGMENTATIONS`, ``cifar``, or
    True = ``crop-flip``, False = ``none``) for data config ``cfg``.

    The CIFAR-style augmentations first resize images to the model's input size, so they work the same
    on digits' 32×32 images and on larger image folders; ``timm`` crops a random region and resizes it.
    """
    return AUGMENTATIONS.get(augmentation_name(augment))(cfg)


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
    tf = train_transform(cfg, augment=augment) if train else eval_transform(cfg, normalize=False)
    data = DATA_SOURCES.get(parsed.name)(parsed, split, tf, {"cfg": cfg, "num_classes": num_classes})
    if not train:
        data.normalize = (tuple(cfg["mean"]), tuple(cfg["std"]))
    return data


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


MAX_DEFAULT_WORKERS = 8  # past this, one process's JPEG decoding outruns what one model consumes (timm's recipes)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS/Windows have no affinity mask
        return os.cpu_count() or 1


def default_workers(cpus: int | None = None, local_processes: int | None = None) -> int:
    """The worker count of ``--workers`` left unset: ``min(8, usable CPUs ÷ processes on this node)``.

    Decoding runs in worker processes so the model's process never waits on JPEGs (timm's ``train.py``
    and ``validate.py`` use 4 workers by default, whatever the machine; this rule uses what the machine
    has, up to 8). Under torchrun the node's CPUs are shared by its ``LOCAL_WORLD_SIZE`` processes.
    Fewer than 2 CPUs per process gives 0: a single worker on a single core only adds a copy.
    """
    cpus = usable_cpus() if cpus is None else cpus
    local = local_processes if local_processes is not None else int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    per_process = cpus // max(local, 1)
    return min(MAX_DEFAULT_WORKERS, per_process) if per_process >= 2 else 0


def resolve_workers(workers: int | None, batches: int | None = None) -> int:
    """``workers`` as given, or :func:`default_workers` (never more workers than the loader has batches)."""
    if workers is not None:
        if workers < 0:
            raise DataError(f"--workers must be >= 0, got {workers}")
        return int(workers)
    n = default_workers()
    return min(n, batches) if batches is not None else n


def _seed_worker(worker_id: int) -> None:
    """Seeds python's and numpy's RNGs in a worker from the seed torch gave it.

    torch derives each worker's seed from the loader's seeded generator (base seed + worker id), so a
    transform that draws from ``random``/``numpy``/``torch`` draws the same numbers on every run with
    the same ``--seed`` and worker count; batch order is the sampler's, whatever the worker count.
    """
    import random

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is a dependency; seeding must never be the thing that fails
        pass


def make_loader(
    data: LoadedData,
    *,
    batch_size: int,
    workers: int | None = 0,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    sampler: Any = None,
    device: torch.device | str | None = None,
) -> DataLoader | BatchNormalizer:
    """A deterministic DataLoader set up like timm's ``create_loader``.

    Seeded shuffling and seeded workers (:func:`_seed_worker`); ``workers=None`` picks
    :func:`default_workers` (capped at the number of batches); with workers, they persist across
    epochs (one pool per command, not one per epoch); on CUDA, batches come in pinned memory so the
    copy to the GPU can be ``non_blocking``. Data built with the uint8 eval transform (``normalize=False``,
    ``data.normalize`` set) comes back normalised on ``device`` by a :class:`BatchNormalizer`.
    Build it once per command and iterate it every epoch.
    """
    if batch_size <= 0:
        raise DataError(f"--batch-size must be positive, got {batch_size}")
    n = len(sampler) if sampler is not None else len(data.dataset)  # type: ignore[arg-type]
    batches = (n // batch_size) if drop_last else -(-n // batch_size)
    workers = resolve_workers(workers, max(batches, 1))
    cuda = torch.device(device).type == "cuda" if device is not None else False
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        data.dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        generator=g,
        drop_last=drop_last,
        pin_memory=cuda,
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker if workers > 0 else None,
    )
    if data.normalize is None:
        return loader
    return BatchNormalizer(loader, *data.normalize, device=device)


def loader_info(loader: DataLoader | BatchNormalizer) -> dict[str, Any]:
    """What the record says about a loader: worker count and pinned memory."""
    return {"workers": int(loader.num_workers), "pin_memory": bool(loader.pin_memory)}

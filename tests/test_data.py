"""Data specs (README "Subcommands"): parsing, the embedded digits split, image folders, torchvision formats on disk,
synthetic data, transforms from the pretrained config, deterministic loaders."""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prunecli.data import (
    DATA_SOURCES,
    DataSpec,
    build_dataset,
    check_num_classes,
    data_config,
    eval_transform,
    make_loader,
    parse_data_spec,
    train_transform,
)
from prunecli.errors import DataError

CFG_RGB = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 1.0,
           "interpolation": "bilinear", "crop_mode": "center"}  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("digits", DataSpec("digits", None, None)),
        ("digits:train", DataSpec("digits", None, "train")),
        ("imagefolder:/data/val", DataSpec("imagefolder", "/data/val", None)),
        ("cifar10:/data/c10:test", DataSpec("cifar10", "/data/c10", "test")),
        ("mnist:/data", DataSpec("mnist", "/data", None)),
        ("synthetic:16", DataSpec("synthetic", "16", None)),
        ("synthetic", DataSpec("synthetic", None, None)),
    ],
)
def test_parse_data_spec(spec: str, parsed: DataSpec) -> None:
    assert parse_data_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["", "nosuch", "nosuch:x", "Digits"])
def test_unknown_specs(spec: str) -> None:
    with pytest.raises(DataError) as info:
        parse_data_spec(spec)
    assert info.value.hint and "digits" in info.value.hint


def test_registry_lists_all_sources() -> None:
    assert DATA_SOURCES.names() == sorted(
        ["cifar10", "cifar100", "digits", "fashionmnist", "imagefolder", "mnist", "synthetic"]
    )


def test_digits_split_is_fixed_stratified_and_complete() -> None:
    from sklearn.datasets import load_digits

    full = load_digits()
    train = build_dataset("digits:train", CFG_RGB)
    test = build_dataset("digits", CFG_RGB)  # eval default split: test
    assert (len(train.dataset), len(test.dataset)) == (1437, 360)
    assert train.num_classes == test.num_classes == 10 and test.split == "test"
    assert Counter(train.targets) + Counter(test.targets) == Counter(full.target.tolist())
    for c, n in Counter(full.target.tolist()).items():  # stratified: each class ~20 % in test
        assert abs(Counter(test.targets)[c] - 0.2 * n) <= 1
    x, y = test.dataset[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and isinstance(y, int)  # the loader normalises
    (xb, _), *_ = list(make_loader(test, batch_size=8))
    assert xb.dtype == torch.float32 and float(xb.min()) >= -1.0 and float(xb.max()) <= 1.0  # mean = std = 0.5
    assert torch.equal(xb[0], x.float() / 255 * 2 - 1)  # ÷255, −0.5, ÷0.5: exact in float32 (powers of two)
    # the split is a pure function of the data: the same images in the same order each time
    again = build_dataset("digits:test", CFG_RGB)
    assert torch.equal(again.dataset[5][0], test.dataset[5][0]) and again.targets == test.targets


def test_digits_images_are_the_uci_digits() -> None:
    """Each image is sklearn's 8×8 digit scaled to 0..255 and resized: check one independently."""
    from sklearn.datasets import load_digits

    full = load_digits()
    test = build_dataset("digits:test", CFG_RGB)
    x, y = test.dataset[0]
    gray = x[0].numpy() / 255.0  # uint8 before the loader normalises (channels are equal)
    assert np.allclose(x[0].numpy(), x[1].numpy()) and np.allclose(x[1].numpy(), x[2].numpy())
    small = np.asarray(Image.fromarray((gray * 255).round().astype(np.uint8)).resize((8, 8), Image.Resampling.BOX))
    dists = [np.abs(small.astype(float) - img * 255 / 16).mean() for img in full.images]
    assert full.target[int(np.argmin(dists))] == y


def _write_images(root: Path, classes: int, per_class: int, mode: str = "RGB") -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"k{c}").mkdir(parents=True)
        for i in range(per_class):
            shape = (20 + i, 24) if mode == "L" else (20 + i, 24, 3)
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(root / f"k{c}" / f"{i}.png")


def test_imagefolder_and_eval_transform(tmp_path: Path) -> None:
    from torchvision import transforms as T

    _write_images(tmp_path / "imgs", 3, 2)
    cfg = data_config({**CFG_RGB, "crop_pct": 0.875}, input_size=(16,))
    data = build_dataset(f"imagefolder:{tmp_path / 'imgs'}", cfg)
    assert data.num_classes == 3 and len(data.dataset) == 6 and data.targets == [0, 0, 1, 1, 2, 2]
    crop = T.Compose([T.Resize(int(16 / 0.875)), T.CenterCrop(16)])
    hand = T.Compose([crop, T.ToTensor(), T.Normalize(CFG_RGB["mean"], CFG_RGB["std"])])
    imgs = [Image.open(p).convert("RGB") for p in sorted((tmp_path / "imgs").glob("k*/*.png"))]
    # the workers' part stops at the cropped uint8 image (timm's prefetcher split) ...
    assert torch.equal(data.dataset[3][0], T.PILToTensor()(crop(imgs[3])))
    # ... and the loader's batches are torchvision's ToTensor + Normalize of each image: the same float32
    # operations in the same order, so the same bits, with and without workers
    for workers in (0, 2):
        (x, y), *_ = list(make_loader(data, batch_size=6, workers=workers))
        assert x.dtype == torch.float32 and y.tolist() == data.targets
        assert torch.equal(x, torch.stack([hand(img) for img in imgs]))
    assert torch.equal(eval_transform(cfg)(imgs[3]), hand(imgs[3]))


def test_grayscale_model_gets_one_channel(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 2, 1, mode="RGB")
    cfg = data_config({**CFG_RGB, "input_size": (1, 8, 8), "mean": (0.5,), "std": (0.5,)})
    x, _ = build_dataset(f"imagefolder:{tmp_path / 'imgs'}", cfg).dataset[0]
    assert x.shape == (1, 8, 8)
    x, _ = build_dataset("digits:test", cfg).dataset[0]
    assert x.shape == (1, 8, 8)


def test_data_config_overrides() -> None:
    base = {**CFG_RGB, "input_size": (3, 224, 224)}
    assert data_config(base)["input_size"] == (3, 224, 224)
    assert data_config(base, input_size=(64,))["input_size"] == (3, 64, 64)
    assert data_config(base, input_size=(48, 64))["input_size"] == (3, 48, 64)
    assert data_config(base, input_size=(1, 28, 28))["input_size"] == (1, 28, 28)
    cfg = data_config(base, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert cfg["mean"] == (0.1, 0.2, 0.3) and cfg["std"] == (0.4, 0.5, 0.6)


def test_train_transform() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    aug = train_transform(CFG_RGB)
    assert aug(img).shape == (3, 32, 32)
    torch.manual_seed(0)
    outs = {tuple(aug(img).flatten()[:50].tolist()) for _ in range(6)}
    assert len(outs) > 1  # random crop / flip really vary
    assert torch.equal(train_transform(CFG_RGB, augment=False)(img), eval_transform(CFG_RGB)(img))


def test_synthetic(tmp_path: Path) -> None:
    cfg = data_config({**CFG_RGB, "input_size": (3, 12, 10)})
    a = build_dataset("synthetic:7", cfg, num_classes=4)
    b = build_dataset("synthetic:7", cfg, num_classes=4)
    assert len(a.dataset) == 7 and a.num_classes == 4
    for i in range(7):
        xa, ya = a.dataset[i]
        assert xa.shape == (3, 12, 10) and 0 <= ya < 4
        assert torch.equal(xa, b.dataset[i][0]) and ya == b.dataset[i][1]
    train = build_dataset("synthetic:7:train", cfg, num_classes=4)
    assert not torch.equal(train.dataset[0][0], a.dataset[0][0])  # train and test differ
    assert len(build_dataset("synthetic", cfg).dataset) == 256
    for bad in ("synthetic:0", "synthetic:x"):
        with pytest.raises(DataError):
            build_dataset(bad, cfg)


def _idx(path: Path, arr: np.ndarray) -> None:
    """Writes an IDX file (the MNIST format) by hand."""
    magic = {1: 0x0801, 3: 0x0803}[arr.ndim]
    path.write_bytes(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes())


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_formats_from_local_disk(tmp_path: Path, name: str, folder: str) -> None:
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 4)):
        _idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _idx(raw / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    cfg = data_config({**CFG_RGB, "input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,)})
    test = build_dataset(f"{name}:{tmp_path}", cfg)
    train = build_dataset(f"{name}:{tmp_path}:train", cfg)
    assert (len(test.dataset), len(train.dataset)) == (4, 6) and test.num_classes == 10
    assert test.targets == [0, 1, 2, 3] and test.dataset[0][0].shape == (1, 28, 28)
    with pytest.raises(DataError, match="not found under"):
        build_dataset(f"{name}:{tmp_path / 'missing'}", cfg)
    with pytest.raises(DataError, match="needs the folder"):
        build_dataset(name, cfg)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs a path"):
        build_dataset("imagefolder", CFG_RGB)
    with pytest.raises(DataError, match="not a directory"):
        build_dataset(f"imagefolder:{tmp_path / 'nope'}", CFG_RGB)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        build_dataset(f"imagefolder:{tmp_path / 'empty'}", CFG_RGB)
    with pytest.raises(DataError, match="takes no path"):
        build_dataset("digits:/some/path", CFG_RGB)


def test_check_num_classes() -> None:
    data = build_dataset("synthetic:2", CFG_RGB, num_classes=10)
    check_num_classes(data, 10)
    check_num_classes(data, None)
    with pytest.raises(DataError, match="10 classes but the model's head has 5"):
        check_num_classes(data, 5)


def test_make_loader_is_deterministic() -> None:
    data = build_dataset("synthetic:20", data_config({**CFG_RGB, "input_size": (3, 4, 4)}), num_classes=3)

    def order(seed: int) -> list[int]:
        return [int(y) for _, ys in make_loader(data, batch_size=6, shuffle=True, seed=seed) for y in ys]

    assert order(1) == order(1)
    plain = [int(y) for _, ys in make_loader(data, batch_size=6) for y in ys]
    assert plain == [data.dataset[i][1] for i in range(20)]
    assert sorted(order(1)) == sorted(plain)
    with pytest.raises(DataError):
        make_loader(data, batch_size=0)

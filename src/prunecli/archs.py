"""The papers' own networks, registered as timm models so every path treats them like timm's own.

- ``improved_cnn`` — paper A's "Improved CNN" (README.md, Checkpoints): three Conv3×3-BN-ReLU-MaxPool blocks
  (64/128/256), Flatten (256·4·4 = 4096) → ``fc1`` Linear 512 → ReLU → Dropout 0.5 → ``fc2`` Linear 10.
  2,475,402 parameters and buffers (9.44 MiB fp32) at 32×32 input, matching the paper's 9.45 MB.
- ``fc_mlp`` — paper E's fully connected network with biases (an MLP; ``hidden=(300, 100)`` at the
  default 1×8×8 input gives the LeNet-300-100 analogue 64-300-100-10 for digits). ``bn=True`` inserts
  BatchNorm1d after each hidden Linear (the variant docs/restoration.md uses for LBYL).

Both take the usual timm keyword arguments (``num_classes``, ``in_chans``, ``img_size``,
``drop_rate``) and implement ``forward_features``/``forward_head``/``get_classifier``/
``reset_classifier``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["FcMLP", "ImprovedCNN"]


class ConvBlock(nn.Sequential):
    """Conv3×3 (pad 1) → BatchNorm → ReLU → MaxPool 2×2, the repeating unit of paper A's CNN."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, padding=1)  # bias as in plain nn.Conv2d (paper size)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)


class ImprovedCNN(nn.Module):
    """Paper A's VGG-style CIFAR network.

    Args:
        num_classes: classifier outputs (0 removes the classifier).
        in_chans: input channels.
        img_size: input side; must be divisible by 8.
        widths: output channels of the three conv blocks.
        hidden: width of ``fc1``.
        drop_rate: dropout before ``fc2``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 32,
        widths: Sequence[int] = (64, 128, 256),
        hidden: int = 512,
        drop_rate: float = 0.5,
    ) -> None:
        super().__init__()
        if img_size % 8:
            raise ValueError(f"improved_cnn needs img_size divisible by 8, got {img_size}")
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = hidden
        self.drop_rate = drop_rate
        chans = [in_chans, *widths]
        self.features = nn.Sequential(*[ConvBlock(chans[i], chans[i + 1]) for i in range(len(widths))])
        side = img_size // 2 ** len(widths)
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(widths[-1] * side * side, hidden)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate)
        self.fc2 = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc2

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc2 = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(self.flatten(x))))
        return x if pre_logits else self.fc2(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class FcMLP(nn.Module):
    """Fully connected ReLU network with biases (paper E; LeNet-300-100 shaped by default).

    Args:
        num_classes: classifier outputs (0 removes the classifier).
        in_chans: input channels; the input is flattened.
        img_size: input side.
        hidden: widths of the hidden layers ``fc1``, ``fc2``, ….
        bn: insert BatchNorm1d after each hidden Linear (``bn1``, ``bn2``, …).
        drop_rate: dropout before the classifier.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 8,
        hidden: Sequence[int] = (300, 100),
        bn: bool = False,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.flatten = nn.Flatten(1)
        widths = [in_chans * img_size * img_size, *hidden]
        self.hidden_names: list[str] = []
        for i in range(len(hidden)):
            self.add_module(f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1]))
            if bn:
                self.add_module(f"bn{i + 1}", nn.BatchNorm1d(widths[i + 1]))
            self.add_module(f"act{i + 1}", nn.ReLU())
            self.hidden_names.append(str(i + 1))
        self.num_features = self.head_hidden_size = widths[-1]
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(widths[-1], num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        for i in self.hidden_names:
            x = getattr(self, f"fc{i}")(x)
            if hasattr(self, f"bn{i}"):
                x = getattr(self, f"bn{i}")(x)
            x = getattr(self, f"act{i}")(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: object) -> dict[str, object]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "features.0.conv",
        "classifier": "fc2",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "improved_cnn.untrained": _cfg(),
        "fc_mlp.untrained": _cfg(input_size=(1, 8, 8), mean=(0.5,), std=(0.5,), first_conv="fc1", classifier="head"),
    }
)


@register_model
def improved_cnn(pretrained: bool = False, **kwargs: object) -> ImprovedCNN:
    """Paper A's "Improved CNN" (Conv 64/128/256 + FC 4096→512→10)."""
    return build_model_with_cfg(ImprovedCNN, "improved_cnn", pretrained, **kwargs)


@register_model
def fc_mlp(pretrained: bool = False, **kwargs: object) -> FcMLP:
    """Paper E's fully connected network with biases (64-300-100-10 at the default 1×8×8 input)."""
    return build_model_with_cfg(FcMLP, "fc_mlp", pretrained, **kwargs)

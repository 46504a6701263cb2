"""A fast subset of the zoo coverage (benchmarks/zoo_coverage.py): 22 timm architectures, 7 of them
transformers or hybrids, channel-pruned at 30 %, saved, reloaded through prunecli, compared.

The reference for "reloads correctly" is the pruned model in memory: the checkpoint is rebuilt from
the architecture name and ``manifest.structure`` only (no pickle), so equal outputs show that the
structure captured every shape and attribute the forward needs.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch

from prunecli.checkpoint.loaders import load_checkpoint
from prunecli.checkpoint.manifest import Manifest
from prunecli.checkpoint.writer import save_checkpoint
from prunecli.models import default_pretrained_cfg
from prunecli.pruning.channel import prune_channels

pytestmark = pytest.mark.xdist_group("zoo_subset")

# (architecture, input side or None for the default, transformer/hybrid)
ZOO = [
    ("test_resnet", None, False),
    ("test_byobnet", None, False),
    ("test_convnext", None, False),
    ("test_convnext2", None, False),
    ("test_efficientnet", None, False),
    ("test_efficientnet_gn", None, False),
    ("test_efficientnet_ln", None, False),
    ("test_nfnet", None, False),
    ("test_mambaout", None, False),
    ("resnet10t", 64, False),
    ("regnetx_002", 64, False),  # grouped convs
    ("mobilenetv3_small_050", 64, False),  # inverted residuals, squeeze-excite
    ("lcnet_050", 64, False),
    ("ghostnet_050", 64, False),  # concatenations
    ("dla46_c", 64, False),
    ("test_vit", None, True),
    ("test_vit2", None, True),
    ("test_vit3", None, True),  # attention pooling head
    ("test_vit4", None, True),
    ("test_vit_relpos", None, True),
    ("test_coatnet", None, True),
    ("mobilevit_xxs", 64, True),
]


def test_subset_is_large_enough() -> None:
    assert len(ZOO) >= 20 and sum(t for *_, t in ZOO) >= 6


@pytest.mark.parametrize(("arch", "side"), [(a, s) for a, s, _ in ZOO], ids=[a for a, *_ in ZOO])
def test_channel_prune_save_reload(arch: str, side: int | None, tmp_path: object) -> None:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    c, h, w = model.pretrained_cfg["input_size"]
    x = torch.randn(2, c, side or h, side or w, generator=torch.Generator().manual_seed(1))
    before = sum(p.numel() for p in model.parameters())

    result = prune_channels(model, example_input=x[:1], ratio=0.3)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) < before
    structure = json.loads(json.dumps(result.structure))  # what the safetensors header will hold

    manifest = Manifest(arch, 10, {}, default_pretrained_cfg(arch), structure=structure)
    path, _ = save_checkpoint(tmp_path / "p.safetensors", model, manifest)  # type: ignore[operator]
    reloaded = load_checkpoint(path).model
    with torch.no_grad():
        y2 = reloaded(x)
    assert float((y2 - y).abs().max()) <= 1e-5

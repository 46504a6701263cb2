"""Outputs get the permissions of the user's umask, as ``open``/``mkdir`` would give them.

Every output is written to a ``mkstemp``/``mkdtemp`` temporary (0600/0700 whatever the umask) and
renamed into place; these tests check the final ``st_mode`` of checkpoints (file and ``-o DIR/``
folder), scores files and kept LoRA adapters under several umasks, against the mode the kernel gives a
plain file and folder created beside them (and the expected octal literals).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch

from prunecli.checkpoint.manifest import Manifest
from prunecli.checkpoint.permissions import _umask_by_setting, current_umask
from prunecli.checkpoint.writer import save_checkpoint
from prunecli.models import default_pretrained_cfg

# umask → (file mode, folder mode) that open()/mkdir() give; 022 is the case 0600/0700 temporaries get wrong.
CASES = [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)]


@pytest.fixture(params=CASES, ids=lambda c: f"umask{c[0]:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[tuple[int, int, int]]:
    old = os.umask(request.param[0])
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _reference(tmp_path: Path) -> tuple[int, int]:
    """What the kernel gives a new file and folder under the current umask (the independent reference)."""
    (tmp_path / "ref.txt").write_bytes(b"")
    (tmp_path / "ref.d").mkdir()
    return _mode(tmp_path / "ref.txt"), _mode(tmp_path / "ref.d")


def _model() -> tuple[torch.nn.Module, Manifest]:
    import prunecli.archs  # noqa: F401  (registers fc_mlp)

    torch.manual_seed(0)
    model = timm.create_model("fc_mlp", num_classes=3, hidden=(8, 6)).eval()
    return model, Manifest("fc_mlp", 3, {"hidden": [8, 6]}, default_pretrained_cfg("fc_mlp"))


def test_umask_is_read_without_changing_it(umask: tuple[int, int, int]) -> None:
    assert current_umask() == umask[0]
    assert _umask_by_setting() == umask[0]  # the fallback for platforms without /proc
    assert current_umask() == umask[0]  # ... restores what it read


def test_checkpoint_file_and_folder(tmp_path: Path, umask: tuple[int, int, int]) -> None:
    _, file_mode, dir_mode = umask
    assert _reference(tmp_path) == (file_mode, dir_mode)
    model, manifest = _model()
    save_checkpoint(tmp_path / "m.safetensors", model, manifest)
    assert _mode(tmp_path / "m.safetensors") == file_mode
    save_checkpoint(tmp_path / "m.safetensors", model, manifest, force=True)  # replaced: a new inode
    assert _mode(tmp_path / "m.safetensors") == file_mode
    save_checkpoint(f"{tmp_path / 'f'}/", model, manifest)
    assert _mode(tmp_path / "f") == dir_mode
    files = sorted((tmp_path / "f").iterdir())
    assert [f.name for f in files][:2] == ["config.json", "model.safetensors"]
    assert {f.name: _mode(f) for f in files} == {f.name: file_mode for f in files}


def test_scores_file(tmp_path: Path, umask: tuple[int, int, int]) -> None:
    from prunecli.scores import ScoresFile, save_scores

    scores = ScoresFile(method="magnitude", granularity="weight", scores={"fc1.weight": torch.ones(8, 4)})
    save_scores(tmp_path / "s.safetensors", scores)
    assert _mode(tmp_path / "s.safetensors") == umask[1]


def test_kept_adapter_folder(tmp_path: Path, umask: tuple[int, int, int]) -> None:
    from prunecli import lora

    model, _ = _model()
    peft_model = lora.attach_lora(model, lora.LoraOptions(rank=2))
    tmp, _ = lora.stage_adapter(peft_model, tmp_path)
    lora.commit_adapter(tmp, tmp_path / "m.adapter")
    folder = tmp_path / "m.adapter"
    assert _mode(folder) == umask[2]
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert {f.name for f in files} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert {f.name: _mode(f) for f in files} == {f.name: umask[1] for f in files}

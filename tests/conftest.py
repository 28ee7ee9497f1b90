"""Shared fixtures: a tiny generated image folder and a tiny, fast training configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinokit.config import TrainConfig
from dinokit.data.builtin import builtin_textures

CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "train"


@pytest.fixture(scope="session")
def textures_dir(tmp_path_factory) -> Path:
    """8 classes x 8 images of 32 px, generated once per test session."""
    return builtin_textures(images_per_class=8, size=32, seed=0, root=tmp_path_factory.mktemp("textures"))


def tiny_config(data: Path, out: Path, **changes) -> TrainConfig:
    """A run of a few seconds on the CPU: ViT-tiny/8 on 32 px views, a 64-prototype head."""
    values = dict(
        data=str(data), out=str(out), arch="vit_tiny", patch_size=8, global_crops_size=32, local_crops_size=16,
        local_crops_number=2, out_dim=64, head_hidden_dim=64, head_bottleneck_dim=32, batch_size=8, epochs=2,
        warmup_epochs=1, warmup_teacher_temp_epochs=1, val_fraction=0.0, device="cpu", num_workers=0,
        log_every=1, eval_batch_size=32, drop_path_rate=0.1, report=False,
    )
    values.update(changes)
    return TrainConfig.build(values)


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield

"""dinokit train --init: from a full training checkpoint (head and centre taken) or a backbone-only file."""

from __future__ import annotations

import argparse

import pytest
import torch
from click.testing import CliRunner

from dinokit.cli import main
from dinokit.data.builtin import builtin_textures
from dinokit.train.init_weights import init_training_state
from dinokit.models.vit import vit
from dinokit.train.checkpoint import CheckpointError, load_checkpoint
from dinokit.train.loop import build_state
from tests.conftest import tiny_config
from tests.hub.test_load import randomised

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 generated PNGs: two steps of 8 images per epoch."""
    return builtin_textures(images_per_class=2, size=32, seed=0, root=tmp_path_factory.mktemp("textures"))


def official_checkpoint(cfg, path, center: float = 100.0, epoch: int = 100) -> dict:
    """A full checkpoint in main_dino.py's layout for ``cfg``'s network, every weight random."""
    source = build_state(cfg, CPU)
    randomised(source.student, 20)
    randomised(source.teacher, 21)
    ckpt = {"student": {f"module.{k}": v for k, v in source.student.state_dict().items()},
            "teacher": source.teacher.state_dict(), "optimizer": source.optimizer.state_dict(), "epoch": epoch,
            "args": argparse.Namespace(arch=cfg.arch, patch_size=cfg.patch_size, out_dim=cfg.out_dim),
            "dino_loss": {"center": torch.full((1, cfg.out_dim), center)}}
    torch.save(ckpt, path)
    return ckpt


def _optimizer_holds_student_params(state) -> bool:
    student = {id(p) for p in state.student.parameters()}
    return all(id(p) in student for group in state.optimizer.param_groups for p in group["params"])


def test_full_checkpoint_gives_student_teacher_and_centre(data, tmp_path):
    cfg = tiny_config(data, tmp_path / "run", epochs=1)
    ckpt = official_checkpoint(cfg, tmp_path / "official.pth", center=3.0)
    state = build_state(cfg, CPU)
    lines = init_training_state(state, tmp_path / "official.pth")
    assert "the centre" in lines[0] and "after 100 epochs" in lines[0] and "step 0" in lines[0]
    for name, prefix in (("student", "module."), ("teacher", "")):
        own = getattr(state, name).state_dict()
        assert all(torch.equal(own[k], ckpt[name][prefix + k]) for k in own), name
    assert torch.equal(state.loss.center, torch.full((1, 64), 3.0))
    assert state.step == 0 and not state.optimizer.state and _optimizer_holds_student_params(state)


def test_backbone_only_file_of_another_image_size(data, tmp_path):
    cfg = tiny_config(data, tmp_path / "run", epochs=1)
    backbone = randomised(vit("vit_tiny", patch_size=8, img_size=64), 5)  # position embeddings for 8 x 8 patches
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    state = build_state(cfg, CPU)
    head_before = state.student.head.state_dict()
    lines = init_training_state(state, tmp_path / "backbone.pth")
    assert any("head starts from random weights" in line for line in lines)
    assert lines[-1] == "init: position embeddings resampled from 8x8 to 4x4 patches (global_crops_size 32)"
    resampled = backbone.interpolate_pos_encoding(4, 4)  # what the 64 px network uses on 32 px images
    for net in (state.student, state.teacher):
        own = net.backbone.state_dict()
        assert torch.equal(own.pop("pos_embed"), resampled)
        assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in own.items())
    assert all(torch.equal(v, head_before[k]) for k, v in state.student.head.state_dict().items())
    assert state.loss.center.abs().sum() == 0 and _optimizer_holds_student_params(state)
    with torch.no_grad():
        assert state.student([torch.randn(2, 3, 32, 32)]).shape == (2, 64)


def test_other_network_is_refused_naming_keys_and_settings(data, tmp_path):
    official_checkpoint(tiny_config(data, tmp_path / "a", out_dim=32), tmp_path / "k32.pth")
    state = build_state(tiny_config(data, tmp_path / "b", out_dim=64), CPU)
    with pytest.raises(CheckpointError, match=r"wrong shape: head\.last_layer\.weight_g, head\.last_layer\.weight_v.*"
                                              r"arch=vit_tiny patch_size=8 out_dim=32"):
        init_training_state(state, tmp_path / "k32.pth")


def _train(cfg, init, tmp_path):
    cfg.to_yaml(tmp_path / "cfg.yaml")
    return CliRunner().invoke(main, ["train", "--config", str(tmp_path / "cfg.yaml"), "--init", str(init)])


def test_cli_train_init_from_full_checkpoint(data, tmp_path):
    cfg = tiny_config(data, tmp_path / "run", epochs=1)
    official_checkpoint(cfg, tmp_path / "official.pth", center=100.0)
    result = _train(cfg, tmp_path / "official.pth", tmp_path)
    assert result.exit_code == 0, result.output
    assert "init: student and teacher (backbone and head) and the centre" in result.output
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["step"] == 2
    assert ckpt["dino_loss"]["center"].mean() > 50  # 0.9^2 x 100 plus a little: the centre was carried over


def test_cli_train_init_from_backbone_only_file_and_a_mismatch(data, tmp_path):
    cfg = tiny_config(data, tmp_path / "run", epochs=1)
    torch.save(randomised(vit("vit_tiny", patch_size=8, img_size=64), 6).state_dict(), tmp_path / "b.pth")
    result = _train(cfg, tmp_path / "b.pth", tmp_path)
    assert result.exit_code == 0, result.output
    assert "the head starts from random weights" in result.output and "resampled from 8x8 to 4x4" in result.output
    assert load_checkpoint(tmp_path / "run")["step"] == 2
    again = _train(cfg, tmp_path / "b.pth", tmp_path)  # the run resumes: its checkpoint has its config's shapes
    assert again.exit_code == 0 and "resuming" in again.output, again.output

    torch.save(vit("vit_tiny", patch_size=16, img_size=32).state_dict(), tmp_path / "p16.pth")
    result = _train(tiny_config(data, tmp_path / "run2", epochs=1), tmp_path / "p16.pth", tmp_path)
    assert result.exit_code == 2 and "patch_embed.proj.weight" in result.output and "Traceback" not in result.output

"""load_backbone from files in the official DINO layout (built in memory), ours, timm's and torchvision's."""

from __future__ import annotations

import argparse
import fractions

import pytest
import torch

from dinokit.hub.load import infer_arch, load_backbone, open_backbone
from dinokit.models.backbones import build_backbone
from dinokit.models.vit import vit
from dinokit.train.checkpoint import CheckpointError


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and buffer drawn at random (norm gains and biases too), so no key can be
    left at its initial value unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.copy_(torch.randn(t.shape, generator=g) * 0.1 + (1.0 if t.dim() == 1 else 0.0))
    return model.eval()


def official_full_checkpoint(student: torch.nn.Module, teacher: torch.nn.Module, arch: str, patch: int) -> dict:
    """A checkpoint as main_dino.py saves it: DDP student, bare teacher, args an argparse.Namespace."""
    head = {"head.mlp.0.weight": torch.randn(16, student.embed_dim), "head.mlp.0.bias": torch.zeros(16),
            "head.last_layer.weight_g": torch.ones(8, 1), "head.last_layer.weight_v": torch.randn(8, 16)}
    return {
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                    **{f"module.{k}": v for k, v in head.items()}},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 100,
        "args": argparse.Namespace(arch=arch, patch_size=patch, out_dim=8, norm_last_layer=True, lr=0.0005,
                                   global_crops_scale=(0.4, 1.0), data_path="/path/to/imagenet/train", seed=0),
        "dino_loss": {"center": torch.randn(1, 8)},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 10},
    }


@pytest.fixture(scope="module")
def two_vits():
    return tuple(randomised(vit("vit_tiny", patch_size=8, img_size=32), seed) for seed in (1, 2))


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 40, generator=torch.Generator().manual_seed(0))


def test_official_backbone_only_file_gives_the_same_features(tmp_path, two_vits, images):
    teacher, _ = two_vits
    torch.save(teacher.state_dict(), tmp_path / "dino_deittiny8_pretrain.pth")
    loaded = open_backbone(tmp_path / "dino_deittiny8_pretrain.pth")
    assert (loaded.arch, loaded.patch_size, loaded.img_size, loaded.embed_dim) == ("vit_tiny", 8, 32, 192)
    with torch.no_grad():
        assert torch.equal(loaded.model(images), teacher(images))


def test_official_full_checkpoint_teacher_by_default_student_on_request(tmp_path, two_vits, images):
    student, teacher = two_vits
    path = tmp_path / "checkpoint.pth"
    torch.save(official_full_checkpoint(student, teacher, "vit_tiny", 8), path)
    with torch.no_grad():
        assert torch.equal(load_backbone(path)(images), teacher(images))
        assert torch.equal(load_backbone(path, which="student")(images), student(images))
        assert torch.equal(load_backbone(tmp_path)(images), teacher(images))  # the folder of the run


def test_the_student_of_a_file_holding_one_network_is_refused(tmp_path, two_vits):
    _, teacher = two_vits
    torch.save(teacher.state_dict(), tmp_path / "backbone.pth")
    with pytest.raises(CheckpointError, match=r"holds one network .*--which student"):
        open_backbone(tmp_path / "backbone.pth", which="student")
    torch.save({"teacher": teacher.state_dict(), "args": {"arch": "vit_tiny"}}, tmp_path / "teacher.pth")
    with pytest.raises(CheckpointError, match="holds only the teacher"):
        open_backbone(tmp_path / "teacher.pth", which="student")
    assert open_backbone(tmp_path / "backbone.pth").which == "teacher"


def test_official_namespace_needs_no_trust_but_other_objects_do(tmp_path, two_vits):
    teacher, _ = two_vits
    torch.save({"teacher": teacher.state_dict(), "args": argparse.Namespace(arch="vit_tiny")}, tmp_path / "ns.pth")
    assert load_backbone(tmp_path / "ns.pth").embed_dim == 192
    torch.save({"teacher": teacher.state_dict(), "lr": fractions.Fraction(1, 3)}, tmp_path / "object.pth")
    with pytest.raises(CheckpointError, match="trust"):
        load_backbone(tmp_path / "object.pth")
    assert load_backbone(tmp_path / "object.pth", trust=True).embed_dim == 192


def test_timm_classifier_state_dict_loads_without_its_classifier(tmp_path, two_vits, images):
    teacher, _ = two_vits
    state = {**teacher.state_dict(), "head.weight": torch.randn(10, 192), "head.bias": torch.zeros(10)}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "timm.pth")
    with torch.no_grad():
        assert torch.equal(load_backbone(tmp_path / "timm.pth")(images), teacher(images))


def test_wrong_architecture_is_refused_naming_the_keys(tmp_path, two_vits):
    teacher, _ = two_vits
    torch.save(teacher.state_dict(), tmp_path / "tiny.pth")
    expected = r"vit_tiny/8, the model a vit_small/8\); wrong shape: .*blocks\.0\.attn\.qkv\.weight"
    with pytest.raises(CheckpointError, match=expected):
        load_backbone(tmp_path / "tiny.pth", arch="vit_small")
    with pytest.raises(CheckpointError, match="patch size 8 .* patch_size=16"):
        load_backbone(tmp_path / "tiny.pth", patch_size=16)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("blocks.11.")}
    state["blocks.12.norm1.weight"] = torch.ones(192)
    torch.save(state, tmp_path / "odd.pth")
    expected = r"missing: blocks\.11\.attn\.proj\.bias.*unexpected: blocks\.12\.norm1\.weight"
    with pytest.raises(CheckpointError, match=expected):
        load_backbone(tmp_path / "odd.pth", arch="vit_tiny")


def test_unknown_sources_get_one_clear_message(tmp_path):
    with pytest.raises(CheckpointError, match="did you mean 'dino_vits16'"):
        load_backbone("dino_vit16")
    with pytest.raises(CheckpointError, match="official backbones by name: dino_vits16"):
        load_backbone("nothing")
    for path in (tmp_path / "nothing.pth", "/nonexistent/x", "runs/absent"):  # a path, not a misspelt name
        with pytest.raises(CheckpointError, match="no such file or folder"):
            load_backbone(path)
    with pytest.raises(CheckpointError, match="neither a training checkpoint"):
        load_backbone(tmp_path)
    torch.save({"weight": torch.ones(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="cannot infer the architecture"):
        load_backbone(tmp_path / "other.pth")


def test_resnet_architecture_is_inferred_and_fc_dropped(tmp_path):
    resnet = randomised(build_backbone("resnet18"), 3)
    assert infer_arch(resnet.state_dict())["arch"] == "resnet18"
    state = {**resnet.state_dict(), "fc.weight": torch.randn(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(state, tmp_path / "resnet.pth")
    x = torch.randn(2, 3, 64, 64)
    loaded = open_backbone(tmp_path / "resnet.pth")
    assert (loaded.arch, loaded.patch_size, loaded.embed_dim) == ("resnet18", None, 512)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), resnet(x))


def test_run_config_gives_arch_image_size_and_normalisation(tmp_path, two_vits):
    teacher, student = two_vits
    ours = {"student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
            "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()},
            "args": {"arch": "vit_tiny", "patch_size": 8, "global_crops_size": 32,
                     "mean": [0.5] * 3, "std": [0.25] * 3}}
    torch.save(ours, tmp_path / "checkpoint.pth")
    loaded = open_backbone(tmp_path)
    assert (loaded.img_size, loaded.mean, loaded.std) == (32, (0.5,) * 3, (0.25,) * 3)


def test_untrained_source_is_seeded_and_takes_the_patch_size():
    a, b = open_backbone("random:vit_tiny/8"), open_backbone("random:vit_tiny/8")
    assert (a.arch, a.patch_size, a.which) == ("vit_tiny", 8, "untrained")
    assert torch.equal(a.model.pos_embed, b.model.pos_embed)
    assert open_backbone("random:vit_tiny").patch_size == 16
    assert open_backbone("random:resnet18").patch_size is None
    for bad in ("random:vit_tiny/x", "random:", "random:vit_huge/8"):
        with pytest.raises(CheckpointError, match="random:"):
            open_backbone(bad)

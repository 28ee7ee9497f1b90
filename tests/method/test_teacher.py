import pytest
import torch
from torch import nn

from dinokit.method.teacher import make_teacher, update_teacher
from dinokit.models.vit import vit


def test_teacher_is_a_frozen_copy_without_drop_path():
    student = vit("vit_tiny", patch_size=8, img_size=32, drop_path_rate=0.1)
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(b.drop_path == 0 for b in teacher.blocks) and student.blocks[-1].drop_path > 0
    for a, b in zip(student.state_dict().values(), teacher.state_dict().values()):
        assert torch.equal(a, b)


def test_multi_tensor_ema_equals_per_parameter_formula():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    expected = [0.996 * t + 0.004 * s for t, s in zip(teacher.parameters(), student.parameters())]
    update_teacher(teacher, student, 0.996)
    for p, e in zip(teacher.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-7)
    update_teacher(teacher, student, 1.0)  # momentum 1: unchanged
    for p, e in zip(teacher.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-7)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: there the step flag stays on the device (masked multi-tensor EMA)"))])
def test_masked_ema_updates_on_one_and_leaves_the_teacher_on_zero(device):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4)).to(device)
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = [t.clone() for t in teacher.parameters()]
    update_teacher(teacher, student, 0.9, apply=torch.tensor(0.0, device=device))
    for p, b in zip(teacher.parameters(), before):
        assert torch.equal(p, b)
    update_teacher(teacher, student, 0.9, apply=torch.tensor(1.0, device=device))
    for p, b, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(p, 0.9 * b + 0.1 * s, atol=1e-7)


def test_teacher_of_a_timm_backbone_has_no_drop_path():
    pytest.importorskip("timm")
    from dinokit.models.backbones import build_backbone
    student = build_backbone("timm:vit_tiny_patch16_224", img_size=32, drop_path_rate=0.5)
    teacher = make_teacher(student)  # in training mode, as the loop runs it
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x), teacher(x))  # a DropPath module still dropping made these differ
    assert student.blocks[-1].drop_path1.drop_prob == 0.5


@pytest.mark.parametrize("other, match", [
    (nn.Linear(5, 3), r"parameter weight: teacher \(4, 5\) torch.float32 on cpu, student \(3, 5\)"),
    (nn.Linear(5, 4).double(), "parameter weight: .* student \\(4, 5\\) torch.float64"),
])
def test_ema_between_networks_that_differ_names_the_parameter(other, match):
    teacher = make_teacher(nn.Linear(5, 4))
    with pytest.raises(ValueError, match=match):
        update_teacher(teacher, other, 0.9)


def test_ema_with_a_teacher_on_another_device_names_it():
    student = nn.Linear(5, 4)
    teacher = make_teacher(student).to("meta")  # the student moved to the GPU after make_teacher, say
    with pytest.raises(ValueError, match="teacher .* on meta, student .* on cpu"):
        update_teacher(teacher, student, 0.9)


def test_ema_with_the_arguments_swapped_is_refused_and_changes_nothing():
    student = nn.Linear(5, 4)
    teacher = make_teacher(student)
    with torch.no_grad():
        student.weight.add_(1.0)
    before = student.weight.clone()
    with pytest.raises(ValueError, match=r"update_teacher\(teacher, student, momentum\)"):
        update_teacher(student, teacher, 0.9)  # lightly's update_momentum takes the student first
    assert torch.equal(student.weight, before)

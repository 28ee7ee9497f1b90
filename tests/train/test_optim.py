import pytest
import torch
from torch import nn

from dinokit.models.head import DINOHead
from dinokit.models.multicrop import MultiCropModel
from dinokit.models.vit import vit
from dinokit.train.optim import (build_optimizer, clip_gradients, fused_adamw_available, param_groups,
                                 set_hyperparameters, step_if_finite)


def test_no_decay_on_biases_and_norms_and_fixed_gain_left_out():
    model = MultiCropModel(vit("vit_tiny", patch_size=8, img_size=32), DINOHead(192, 20, 16, 8))
    decay, no_decay = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert "backbone.blocks.0.attn.qkv.weight" in decayed and "head.last_layer.weight_v" in decayed
    assert "backbone.blocks.0.attn.qkv.bias" in plain and "backbone.norm.weight" in plain
    assert "head.last_layer.weight_g" not in decayed | plain  # fixed gain: not optimised
    opt = build_optimizer(model, torch.device("cpu"))
    set_hyperparameters(opt, lr=0.1, weight_decay=0.3)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.1, 0.3), (0.1, 0.0)]


def test_each_gradient_tensor_is_clipped_on_its_own():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5 -> clipped to 3
    b.grad = torch.tensor([1.0, 0.0])       # norm 1 -> untouched
    norms = clip_gradients([a, b], 3.0)
    assert torch.allclose(norms, torch.tensor([5.0, 1.0]))
    assert torch.allclose(a.grad, torch.tensor([1.8, 2.4, 0.0]), atol=1e-5)
    assert torch.equal(b.grad, torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_step_changes_nothing_and_a_finite_one_steps(fused):
    if fused and not fused_adamw_available("cpu"):
        pytest.skip("this PyTorch has no fused AdamW on the CPU")
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5, fused=fused)
    model(torch.randn(2, 4)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    stepped = step_if_finite(optimizer, torch.tensor(0.0))
    assert float(stepped) == 0 and isinstance(stepped, torch.Tensor) is fused  # unfused: the host was asked
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(float(s["step"]) == 0 for s in optimizer.state.values())
    model.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    assert float(step_if_finite(optimizer, torch.tensor(1.0))) == 1
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(float(s["step"]) == 1 for s in optimizer.state.values())

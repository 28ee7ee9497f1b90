import pytest
import torch
from torch import nn

from dinokit.models.head import DINOHead, WeightNormLinear


def test_structure_and_initialisation():
    head = DINOHead(384, out_dim=1000, hidden_dim=2048, bottleneck_dim=256)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [2048, 2048, 256]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    for m in head.mlp:
        if isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0) and abs(m.weight.std().item() - 0.02) < 0.003
    assert set(head.state_dict()) == {f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")} | {
        "last_layer.weight_g", "last_layer.weight_v"}


def test_weight_norm_formula_and_fixed_gain():
    head = DINOHead(16, out_dim=10, hidden_dim=32, bottleneck_dim=8)
    last = head.last_layer
    assert not last.weight_g.requires_grad and torch.all(last.weight_g == 1)
    w = last.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(10), atol=1e-6)
    x = torch.randn(4, 16)
    z = nn.functional.normalize(head.mlp(x), dim=-1)
    assert torch.allclose(head(x), z @ (last.weight_v / last.weight_v.norm(dim=1, keepdim=True)).T, atol=1e-6)
    head(x).sum().backward()
    assert last.weight_g.grad is None and last.weight_v.grad is not None
    free = DINOHead(16, out_dim=10, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
    assert free.last_layer.weight_g.requires_grad


def test_weight_norm_gradients_equal_autograd_through_the_formula():
    torch.manual_seed(0)
    last = WeightNormLinear(8, 12, fix_gain=False).double()
    with torch.no_grad():
        last.weight_g.uniform_(0.5, 2.0)  # a gain other than 1
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 12, dtype=torch.float64)
    (last(x) * upstream).sum().backward()
    ours = [t.grad.clone() for t in (x, last.weight_v, last.weight_g)]
    for t in (x, last.weight_v, last.weight_g):
        t.grad = None
    v, g = last.weight_v, last.weight_g
    ((x @ (v * g / v.norm(dim=1, keepdim=True)).T) * upstream).sum().backward()
    for mine, expected in zip(ours, (x.grad, v.grad, g.grad)):
        torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-12)
    fixed = WeightNormLinear(8, 12).double()
    fixed(x).sum().backward()
    assert fixed.weight_g.grad is None and fixed.weight_v.grad is not None


def test_a_head_without_layers_is_refused():
    with pytest.raises(ValueError, match="nlayers must be at least 1"):
        DINOHead(192, 64, nlayers=0)  # built before, then failed on the first batch

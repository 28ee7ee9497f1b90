"""The DINO projection head: MLP -> L2 normalisation -> weight-normalised linear layer.

Shapes: features ``B x D`` -> logits ``B x K``. Key names match the official code
(``mlp.0/2/4``, ``last_layer.weight_g``, ``last_layer.weight_v``) so its checkpoints load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _NormalizedWeight(torch.autograd.Function):
    """``W = v * (g / ||v||)`` per row, with a hand-written backward.

    Autograd through the formula makes four more ``K x d`` tensors in the backward (at K = 65536,
    d = 256: 64 MiB each); this makes one:

        dL/dv = (g / ||v||) * (dL/dW - u * <u, dL/dW>),   dL/dg = <u, dL/dW>,   u = v / ||v||,

    with ``<.,.>`` the dot product of each row (``K x 1``).
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        inv_norm = v.norm(dim=1, keepdim=True).reciprocal()
        ctx.save_for_backward(v, g, inv_norm)
        return v * (g * inv_norm)

    @staticmethod
    def backward(ctx, grad_w: torch.Tensor):
        v, g, inv_norm = ctx.saved_tensors
        dot_u = torch.einsum("kd,kd->k", v, grad_w).unsqueeze(1) * inv_norm  # <u, dL/dW>, K x 1
        scale = g * inv_norm
        grad_v = (grad_w * scale).addcmul_(v, dot_u * scale * inv_norm, value=-1) if ctx.needs_input_grad[0] else None
        return grad_v, dot_u if ctx.needs_input_grad[1] else None


class WeightNormLinear(nn.Module):
    """``y = x @ (g * v / ||v||)^T`` with a gain ``g`` (``K x 1``) per output and direction ``v``
    (``K x d``); no bias. ``fix_gain=True`` keeps ``g`` at 1 and out of training."""

    def __init__(self, in_dim: int, out_dim: int, fix_gain: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_gain)

    @property
    def weight(self) -> torch.Tensor:
        return _NormalizedWeight.apply(self.weight_v, self.weight_g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """``in_dim -> hidden -> ... -> bottleneck`` (GELU between), L2-normalise, then ``K`` logits.

    Args:
        nlayers: linear layers in the MLP (the recipe's 3).
        norm_last_layer: fix the last layer's weight-norm gain at 1.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be at least 1 (the MLP's linear layers), got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_gain=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-6 if x.dtype != torch.float32 else 1e-12)
        return self.last_layer(x)

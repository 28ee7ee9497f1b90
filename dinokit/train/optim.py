"""AdamW for DINO: parameter groups without decay on biases and norms, per-tensor clipping."""

from __future__ import annotations

import functools

import torch
from torch import nn

from dinokit.train.fsdp import is_sharded


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights that decay (``ndim > 1``, not a bias) and the rest (``weight_decay=0``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW with fused kernels where PyTorch has them for ``device`` (CUDA; the CPU since
    PyTorch 2.4) and the parameters are plain tensors, else multi-tensor; lr and weight decay are
    set every step."""
    fused = not is_sharded(model) and fused_adamw_available(device.type)
    return torch.optim.AdamW(param_groups(model), lr=0.0, weight_decay=0.0, fused=fused, foreach=None if fused else True)


@functools.cache
def fused_adamw_available(device_type: str) -> bool:
    if device_type == "cuda":
        return True
    try:
        probe = torch.zeros(1, device=device_type, requires_grad=True)
        probe.grad = torch.zeros(1, device=device_type)
        torch.optim.AdamW([probe], fused=True).step()
    except (RuntimeError, TypeError):
        return False
    return True


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("name") != "no_decay":
            group["weight_decay"] = weight_decay


def step_if_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> torch.Tensor | float:
    """``optimizer.step()`` unless ``finite`` (a 0-d tensor) is 0. Returns whether the step was
    taken, for the updates that follow (``update_teacher``, ``update_center``) to honour: a fused
    optimizer decides on the device (its ``found_inf``, as with a gradient scaler), so the host
    does not wait, and the answer is ``finite`` itself; otherwise (FSDP's sharded parameters) the
    host reads ``finite`` and the answer is 1.0 or 0.0."""
    if all(group.get("fused") for group in optimizer.param_groups):  # (a loaded state dict sets the groups')
        optimizer.found_inf = 1.0 - finite  # the fused kernels leave every tensor as it is when 1
        optimizer.step()
        return finite
    if not bool(finite):
        optimizer.zero_grad(set_to_none=True)
        return 0.0
    optimizer.step()
    return 1.0


@torch.no_grad()
def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale each gradient tensor whose L2 norm exceeds ``max_norm`` down to it (the reference's
    per-tensor clipping), in multi-tensor ops. Returns the norms before clipping (one per tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch._foreach_norm(grads)
    if max_norm > 0:
        scales = torch._foreach_add(norms, 1e-6)
        torch._foreach_reciprocal_(scales)
        torch._foreach_mul_(scales, max_norm)
        torch._foreach_clamp_max_(scales, 1.0)
        torch._foreach_mul_(grads, scales)
    norms = torch.stack(norms)
    return norms.full_tensor() if hasattr(norms, "full_tensor") else norms  # FSDP: a DTensor, made whole

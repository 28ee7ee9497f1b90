"""The momentum (EMA) teacher: ``theta_t <- lambda theta_t + (1 - lambda) theta_s``."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A copy of the student that gradients never touch. Drop path is switched off."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    for m in teacher.modules():
        if hasattr(m, "drop_path") and isinstance(m.drop_path, float):
            m.drop_path = 0.0
    return teacher


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float,
                   apply: torch.Tensor | float = 1.0) -> None:
    """EMA of all parameters in multi-tensor operations (no Python loop over tensors).

    ``apply``: 1 to update, 0 to leave the teacher as it is (a skipped step); a 0-d tensor when
    that is decided on the device (CUDA), so that the caller never waits for it.
    """
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameter tensors, student {len(s_params)}")
    if isinstance(apply, torch.Tensor) and apply.device.type == "cpu":
        apply = float(apply)  # reading it waits for nothing there; one lerp pass instead of three
    if not isinstance(apply, torch.Tensor):
        if apply:
            torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
        return
    step = apply.to(t_params[0].dtype) * (1.0 - momentum)  # 0 on a skipped step
    torch._foreach_mul_(t_params, 1.0 - step)
    torch._foreach_add_(t_params, torch._foreach_mul(s_params, step))

"""The momentum (EMA) teacher: ``theta_t <- lambda theta_t + (1 - lambda) theta_s``."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A copy of the student that gradients never touch. Drop path is switched off: our blocks'
    rate (``drop_path``) and timm's ``DropPath`` modules (``drop_prob``)."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    for m in teacher.modules():
        for rate in ("drop_path", "drop_prob"):
            if isinstance(getattr(m, rate, None), float):
                setattr(m, rate, 0.0)
    return teacher


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float,
                   apply: torch.Tensor | float = 1.0) -> None:
    """EMA of all parameters in multi-tensor operations (no Python loop over tensors).

    ``apply``: 1 to update, 0 to leave the teacher as it is (a skipped step); a 0-d tensor when
    that is decided on the device (CUDA), so that the caller never waits for it.

    ``ValueError`` for a teacher and student that differ in a parameter's shape, dtype or device
    (the teacher was not moved with the student), and for the two given the other way round (the
    teacher's parameters require gradients, the student's none: ``make_teacher`` freezes them).
    """
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameter tensors, student {len(s_params)}")
    if not any(p.requires_grad for p in student.parameters()) and any(p.requires_grad for p in t_params):
        raise ValueError("the teacher's parameters require gradients and the student's do not: "
                         "the arguments are update_teacher(teacher, student, momentum)")
    try:
        _ema(t_params, s_params, momentum, apply)
    except RuntimeError:
        for (name, t), s in zip(teacher.named_parameters(), s_params):
            if (t.shape, t.dtype, t.device) != (s.shape, s.dtype, s.device):
                raise ValueError(f"teacher and student differ at parameter {name}: teacher {tuple(t.shape)} "
                                 f"{t.dtype} on {t.device}, student {tuple(s.shape)} {s.dtype} on {s.device}") from None
        raise


def _ema(t_params: list[torch.Tensor], s_params: list[torch.Tensor], momentum: float,
         apply: torch.Tensor | float) -> None:
    """``update_teacher``'s arithmetic on the two lists of parameters."""
    if isinstance(apply, torch.Tensor) and apply.device.type == "cpu":
        apply = float(apply)  # reading it waits for nothing there; one lerp pass instead of three
    if not isinstance(apply, torch.Tensor):
        if apply:
            torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
        return
    step = apply.to(t_params[0].dtype) * (1.0 - momentum)  # 0 on a skipped step
    torch._foreach_mul_(t_params, 1.0 - step)
    torch._foreach_add_(t_params, torch._foreach_mul(s_params, step))

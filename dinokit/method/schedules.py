"""Schedules of DINO, as functions of the training step (evaluated every iteration).

``cosine`` covers lr (with warm-up), weight decay and teacher momentum; ``linear_warmup``
covers the teacher temperature. Step ``s`` of ``total`` steps; warm-up lengths are in steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dinokit.config import TrainConfig


def cosine(step: int, total: int, start: float, end: float, warmup: int = 0, warmup_start: float = 0.0) -> float:
    """Linear from ``warmup_start`` to ``start`` over ``warmup`` steps, then a half cosine from
    ``start`` (right after warm-up) to ``end`` (at step ``total - 1``)."""
    if step < warmup:
        return warmup_start + (start - warmup_start) * step / warmup
    span = total - warmup
    if span <= 1:
        return start if span == 1 and step == warmup else end
    progress = min(step - warmup, span - 1) / (span - 1)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def linear_warmup(step: int, warmup: int, start: float, end: float) -> float:
    """Linear from ``start`` at step 0 to ``end`` at step ``warmup``, then ``end``."""
    if step >= warmup:
        return end
    return start + (end - start) * step / warmup


@dataclass(frozen=True)
class Schedules:
    """Every per-step value of a run: ``Schedules.from_config(cfg, steps_per_epoch).at(step)``."""

    total_steps: int
    steps_per_epoch: int
    cfg: TrainConfig

    @classmethod
    def from_config(cls, cfg: TrainConfig, steps_per_epoch: int) -> "Schedules":
        return cls(cfg.epochs * steps_per_epoch, steps_per_epoch, cfg)

    @property
    def peak_lr(self) -> float:
        """``lr x batch_size / 256``: the linear scaling rule."""
        return self.cfg.lr * self.cfg.batch_size / 256

    def at(self, step: int) -> dict[str, float]:
        cfg, ipe = self.cfg, self.steps_per_epoch
        return {
            "lr": cosine(step, self.total_steps, self.peak_lr, cfg.min_lr, round(cfg.warmup_epochs * ipe)),
            "weight_decay": cosine(step, self.total_steps, cfg.weight_decay, cfg.weight_decay_end),
            "momentum": cosine(step, self.total_steps, cfg.momentum_teacher, cfg.momentum_teacher_final),
            "teacher_temp": linear_warmup(step, round(cfg.warmup_teacher_temp_epochs * ipe),
                                          cfg.warmup_teacher_temp, cfg.teacher_temp),
            "freeze_last_layer": float(step < round(cfg.freeze_last_layer * ipe)),
        }

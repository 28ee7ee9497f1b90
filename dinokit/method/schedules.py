"""Schedules of DINO, as functions of the training step (evaluated every iteration).

``cosine`` covers lr (with warm-up), weight decay and teacher momentum; ``linear_warmup``
covers the teacher temperature. Step ``s`` of ``total`` steps; warm-up lengths are in steps.
``Schedules.at(step)`` gives one step's values as ``StepHyperparameters``.
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
class StepHyperparameters:
    """The schedules' values for one training step (what ``train_step`` reads)."""

    lr: float  # AdamW's learning rate
    weight_decay: float  # AdamW's weight decay (of the weights, not of biases and norms)
    momentum: float  # the teacher's EMA momentum m: teacher <- m teacher + (1 - m) student
    teacher_temp: float  # the teacher's softmax temperature
    freeze_last_layer: bool  # the head's last layer is not updated in this step

    @classmethod
    def mid_run(cls, cfg: TrainConfig) -> "StepHyperparameters":
        """The values in the middle of a run (peak lr, the last layer trained): ``dinokit bench``'s."""
        return cls(peak_lr(cfg), cfg.weight_decay, cfg.momentum_teacher, cfg.teacher_temp, False)

    def as_dict(self) -> dict[str, float]:
        """For the logs: every value a float (``freeze_last_layer`` 1.0 or 0.0)."""
        return {"lr": self.lr, "weight_decay": self.weight_decay, "momentum": self.momentum,
                "teacher_temp": self.teacher_temp, "freeze_last_layer": float(self.freeze_last_layer)}


def peak_lr(cfg: TrainConfig) -> float:
    """``lr x batch_size / 256``: the linear scaling rule."""
    return cfg.lr * cfg.batch_size / 256


@dataclass(frozen=True)
class Schedules:
    """Every per-step value of a run: ``Schedules.from_config(cfg, steps_per_epoch).at(step)``."""

    total_steps: int
    steps_per_epoch: int
    cfg: TrainConfig

    @classmethod
    def from_config(cls, cfg: TrainConfig, steps_per_epoch: int) -> "Schedules":
        return cls(cfg.epochs * steps_per_epoch, steps_per_epoch, cfg)

    def at(self, step: int) -> StepHyperparameters:
        cfg, ipe = self.cfg, self.steps_per_epoch
        return StepHyperparameters(
            lr=cosine(step, self.total_steps, peak_lr(cfg), cfg.min_lr, round(cfg.warmup_epochs * ipe)),
            weight_decay=cosine(step, self.total_steps, cfg.weight_decay, cfg.weight_decay_end),
            momentum=cosine(step, self.total_steps, cfg.momentum_teacher, cfg.momentum_teacher_final),
            teacher_temp=linear_warmup(step, round(cfg.warmup_teacher_temp_epochs * ipe), cfg.warmup_teacher_temp,
                                       cfg.teacher_temp),
            freeze_last_layer=step < round(cfg.freeze_last_layer * ipe),
        )

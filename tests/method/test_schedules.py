import math

import pytest

from dinokit.config import TrainConfig
from dinokit.method.schedules import Schedules, StepHyperparameters, cosine, linear_warmup, peak_lr


def test_cosine_with_warmup_matches_formula():
    total, warmup, base, final = 100, 10, 1.0, 0.01
    assert cosine(0, total, base, final, warmup) == 0.0
    assert cosine(5, total, base, final, warmup) == pytest.approx(0.5)
    assert cosine(warmup, total, base, final, warmup) == pytest.approx(base)
    for s in (10, 37, 64, 99):
        progress = (s - warmup) / (total - warmup - 1)
        assert cosine(s, total, base, final, warmup) == pytest.approx(final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress)))
    assert cosine(total - 1, total, base, final, warmup) == pytest.approx(final)


def test_teacher_temperature_warmup():
    assert linear_warmup(0, 30, 0.04, 0.07) == 0.04
    assert linear_warmup(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(30, 30, 0.04, 0.07) == 0.07 == linear_warmup(500, 30, 0.04, 0.07)
    assert linear_warmup(0, 0, 0.04, 0.07) == 0.07


def test_schedules_of_the_recipe():
    cfg = TrainConfig(batch_size=512, epochs=100)
    s = Schedules.from_config(cfg, steps_per_epoch=10)
    peak = 0.0005 * 512 / 256
    assert peak_lr(cfg) == pytest.approx(peak)
    first, warm, last = s.at(0), s.at(100), s.at(999)
    assert first.lr == 0 and warm.lr == pytest.approx(peak) and last.lr == pytest.approx(1e-6)
    assert first.weight_decay == pytest.approx(0.04) and last.weight_decay == pytest.approx(0.4)
    assert first.momentum == pytest.approx(0.996) and last.momentum == pytest.approx(1.0)
    assert s.at(150).teacher_temp == pytest.approx(0.055) and s.at(300).teacher_temp == 0.07
    assert s.at(9).freeze_last_layer is True and s.at(10).freeze_last_layer is False
    assert 0.996 < s.at(500).momentum < 1.0
    assert s.at(9).as_dict() == {"lr": s.at(9).lr, "weight_decay": s.at(9).weight_decay, "momentum": s.at(9).momentum,
                                 "teacher_temp": s.at(9).teacher_temp, "freeze_last_layer": 1.0}  # as logged


def test_the_mid_run_values_are_the_peak_lr_with_the_last_layer_trained():
    cfg = TrainConfig(batch_size=512)
    hp = StepHyperparameters.mid_run(cfg)
    assert hp == StepHyperparameters(peak_lr(cfg), 0.04, 0.996, 0.07, False)

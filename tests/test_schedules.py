import math

import pytest

from ssl_kd.schedules import cosine_schedule, epoch_warmup_schedule


def test_cosine_schedule_matches_dino_formula():
    schedule = cosine_schedule(1.0, 0.1, total_steps=20, warmup_steps=5)
    assert len(schedule) == 20
    assert schedule[:5].tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    for i in range(15):
        expected = 0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi * i / 15))
        assert schedule[5 + i].item() == pytest.approx(expected)


def test_momentum_schedule_rises_to_one():
    schedule = cosine_schedule(0.996, 1.0, 100)
    assert schedule[0] == pytest.approx(0.996)
    assert schedule[-1] == pytest.approx(1.0, abs=1e-5)
    assert (schedule.diff() >= 0).all()


def test_teacher_temperature_warms_up_per_epoch():
    schedule = epoch_warmup_schedule(0.04, 0.07, warmup_epochs=3, epochs=5, steps_per_epoch=2)
    assert schedule.tolist() == pytest.approx(
        [0.04, 0.04, 0.055, 0.055, 0.07, 0.07, 0.07, 0.07, 0.07, 0.07]
    )

"""The per-step schedule choice (eager-K vs two-phase VFD) and its online cost model."""

from __future__ import annotations

import pytest

from value_steer.runtime.vfd_schedule import ScheduleModel


def test_pinned_modes_and_counters():
    m = ScheduleModel(mode="eager")
    assert m.choose(10, 32, 4) == "eager" and m.counters["eager_steps"] == 1
    m = ScheduleModel(mode="two_phase", device_kind="cuda")
    assert m.choose(10, 1, 4) == "two_phase" and m.counters["two_phase_steps"] == 1
    with pytest.raises(ValueError, match="schedule must be one of"):
        ScheduleModel(mode="fast")


def test_auto_follows_the_cost_model():
    cpu = ScheduleModel(device_kind="cpu")
    cpu.coef = {"fixed": 25.0, "per_token": 1.0, "second_fixed": 20.0}
    cpu.rate = 0.05
    assert cpu.choose(64, 64, 8) == "two_phase"  # 448 extra rows against one ~20 ms second forward
    cpu.rate = 1.0
    assert cpu.choose(1, 1, 2) == "eager"  # always unsafe, one extra row: a second forward costs more
    gpu = ScheduleModel(device_kind="cuda")
    gpu.rate = 0.3
    assert gpu.choose(32, 32, 4) == "eager"  # memory-bound: extra rows are nearly free


def test_rate_is_a_moving_average_of_unsafe_natural_samples():
    m = ScheduleModel(rate=0.3)
    for _ in range(200):
        m.observe(10, 1)
    assert m.rate == pytest.approx(0.1, abs=1e-3)
    m.observe(0, 0)  # nothing observed: unchanged
    assert m.rate == pytest.approx(0.1, abs=1e-3)


def test_online_fit_recovers_a_linear_forward_cost():
    m = ScheduleModel(device_kind="cpu")
    for tokens in [1, 4, 8, 16, 32, 64, 128] * 5:
        m.observe_forward(tokens, 12.0 + 0.5 * tokens)
    assert m.coef["fixed"] == pytest.approx(12.0, rel=1e-6)
    assert m.coef["per_token"] == pytest.approx(0.5, rel=1e-6)
    for _ in range(100):
        m.observe_forward(10, 0.5 * 10 + 7.0, second=True)
    assert m.coef["second_fixed"] == pytest.approx(7.0, rel=1e-3)
    assert not ScheduleModel(device_kind="cuda").timed

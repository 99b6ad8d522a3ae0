"""Fixed schedules: each formula at chosen steps, validity at any T, and registration."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mdmrl.errors import UserError
from mdmrl.options import build
from mdmrl.plugins import get_registry
from mdmrl.trajectory import NUM_ACTIONS
from mdmrl_plugins.cogrpo.schedules import (
    FIXED_SCHEDULES,
    AmusedSchedule,
    AmusedScheduleOptions,
    ConstantOptions,
    ConstantSchedule,
    CosineGammaOptions,
    CosineGammaSchedule,
    MeissonicOptions,
    MeissonicSchedule,
    MeissonicTable1Schedule,
    fixed_actions,
)

NAMES = [cls.name for cls in FIXED_SCHEDULES]


def action(schedule, t, T):
    a, raw, lp = schedule.act(t, T, 1, None, None)
    return [float(x) for x in a[0]]


def cos_r(t, T):
    return math.cos((t + 1) / T * math.pi / 2)


@pytest.mark.parametrize("t", [0, 3, 6, 7])
def test_meissonic_formula(t):
    T = 8
    tau_s, r, tau_r, s = action(MeissonicSchedule(), t, T)
    assert tau_s == 1.0 and s == 9.0
    assert r == pytest.approx(max(cos_r(t, T), 0.0), abs=1e-6)
    assert tau_r == pytest.approx(2.0 * (1 - t / (T - 1)), abs=1e-6)  # linspace(2, 0, T)[t]


def test_meissonic_options_override_scale_and_temperature():
    tau_s, _, _, s = action(MeissonicSchedule(MeissonicOptions(cfg_scale=4.5, temperature=0.7)), 2, 5)
    assert s == 4.5 and tau_s == pytest.approx(0.7)


@pytest.mark.parametrize("t", [0, 5, 11])
def test_meissonic_table1_formula(t):
    T = 12
    tau_s, r, tau_r, s = action(MeissonicTable1Schedule(), t, T)
    assert (tau_s, s) == (1.0, 9.0)
    assert r == pytest.approx(max(cos_r(t, T), 0.0), abs=1e-6)
    assert tau_r == pytest.approx(2.0 ** ((T - t) / T), rel=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("t", [0, 7, 15])
def test_cosine_gamma_formula(gamma, t):
    T = 16
    sched = CosineGammaSchedule(CosineGammaOptions(gamma=gamma, cfg_scale=3.0, temperature=0.9))
    tau_s, r, tau_r, s = action(sched, t, T)
    assert r == pytest.approx(max(math.cos(math.pi * (t + 1) / (2 * T)), 0.0) ** gamma, abs=1e-6)
    assert (s, tau_s) == (3.0, pytest.approx(0.9))
    assert tau_r == pytest.approx(2.0 * (1 - t / (T - 1)), abs=1e-6)


def test_cosine_gamma_remask_temperature_schedules():
    T, t = 10, 4
    exp = CosineGammaSchedule(CosineGammaOptions(remask_schedule="exponential", remask_temperature=3.0))
    const = CosineGammaSchedule(CosineGammaOptions(remask_schedule="constant", remask_temperature=0.25))
    assert action(exp, t, T)[2] == pytest.approx(3.0 ** ((T - t) / T), rel=1e-6)
    assert action(const, t, T)[2] == 0.25
    with pytest.raises(UserError, match="remask_schedule"):
        CosineGammaSchedule(CosineGammaOptions(remask_schedule="cubic"))


def test_cosine_gamma_one_is_meissonics_mask_ratio():
    for t in range(6):
        assert action(CosineGammaSchedule(), t, 6)[1] == action(MeissonicSchedule(), t, 6)[1]


@pytest.mark.parametrize("t", [0, 2])
def test_constant_formula(t):
    sched = ConstantSchedule(ConstantOptions(temperature=1.3, remask_temperature=0.5, cfg_scale=2.0))
    tau_s, r, tau_r, s = action(sched, t, 3)
    assert (tau_s, tau_r, s) == (pytest.approx(1.3), 0.5, 2.0)
    assert r == pytest.approx(max(cos_r(t, 3), 0.0), abs=1e-6)


@pytest.mark.parametrize("t", [0, 4, 9])
def test_amused_formula(t):
    T = 10
    tau_s, r, tau_r, s = action(AmusedSchedule(), t, T)
    assert (tau_s, s) == (1.0, 10.0)
    # the same float32 expression AmusedScheduler.step uses for the mask ratio
    want = torch.cos((torch.tensor([[t]]) + 1) / T * math.pi / 2)
    assert r == max(float(want), 0.0)
    assert tau_r == float(torch.linspace(2, 0, T)[t])
    lin = AmusedSchedule(
        AmusedScheduleOptions(masking_schedule="linear", temperature_start=3.0, temperature_end=1.0)
    )
    assert action(lin, t, T)[1] == pytest.approx(1 - (t + 1) / T, abs=1e-7)
    assert action(lin, t, T)[2] == pytest.approx(3.0 - 2.0 * t / (T - 1), abs=1e-6)


def test_amused_guidance_at_most_one_means_no_guidance():
    assert action(AmusedSchedule(AmusedScheduleOptions(guidance_scale=0.5)), 0, 4)[3] == 1.0
    assert action(AmusedSchedule(AmusedScheduleOptions(guidance_scale=4.0)), 0, 4)[3] == 4.0


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(NAMES), T=st.integers(1, 64), b=st.integers(1, 4), data=st.data())
def test_every_fixed_schedule_is_valid_at_any_step_count(name, T, b, data):
    sched = get_registry().get("schedule", name).cls()
    t = data.draw(st.integers(0, T - 1))
    a, raw, lp = sched.act(t, T, b, None, torch.Generator().manual_seed(0))
    assert a.shape == (b, NUM_ACTIONS) and a.dtype == torch.float32
    assert torch.equal(a, raw) and torch.equal(lp, torch.zeros(b))
    assert bool((a == a[:1]).all())
    tau_s, r, tau_r = a[0, 0], a[0, 1], a[0, 2]
    assert tau_s > 0 and 0 <= r <= 1 and tau_r >= 0
    assert torch.equal(sched.log_prob(t, T, None, raw), torch.zeros(b))
    assert not sched.stochastic and not sched.needs_features
    if t + 1 < T:  # the mask ratio never increases
        assert sched.act(t + 1, T, 1, None, None)[0][0, 1] <= r


def test_fixed_actions_table():
    table = fixed_actions(MeissonicSchedule(), 5)
    assert table.shape == (5, NUM_ACTIONS)
    for t in range(5):
        assert table[t].tolist() == action(MeissonicSchedule(), t, 5)
    assert table[-1, 1] == 0.0 and table[0, 2] == 2.0


def test_act_results_are_not_shared_with_the_cache():
    sched = MeissonicSchedule()
    a, _, _ = sched.act(0, 4, 2, None, None)
    a.fill_(-1.0)
    assert sched.act(0, 4, 2, None, None)[0][0, 3] == 9.0


def test_registered_and_options_validated():
    reg = get_registry()
    for name in ("meissonic", "meissonic-table1", "cosine-gamma", "constant", "amused"):
        assert reg.get("schedule", name).cls.name == name
    problems: list[str] = []
    build(CosineGammaOptions, {"gamma": 0.0, "remask_schedule": "cubic"}, "schedule.options", problems)
    assert any("gamma" in p for p in problems) and any("remask_schedule" in p for p in problems)

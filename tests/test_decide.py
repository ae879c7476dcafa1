"""The pure decision logic, on plain lists of readings."""
from __future__ import annotations

import datetime as dt
import textwrap
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorslm.controller.decision.decide import Decider, DecisionError, DeciderState, Rule, decide
from tensorslm.controller.decision.policy import load_policy
from tensorslm.controller.power.readings import Method, PowerReading

POINTS = """\
points:
  - {name: full, threads: 2, max_new_tokens: 256, watts: 5.0, figures_method: estimated}
  - {name: balanced, rung: r64, threads: 1, watts: 3.8, figures_method: estimated}
  - {name: eco, rung: r16, max_new_tokens: 48, watts: 3.0, figures_method: estimated}
"""
LEVELS = """\
battery:
  - {point: balanced, enter_below: 60, exit_above: 65}
  - {point: eco, enter_below: 30, exit_above: 35}
"""


@pytest.fixture
def make_policy(tmp_path):
    def make(text: str = "", *, dwell: float = 0, smoothing: float = 0):
        path = tmp_path / "policy.yaml"
        path.write_text(POINTS + f"dwell_seconds: {dwell}\nsmoothing_seconds: {smoothing}\n"
                        + textwrap.dedent(text))
        return load_policy(path)
    return make


def reading(t: float, battery: float | None = None, watts: float | None = None,
            external: bool = False) -> PowerReading:
    return PowerReading(time=t, method=Method.SIMULATED, battery_percent=battery, watts=watts,
                        on_external_power=external)


def run(decider: Decider, batteries: list[float], start: float = 0.0, step: float = 10.0,
        **kw) -> list:
    return [decider.step(reading(start + i * step, b, **kw), start + i * step)
            for i, b in enumerate(batteries)]


def test_no_rule_applies_gives_top_point(make_policy):
    decision = Decider(make_policy(LEVELS)).step(reading(0, 90), 0)
    assert (decision.point.name, decision.rule, decision.switched) == ("full", Rule.DEFAULT, True)
    assert decision.previous is None


def test_hysteresis_enter_below_exit_above(make_policy):
    decider = Decider(make_policy(LEVELS))
    batteries = [70, 61, 59.9, 62, 64.9, 65.0, 65.1, 62, 59]
    names = [d.point.name for d in run(decider, batteries)]
    assert names == ["full", "full", "balanced", "balanced", "balanced", "balanced", "full",
                     "full", "balanced"]


def test_a_deep_drop_enters_the_deepest_level_and_rising_leaves_one_band_at_a_time(make_policy):
    decider = Decider(make_policy(LEVELS))
    names = [d.point.name for d in run(decider, [90, 20, 33, 36, 63, 66])]
    assert names == ["full", "eco", "eco", "balanced", "balanced", "full"]


def test_dwell_time_holds_a_switch(make_policy):
    decider = Decider(make_policy(LEVELS, dwell=100))
    decisions = run(decider, [90, 50, 50, 50, 50, 50, 50, 20, 20, 20], step=25)
    names = [d.point.name for d in decisions]
    # first decision at t=0 is free; the switch to balanced waits until t=100
    assert names == ["full", "full", "full", "full", "balanced", "balanced", "balanced",
                     "balanced", "eco", "eco"]
    held = decisions[1]
    assert held.rule is Rule.DWELL and not held.switched
    assert "holding full for 75 s more" in held.reason and "battery wants balanced" in held.reason
    assert [d.time for d in decisions if d.switched] == [0, 100, 200]


def test_smoothing_ignores_a_short_dip(make_policy):
    decider = Decider(make_policy(LEVELS, smoothing=60))
    decisions = run(decider, [80, 80, 40, 80, 80], step=5)
    assert [d.point.name for d in decisions] == ["full"] * 5
    assert decisions[2].battery_percent == pytest.approx(80 - 40 * (1 - 2.718281828 ** (-5 / 60)),
                                                         rel=1e-6)
    # a lasting drop does get through
    decisions = run(decider, [40] * 30, start=25, step=5)
    assert decisions[-1].point.name == "balanced"


def test_external_power_always_top_point(make_policy):
    decider = Decider(make_policy(LEVELS + "critical: {point: eco, enter_below: 10, exit_above: 15}\n"))
    decisions = run(decider, [50, 20, 5], external=True)
    assert [(d.point.name, d.rule) for d in decisions] == [("full", Rule.EXTERNAL_POWER)] * 3
    decision = decider.step(reading(40, 5), 40)
    assert (decision.point.name, decision.rule) == ("eco", Rule.CRITICAL)


def test_critical_beats_override_and_dwell(make_policy):
    policy = make_policy(LEVELS + "critical: {point: eco, enter_below: 10, exit_above: 15}\n",
                         dwell=1000)
    decider = Decider(policy)
    decider.step(reading(0, 90), 0)
    decider.set_override("full", until=10_000)
    decision = decider.step(reading(10, 9), 10)
    assert (decision.point.name, decision.rule, decision.switched) == ("eco", Rule.CRITICAL, True)
    assert "critical 10%" in decision.reason
    # critical stays until above exit_above; then the override (still valid) applies
    assert decider.step(reading(20, 14), 20).rule is Rule.CRITICAL
    after = decider.step(reading(30, 16), 30)
    assert (after.point.name, after.rule) == ("full", Rule.OVERRIDE)


def test_override_applies_at_once_and_expires(make_policy):
    decider = Decider(make_policy(LEVELS, dwell=500))
    decider.step(reading(0, 20), 0)
    decider.set_override("full", until=100, reason="operator: demo")
    now = decider.step(reading(10, 20), 10)
    assert (now.point.name, now.rule, now.reason, now.switched) == (
        "full", Rule.OVERRIDE, "operator: demo", True)
    assert decider.step(reading(99, 20), 99).point.name == "full"
    expired = decider.step(reading(100, 20), 100)
    assert (expired.point.name, expired.rule, expired.switched) == ("eco", Rule.BATTERY, True)
    assert expired.reason.startswith("override expired; battery 20.0%")
    assert decider.state.override is None


def test_override_of_unknown_point_is_refused(make_policy):
    decider = Decider(make_policy())
    with pytest.raises(ValueError, match="no operating point named 'turbo'"):
        decider.set_override("turbo", until=5)


def test_fallback_when_sensor_failing(make_policy):
    decider = Decider(make_policy("fallback: {point: balanced, after_failures: 2}\n"))
    assert decider.step(reading(0, 90), 0).point.name == "full"
    failed = decider.step(None, 10)
    assert (failed.point.name, failed.rule) == ("balanced", Rule.FALLBACK)
    assert "failed 2 reads" in failed.reason
    assert decider.step(reading(20, 90), 20).point.name == "full"


def test_schedule_caps_and_most_frugal_ceiling_wins(make_policy):
    policy = make_policy(LEVELS + "schedule:\n  - {point: balanced, from: '22:00', to: '06:00'}\n")
    decider = Decider(policy)
    night = dt.datetime(2026, 11, 23, 23, 0)
    day = dt.datetime(2026, 11, 23, 12, 0)
    assert decider.step(reading(0, 90), 0, day).point.name == "full"
    d = decider.step(reading(10, 90), 10, night)
    assert (d.point.name, d.rule) == ("balanced", Rule.SCHEDULE)
    d = decider.step(reading(20, 20), 20, night)   # battery asks for eco, more frugal
    assert (d.point.name, d.rule) == ("eco", Rule.BATTERY)
    # without a local time the schedule cannot apply
    assert decider.step(reading(30, 90), 30).point.name == "full"


def test_power_budget_best_point_that_fits_and_observed_watts_replace_figures(make_policy):
    policy = make_policy("power_budget: {max_watts: 4.0}\n", smoothing=10)
    decider = Decider(policy)
    first = decider.step(reading(0, 80, watts=3.7), 0)
    assert (first.point.name, first.rule) == ("balanced", Rule.POWER_BUDGET)
    assert "3.80 W estimated" in first.reason
    # measured at 'balanced' for longer than 3 time constants: 4.6 W does not fit any more
    actual = {"balanced": 4.6, "eco": 2.9}   # what the machine draws at each point
    decisions = []
    for t in range(10, 200, 10):
        decisions.append(decider.step(reading(t, 80, watts=actual[decider.state.point]), t))
    switches = [(d.time, d.point.name) for d in decisions if d.switched]
    assert switches == [(30, "eco")]         # learnt only after 3 time constants at balanced
    assert decider.state.observed_watts["balanced"][0] == pytest.approx(4.6, abs=0.25)
    assert decider.state.observed_watts["eco"] == (pytest.approx(2.9, abs=0.1), 190)
    assert "3.00 W estimated" in decisions[2].reason
    assert decisions[-1].reason.endswith("(2.90 W observed)")


def test_observed_figures_expire_so_an_excluded_point_is_tried_again(make_policy):
    policy = make_policy("power_budget: {max_watts: 4.0, observed_seconds: 100}\n", smoothing=10)
    decider = Decider(policy)
    actual = {"balanced": 4.6, "eco": 2.9}
    points = []
    for t in range(0, 400, 10):
        point = decider.state.point or "balanced"
        points.append(decider.step(reading(t, 80, watts=actual[point]), t).point.name)
    # balanced is excluded at t=30 (observed 4.6 W), tried again once that figure is older
    # than 100 s (t=140), excluded again 30 s later
    assert points[:3] == ["balanced"] * 3 and points[3] == "eco"
    assert points[14] == "balanced" and points[17] == "eco"


def test_power_budget_nothing_fits_picks_lowest(make_policy):
    decider = Decider(make_policy("power_budget: {max_watts: 1.0}\n"))
    d = decider.step(reading(0, 80), 0)
    assert d.point.name == "eco"
    assert d.reason == ("no point fits 1 W (full 5.00 W estimated, balanced 3.80 W estimated, "
                        "eco 3.00 W estimated); most frugal point")


def test_time_going_backwards_is_refused(make_policy):
    decider = Decider(make_policy())
    decider.step(reading(10, 80), 10)
    with pytest.raises(DecisionError, match="expected now >= 10"):
        decider.step(reading(5, 80), 5)


def test_decide_is_pure(make_policy):
    policy = make_policy(LEVELS)
    state = DeciderState()
    d1, s1 = decide(policy, state, reading(0, 50), 0)
    d2, s2 = decide(policy, state, reading(0, 50), 0)
    assert state == DeciderState() and d1 == d2 and s1 == s2
    assert s1.point == "balanced" and s1.level == 1


def test_replace_policy_keeps_current_point_when_still_defined(make_policy, tmp_path):
    decider = Decider(make_policy(LEVELS))
    decider.step(reading(0, 50), 0)
    other = tmp_path / "other.yaml"
    other.write_text("points:\n  - {name: full}\n  - {name: tiny}\n")
    decider.replace_policy(load_policy(other))
    assert decider.state.point is None and decider.state.level == 0
    d = decider.step(reading(10, 50), 10)
    assert d.switched and d.point.name == "full"


@pytest.fixture(scope="module")
def levels_policy(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "levels.yaml"
    path.write_text(POINTS + LEVELS)
    return load_policy(path)


@settings(max_examples=150, deadline=None)
@given(
    dwell=st.floats(min_value=1, max_value=300),
    smoothing=st.sampled_from([0.0, 5.0, 30.0]),
    steps=st.lists(st.tuples(st.floats(min_value=0.1, max_value=40),      # seconds to next read
                             st.floats(min_value=-6, max_value=6)),       # noise, percent
                   min_size=1, max_size=120),
)
def test_noisy_readings_near_a_threshold_never_switch_faster_than_dwell(
        levels_policy, dwell, smoothing, steps):
    """Battery hovering around 60 % (balanced enters below 60, leaves above 65) and around
    30 %: whatever the noise, consecutive switches are at least ``dwell`` seconds apart."""
    decider = Decider(replace(levels_policy, dwell_seconds=dwell, smoothing_seconds=smoothing))
    now, switch_times = 0.0, []
    for i, (gap, noise) in enumerate(steps):
        now += gap
        centre = 60 if i < len(steps) // 2 else 30
        decision = decider.step(reading(now, centre + noise), now)
        if decision.switched:
            switch_times.append(now)
    gaps = [b - a for a, b in zip(switch_times, switch_times[1:])]
    assert all(g >= dwell for g in gaps), (dwell, switch_times)

"""Policy YAML: validated dataclasses, and errors that name the file, the line and the field."""
from __future__ import annotations

import datetime as dt
import textwrap
from pathlib import Path

import pytest

from tensorslm.errors import ConfigError
from tensorslm.controller.decision.policy import ScheduleWindow, Weekday, load_policy
from tensorslm.controller.power.readings import Method

ROOT = Path(__file__).resolve().parents[1]
POLICIES = sorted((ROOT / "deploy" / "policies").glob("*.yaml"))

POINTS = """\
points:
  - name: full
    threads: 2
    max_new_tokens: 256
  - name: balanced
    rung: r64
    threads: 1
  - name: eco
    rung: r16
    max_new_tokens: 48
"""


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_example_policies_shipped_in_deploy_parse():
    assert {p.name for p in POLICIES} >= {"battery.yaml", "power_budget.yaml", "schedule.yaml"}
    for path in POLICIES:
        policy = load_policy(path)
        assert policy.file == str(path)
        assert len(policy.points) >= 2


def test_battery_example_moves_the_knobs_that_measurably_save_energy():
    # bench/results/rung_energy_smollm2.md: with head tied a compressed rung decodes for less
    # CPU per token than full; docs/engine.md, Threads: a second thread costs 1.2-1.5x the CPU
    # per token, so no battery point runs one.
    policy = load_policy(ROOT / "deploy" / "policies" / "battery.yaml")
    top, low = policy.points[0], policy.points[-1]
    assert top.rung == "full" and low.rung != "full"
    assert all(point.threads == 1 for point in policy.points)
    assert top.max_new_tokens > low.max_new_tokens
    assert low.max_prompt_tokens is not None and low.max_prompt_tokens < 1024


def test_full_policy_is_read_into_values(tmp_path):
    path = write(tmp_path, POINTS + """\
external_power: balanced
dwell_seconds: 90
smoothing_seconds: 0
battery:
  - {point: balanced, enter_below: 50, exit_above: 55}
  - {point: eco, enter_below: 20, exit_above: 25.5}
critical: {point: eco, enter_below: 5, exit_above: 8}
schedule:
  - {point: eco, from: '22:30', to: '06:00', days: [mon, Fri]}
fallback: {point: balanced, after_failures: 4}
""")
    policy = load_policy(path)
    assert policy.names == ["full", "balanced", "eco"]
    assert policy.top.threads == 2 and policy.top.rung == "full"
    assert policy.point("eco").max_new_tokens == 48
    assert policy.external_power_point == "balanced"
    assert (policy.dwell_seconds, policy.smoothing_seconds) == (90.0, 0.0)
    assert [(lv.point, lv.enter_below, lv.exit_above) for lv in policy.battery_levels] == [
        ("balanced", 50.0, 55.0), ("eco", 20.0, 25.5)]
    assert policy.critical.enter_below == 5.0
    window = policy.schedule[0]
    assert (window.start, window.end) == (dt.time(22, 30), dt.time(6, 0))
    assert window.days == {Weekday.MON, Weekday.FRI}
    assert policy.fallback.point == "balanced" and policy.fallback.after_failures == 4
    assert policy.rank("eco") == 2


def test_defaults_fallback_is_last_point_external_is_top(tmp_path):
    policy = load_policy(write(tmp_path, POINTS))
    assert policy.fallback.point == "eco"
    assert policy.external_power_point == "full"
    assert policy.battery_levels == () and policy.critical is None


def test_point_figures_and_knobs(tmp_path):
    path = write(tmp_path, """\
points:
  - {name: a, watts: 5.5, joules_per_query: 12, figures_method: ina219}
  - {name: b, watts: 3, figures_method: estimated, max_prompt_tokens: 128}
power_budget: {max_watts: 4}
""")
    policy = load_policy(path)
    a, b = policy.points
    assert (a.watts, a.joules_per_query, a.figures_method) == (5.5, 12.0, Method.INA219)
    assert (b.rung, b.max_new_tokens, b.threads, b.max_prompt_tokens) == ("full", 128, 1, 128)
    assert policy.power_budget.max_watts == 4.0


def test_knobs_the_agent_does_not_apply_are_refused(tmp_path):
    """The agent's actuator applies the point's named knobs only; a knob it would ignore is an
    error at load time, not a silent no-op."""
    path = write(tmp_path, "points:\n  - {name: a, extra: {do_sample: true}}\n")
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    assert caught.value.field == "points[0].extra" and caught.value.line == 2
    assert caught.value.reason.startswith("the agent applies only the knobs rung, threads, "
                                          "max_new_tokens, max_prompt_tokens and precision")


@pytest.mark.parametrize("tail, line, field, message", [
    ("battery:\n  - {point: balanced, enter_below: 50, exit_above: 45}\n", 12,
     "battery[0].exit_above", "expected above enter_below (50)"),
    ("battery:\n  - point: economy\n    enter_below: 50\n    exit_above: 55\n", 12,
     "battery[0].point", "point 'economy' not defined; defined points: full, balanced, eco"),
    ("battery:\n  - {point: balanced, enter_below: 50, exit_above: 55}\n"
     "  - {point: eco, enter_below: 60, exit_above: 65}\n", 13,
     "battery[1].enter_below", "falling enter_below; expected below 50"),
    ("battery:\n  - {point: eco, enter_below: 50, exit_above: 55}\n"
     "  - {point: balanced, enter_below: 20, exit_above: 25}\n", 13,
     "battery[1].point", "at least as frugal as the level above ('eco'"),
    ("battery:\n  - {point: eco, enter_below: 120, exit_above: 125}\n", 12,
     "battery[0].enter_below", "expected at most 100, got 120"),
    ("battery:\n  - {point: eco, enter_below: 30, exit_above: 35}\ncritical:\n"
     "  enter_below: 40\n  exit_above: 45\n", 14, "critical.enter_below",
     "below the lowest battery level's enter_below (30)"),
    ("critical:\n  point: eco\n  enter_below: 10\n", 12, "critical.exit_above",
     "required field is missing"),
    ("external_power: turbo\n", 11, "external_power", "point 'turbo' not defined"),
    ("fallback: {point: nope}\n", 11, "fallback.point", "point 'nope' not defined"),
    ("dwell_seconds: -1\n", 11, "dwell_seconds", "expected at least 0, got -1"),
    ("schedule:\n  - point: eco\n    from: 22:00\n    to: '07:00'\n", 13, "schedule[0].from",
     "expected a time of day in quotes, e.g. '22:00'"),
    ("schedule:\n  - point: eco\n    from: '25:00'\n    to: '07:00'\n", 13, "schedule[0].from",
     "expected a time of day HH:MM (00:00 to 23:59), got '25:00'"),
    ("schedule:\n  - {point: eco, from: '22:00', to: '07:00', days: [mon, funday]}\n", 12,
     "schedule[0].days[1]", "expected one of mon, tue, wed, thu, fri, sat, sun; got 'funday'"),
    ("power_budget: {max_watts: 4}\n", 11, "power_budget",
     "give at least one point a 'watts' field"),
    ("smoothing: 3\n", 11, "smoothing", "unknown field; accepted fields here:"),
    ("critical: {point: eco, enter_below: 5, exit_above: 8, hysteresis: 2}\n", 11,
     "critical.hysteresis", "unknown field"),
])
def test_errors_name_file_line_field(tmp_path, tail, line, field, message):
    path = write(tmp_path, POINTS + tail)
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), line, field), str(err)
    assert message in err.reason
    assert str(err).startswith(f"{path}, line {line}, field '{field}': ")


@pytest.mark.parametrize("text, line, field, message", [
    ("points: []\n", 1, "points", "expected at least one operating point"),
    ("points:\n  - {name: a}\n  - {name: a}\n", 3, "points[1].name", "duplicate point name 'a'"),
    ("points:\n  - {name: a, threads: 0}\n", 2, "points[0].threads", "expected at least 1, got 0"),
    ("points:\n  - {name: a, watts: 3}\n", 2, "points[0].figures_method",
     "say how the figures were obtained, one of ina219"),
    ("points:\n  - {name: a, watts: 3, figures_method: guessed}\n", 2, "points[0].figures_method",
     "expected one of ina219"),
    ("points:\n  - {name: a, speed: 3}\n", 2, "points[0].speed", "unknown field"),
])
def test_point_errors(tmp_path, text, line, field, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    assert (info.value.line, info.value.field) == (line, field), str(info.value)
    assert message in info.value.reason


def test_rung_names_checked_against_a_ladder_when_given(tmp_path):
    path = write(tmp_path, POINTS)
    assert load_policy(path, rungs=["full", "r64", "r16"]).point("eco").rung == "r16"
    with pytest.raises(ConfigError) as info:
        load_policy(path, rungs=["full", "r64"])
    assert (info.value.line, info.value.field) == (9, "points[2].rung")
    assert "expected one of full, r64; got 'r16'" in info.value.reason


def test_unknown_point_lookup_lists_defined(tmp_path):
    policy = load_policy(write(tmp_path, POINTS))
    with pytest.raises(ConfigError, match="no operating point named 'x'; defined: full, balanced, eco"):
        policy.point("x")


@pytest.mark.parametrize("start, end, days, moment, inside", [
    ("22:00", "07:00", None, dt.datetime(2026, 11, 23, 23, 0), True),
    ("22:00", "07:00", None, dt.datetime(2026, 11, 23, 6, 59), True),
    ("22:00", "07:00", None, dt.datetime(2026, 11, 23, 7, 0), False),
    ("22:00", "07:00", None, dt.datetime(2026, 11, 23, 12, 0), False),
    ("09:00", "17:00", None, dt.datetime(2026, 11, 23, 9, 0), True),
    ("09:00", "17:00", None, dt.datetime(2026, 11, 23, 17, 0), False),
    # 2026-11-23 is a Monday; 02:00 Tuesday belongs to Monday night's window
    ("22:00", "07:00", {Weekday.MON}, dt.datetime(2026, 11, 24, 2, 0), True),
    ("22:00", "07:00", {Weekday.MON}, dt.datetime(2026, 11, 23, 2, 0), False),
    ("09:00", "17:00", {Weekday.SAT}, dt.datetime(2026, 11, 28, 10, 0), True),
])
def test_schedule_window_contains(start, end, days, moment, inside):
    window = ScheduleWindow("eco", dt.time.fromisoformat(start), dt.time.fromisoformat(end),
                            frozenset(days) if days else None)
    assert window.contains(moment) is inside


def test_readme_policy_example_parses(tmp_path):
    """The commented example in docs/energy.md's controller-policy section is a valid policy."""
    readme = (ROOT / "docs" / "energy.md").read_text(encoding="utf-8")
    start = readme.index("<!-- section:controller-policy -->")
    section = readme[start:readme.index("<!-- /section:controller-policy -->")]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = write(tmp_path, example)
    policy = load_policy(path)
    assert policy.names == ["full", "balanced", "eco"]
    assert policy.point("eco").figures_method is Method.ESTIMATED
    assert [lv.point for lv in policy.battery_levels] == ["balanced", "eco"]
    assert policy.schedule[0].days == {Weekday.MON, Weekday.TUE, Weekday.WED, Weekday.THU,
                                       Weekday.FRI}
    # the error quoted in the page is the one this example gives with exit_above 55
    bad = write(tmp_path, example.replace("exit_above: 65", "exit_above: 55"))
    with pytest.raises(ConfigError) as info:
        load_policy(bad)
    assert f"line {info.value.line}, field '{info.value.field}': {info.value.reason}" in \
        " ".join(section.split())

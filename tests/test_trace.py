"""Trace CSV reading (errors by file, line, column) and replay through the real controller."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tensorslm.controller.decision.decide import Rule
from tensorslm.errors import ConfigError
from tensorslm.controller.decision.policy import load_policy
from tensorslm.controller.decision.trace import load_trace, plot_simulation, simulate

ROOT = Path(__file__).resolve().parents[1]
HEADER = "time,battery_percent,watts,on_external_power\n"
POLICY = """\
points:
  - {name: full, threads: 2}
  - {name: eco, rung: r16, max_new_tokens: 48}
dwell_seconds: 60
smoothing_seconds: 0
battery:
  - {point: eco, enter_below: 50, exit_above: 55}
schedule:
  - {point: eco, from: '22:00', to: '06:00'}
fallback: {point: eco, after_failures: 2}
"""


@pytest.fixture
def policy(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return load_policy(path)


def write(tmp_path, body: str, header: str = HEADER) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(header + body)
    return path


def test_reads_seconds_and_empty_cells(tmp_path):
    rows = load_trace(write(tmp_path, "10,80,3.5,false\n20,,4,yes\n\n30,,,\n"))
    assert [(r.line, r.time, r.battery_percent, r.watts, r.on_external_power) for r in rows] == [
        (2, 0.0, 80.0, 3.5, False), (3, 10.0, None, 4.0, True), (5, 20.0, None, None, None)]
    assert [r.failed for r in rows] == [False, False, True]
    assert rows[0].local_time is None


def test_iso_times_give_local_time_and_start_gives_it_to_seconds(tmp_path):
    rows = load_trace(write(tmp_path, "2026-11-23T21:59:00,80,,\n2026-11-23T22:01:30,80,,\n"))
    assert [r.time for r in rows] == [0.0, 150.0]
    assert rows[1].local_time == dt.datetime(2026, 11, 23, 22, 1, 30)
    rows = load_trace(write(tmp_path, "0,80,,\n90,80,,\n"), start=dt.datetime(2026, 1, 1, 8))
    assert rows[1].local_time == dt.datetime(2026, 1, 1, 8, 1, 30)


@pytest.mark.parametrize("body, header, line, field, message", [
    ("", "time,battery,watts,on_external_power\n", 1, None,
     "missing: battery_percent; unknown: battery"),
    ("0,80,3,false\n5,180,3,false\n", HEADER, 3, "battery_percent", "expected 0..100, got 180"),
    ("0,80,lots,false\n", HEADER, 2, "watts", "expected a number or an empty cell, got 'lots'"),
    ("0,80,3,maybe\n", HEADER, 2, "on_external_power", "expected true/false"),
    ("noon,80,3,false\n", HEADER, 2, "time", "expected seconds (e.g. 12.5) or an ISO date-time"),
    ("10,80,3,false\n5,80,3,false\n", HEADER, 3, "time", "expected times in increasing order"),
    ("0,80,3\n", HEADER, 2, None, "expected 4 values, got 3"),
    ("", HEADER, 2, None, "trace has a header but no rows"),
    ("0,80,,\n2026-11-23T10:00:00,80,,\n", HEADER, 3, "time", "same form as the first row's (seconds)"),
])
def test_trace_errors_name_line_and_column(tmp_path, body, header, line, field, message):
    path = write(tmp_path, body, header)
    with pytest.raises(ConfigError) as info:
        load_trace(path)
    assert (info.value.file, info.value.line, info.value.field) == (str(path), line, field)
    assert message in info.value.reason


def test_missing_trace_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read trace"):
        load_trace(tmp_path / "nope.csv")


def test_simulate_switches_with_dwell_fallback_and_time_at_points(tmp_path, policy):
    body = "".join(f"{t},{b},,false\n" for t, b in
                   [(0, 90), (30, 45), (60, 45), (90, 45), (120, 60), (150, 60), (180, 60)])
    body += "210,,,\n240,,,\n270,60,,false\n"
    result = simulate(policy, load_trace(write(tmp_path, body)))
    assert result.points == ["full", "full", "eco", "eco", "full", "full", "full", "full", "eco",
                             "eco"]
    assert [d.rule for d in result.decisions[:3]] == [Rule.DEFAULT, Rule.DWELL, Rule.BATTERY]
    # the first failed read is retried; the second reaches after_failures=2: fallback eco;
    # the good reading 30 s later wants full again but the dwell time holds eco
    assert result.decisions[7] is None and result.decisions[8].rule is Rule.FALLBACK
    assert result.decisions[9].rule is Rule.DWELL and "full" in result.decisions[9].reason
    assert [(s.time, s.to_point) for s in result.switches] == [
        (0, "full"), (60, "eco"), (120, "full"), (240, "eco")]
    assert result.switches[-1].reading is None and result.switch_count == 3
    assert result.seconds_at == {"full": 60 + 120, "eco": 60 + 30}


def test_simulate_uses_trace_dates_for_schedules(tmp_path, policy):
    body = "".join(f"2026-11-23T{h}:00:00,90,,false\n" for h in ("20", "21", "22", "23"))
    result = simulate(policy, load_trace(write(tmp_path, body)))
    assert result.points == ["full", "full", "eco", "eco"]
    assert result.decisions[2].rule is Rule.SCHEDULE
    assert result.switches[-1].wall_time == dt.datetime(2026, 11, 23, 22)


def test_shipped_traces_replay_through_shipped_policies(tmp_path):
    battery = load_policy(ROOT / "deploy" / "policies" / "battery.yaml")
    result = simulate(battery, load_trace(ROOT / "deploy" / "traces" / "discharge.csv"))
    rules = {s.rule for s in result.switches}
    assert {Rule.BATTERY, Rule.EXTERNAL_POWER, Rule.FALLBACK} <= rules
    gaps = [b.time - a.time for a, b in zip(result.switches, result.switches[1:])
            if b.rule not in (Rule.CRITICAL, Rule.OVERRIDE)]
    assert min(gaps) >= battery.dwell_seconds
    out = plot_simulation(result, tmp_path / "plot.png")
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"

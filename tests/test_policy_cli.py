"""``tensorslm policy check`` and ``simulate`` through click's runner, on the shipped examples."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tensorslm.cli import cli

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "deploy" / "policies"
TRACES = ROOT / "deploy" / "traces"


@pytest.fixture
def runner():
    return CliRunner()


@pytest.mark.parametrize("name", ["battery.yaml", "power_budget.yaml", "schedule.yaml"])
def test_check_accepts_shipped_policies(runner, name):
    result = runner.invoke(cli, ["policy", "check", str(POLICIES / name)])
    assert result.exit_code == 0, result.output
    assert f"{name}: OK" in result.output
    assert "Rules, first match wins:" in result.output


def test_check_lists_points_and_rules(runner):
    result = runner.invoke(cli, ["policy", "check", str(POLICIES / "battery.yaml")])
    lines = result.output.splitlines()
    eco = next(line for line in lines if line.startswith("│ eco"))
    assert "auto-6" in eco and "32" in eco and "256" in eco
    assert "1. critical: battery <= 10% -> eco (until > 15%)" in result.output
    assert "battery < 60% -> at most balanced (until > 65%)" in result.output


def test_check_error_names_file_line_field_and_exits_1(runner, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("points:\n  - {name: full}\n  - {name: eco}\ncritical:\n"
                    "  point: eco\n  enter_below: 20\n  exit_above: 12\n")
    result = runner.invoke(cli, ["policy", "check", str(path)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {path}, line 7, field 'critical.exit_above': expected above enter_below (20) "
        "so that readings near the threshold do not flap; got 12")


def test_check_missing_file(runner, tmp_path):
    result = runner.invoke(cli, ["policy", "check", str(tmp_path / "none.yaml")])
    assert result.exit_code == 1 and "none.yaml: file not found" in result.output


def test_simulate_prints_decisions_and_plots(runner, tmp_path):
    out = tmp_path / "plot.png"
    result = runner.invoke(cli, ["policy", "simulate", str(POLICIES / "battery.yaml"),
                                 "--trace", str(TRACES / "discharge.csv"), "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert "external_power" in result.output and "fallback" in result.output
    assert "switches over 7:00:00" in result.output
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_simulate_start_time_makes_schedules_apply(runner, tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("time,battery_percent,watts,on_external_power\n0,90,,false\n"
                     "3600,90,,false\n7200,90,,false\n")
    args = ["policy", "simulate", str(POLICIES / "schedule.yaml"), "--trace", str(trace)]
    without = runner.invoke(cli, args)
    with_start = runner.invoke(cli, args + ["--start", "2026-11-23T21:00:00"])
    assert without.exit_code == 0 and with_start.exit_code == 0, with_start.output
    assert "schedule" not in without.output.split("Decisions")[1]
    assert "schedule 22:00-07:00 at 22:00" in with_start.output
    assert "1 switch over 2:00:00" in with_start.output


def test_simulate_bad_trace_is_a_clean_error(runner, tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("time,battery_percent,watts,on_external_power\n0,90,,perhaps\n")
    result = runner.invoke(cli, ["policy", "simulate", str(POLICIES / "battery.yaml"),
                                 "--trace", str(trace)])
    assert result.exit_code == 1
    assert f"Error: {trace}, line 2, field 'on_external_power': expected true/false" in result.output

"""The simulated power source as ``tensorslm serve`` builds it: the board its load is modelled
on by default, and the policy's dwell and smoothing in the battery's accelerated time."""
from __future__ import annotations

from pathlib import Path

import pytest

from tensorslm.config_file import load_section
from tensorslm.controller.decision.policy import load_policy
from tensorslm.controller.power.power_model import BOARDS
from tensorslm.controller.power.sources import (SIMULATED_LOAD_BOARD, open_source,
                                                time_acceleration)

ROOT = Path(__file__).resolve().parents[1]


def power(tmp_path, text: str):
    path = tmp_path / "agent.yaml"
    path.write_text(f"power: {text}\n")
    return load_section(path).section("power")


def test_the_simulated_load_is_a_pi_4_by_default_on_any_machine(tmp_path):
    source = open_source(power(tmp_path, "{kind: simulated}"))
    assert SIMULATED_LOAD_BOARD == "raspberry-pi-4"
    assert source.battery.load.board is BOARDS["raspberry-pi-4"]
    auto = open_source(power(tmp_path, "{kind: simulated, load_board: auto}"))
    assert auto.battery.load.board.name in BOARDS   # still available, as an explicit choice


def test_an_idle_pack_drains_at_the_default_boards_idle_power_times_the_acceleration(tmp_path):
    """2 Wh at 120x, idle for 10 s of wall time: the Pi 4 model's 2.7 W idle takes 2.7 x 10 x
    120 J = 0.9 Wh (45 %); the x86 laptop profile (6 W idle) would take the whole pack."""
    clock = [0.0]
    section = power(tmp_path, "{kind: simulated, capacity_wh: 2, acceleration: 120, "
                              "internal_ohms: 0}")
    source = open_source(section, clock=lambda: clock[0])
    battery = source.battery
    idle_watts = battery.load.board.watts(0.0)   # the default board, no CPU time
    battery.load = lambda: idle_watts
    for _ in range(10):
        clock[0] += 1.0
        source.read()
    assert idle_watts == 2.7
    assert battery.soc_percent == pytest.approx(100 * (1 - 2.7 * 10 * 120 / 3600 / 2), abs=0.5)
    assert not battery.empty


@pytest.mark.parametrize("text, factor", [
    ("{kind: simulated, acceleration: 60}", 60.0),
    ("{kind: simulated}", 1.0),
    ("{kind: estimated}", 1.0),
    ("{kind: ups, board: waveshare-ups-hat}", 1.0),
])
def test_time_acceleration_of_a_power_section(tmp_path, text, factor):
    assert time_acceleration(power(tmp_path, text)) == factor


def test_policy_accelerated_divides_dwell_and_smoothing():
    policy = load_policy(ROOT / "deploy/policies/battery.yaml")
    fast = policy.accelerated(120)
    assert fast.dwell_seconds == pytest.approx(policy.dwell_seconds / 120)
    assert fast.smoothing_seconds == pytest.approx(policy.smoothing_seconds / 120)
    assert fast.points == policy.points and fast.battery_levels == policy.battery_levels
    with pytest.raises(ValueError, match="acceleration factor > 0, got 0"):
        policy.accelerated(0)


def test_serve_runs_the_policy_in_the_batterys_time(tmp_path):
    from tensorslm.agent.config import load_config
    from tensorslm.agent.wiring import build_agent
    from tests.tiny_model import tiny_model

    model, tokenizer = tiny_model()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    policy_path = ROOT / "deploy/policies/battery.yaml"
    config = tmp_path / "agent.yaml"
    config.write_text(f"device: pi-s\nbroker: {{url: 'mqtt://127.0.0.1:1'}}\n"
                      f"model: {{ref: {tmp_path / 'model'}}}\nlog: q.db\n"
                      f"power: {{kind: simulated, acceleration: 40}}\npolicy: {policy_path}\n")
    agent = build_agent(load_config(config))
    policy = load_policy(policy_path)
    assert agent.controller.policy.dwell_seconds == pytest.approx(policy.dwell_seconds / 40)
    assert agent.controller.policy.smoothing_seconds == pytest.approx(
        policy.smoothing_seconds / 40)
    assert agent.controller.interval == pytest.approx(5.0 / 40)   # ticks in battery time too
    agent.log.close()

"""The simulated battery, read through the real INA219 driver; and the board power model."""
from __future__ import annotations

import pytest

from tensorslm.errors import ConfigError
from tensorslm.controller.power.power_model import BOARDS, EstimatedSource, board_model, detect_board
from tensorslm.controller.power.readings import Method
from tensorslm.controller.power.simulated_battery import LoadEstimate, SimulatedBattery, SimulatedBatterySource


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def battery(watts, clock, **kw):
    kw.setdefault("acceleration", 60.0)
    return SimulatedBattery(capacity_wh=10.0, load=lambda: watts, clock=clock, **kw)


@pytest.mark.parametrize("light, heavy", [(2.0, 4.0), (3.0, 6.0)])
def test_drains_faster_under_more_load(light, heavy):
    clock = Clock()
    a, b = battery(light, clock), battery(heavy, clock)
    for second in range(1, 61):                 # 1 min x 60 = 1 h simulated
        clock.now = float(second)
        a.advance()
        b.advance()
    assert 0.0 < b.soc_percent < a.soc_percent < 100.0
    # energy removed = load x time x acceleration, plus a small I^2 R loss (< 3 %)
    drained_a = 10.0 - a.energy_wh
    assert light * 1.0 <= drained_a <= 1.03 * light * 1.0


def test_reads_back_through_driver_within_one_lsb():
    clock = Clock()
    b = battery(5.0, clock, soc_percent=60.0)
    source = SimulatedBatterySource(b)
    clock.now = 10.0
    r = source.read()
    lsb = source.board_source.driver.calibration.current_lsb_amps
    assert r.method is Method.SIMULATED
    assert r.volts == pytest.approx(b.terminal_volts, abs=0.004)
    assert r.amps == pytest.approx(b.discharge_amps, abs=lsb)
    assert r.watts == pytest.approx(5.0, rel=0.002)
    assert b.terminal_volts < b.open_circuit_volts          # sag under load
    assert r.battery_percent == pytest.approx(b.soc_percent, abs=0.5)   # sag undone by I x R
    assert r.energy_joules == pytest.approx(50.0)            # 5 W x 10 s, real time


def test_runs_empty_and_stops_drawing():
    clock = Clock()
    b = battery(6.0, clock, soc_percent=5.0, acceleration=1000.0)
    clock.now = 60.0
    b.advance()
    assert b.empty and b.soc_percent == 0.0
    clock.now = 61.0
    b.advance()
    assert b.discharge_amps == 0.0


def test_external_power_charges_and_hides_draw():
    clock = Clock()
    b = battery(4.0, clock, soc_percent=50.0, external_power=True, charge_watts=10.0,
                acceleration=1.0)
    source = SimulatedBatterySource(b)
    clock.now = 60.0
    r = source.read()
    assert b.soc_percent == pytest.approx(50.0 + 100 * 10.0 * 60 / 3600 / 10.0)
    assert r.on_external_power is True and r.charging is True and r.watts is None
    assert r.energy_joules == pytest.approx(240.0)


def test_load_from_cpu_model():
    clock = Clock()
    cpu = [0.0]
    board = board_model("raspberry-pi-4")
    load = LoadEstimate(board, cpu_seconds=lambda: cpu[0], clock=clock)
    clock.now, cpu[0] = 10.0, 20.0              # two busy cores for 10 s
    assert load() == pytest.approx(2.7 + 2 * 0.9)
    clock.now, cpu[0] = 10.1, 20.1              # below min_interval: last figure kept
    assert load() == pytest.approx(4.5)


def test_board_model_energy_and_clamp():
    pi5 = BOARDS["raspberry-pi-5"]
    assert pi5.joules(cpu_seconds=1.0, wall_seconds=2.0) == pytest.approx(2 * 2.7 + 1.15)
    assert pi5.joules(cpu_seconds=100.0, wall_seconds=1.0) == pytest.approx(2.7 + 4 * 1.15)
    assert pi5.joules(1.0, 2.0, include_idle=False) == pytest.approx(1.15)
    with pytest.raises(ConfigError, match="known boards: raspberry-pi-4, raspberry-pi-5, x86-laptop"):
        board_model("pi-zero")


def test_estimated_source_counts_cpu_time():
    clock = Clock()
    cpu = [5.0]
    source = EstimatedSource(BOARDS["raspberry-pi-4"], cpu_seconds=lambda: cpu[0], clock=clock)
    clock.now, cpu[0] = 4.0, 7.0
    r = source.read()
    assert r.method is Method.ESTIMATED
    assert r.energy_joules == pytest.approx(4 * 2.7 + 2 * 0.9)
    assert r.watts == pytest.approx(r.energy_joules / 4)


def test_detect_board_from_device_tree(tmp_path):
    model = tmp_path / "model"
    model.write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\0")
    assert detect_board(model) == "raspberry-pi-5"
    assert detect_board(tmp_path / "absent") == "x86-laptop"

"""UPS board profiles: voltage curve, charging sign, read through the real INA219 driver."""
from __future__ import annotations

import pytest

from tensorslm.errors import ConfigError
from tensorslm.controller.power.ina219_sim import Ina219Model, SimulatedSMBus
from tensorslm.controller.power.readings import Method
from tensorslm.controller.power.ups_boards import (BOARDS, UpsBoardSource, board_named,
                                   cell_volts_from_percent, percent_from_cell_volts)


@pytest.mark.parametrize("volts, percent", [(4.20, 100.0), (4.5, 100.0), (3.00, 0.0), (2.5, 0.0),
                                            (3.82, 50.0), (3.845, 55.0), (4.05, 85.0)])
def test_cell_curve_interpolates_and_clamps(volts, percent):
    assert percent_from_cell_volts(volts) == pytest.approx(percent)


def test_curve_round_trip():
    for p in range(0, 101, 7):
        assert percent_from_cell_volts(cell_volts_from_percent(p)) == pytest.approx(p)


def board(name, pack_volts, battery_amps):
    profile = BOARDS[name]
    chip = Ina219Model(shunt_ohms=profile.shunt_ohms, bus_volts=pack_volts,
                       shunt_amps=battery_amps)
    return UpsBoardSource(profile, bus=SimulatedSMBus({profile.address: chip}),
                          clock=lambda: 5.0), chip


def test_two_cell_board_at_0x42_discharging():
    source, _ = board("waveshare-ups-hat", 7.64, -0.8)     # 3.82 V per cell, 0.8 A out
    r = source.read()
    assert source.driver.address == 0x42
    assert r.method is Method.INA219 and r.time == 5.0
    assert r.battery_percent == pytest.approx(50.0, abs=0.3)
    assert r.amps == pytest.approx(0.8, abs=1e-4)
    assert r.watts == pytest.approx(7.64 * 0.8, abs=0.01)
    assert r.charging is False and r.on_external_power is False


def test_one_cell_board_at_0x43_charging():
    source, _ = board("waveshare-ups-hat-c", 4.0, +1.2)
    r = source.read()
    assert source.driver.address == 0x43
    assert r.battery_percent == pytest.approx(80.0, abs=0.5)
    assert r.charging is True and r.on_external_power is True
    assert r.watts is None                    # the battery shunt does not see the Pi's draw
    assert r.amps == pytest.approx(-1.2, abs=1e-3)


def test_unknown_board_lists_known():
    with pytest.raises(ConfigError, match="known boards: waveshare-ups-hat, waveshare-ups-hat-c"):
        board_named("pijuice")


def test_curve_must_rise():
    with pytest.raises(ValueError, match="must rise"):
        type(BOARDS["waveshare-ups-hat"])("x", 0x40, 1, 0.1, 1.0,
                                          curve=((3.0, 0.0), (3.0, 50.0)))


def test_internal_resistance_undoes_sag():
    from dataclasses import replace
    profile = replace(BOARDS["waveshare-ups-hat"], internal_ohms=0.2)
    chip = Ina219Model(shunt_ohms=0.1, bus_volts=7.44, shunt_amps=-1.0)   # OCV 7.64 V - 1 A x 0.2
    plain = UpsBoardSource(BOARDS["waveshare-ups-hat"], bus=SimulatedSMBus({0x42: chip})).read()
    fixed = UpsBoardSource(profile, bus=SimulatedSMBus({0x42: chip})).read()
    assert fixed.battery_percent == pytest.approx(50.0, abs=0.5)
    assert plain.battery_percent < 25.0                      # loaded pack reads low

"""The fuel-gauge driver against its register-level model on the fake SMBus."""
from __future__ import annotations

import pytest

from tensorslm.controller.errors import ConfigError, SensorError
from tensorslm.controller.power.fuel_gauge import FuelGauge, FuelGaugeSource, decode_crate, decode_soc, decode_vcell
from tensorslm.controller.power.fuel_gauge_sim import FuelGaugeModel
from tensorslm.controller.power.ina219_sim import SimulatedSMBus
from tensorslm.controller.power.readings import Method


def gauge(chip="max17048", **state):
    model = FuelGaugeModel(chip=chip, **state)
    bus = SimulatedSMBus({0x36: model})
    return FuelGauge(bus=bus, chip=chip), model, bus


@pytest.mark.parametrize("word, percent", [(0x3280, 50.5), (0x6400, 100.0), (0x0001, 1 / 256)])
def test_soc_decoding(word, percent):
    assert decode_soc(word) == pytest.approx(percent)


@pytest.mark.parametrize("word, volts", [(0xC350, 3.90625), (0xD200, 4.2), (0, 0.0)])
def test_vcell_decoding(word, volts):
    assert decode_vcell(word) == pytest.approx(volts)


def test_crate_is_signed():
    assert decode_crate(0xFFF6) == pytest.approx(-2.08)
    assert decode_crate(0x000A) == pytest.approx(2.08)


def test_max17048_reads_back_within_one_lsb():
    g, _, _ = gauge(cell_volts=3.7654, soc_percent=63.2, crate_percent_per_hour=-5.0)
    assert g.cell_volts() == pytest.approx(3.7654, abs=78.125e-6)
    assert g.soc_percent() == pytest.approx(63.2, abs=1 / 256)
    assert g.crate_percent_per_hour() == pytest.approx(-5.0, abs=0.208)
    assert g.version() == 0x0012


def test_max17040_has_12_bit_vcell_and_no_crate():
    g, _, _ = gauge(chip="max17040", cell_volts=3.7654)
    assert g.cell_volts() == pytest.approx(3.7654, abs=1.25e-3)
    assert g.cell_volts() != pytest.approx(3.7654, abs=78.125e-6 / 2)
    assert g.crate_percent_per_hour() is None


def test_source_watts_from_crate_and_capacity():
    g, _, _ = gauge(cell_volts=3.8, soc_percent=40.0, crate_percent_per_hour=-20.8)
    r = FuelGaugeSource(g, capacity_wh=20.0, clock=lambda: 1.0).read()
    assert r.method is Method.FUEL_GAUGE
    assert r.battery_percent == pytest.approx(40.0)
    assert r.watts == pytest.approx(20.8 / 100 * 20.0)     # 4.16 W discharging
    assert r.charging is False
    assert FuelGaugeSource(g).read().watts is None            # no capacity: no watts


def test_quick_start_and_read_only_registers():
    g, model, _ = gauge()
    g.quick_start()
    assert model.quick_starts == 1
    with pytest.raises(OSError):
        model.write(0x04, 0)


def test_fault_and_bad_chip():
    g, _, bus = gauge()
    bus.fail_always = True
    with pytest.raises(SensorError, match="address 0x36"):
        FuelGaugeSource(g).read()
    with pytest.raises(ConfigError, match="expected one of max17040, max17043, max17048"):
        FuelGauge(bus=bus, chip="bq27441")

"""The power_supply reader against a sysfs tree built in tmp_path."""
from __future__ import annotations

import pytest

from tensorslm.controller.errors import ConfigError, SensorError
from tensorslm.controller.power.readings import Method
from tensorslm.controller.power.sysfs_battery import SysfsBatterySource, list_supplies


def supply(root, name, **files):
    d = root / name
    d.mkdir(parents=True)
    for key, value in files.items():
        (d / key).write_text(f"{value}\n")
    return d


def test_units_are_micro_and_power_now_preferred(tmp_path):
    supply(tmp_path, "AC", type="Mains", online=0)
    supply(tmp_path, "BAT0", type="Battery", status="Discharging", capacity=87,
           voltage_now=11_400_000, current_now=-1_250_000, power_now=14_250_000,
           energy_now=40_000_000)
    r = SysfsBatterySource(root=tmp_path, clock=lambda: 3.0).read()
    assert r.method is Method.SYSFS and r.time == 3.0
    assert r.battery_percent == 87.0
    assert r.volts == pytest.approx(11.4)
    assert r.amps == pytest.approx(1.25)          # sign normalised: discharging is positive
    assert r.watts == pytest.approx(14.25)
    assert r.on_external_power is False and r.charging is False


def test_missing_files_give_none_and_power_from_v_times_i(tmp_path):
    supply(tmp_path, "battery", type="Battery", status="Discharging",
           voltage_now=3_900_000, current_now=500_000)
    r = SysfsBatterySource(root=tmp_path).read()
    assert r.battery_percent is None
    assert r.watts == pytest.approx(1.95)
    assert r.on_external_power is False           # no external supply listed: from status


def test_charging_hides_watts_and_reads_external(tmp_path):
    supply(tmp_path, "usb", type="USB", online=1)
    supply(tmp_path, "BAT1", type="Battery", status="Charging", energy_now=20_000_000,
           energy_full=40_000_000, current_now=800_000, voltage_now=4_000_000)
    r = SysfsBatterySource("BAT1", root=tmp_path).read()
    assert r.battery_percent == pytest.approx(50.0)   # from energy_now / energy_full
    assert r.watts is None and r.charging is True and r.on_external_power is True
    assert r.amps == pytest.approx(-0.8)


def test_no_battery_lists_what_is_there(tmp_path):
    supply(tmp_path, "AC", type="Mains", online=1)
    assert list_supplies(tmp_path) == {"AC": "Mains"}
    with pytest.raises(ConfigError, match=r"no battery found under .*supplies present: AC \(Mains\)"):
        SysfsBatterySource(root=tmp_path)
    with pytest.raises(ConfigError, match="'BAT9' not found"):
        SysfsBatterySource("BAT9", root=tmp_path)


def test_garbage_and_vanished_battery_raise_sensor_error(tmp_path):
    d = supply(tmp_path, "BAT0", type="Battery", status="Discharging", voltage_now="n/a")
    source = SysfsBatterySource(root=tmp_path)
    with pytest.raises(SensorError, match="expected an integer in micro-units, got 'n/a'"):
        source.read()
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    with pytest.raises(SensorError, match="disappeared"):
        source.read()

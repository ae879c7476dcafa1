"""open_source / meter_for from YAML: every kind, and errors naming file, line and field."""
from __future__ import annotations

import pytest

from tensorslm.config_file import load_section
from tensorslm.controller.power.energy_meter import EnergyMeter
from tensorslm.errors import ConfigError
from tensorslm.controller.power.fuel_gauge_sim import FuelGaugeModel
from tensorslm.controller.power.ina219_sim import Ina219Model, SimulatedSMBus
from tensorslm.controller.power.readings import Method
from tensorslm.controller.power.sources import meter_for, open_source


def power(tmp_path, text):
    path = tmp_path / "agent.yaml"
    path.write_text("name: pi-07\npower:\n" + "".join(f"  {line}\n" for line in text.splitlines()))
    return load_section(path).section("power")


def test_ups_board_over_injected_bus(tmp_path):
    chip = Ina219Model(shunt_ohms=0.1, bus_volts=7.64, shunt_amps=-0.5)
    section = power(tmp_path, "kind: ups\nboard: waveshare-ups-hat\nbus: 3\nmeter:\n  sample_hz: 5")
    seen = []
    source = open_source(section, bus_factory=lambda n: seen.append(n) or SimulatedSMBus({0x42: chip}))
    r = source.read()
    assert seen == [3]
    assert r.method is Method.INA219 and r.battery_percent == pytest.approx(50.0, abs=0.3)
    meter = meter_for(source, section)
    assert isinstance(meter, EnergyMeter) and meter.sample_hz == 5.0


def test_plain_ina219_with_hex_address(tmp_path):
    chip = Ina219Model(shunt_ohms=0.05, bus_volts=5.1, shunt_amps=0.8)
    section = power(tmp_path, "kind: ina219\naddress: 0x45\nshunt_ohms: 0.05\nmax_current_amps: 4")
    r = open_source(section, bus_factory=lambda n: SimulatedSMBus({0x45: chip})).read()
    assert r.watts == pytest.approx(5.1 * 0.8, rel=1e-3)


def test_fuel_gauge(tmp_path):
    gauge = FuelGaugeModel(cell_volts=3.9, soc_percent=72.5)
    section = power(tmp_path, "kind: fuel_gauge\ncapacity_wh: 24")
    r = open_source(section, bus_factory=lambda n: SimulatedSMBus({0x36: gauge})).read()
    assert r.method is Method.FUEL_GAUGE and r.battery_percent == pytest.approx(72.5)


def test_sysfs_and_rapl_roots(tmp_path):
    bat = tmp_path / "ps" / "BAT0"
    bat.mkdir(parents=True)
    for name, value in {"type": "Battery", "status": "Discharging", "capacity": "41"}.items():
        (bat / name).write_text(value)
    r = open_source(power(tmp_path, f"kind: sysfs\nroot: {tmp_path / 'ps'}")).read()
    assert r.battery_percent == 41.0
    zone = tmp_path / "pc" / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text("5")
    (zone / "max_energy_range_uj").write_text("100")
    assert open_source(power(tmp_path, f"kind: rapl\nroot: {tmp_path / 'pc'}")).method is Method.RAPL


def test_simulated_and_estimated(tmp_path):
    clock = iter(range(100)).__next__
    src = open_source(power(tmp_path, "kind: simulated\ncapacity_wh: 5\nacceleration: 120\n"
                                      "load_board: raspberry-pi-5"), clock=lambda: float(clock()))
    assert src.read().method is Method.SIMULATED
    est = open_source(power(tmp_path, "kind: estimated\nboard: raspberry-pi-4"))
    assert est.board.name == "raspberry-pi-4" and est.scope == "process"


def test_gpio_only_source_gets_estimated_meter(tmp_path, mock_factory):
    source = open_source(power(tmp_path, "kind: gpio\npin: 6\nbounce_time: 0"))
    assert source.read().power_lost is False
    assert meter_for(source).method is Method.ESTIMATED
    source.close()


@pytest.mark.parametrize("text, line, field, message", [
    ("kind: battery", 3, "power.kind", "expected one of ina219, ups, fuel_gauge"),
    ("kind: ups\nboard: pijuice", 4, "power.board",
     "expected one of waveshare-ups-hat, waveshare-ups-hat-c; got 'pijuice'"),
    ("kind: ina219\nshunt_ohms: 0.1\nmax_current_amps: 3.2\naddress: 0x36", 6, "power.address",
     "expected at least 64, got 54"),
    ("kind: ina219\nshunt_ohms: -1\nmax_current_amps: 3.2", 4, "power.shunt_ohms", "expected at least"),
    ("kind: estimated\nboard: raspberry-pi-4\nvolts: 5", 5, "power.volts",
     "unknown field; accepted fields here: board, kind, meter, power_loss_pin, scope"),
    ("kind: estimated\nmeter:\n  overlap: split", 5, "power.meter.overlap",
     "expected one of full, shared; got 'split'"),
    ("kind: simulated\nsoc_percent: 150", 4, "power.soc_percent", "expected at most 100"),
])
def test_bad_values_name_file_line_and_field(tmp_path, text, line, field, message):
    with pytest.raises(ConfigError, match=message) as info:
        open_source(power(tmp_path, text), bus_factory=lambda n: SimulatedSMBus())
    assert info.value.file.endswith("agent.yaml")
    assert (info.value.line, info.value.field) == (line, field)


def test_fuel_gauge_with_power_loss_pin(tmp_path, mock_factory):
    gauge = FuelGaugeModel(cell_volts=3.9, soc_percent=60.0, crate_percent_per_hour=1.0)
    section = power(tmp_path, "kind: fuel_gauge\npower_loss_pin:\n  pin: 6\n  bounce_time: 0")
    source = open_source(section, bus_factory=lambda n: SimulatedSMBus({0x36: gauge}))
    assert source.read().power_lost is False
    mock_factory.pin(6).drive_high()     # X728: adapter unplugged
    r = source.read()
    assert r.power_lost is True and r.on_external_power is False
    assert r.method is Method.FUEL_GAUGE and r.battery_percent == pytest.approx(60.0)
    source.close()


def test_modules_import_without_hardware_libraries(tmp_path):
    """With smbus2 and gpiozero unimportable, every module imports; opening says what to install."""
    import subprocess
    import sys
    code = (
        "import sys; sys.modules['smbus2'] = None; sys.modules['gpiozero'] = None\n"
        "import tensorslm.controller.power.ina219, tensorslm.controller.power.ups_boards, tensorslm.controller.power.fuel_gauge, "
        "tensorslm.controller.power.gpio_power, tensorslm.controller.power.sysfs_battery, tensorslm.controller.power.rapl, "
        "tensorslm.controller.power.simulated_battery, tensorslm.controller.power.energy_meter, tensorslm.controller.power.sources\n"
        "from tensorslm.controller.power.readings import HardwareLibraryMissing\n"
        "for open_ in (lambda: tensorslm.controller.power.ina219.open_i2c_bus(1), "
        "lambda: tensorslm.controller.power.gpio_power.PowerPinSource(6)):\n"
        "    try:\n        open_()\n    except HardwareLibraryMissing as e:\n        print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2
    assert all("pip install 'tensorslm[pi]'" in line for line in lines)
    assert "smbus2" in lines[0] and "gpiozero" in lines[1]

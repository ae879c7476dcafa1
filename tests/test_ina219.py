"""The INA219 driver against the register-level model behind a fake SMBus."""
from __future__ import annotations

import pytest

from tensorslm.controller.errors import ConfigError, SensorError
from tensorslm.controller.power.ina219 import (Adc, BusRange, Gain, Ina219, Mode, REG_CALIBRATION, calibrate,
                               decode_config, encode_config, gain_for)
from tensorslm.controller.power.ina219_sim import Ina219Model, SimulatedSMBus


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(shunt=0.1, max_current=3.2, address=0x40, lsb=None, **physical):
    clock = Clock()
    chip = Ina219Model(shunt_ohms=shunt, clock=clock, **physical)
    bus = SimulatedSMBus({address: chip})
    driver = Ina219(shunt_ohms=shunt, max_current_amps=max_current, address=address, bus=bus,
                    current_lsb_amps=lsb)
    clock.now += 0.01   # let the first conversion complete
    return driver, chip, bus, clock


def test_power_on_config_decodes_to_datasheet_default():
    assert decode_config(0x399F) == (BusRange.V32, Gain.DIV8_320MV, Adc.BITS_12, Adc.BITS_12,
                                     Mode.SHUNT_AND_BUS_CONTINUOUS)
    assert encode_config() == 0x399F


@pytest.mark.parametrize("shunt, max_current, lsb, cal, current_lsb", [
    (0.1, 3.2, None, 4194, 0.04096 / (4194 * 0.1)),   # finest LSB 3.2/2**15 = 97.66 uA
    (0.1, 3.2, 100e-6, 4096, 100e-6),                 # rounded LSB: the classic CAL 4096
    (0.1, 0.4, 50e-6, 8192, 50e-6),
    (0.01, 5.0, 200e-6, 20480, 200e-6),
])
def test_calibration_from_shunt_and_max_current(shunt, max_current, lsb, cal, current_lsb):
    c = calibrate(shunt, max_current, lsb)
    assert c.cal == cal
    assert c.current_lsb_amps == pytest.approx(current_lsb, rel=1e-12)
    assert c.power_lsb_watts == pytest.approx(20 * current_lsb, rel=1e-12)


@pytest.mark.parametrize("args, message", [
    ((0.0, 3.2, None), "shunt_ohms must be a positive number"),
    ((0.1, -1.0, None), "max_current_amps must be a positive number"),
    ((0.1, 3.2, 50e-6), "finer than max_current/2\\*\\*15"),
    ((1000.0, 3.2, None), "calibration value 0 out of the register's range"),
])
def test_bad_calibration_parameters(args, message):
    with pytest.raises(ConfigError, match=message):
        calibrate(*args)


def test_gain_chosen_from_shunt_range():
    assert gain_for(0.1, 0.4) is Gain.DIV1_40MV
    assert gain_for(0.1, 3.2) is Gain.DIV8_320MV
    with pytest.raises(ConfigError, match="exceeds the INA219's largest shunt range"):
        gain_for(0.1, 4.0)


def test_driver_writes_config_and_calibration_big_endian():
    driver, chip, bus, _ = make(lsb=100e-6)
    assert chip.calibration == 4096
    assert chip.config == driver.config_word
    # on the SMBus the word is little-endian: 0x1000 travels as 0x0010
    assert bus.read_word_data(0x40, REG_CALIBRATION) == 0x0010


def test_positive_current_bus_voltage_and_power():
    driver, chip, _, _ = make(lsb=100e-6, bus_volts=12.0, shunt_amps=1.0)
    m = driver.measure()
    assert m.bus_volts == pytest.approx(12.0)
    assert m.shunt_volts == pytest.approx(0.100)
    assert m.amps == pytest.approx(1.0)
    assert m.watts == pytest.approx(12.0)       # 10000 x 3000 / 5000 = 6000 x 2 mW
    assert m.conversion_ready and not m.overflow


def test_negative_current_is_twos_complement():
    driver, chip, _, _ = make(lsb=100e-6, bus_volts=8.0, shunt_amps=-0.5)
    assert chip.read(0x01) == 0xEC78           # -5000 x 10 uV
    m = driver.measure()
    assert m.shunt_volts == pytest.approx(-0.05)
    assert m.amps == pytest.approx(-0.5)
    assert m.watts == pytest.approx(4.0)       # the power register holds the magnitude


@pytest.mark.parametrize("volts, expected", [(4.001, 4.000), (4.003, 4.004), (0.0, 0.0),
                                             (12.3456, 12.344), (40.0, 32.0)])
def test_bus_voltage_lsb_is_4mv_and_clips_at_range(volts, expected):
    driver, chip, _, _ = make(bus_volts=volts)
    assert driver.read_bus_volts()[0] == pytest.approx(expected)


def test_current_math_overflow_sets_ovf():
    # 0.5 A range -> CAL 26842; 3.2 A through the shunt saturates the current computation
    driver, chip, _, _ = make(max_current=0.5, bus_volts=5.0, shunt_amps=0.45)
    assert not driver.measure().overflow
    chip.shunt_amps = 3.2
    driver.gain = Gain.DIV8_320MV
    chip.config = encode_config(gain=Gain.DIV8_320MV)
    m = driver.measure()
    assert m.overflow
    assert m.amps == pytest.approx(32767 * driver.calibration.current_lsb_amps)


def test_shunt_clips_at_gain_range():
    driver, chip, _, _ = make(max_current=0.4, shunt_amps=1.0)   # gain /1: 40 mV
    assert driver.read_shunt_volts() == pytest.approx(0.040)


def test_conversion_ready_cleared_by_power_read():
    driver, chip, _, clock = make(bus_volts=5.0)
    assert driver.read_bus_volts()[1] is True
    driver.read_watts()
    assert driver.read_bus_volts()[1] is False
    clock.now += 0.002   # bus + shunt conversion at 12 bits: 2 x 532 us
    assert driver.read_bus_volts()[1] is True


def test_read_fault_raises_sensor_error_which_is_an_oserror():
    driver, chip, bus, _ = make(bus_volts=5.0)
    bus.fail_reads = 1
    with pytest.raises(SensorError, match="I2C read of register 0x05 at address 0x40 failed"):
        driver.measure()
    assert driver.measure().bus_volts == pytest.approx(5.0)
    assert issubclass(SensorError, OSError)


def test_missing_device_and_bad_address():
    bus = SimulatedSMBus({})
    with pytest.raises(SensorError, match="address 0x41"):
        Ina219(shunt_ohms=0.1, max_current_amps=3.2, address=0x41, bus=bus)
    with pytest.raises(ConfigError, match="0x40..0x4F"):
        Ina219(shunt_ohms=0.1, max_current_amps=3.2, address=0x36, bus=bus)


def test_lost_calibration_is_rewritten():
    driver, chip, _, _ = make(lsb=100e-6, bus_volts=5.0, shunt_amps=0.2)
    chip.write(0x00, 0x8000)       # reset: CAL back to 0
    assert chip.calibration == 0
    assert driver.measure().amps == pytest.approx(0.2)
    assert chip.calibration == 4096

"""A small INA219 driver over I2C (smbus2), and the helper that opens an I2C bus.

The INA219 measures the voltage across a shunt resistor and the bus voltage; from a
calibration value it also computes current and power inside the chip. This driver writes
the configuration and calibration registers and decodes the four measurement registers,
following the TI datasheet (SBOS448):

=========  ====================  =========================================================
register   name                  content
=========  ====================  =========================================================
0x00       configuration         RST, BRNG (16/32 V), PG (gain /1../8), BADC, SADC, MODE
0x01       shunt voltage         signed, LSB 10 uV
0x02       bus voltage           bits 15..3 voltage (LSB 4 mV), bit 1 CNVR, bit 0 OVF
0x03       power                 unsigned, LSB = 20 x current LSB
0x04       current               signed, LSB = current LSB = shunt x CAL / 4096
0x05       calibration           CAL = trunc(0.04096 / (current_LSB x R_shunt)), bit 0 = 0
=========  ====================  =========================================================

Registers are big-endian on the wire; SMBus word transfers are little-endian, so every
word is byte-swapped here. ``smbus2`` is imported lazily, only in this module: other I2C
devices (the fuel gauge) get their bus from :func:`open_i2c_bus`. Tests pass a fake bus
(:class:`tensorslm.controller.power.ina219_sim.SimulatedSMBus`) with the same methods.
"""
from __future__ import annotations

import enum
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from tensorslm.controller.errors import ConfigError, SensorError
from .readings import HardwareLibraryMissing, Method, PowerReading

log = logging.getLogger(__name__)

REG_CONFIG = 0x00
REG_SHUNT_VOLTAGE = 0x01
REG_BUS_VOLTAGE = 0x02
REG_POWER = 0x03
REG_CURRENT = 0x04
REG_CALIBRATION = 0x05

SHUNT_LSB_VOLTS = 10e-6
BUS_LSB_VOLTS = 4e-3
POWER_LSB_FACTOR = 20          # power LSB = 20 x current LSB (datasheet 8.5.1)
CAL_NUMERATOR = 0.04096        # fixed scaling constant of the calibration equation
CONFIG_RESET = 0x8000


class BusRange(enum.IntEnum):
    """BRNG bit: full-scale bus voltage range."""

    V16 = 0
    V32 = 1

    @property
    def volts(self) -> float:
        return 16.0 if self is BusRange.V16 else 32.0


class Gain(enum.IntEnum):
    """PG bits: the shunt voltage full-scale range (gain /1, /2, /4, /8)."""

    DIV1_40MV = 0
    DIV2_80MV = 1
    DIV4_160MV = 2
    DIV8_320MV = 3

    @property
    def shunt_range_volts(self) -> float:
        return 0.040 * (1 << int(self))


class Adc(enum.IntEnum):
    """BADC/SADC bits: resolution or averaging (4-bit field values from the datasheet)."""

    BITS_9 = 0x0
    BITS_10 = 0x1
    BITS_11 = 0x2
    BITS_12 = 0x3
    SAMPLES_2 = 0x9
    SAMPLES_4 = 0xA
    SAMPLES_8 = 0xB
    SAMPLES_16 = 0xC
    SAMPLES_32 = 0xD
    SAMPLES_64 = 0xE
    SAMPLES_128 = 0xF

    @property
    def conversion_seconds(self) -> float:
        """Conversion time from the datasheet table (typical)."""
        return {0x0: 84e-6, 0x1: 148e-6, 0x2: 276e-6, 0x3: 532e-6, 0x9: 1.06e-3,
                0xA: 2.13e-3, 0xB: 4.26e-3, 0xC: 8.51e-3, 0xD: 17.02e-3, 0xE: 34.05e-3,
                0xF: 68.10e-3}[int(self)]


class Mode(enum.IntEnum):
    POWER_DOWN = 0
    SHUNT_TRIGGERED = 1
    BUS_TRIGGERED = 2
    SHUNT_AND_BUS_TRIGGERED = 3
    ADC_OFF = 4
    SHUNT_CONTINUOUS = 5
    BUS_CONTINUOUS = 6
    SHUNT_AND_BUS_CONTINUOUS = 7


def encode_config(bus_range: BusRange = BusRange.V32, gain: Gain = Gain.DIV8_320MV,
                  bus_adc: Adc = Adc.BITS_12, shunt_adc: Adc = Adc.BITS_12,
                  mode: Mode = Mode.SHUNT_AND_BUS_CONTINUOUS) -> int:
    """The configuration register word. The power-on default is 0x399F."""
    return (int(bus_range) << 13) | (int(gain) << 11) | (int(bus_adc) << 7) \
        | (int(shunt_adc) << 3) | int(mode)


def decode_config(word: int) -> tuple[BusRange, Gain, Adc, Adc, Mode]:
    """Inverse of :func:`encode_config` (raises ValueError for reserved ADC codes)."""
    return (BusRange((word >> 13) & 1), Gain((word >> 11) & 3), Adc((word >> 7) & 0xF),
            Adc((word >> 3) & 0xF), Mode(word & 7))


@dataclass(frozen=True)
class Calibration:
    """Calibration derived from the shunt and the maximum expected current (datasheet 8.5.1)."""

    shunt_ohms: float
    max_current_amps: float
    current_lsb_amps: float     # effective LSB, recomputed from the truncated CAL
    cal: int                    # value written to register 0x05

    @property
    def power_lsb_watts(self) -> float:
        return POWER_LSB_FACTOR * self.current_lsb_amps


def calibrate(shunt_ohms: float, max_current_amps: float,
              current_lsb_amps: float | None = None) -> Calibration:
    """Compute CAL from the shunt resistance and the maximum expected current.

    ``current_lsb_amps`` defaults to the finest LSB the range allows,
    ``max_current / 2**15``; a rounder value (e.g. 100e-6 A) may be passed if it is not
    finer. CAL = trunc(0.04096 / (current_LSB x R_shunt)), with bit 0 cleared (the chip
    ignores it); the effective LSB is then recomputed from CAL so that decoded currents
    are exact for the value the chip really uses.
    """
    if not (isinstance(shunt_ohms, (int, float)) and shunt_ohms > 0 and math.isfinite(shunt_ohms)):
        raise Ina219ConfigError(f"shunt_ohms must be a positive number of ohms, got {shunt_ohms!r}")
    if not (isinstance(max_current_amps, (int, float)) and max_current_amps > 0
            and math.isfinite(max_current_amps)):
        raise Ina219ConfigError(
            f"max_current_amps must be a positive number of amps, got {max_current_amps!r}")
    minimum_lsb = max_current_amps / 32768
    lsb = minimum_lsb if current_lsb_amps is None else current_lsb_amps
    if lsb < minimum_lsb * (1 - 1e-12):
        raise Ina219ConfigError(
            f"current_lsb_amps {lsb!r} is finer than max_current/2**15 = {minimum_lsb:.6g} A; "
            "the current register would overflow below the maximum current")
    cal = int(CAL_NUMERATOR / (lsb * shunt_ohms)) & 0xFFFE
    if not 2 <= cal <= 0xFFFE:
        raise Ina219ConfigError(
            f"calibration value {cal} out of the register's range 2..65534 for shunt "
            f"{shunt_ohms} ohm and current LSB {lsb:.6g} A; choose another shunt or maximum current")
    return Calibration(shunt_ohms=float(shunt_ohms), max_current_amps=float(max_current_amps),
                       current_lsb_amps=CAL_NUMERATOR / (cal * shunt_ohms), cal=cal)


def gain_for(shunt_ohms: float, max_current_amps: float) -> Gain:
    """The smallest shunt range (best resolution) that holds max current x shunt."""
    volts = shunt_ohms * max_current_amps
    for gain in Gain:
        if volts <= gain.shunt_range_volts * (1 + 1e-9):
            return gain
    raise Ina219ConfigError(
        f"max current {max_current_amps} A x shunt {shunt_ohms} ohm = {volts:.3f} V exceeds the "
        "INA219's largest shunt range of 0.320 V")


class Ina219ConfigError(ConfigError):
    """Bad INA219 parameters (shunt, current range, address)."""


def _signed16(word: int) -> int:
    return word - 0x10000 if word & 0x8000 else word


def _swap16(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)


class SMBusLike(Protocol):
    """The subset of ``smbus2.SMBus`` the drivers call (the simulators implement it too)."""

    def read_word_data(self, i2c_addr: int, register: int) -> int: ...

    def write_word_data(self, i2c_addr: int, register: int, value: int) -> None: ...

    def close(self) -> None: ...


def open_i2c_bus(bus_number: int) -> SMBusLike:
    """Open ``/dev/i2c-<bus_number>`` with smbus2 (imported here, lazily)."""
    try:
        import smbus2  # noqa: PLC0415 - lazy on purpose: nothing imports smbus2 off a Pi
    except ImportError as exc:
        raise HardwareLibraryMissing(
            "reading an I2C sensor needs smbus2, which is not installed; install it with "
            "pip install 'tensorslm[pi]'") from exc
    try:
        return smbus2.SMBus(bus_number)
    except OSError as exc:
        raise SensorError(f"cannot open I2C bus /dev/i2c-{bus_number}: {exc.strerror or exc}; "
                          "is I2C enabled (raspi-config) and the user in group i2c?") from exc


def read_register(bus: SMBusLike, address: int, register: int) -> int:
    """Read one big-endian 16-bit register (SMBus words arrive little-endian: swap)."""
    try:
        return _swap16(bus.read_word_data(address, register))
    except OSError as exc:
        raise SensorError(f"I2C read of register 0x{register:02X} at address 0x{address:02X} "
                          f"failed: {exc}") from exc


def write_register(bus: SMBusLike, address: int, register: int, value: int) -> None:
    """Write one big-endian 16-bit register."""
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"register value must be 0..0xFFFF, got {value!r}")
    try:
        bus.write_word_data(address, register, _swap16(value))
    except OSError as exc:
        raise SensorError(f"I2C write of register 0x{register:02X} at address 0x{address:02X} "
                          f"failed: {exc}") from exc


@dataclass(frozen=True)
class Ina219Measurement:
    """One decoded set of INA219 registers."""

    bus_volts: float
    shunt_volts: float
    amps: float                 # signed: positive when current flows IN+ -> IN-
    watts: float                # from the power register (unsigned magnitude)
    conversion_ready: bool
    overflow: bool


def _check_address(address: int) -> int:
    if isinstance(address, bool) or not isinstance(address, int) or not 0x40 <= address <= 0x4F:
        raise Ina219ConfigError(
            f"INA219 address must be 0x40..0x4F (set by A0/A1), got {address!r}")
    return address


class Ina219:
    """The INA219 on an I2C bus.

    ``bus`` is an open SMBus-like object (injected by tests, or from :func:`open_i2c_bus`);
    ``bus_number`` is used only when ``bus`` is None. The driver writes configuration and
    calibration on construction (and again after a chip reset is detected).
    """

    def __init__(self, *, shunt_ohms: float, max_current_amps: float, address: int = 0x40,
                 bus: SMBusLike | None = None, bus_number: int = 1,
                 bus_range: BusRange = BusRange.V32, gain: Gain | None = None,
                 adc: Adc = Adc.BITS_12, current_lsb_amps: float | None = None) -> None:
        self.address = _check_address(address)
        self.calibration = calibrate(shunt_ohms, max_current_amps, current_lsb_amps)
        self.gain = gain if gain is not None else gain_for(shunt_ohms, max_current_amps)
        self.config_word = encode_config(bus_range, self.gain, adc, adc,
                                         Mode.SHUNT_AND_BUS_CONTINUOUS)
        self._owns_bus = bus is None
        self.bus: Any = bus if bus is not None else open_i2c_bus(bus_number)
        self.configure()

    def configure(self) -> None:
        """Write configuration and calibration (both are lost on power-up or reset)."""
        write_register(self.bus, self.address, REG_CONFIG, self.config_word)
        write_register(self.bus, self.address, REG_CALIBRATION, self.calibration.cal)
        log.debug("INA219 0x%02X configured: config=0x%04X cal=%d current_lsb=%.6g A",
                  self.address, self.config_word, self.calibration.cal,
                  self.calibration.current_lsb_amps)

    def read_bus_volts(self) -> tuple[float, bool, bool]:
        """Bus voltage, conversion-ready flag, overflow flag."""
        word = read_register(self.bus, self.address, REG_BUS_VOLTAGE)
        return (word >> 3) * BUS_LSB_VOLTS, bool(word & 0x2), bool(word & 0x1)

    def read_shunt_volts(self) -> float:
        return _signed16(read_register(self.bus, self.address, REG_SHUNT_VOLTAGE)) * SHUNT_LSB_VOLTS

    def read_amps(self) -> float:
        return _signed16(read_register(self.bus, self.address, REG_CURRENT)) \
            * self.calibration.current_lsb_amps

    def read_watts(self) -> float:
        return read_register(self.bus, self.address, REG_POWER) * self.calibration.power_lsb_watts

    def measure(self) -> Ina219Measurement:
        """Read all measurement registers. Re-calibrates once if the chip lost its CAL."""
        if read_register(self.bus, self.address, REG_CALIBRATION) != self.calibration.cal:
            log.warning("INA219 0x%02X lost its calibration (reset or brown-out); rewriting",
                        self.address)
            self.configure()
        bus_volts, ready, overflow = self.read_bus_volts()
        shunt = self.read_shunt_volts()
        amps = self.read_amps()
        watts = self.read_watts()   # reading POWER clears CNVR, so it is read last
        return Ina219Measurement(bus_volts=bus_volts, shunt_volts=shunt, amps=amps, watts=watts,
                                 conversion_ready=ready, overflow=overflow)

    def close(self) -> None:
        if self._owns_bus:
            self.bus.close()


INA219_RELATIVE_UNCERTAINTY = 0.01
"""One-sigma relative error of INA219 power figures: the datasheet's worst-case gain error
is 1 % (INA219A, 0.5 % for the B grade) plus shunt tolerance (typically 1 %) partly
compensating; 1 % is used for a board whose shunt was not calibrated by hand."""


class Ina219Source:
    """An INA219 in line with the machine's supply: ``watts`` = bus volts x current.

    ``invert_current`` flips the sign when the board wires the shunt so that load current
    reads negative. Battery percentage is unknown here (see ``tensorslm.controller.power.ups_boards``).
    """

    method = Method.INA219
    relative_uncertainty = INA219_RELATIVE_UNCERTAINTY

    def __init__(self, driver: Ina219, *, invert_current: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.driver = driver
        self.invert_current = invert_current
        self.clock = clock

    def read(self) -> PowerReading:
        m = self.driver.measure()
        amps = -m.amps if self.invert_current else m.amps
        if m.overflow:
            log.warning("INA219 0x%02X overflow: current beyond the calibrated range of %.3g A",
                        self.driver.address, self.driver.calibration.max_current_amps)
        return PowerReading(time=self.clock(), method=self.method, watts=m.bus_volts * amps,
                            volts=m.bus_volts, amps=amps)

    def close(self) -> None:
        self.driver.close()

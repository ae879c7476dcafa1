"""A register-level model of the INA219 behind a fake SMBus, for tests and the demo.

The model holds a physical state (bus voltage at IN-, current through the shunt) and turns
it into register contents the way the datasheet (SBOS448, section 8.6) defines them:

* shunt voltage = I x R_shunt, in 10 uV steps, clipped at the selected PGA range;
* bus voltage in 4 mV steps in bits 15..3, clipped at the BRNG range (and 0);
  CNVR (bit 1) is set once a conversion has completed since the last config write or POWER
  read; OVF (bit 0) is set when the current or power computation overflows;
* current = shunt_register x CAL / 4096 (signed, saturating at +-32767, OVF on overflow);
* power = |current_register| x bus_register / 5000 (unsigned, saturating at 65535);
* CAL bit 0 always reads 0; a write of RST resets every register to its power-on value.

:class:`SimulatedSMBus` exposes ``read_word_data`` / ``write_word_data`` exactly as smbus2
does (little-endian words, so the driver's byte swap is exercised), routes by address, and
raises ``OSError`` (errno EIO / ENXIO, as the Linux i2c driver does) on configured faults.
"""
from __future__ import annotations

import errno
import logging
import math
import time
from typing import Callable

from .ina219 import (BUS_LSB_VOLTS, REG_BUS_VOLTAGE, REG_CALIBRATION, REG_CONFIG, REG_CURRENT,
                     REG_POWER, REG_SHUNT_VOLTAGE, SHUNT_LSB_VOLTS, decode_config, BusRange)

log = logging.getLogger(__name__)

POWER_ON_CONFIG = 0x399F


def _swap16(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)


def _to_unsigned16(value: int) -> int:
    return value & 0xFFFF


class Ina219Model:
    """The chip: registers computed from ``bus_volts`` and ``shunt_amps`` on every read.

    ``on_read`` (optional) is called before each register read, so a driving model (the
    simulated battery) can update the physical state at the moment the driver samples it.
    """

    def __init__(self, *, shunt_ohms: float, bus_volts: float = 0.0, shunt_amps: float = 0.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_read: Callable[["Ina219Model"], None] | None = None) -> None:
        if shunt_ohms <= 0:
            raise ValueError(f"shunt_ohms must be positive, got {shunt_ohms!r}")
        self.shunt_ohms = shunt_ohms
        self.bus_volts = bus_volts
        self.shunt_amps = shunt_amps
        self.clock = clock
        self.on_read = on_read
        self.reset()

    def reset(self) -> None:
        self.config = POWER_ON_CONFIG
        self.calibration = 0
        self._cnvr_cleared_at = self.clock()

    # -- derived register contents ------------------------------------------------------
    def _conversion_seconds(self) -> float:
        _, _, bus_adc, shunt_adc, _ = decode_config(self.config)
        return bus_adc.conversion_seconds + shunt_adc.conversion_seconds

    def shunt_register(self) -> int:
        _, gain, _, _, _ = decode_config(self.config)
        limit = round(gain.shunt_range_volts / SHUNT_LSB_VOLTS)
        value = round(self.shunt_amps * self.shunt_ohms / SHUNT_LSB_VOLTS)
        return max(-limit, min(limit, value))

    def _bus_counts(self) -> int:
        bus_range, _, _, _, _ = decode_config(self.config)
        counts = round(max(0.0, self.bus_volts) / BUS_LSB_VOLTS)
        full_scale = round(BusRange(bus_range).volts / BUS_LSB_VOLTS)
        return min(counts, full_scale, 0x1FFF)

    def _current_raw(self) -> int:
        return math.trunc(self.shunt_register() * self.calibration / 4096)

    def current_register(self) -> int:
        return max(-32767, min(32767, self._current_raw()))

    def _power_raw(self) -> int:
        return math.trunc(abs(self.current_register()) * self._bus_counts() / 5000)

    def power_register(self) -> int:
        return min(0xFFFF, self._power_raw())

    def overflow(self) -> bool:
        return abs(self._current_raw()) > 32767 or self._power_raw() > 0xFFFF

    def conversion_ready(self) -> bool:
        return self.clock() - self._cnvr_cleared_at >= self._conversion_seconds()

    def bus_register(self) -> int:
        return (self._bus_counts() << 3) | (int(self.conversion_ready()) << 1) | int(self.overflow())

    # -- register access (big-endian words, as on the wire) ------------------------------
    def read(self, register: int) -> int:
        if self.on_read is not None:
            self.on_read(self)
        if register == REG_CONFIG:
            return self.config
        if register == REG_SHUNT_VOLTAGE:
            return _to_unsigned16(self.shunt_register())
        if register == REG_BUS_VOLTAGE:
            return self.bus_register()
        if register == REG_POWER:
            value = self.power_register()
            self._cnvr_cleared_at = self.clock()     # reading POWER clears CNVR
            return value
        if register == REG_CURRENT:
            return _to_unsigned16(self.current_register())
        if register == REG_CALIBRATION:
            return self.calibration
        raise OSError(errno.EIO, f"INA219 has no register 0x{register:02X}")

    def write(self, register: int, value: int) -> None:
        if register == REG_CONFIG:
            if value & 0x8000:
                self.reset()
                return
            decode_config(value)   # reserved ADC codes raise, as a NACK would
            self.config = value
            self._cnvr_cleared_at = self.clock()
        elif register == REG_CALIBRATION:
            self.calibration = value & 0xFFFE
        else:
            raise OSError(errno.EIO, f"INA219 register 0x{register:02X} is read-only")


class SimulatedSMBus:
    """A fake ``smbus2.SMBus``: devices by address, little-endian word transfers, faults.

    ``fail_reads`` is the number of upcoming reads to fail with EIO (a passing fault);
    ``fail_always`` makes every transfer fail (a disconnected board).
    """

    def __init__(self, devices: dict | None = None) -> None:
        self.devices: dict[int, object] = dict(devices or {})
        self.fail_reads = 0
        self.fail_always = False
        self.reads = 0
        self.writes = 0
        self.closed = False

    def attach(self, address: int, device: object) -> None:
        self.devices[address] = device

    def _device(self, address: int):
        if self.closed:
            raise OSError(errno.EBADF, "bus is closed")
        if self.fail_always:
            raise OSError(errno.EIO, "Remote I/O error (simulated fault)")
        device = self.devices.get(address)
        if device is None:
            raise OSError(errno.ENXIO, f"No such device or address 0x{address:02X}")
        return device

    def read_word_data(self, i2c_addr: int, register: int) -> int:
        device = self._device(i2c_addr)
        if self.fail_reads > 0:
            self.fail_reads -= 1
            raise OSError(errno.EIO, "Remote I/O error (simulated fault)")
        self.reads += 1
        return _swap16(device.read(register))

    def write_word_data(self, i2c_addr: int, register: int, value: int) -> None:
        device = self._device(i2c_addr)
        self.writes += 1
        device.write(register, _swap16(value))

    def close(self) -> None:
        self.closed = True

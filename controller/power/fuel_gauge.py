"""MAX17040/MAX17043/MAX17048 fuel gauge (as on Geekworm X728 boards) over I2C.

Registers (big-endian 16-bit, Maxim datasheets 19-4936 and 19-6171):

=======  ========  ===========================================================
0x02     VCELL     cell voltage, 78.125 uV per LSB (the MAX17040's 12-bit value in
                   bits 15..4 at 1.25 mV is the same scale with the low bits zero)
0x04     SOC       state of charge: high byte percent, low byte 1/256 percent
0x06     MODE      write 0x4000: quick-start (restart the fuel-gauge estimate)
0x08     VERSION   production version
0x0C     CONFIG    RCOMP (high byte), alert flag and threshold (low byte)
0x16     CRATE     MAX17048 only: signed charge rate, 0.208 %/hour per LSB
=======  ========  ===========================================================

The bus comes from :func:`tensorslm.controller.power.ina219.open_i2c_bus` (the only smbus2 import).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from tensorslm.controller.errors import ConfigError
from .ina219 import SMBusLike, open_i2c_bus, read_register, write_register
from .readings import Method, PowerReading

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = 0x36
REG_VCELL = 0x02
REG_SOC = 0x04
REG_MODE = 0x06
REG_VERSION = 0x08
REG_CONFIG = 0x0C
REG_CRATE = 0x16
VCELL_LSB_VOLTS = 78.125e-6
CRATE_LSB_PERCENT_PER_HOUR = 0.208
MODE_QUICK_START = 0x4000
CHIPS = ("max17040", "max17043", "max17048")

FUEL_GAUGE_RELATIVE_UNCERTAINTY = 0.3
"""Power from CRATE is the gauge's model-averaged rate of change of SOC: it lags load steps
by minutes and its LSB is 0.208 %/h; with the capacity also uncertain, a 30 % one-sigma
error is assumed for energy figures derived from it."""


def decode_soc(word: int) -> float:
    return (word >> 8) + (word & 0xFF) / 256.0


def decode_vcell(word: int) -> float:
    return word * VCELL_LSB_VOLTS


def decode_crate(word: int) -> float:
    return (word - 0x10000 if word & 0x8000 else word) * CRATE_LSB_PERCENT_PER_HOUR


class FuelGauge:
    """The gauge chip. ``chip`` selects which registers exist (CRATE only on MAX17048)."""

    def __init__(self, *, bus: SMBusLike | None = None, bus_number: int = 1,
                 address: int = DEFAULT_ADDRESS, chip: str = "max17048") -> None:
        if chip not in CHIPS:
            raise ConfigError(f"unknown fuel gauge chip {chip!r}; expected one of {', '.join(CHIPS)}")
        self.chip = chip
        self.address = address
        self._owns_bus = bus is None
        self.bus = bus if bus is not None else open_i2c_bus(bus_number)

    @property
    def has_crate(self) -> bool:
        return self.chip == "max17048"

    def cell_volts(self) -> float:
        return decode_vcell(read_register(self.bus, self.address, REG_VCELL))

    def soc_percent(self) -> float:
        return decode_soc(read_register(self.bus, self.address, REG_SOC))

    def version(self) -> int:
        return read_register(self.bus, self.address, REG_VERSION)

    def crate_percent_per_hour(self) -> float | None:
        if not self.has_crate:
            return None
        return decode_crate(read_register(self.bus, self.address, REG_CRATE))

    def quick_start(self) -> None:
        write_register(self.bus, self.address, REG_MODE, MODE_QUICK_START)

    def close(self) -> None:
        if self._owns_bus:
            self.bus.close()


class FuelGaugeSource:
    """State of charge and cell voltage; watts from CRATE when the capacity is known.

    ``cells_in_series`` scales VCELL to the pack voltage (the X728's cells are in parallel:
    1). ``capacity_wh`` turns the MAX17048's charge rate into watts:
    W = -CRATE[%/h] / 100 x capacity[Wh] (positive while discharging); without it, or on a
    MAX17040/43, ``watts`` is None. Charging is the sign of CRATE (None without CRATE).
    """

    method = Method.FUEL_GAUGE
    relative_uncertainty = FUEL_GAUGE_RELATIVE_UNCERTAINTY

    def __init__(self, gauge: FuelGauge, *, cells_in_series: int = 1,
                 capacity_wh: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if cells_in_series < 1:
            raise ConfigError(f"cells_in_series must be at least 1, got {cells_in_series}")
        if capacity_wh is not None and capacity_wh <= 0:
            raise ConfigError(f"capacity_wh must be positive, got {capacity_wh}")
        self.gauge = gauge
        self.cells_in_series = cells_in_series
        self.capacity_wh = capacity_wh
        self.clock = clock

    def read(self) -> PowerReading:
        volts = self.gauge.cell_volts() * self.cells_in_series
        percent = min(100.0, self.gauge.soc_percent())   # the SOC register can exceed 100
        crate = self.gauge.crate_percent_per_hour()
        watts = None
        if crate is not None and self.capacity_wh is not None:
            watts = -crate / 100.0 * self.capacity_wh
        return PowerReading(time=self.clock(), method=self.method, battery_percent=percent,
                            volts=volts, watts=watts,
                            amps=None if watts is None else watts / volts if volts > 0 else None,
                            charging=None if crate is None else crate > 0)

    def close(self) -> None:
        self.gauge.close()

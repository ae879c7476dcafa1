"""Register-level model of a MAX17040/43/48 fuel gauge, to attach to a SimulatedSMBus.

Physical state (cell volts, state of charge, charge rate) is encoded into the registers as
the datasheets define them: VCELL at 78.125 uV/LSB (12-bit with low nibble zero on the
MAX17040/43), SOC as percent + 1/256 percent, CRATE signed at 0.208 %/h (MAX17048 only;
the older chips answer 0xFFFF for registers they do not have). MODE quick-start and the
CONFIG register are writable; other registers are read-only (EIO on write).
"""
from __future__ import annotations

import errno

from .fuel_gauge import (CRATE_LSB_PERCENT_PER_HOUR, MODE_QUICK_START, REG_CONFIG, REG_CRATE,
                         REG_MODE, REG_SOC, REG_VCELL, REG_VERSION, VCELL_LSB_VOLTS)

VERSIONS = {"max17040": 0x0002, "max17043": 0x0003, "max17048": 0x0012}


class FuelGaugeModel:
    def __init__(self, *, chip: str = "max17048", cell_volts: float = 3.8,
                 soc_percent: float = 50.0, crate_percent_per_hour: float = 0.0) -> None:
        if chip not in VERSIONS:
            raise ValueError(f"chip must be one of {', '.join(VERSIONS)}, got {chip!r}")
        self.chip = chip
        self.cell_volts = cell_volts
        self.soc_percent = soc_percent
        self.crate_percent_per_hour = crate_percent_per_hour
        self.config = 0x971C            # power-on RCOMP 0x97, alert threshold 4 %
        self.quick_starts = 0

    def read(self, register: int) -> int:
        if register == REG_VCELL:
            word = min(0xFFFF, max(0, round(self.cell_volts / VCELL_LSB_VOLTS)))
            return word & 0xFFF0 if self.chip != "max17048" else word
        if register == REG_SOC:
            return min(0xFFFF, max(0, round(self.soc_percent * 256)))
        if register == REG_VERSION:
            return VERSIONS[self.chip]
        if register == REG_CONFIG:
            return self.config
        if register == REG_MODE:
            return 0x0000
        if register == REG_CRATE:
            if self.chip != "max17048":
                return 0xFFFF
            value = round(self.crate_percent_per_hour / CRATE_LSB_PERCENT_PER_HOUR)
            return max(-32768, min(32767, value)) & 0xFFFF
        return 0xFFFF

    def write(self, register: int, value: int) -> None:
        if register == REG_MODE:
            if value == MODE_QUICK_START:
                self.quick_starts += 1
            return
        if register == REG_CONFIG:
            self.config = value
            return
        raise OSError(errno.EIO, f"fuel gauge register 0x{register:02X} is read-only")

"""Pi UPS boards that measure their battery with an INA219, as a PowerSource.

A profile names the I2C address, the shunt and current range the board is built with,
the number of Li-ion cells in series, and which current sign means charging. The battery
percentage comes from the cell voltage through an open-circuit-voltage curve (pure
functions below, also used by the simulated battery); charging is the sign of the current.

The two built-in profiles follow the Waveshare UPS HATs: a 2-cell (2 x 18650, 6.0-8.4 V)
board at 0x42 and a 1-cell board (Pi Zero size) at 0x43, whose sample code calibrates a
0.1 ohm shunt for 3.2 A and a 0.01 ohm shunt for 5 A respectively; both report positive
current while charging. Check the values against your board's schematic.
"""
from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from tensorslm.controller.errors import ConfigError
from .ina219 import INA219_RELATIVE_UNCERTAINTY, Ina219, SMBusLike
from .readings import Method, PowerReading

log = logging.getLogger(__name__)

# Resting (open-circuit) voltage of one Li-ion cell against state of charge, a typical
# 18650 NMC curve (cell makers' discharge curves at C/20; the plateau 3.7-3.9 V holds most
# of the charge). Piecewise-linear between points. Accuracy under load is a few percent at
# best: a loaded cell reads low by I x R_internal.
LIION_CELL_CURVE: tuple[tuple[float, float], ...] = (
    (3.00, 0.0), (3.45, 5.0), (3.68, 10.0), (3.74, 20.0), (3.77, 30.0), (3.79, 40.0),
    (3.82, 50.0), (3.87, 60.0), (3.92, 70.0), (4.00, 80.0), (4.10, 90.0), (4.20, 100.0),
)


def _check_curve(curve: Sequence[tuple[float, float]]) -> None:
    if len(curve) < 2:
        raise ValueError(f"a voltage curve needs at least 2 points, got {len(curve)}")
    for (v0, p0), (v1, p1) in zip(curve, curve[1:]):
        if not (v1 > v0 and p1 > p0):
            raise ValueError(f"voltage curve must rise in both volts and percent; got "
                             f"({v0}, {p0}) then ({v1}, {p1})")


def percent_from_cell_volts(volts: float,
                            curve: Sequence[tuple[float, float]] = LIION_CELL_CURVE) -> float:
    """State of charge (0..100) of one cell at ``volts``, clamped at the curve's ends."""
    volts_axis = [v for v, _ in curve]
    if volts <= volts_axis[0]:
        return curve[0][1]
    if volts >= volts_axis[-1]:
        return curve[-1][1]
    i = bisect.bisect_right(volts_axis, volts)
    (v0, p0), (v1, p1) = curve[i - 1], curve[i]
    return p0 + (p1 - p0) * (volts - v0) / (v1 - v0)


def cell_volts_from_percent(percent: float,
                            curve: Sequence[tuple[float, float]] = LIION_CELL_CURVE) -> float:
    """Inverse of :func:`percent_from_cell_volts` (open-circuit volts of one cell)."""
    percents = [p for _, p in curve]
    if percent <= percents[0]:
        return curve[0][0]
    if percent >= percents[-1]:
        return curve[-1][0]
    i = bisect.bisect_right(percents, percent)
    (v0, p0), (v1, p1) = curve[i - 1], curve[i]
    return v0 + (v1 - v0) * (percent - p0) / (p1 - p0)


@dataclass(frozen=True)
class UpsBoard:
    """What is needed to read one kind of UPS board."""

    name: str
    address: int
    cells: int
    shunt_ohms: float
    max_current_amps: float
    current_lsb_amps: float | None = None
    charging_current_positive: bool = True     # sign convention of the board's shunt wiring
    external_threshold_amps: float = 0.05      # less discharge than this: on external power
    curve: tuple[tuple[float, float], ...] = LIION_CELL_CURVE
    internal_ohms: float | None = None         # pack resistance, to undo the sag under load

    def __post_init__(self) -> None:
        if self.cells < 1:
            raise ValueError(f"cells must be at least 1, got {self.cells}")
        _check_curve(self.curve)

    def percent(self, pack_volts: float, discharge_amps: float = 0.0) -> float:
        """Battery percentage from the pack voltage (shared equally by the series cells).

        With ``internal_ohms`` known, the open-circuit voltage is estimated as
        V + I x R, so the percentage does not drop when the load rises; without it, a
        loaded pack reads low (on a flat Li-ion curve 50 mV per cell is 10-20 %).
        """
        if self.internal_ohms:
            pack_volts += discharge_amps * self.internal_ohms
        return percent_from_cell_volts(pack_volts / self.cells, self.curve)


BOARDS: dict[str, UpsBoard] = {
    "waveshare-ups-hat": UpsBoard("waveshare-ups-hat", address=0x42, cells=2, shunt_ohms=0.1,
                                  max_current_amps=3.2, current_lsb_amps=100e-6),
    "waveshare-ups-hat-c": UpsBoard("waveshare-ups-hat-c", address=0x43, cells=1,
                                    shunt_ohms=0.01, max_current_amps=5.0),
}


def board_named(name: str) -> UpsBoard:
    try:
        return BOARDS[name]
    except KeyError:
        raise ConfigError(f"unknown UPS board {name!r}; known boards: "
                          f"{', '.join(sorted(BOARDS))}") from None


class UpsBoardSource:
    """A UPS board read through the INA219 driver.

    ``amps`` in the reading is positive while the battery discharges into the Pi;
    ``watts`` is the battery's output power while discharging. While charging (or on
    external power) the battery shunt does not see the Pi's draw, so ``watts`` is None.
    """

    method = Method.INA219
    relative_uncertainty = INA219_RELATIVE_UNCERTAINTY

    def __init__(self, board: UpsBoard, *, bus: SMBusLike | None = None, bus_number: int = 1,
                 address: int | None = None, clock: Callable[[], float] = time.monotonic,
                 method: Method = Method.INA219) -> None:
        self.board = board
        self.method = method
        self.clock = clock
        self.driver = Ina219(shunt_ohms=board.shunt_ohms, max_current_amps=board.max_current_amps,
                             current_lsb_amps=board.current_lsb_amps,
                             address=board.address if address is None else address,
                             bus=bus, bus_number=bus_number)

    def read(self) -> PowerReading:
        m = self.driver.measure()
        into_battery = m.amps if self.board.charging_current_positive else -m.amps
        discharge = -into_battery
        external = discharge < self.board.external_threshold_amps
        return PowerReading(
            time=self.clock(), method=self.method,
            battery_percent=self.board.percent(m.bus_volts, discharge),
            watts=None if external else m.bus_volts * discharge,
            volts=m.bus_volts, amps=discharge,
            on_external_power=external, charging=into_battery > self.board.external_threshold_amps)

    def close(self) -> None:
        self.driver.close()

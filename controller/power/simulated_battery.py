"""A simulated battery, drained by what the machine draws, behind the INA219 register map.

The battery: ``capacity_wh`` of energy, ``cells`` Li-ion cells in series whose open-circuit
voltage follows :data:`tensorslm.controller.power.ups_boards.LIION_CELL_CURVE`, and a pack internal
resistance. Each time it is advanced to a clock time it takes the load power ``P`` from
``load`` (by default the ``estimated`` model of this machine's draw: system CPU time over
the interval x per-core watts + idle watts of the named board), solves the terminal
current from ``P = (OCV - I R) I``, and removes ``P x dt x acceleration`` from the stored
energy (plus the I^2 R loss). ``acceleration`` makes the demo drain "faster than life".
With ``external_power`` on, the load is fed externally and the pack charges at
``charge_watts`` until full.

The battery drives an :class:`~tensorslm.controller.power.ina219_sim.Ina219Model` (``chip``) wired as on
the 2-cell UPS board: bus voltage = terminal voltage, shunt current positive while charging.
:class:`SimulatedBatterySource` reads it with the real driver (through
:class:`~tensorslm.controller.power.ups_boards.UpsBoardSource`), so the whole path is exercised; its
readings carry method ``simulated`` and ``energy_joules``, the load energy at real-time
rate (not accelerated), which the energy meter uses as a counter.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import replace
from typing import Callable

from tensorslm.controller.errors import ConfigError
from .ina219_sim import Ina219Model, SimulatedSMBus
from .power_model import BoardModel, CPU_SCOPES
from .readings import Method, PowerReading
from .ups_boards import BOARDS, LIION_CELL_CURVE, UpsBoard, UpsBoardSource, cell_volts_from_percent

log = logging.getLogger(__name__)


class LoadEstimate:
    """Callable giving the machine's mean power since the previous update (estimated model).

    The estimate is refreshed only when at least ``min_interval`` seconds have passed (CPU
    time from /proc/stat moves in 10 ms ticks, so shorter intervals are noise); in between,
    the last figure is returned.
    """

    def __init__(self, board: BoardModel, *, scope: str = "system",
                 cpu_seconds: Callable[[], float] | None = None,
                 clock: Callable[[], float] = time.monotonic, min_interval: float = 0.25) -> None:
        if cpu_seconds is None and scope not in CPU_SCOPES:
            raise ConfigError(f"scope must be one of {', '.join(CPU_SCOPES)}, got {scope!r}")
        self.board = board
        self.min_interval = min_interval
        self.cpu_seconds = cpu_seconds or CPU_SCOPES[scope]
        self.clock = clock
        self._t, self._cpu = clock(), self.cpu_seconds()
        self._last_watts = board.watts(0.0)

    def __call__(self) -> float:
        now, cpu = self.clock(), self.cpu_seconds()
        wall = now - self._t
        if wall >= self.min_interval and wall > 0:
            self._last_watts = self.board.joules(max(0.0, cpu - self._cpu), wall) / wall
            self._t, self._cpu = now, cpu
        return self._last_watts


class SimulatedBattery:
    def __init__(self, *, capacity_wh: float = 10.0, cells: int = 2, internal_ohms: float = 0.15,
                 soc_percent: float = 100.0, load: Callable[[], float],
                 acceleration: float = 1.0, external_power: bool = False,
                 charge_watts: float = 10.0, board: UpsBoard = BOARDS["waveshare-ups-hat"],
                 clock: Callable[[], float] = time.monotonic) -> None:
        for name, value, low in (("capacity_wh", capacity_wh, 0.0), ("acceleration", acceleration, 0.0),
                                 ("internal_ohms", internal_ohms, -1e-300)):
            if not (math.isfinite(value) and value > low):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if not 0 <= soc_percent <= 100:
            raise ConfigError(f"soc_percent must be 0..100, got {soc_percent!r}")
        self.capacity_wh = capacity_wh
        self.cells = cells
        self.internal_ohms = internal_ohms
        self.load = load
        self.acceleration = acceleration
        self.external_power = external_power
        self.charge_watts = charge_watts
        self.board = replace(board, cells=cells, internal_ohms=internal_ohms)
        self.clock = clock
        self.energy_wh = capacity_wh * soc_percent / 100.0
        self.load_joules = 0.0          # energy drawn by the load, at real-time rate
        self.terminal_volts = self.open_circuit_volts
        self.discharge_amps = 0.0
        self._lock = threading.Lock()
        self._t = clock()
        self.chip = Ina219Model(shunt_ohms=board.shunt_ohms, clock=clock,
                                bus_volts=self.terminal_volts, shunt_amps=0.0,
                                on_read=lambda _chip: self.advance())

    @property
    def soc_percent(self) -> float:
        return 100.0 * self.energy_wh / self.capacity_wh

    @property
    def empty(self) -> bool:
        return self.energy_wh <= 0.0

    @property
    def open_circuit_volts(self) -> float:
        return self.cells * cell_volts_from_percent(self.soc_percent, LIION_CELL_CURVE)

    def _current_for(self, watts: float, ocv: float) -> float:
        """Discharge current delivering ``watts`` at the terminals: (OCV - I R) I = P."""
        r = self.internal_ohms
        if r == 0:
            return watts / ocv
        disc = ocv * ocv - 4 * r * watts
        if disc < 0:   # beyond the maximum power transfer: the pack collapses
            return ocv / (2 * r)
        return (ocv - math.sqrt(disc)) / (2 * r)

    def advance(self, now: float | None = None) -> None:
        """Bring the state to clock time ``now`` (idempotent for the same time)."""
        with self._lock:
            now = self.clock() if now is None else now
            dt = now - self._t
            if dt < 0:
                return
            self._t = now
            ocv = self.open_circuit_volts
            if self.external_power:
                watts = self.load() if dt > 0 else 0.0
                self.load_joules += watts * dt
                charge = self.charge_watts if self.energy_wh < self.capacity_wh else 0.0
                amps = -charge / ocv
                self.energy_wh = min(self.capacity_wh,
                                     self.energy_wh + charge * dt * self.acceleration / 3600)
            elif self.empty:
                amps = 0.0
            else:
                watts = self.load() if dt > 0 else self.discharge_amps * self.terminal_volts
                amps = self._current_for(watts, ocv)
                self.load_joules += watts * dt
                drawn_wh = amps * ocv * dt * self.acceleration / 3600   # load + I^2 R loss
                self.energy_wh = max(0.0, self.energy_wh - drawn_wh)
                if self.empty:
                    log.info("simulated battery empty")
            self.discharge_amps = amps
            self.terminal_volts = ocv - amps * self.internal_ohms
            self.chip.bus_volts = self.terminal_volts
            self.chip.shunt_amps = -amps if self.board.charging_current_positive else amps


class SimulatedBatterySource:
    """The simulated battery read through the real INA219 driver; method ``simulated``."""

    method = Method.SIMULATED

    def __init__(self, battery: SimulatedBattery, *,
                 relative_uncertainty: float | None = None) -> None:
        self.battery = battery
        bus = SimulatedSMBus({battery.board.address: battery.chip})
        self.board_source = UpsBoardSource(battery.board, bus=bus, clock=battery.clock,
                                           method=Method.SIMULATED)
        # The figures are exact for the model; how far the model is from a real Pi is the
        # load model's uncertainty, when the load is the estimate.
        board = getattr(battery.load, "board", None)
        self.relative_uncertainty = (relative_uncertainty if relative_uncertainty is not None
                                     else getattr(board, "relative_uncertainty", None))

    def read(self) -> PowerReading:
        reading = self.board_source.read()
        return replace(reading, energy_joules=self.battery.load_joules,
                       on_external_power=self.battery.external_power)

    def close(self) -> None:
        self.board_source.close()

"""The ``estimated`` method: machine power from CPU time and per-core figures of a board.

Model: P = idle_watts + watts_per_core x busy_cores, where busy_cores is CPU seconds used
over the interval divided by its wall seconds (clamped to the core count). Energy of a
window is idle_watts x seconds + watts_per_core x cpu_seconds. It ignores memory, I/O,
frequency scaling and temperature, so each board carries a one-sigma relative uncertainty.

Figures (whole board at the 5 V input, no peripherals but Ethernet, not measured here):

* Raspberry Pi 4 B: idle 2.7 W, all four cores under stress ~6.4 W, hence 0.9 W per busy
  core. From widely reproduced USB-meter measurements (e.g. Jeff Geerling's Pi 4 power
  tests: ~540 mA idle, ~1.28 A under stress-ng, at 5.1 V) and Raspberry Pi's own
  documentation, which gives ~600 mA (3 W) typical bare-board active current. Uncertainty
  30 %: SD card, USB devices, HDMI and the firmware's DVFS move it by about that.
* Raspberry Pi 5: idle 2.7 W, ~7.3 W with four cores under stress, hence 1.15 W per busy
  core. From public reviews of the Pi 5 (USB-C meter figures of 2.5-3.3 W idle and
  6.8-8.8 W under stress-ng with the active cooler). Uncertainty 35 %: reviews disagree
  more, and the fan adds up to ~0.4 W.
* Generic x86 laptop: idle 6 W (screen off, package in C-states), 3.5 W per busy core.
  Reasoning, not a measurement: a 15 W-TDP mobile part reaches ~15 W package at a
  four-core load (3-4 W per core), plus ~0.5 W per core of VRM and memory activity.
  Uncertainty 50 %: laptops differ by 2x; use RAPL where it is readable.
"""
from __future__ import annotations

import logging
import threading
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tensorslm.controller.errors import ConfigError, SensorError
from .readings import Method, PowerReading

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BoardModel:
    name: str
    cores: int
    idle_watts: float
    watts_per_core: float          # added by each fully busy core
    relative_uncertainty: float    # one sigma, relative to the estimated watts or joules

    def watts(self, busy_cores: float) -> float:
        """Estimated board power with ``busy_cores`` cores' worth of CPU time in use."""
        return self.idle_watts + self.watts_per_core * max(0.0, min(busy_cores, self.cores))

    def joules(self, cpu_seconds: float, wall_seconds: float, *, include_idle: bool = True) -> float:
        """Energy of an interval from its CPU seconds (clamped to cores x wall seconds)."""
        if wall_seconds < 0 or cpu_seconds < 0:
            raise ValueError(f"seconds must be non-negative, got cpu={cpu_seconds}, wall={wall_seconds}")
        busy = min(cpu_seconds, self.cores * wall_seconds)
        return (self.idle_watts * wall_seconds if include_idle else 0.0) + self.watts_per_core * busy


BOARDS: dict[str, BoardModel] = {
    "raspberry-pi-4": BoardModel("raspberry-pi-4", cores=4, idle_watts=2.7, watts_per_core=0.9,
                                 relative_uncertainty=0.30),
    "raspberry-pi-5": BoardModel("raspberry-pi-5", cores=4, idle_watts=2.7, watts_per_core=1.15,
                                 relative_uncertainty=0.35),
    "x86-laptop": BoardModel("x86-laptop", cores=os.cpu_count() or 4, idle_watts=6.0,
                             watts_per_core=3.5, relative_uncertainty=0.50),
}


def board_model(name: str) -> BoardModel:
    try:
        return BOARDS[name]
    except KeyError:
        raise ConfigError(f"unknown board {name!r}; known boards: {', '.join(sorted(BOARDS))}") from None


def detect_board(device_tree_model: Path = Path("/proc/device-tree/model")) -> str:
    """The board name from the device tree (Raspberry Pi 4/5), else ``x86-laptop``."""
    try:
        model = device_tree_model.read_bytes().decode("ascii", "replace")
    except OSError:
        return "x86-laptop"
    if "Raspberry Pi 5" in model:
        return "raspberry-pi-5"
    if "Raspberry Pi 4" in model:
        return "raspberry-pi-4"
    log.warning("board %r has no power model; using raspberry-pi-4 figures", model.strip("\0"))
    return "raspberry-pi-4"


def process_cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads)."""
    return time.process_time()


def system_cpu_seconds(proc_stat: Path = Path("/proc/stat")) -> float:
    """Non-idle CPU seconds of the whole machine since boot, from the ``cpu`` line."""
    try:
        with proc_stat.open() as f:
            fields = f.readline().split()
    except OSError as exc:
        raise SensorError(f"cannot read {proc_stat}: {exc}") from exc
    if not fields or fields[0] != "cpu":
        raise SensorError(f"{proc_stat}: expected a first line starting with 'cpu', got {fields[:1]}")
    ticks = [int(x) for x in fields[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
    busy = sum(ticks[:8]) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


CPU_SCOPES: dict[str, Callable[[], float]] = {"process": process_cpu_seconds,
                                              "system": system_cpu_seconds}


class EstimatedSource:
    """A PowerSource from the board model: ``energy_joules`` is cumulative since creation,
    ``watts`` the mean over the interval since the previous read."""

    method = Method.ESTIMATED

    def __init__(self, board: BoardModel, *, scope: str = "process",
                 cpu_seconds: Callable[[], float] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if cpu_seconds is None:
            if scope not in CPU_SCOPES:
                raise ConfigError(f"scope must be one of {', '.join(CPU_SCOPES)}, got {scope!r}")
            cpu_seconds = CPU_SCOPES[scope]
        self.board = board
        self.scope = scope
        self.cpu_seconds = cpu_seconds
        self.clock = clock
        self.relative_uncertainty = board.relative_uncertainty
        self._t0 = self._t = clock()
        self._cpu0 = self._cpu = cpu_seconds()
        self._joules = 0.0
        self._lock = threading.Lock()    # the control loop and the meter read concurrently

    def read(self) -> PowerReading:
        with self._lock:
            return self._read()

    def _read(self) -> PowerReading:
        now, cpu = self.clock(), self.cpu_seconds()
        wall, used = now - self._t, max(0.0, cpu - self._cpu)
        joules = self.board.joules(used, wall) if wall > 0 else 0.0
        self._joules += joules
        watts = joules / wall if wall > 0 else self.board.watts(0.0)
        self._t, self._cpu = now, cpu
        return PowerReading(time=now, method=self.method, watts=watts, energy_joules=self._joules)

    def close(self) -> None:
        """Nothing to release."""

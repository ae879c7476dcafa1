"""What every power source returns, and the interface every backend implements.

A backend module per device lives beside this one (``ina219.py``, ``fuel_gauge.py``,
``sysfs_battery.py``, ``rapl.py``, ``gpio_power.py``, ``simulated_battery.py``). Fields a
backend cannot measure are ``None``, never a made-up number.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tensorslm.controller.errors import ControllerError


class HardwareLibraryMissing(ControllerError, ImportError):
    """An optional hardware library (smbus2, gpiozero) is not installed.

    Raised only when a hardware backend is actually opened; importing any controller module
    never needs those libraries. The message names the ``tensorslm[pi]`` extra.
    """


class Method(str, enum.Enum):
    """How an energy or power figure was obtained. Travels with every figure we publish."""

    INA219 = "ina219"
    FUEL_GAUGE = "fuel_gauge"
    SYSFS = "sysfs"
    RAPL = "rapl"
    ESTIMATED = "estimated"
    SIMULATED = "simulated"
    GPIO = "gpio"           # a power-loss / low-battery pin: state only, no power figure

    def __str__(self) -> str:  # so f-strings and JSON show "ina219", not "Method.INA219"
        return self.value


@dataclass(frozen=True)
class PowerReading:
    """One reading of a power source. ``time`` is ``time.monotonic()`` seconds unless stated."""

    time: float
    method: Method
    battery_percent: float | None = None   # 0..100
    watts: float | None = None             # power drawn by the machine (positive = load)
    volts: float | None = None
    amps: float | None = None              # positive = discharging into the load
    on_external_power: bool | None = None
    charging: bool | None = None
    power_lost: bool | None = None         # e.g. the X728's power-loss pin
    energy_joules: float | None = None     # cumulative counter where the device has one (RAPL)


@runtime_checkable
class PowerSource(Protocol):
    """A backend that can be read repeatedly. ``read`` raises SensorError on a passing fault.

    ``relative_uncertainty`` is the one-sigma relative error of its watts or energy figure
    (None when not known, or for a source with no power figure such as a GPIO pin); the
    energy meter turns it into each report's ``uncertainty_joules``.
    """

    method: Method
    relative_uncertainty: float | None

    def read(self) -> PowerReading: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EnergyReport:
    """Energy of one metered window (one query). Method and uncertainty travel with it."""

    joules: float
    seconds: float
    mean_watts: float
    peak_watts: float
    method: Method
    uncertainty_joules: float | None = None  # one-sigma estimate; None when not known
    baseline_subtracted: bool = False        # True when an idle baseline was removed
    samples: int = 0                         # power samples integrated (0 for counters/estimates)
    missing_seconds: float = 0.0             # time inside the window bridged over failed reads

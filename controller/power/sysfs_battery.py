"""The Linux battery interface, ``/sys/class/power_supply/*``.

Each supply is a directory with one value per file. Units are micro-units (kernel ABI,
Documentation/ABI/testing/sysfs-class-power): ``voltage_now`` uV, ``current_now`` uA,
``power_now`` uW, ``energy_now`` uWh; ``capacity`` is percent; ``status`` is one of
Charging, Discharging, Not charging, Full, Unknown; ``type`` is Battery, Mains, USB, ...
and ``online`` 1/0 for external supplies. Drivers differ in which files exist and in the
sign of ``current_now``, so: missing files give ``None``; the magnitude of current is
used, with the direction taken from ``status``; power is ``power_now`` when present, else
voltage x current. The root directory is injectable (tests build a tree in tmp_path).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from tensorslm.controller.errors import ConfigError, SensorError
from .readings import Method, PowerReading

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/sys/class/power_supply")
EXTERNAL_TYPES = ("Mains", "USB", "USB_C", "USB_PD", "USB_DCP", "USB_CDP", "Wireless")

SYSFS_RELATIVE_UNCERTAINTY = 0.05
"""Battery gauges behind power_supply report with a few percent error and are updated
by the firmware every few seconds (so short windows see stale values): 5 % one sigma."""


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        # Some drivers return ENODATA / EINVAL for a value they cannot give right now.
        log.debug("cannot read %s: %s", path, exc)
        return None


def _read_micro(path: Path) -> float | None:
    text = _read_text(path)
    if text is None or text == "":
        return None
    try:
        return int(text) * 1e-6
    except ValueError:
        raise SensorError(f"{path}: expected an integer in micro-units, got {text!r}") from None


def list_supplies(root: Path = DEFAULT_ROOT) -> dict[str, str]:
    """Supply name -> type (``Battery``, ``Mains``, ...) under ``root``."""
    if not root.is_dir():
        return {}
    return {d.name: (_read_text(d / "type") or "Unknown") for d in sorted(root.iterdir())
            if d.is_dir()}


class SysfsBatterySource:
    """One battery under ``root``; ``name`` None picks the first supply of type Battery."""

    method = Method.SYSFS
    relative_uncertainty = SYSFS_RELATIVE_UNCERTAINTY

    def __init__(self, name: str | None = None, *, root: str | Path = DEFAULT_ROOT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = Path(root)
        self.clock = clock
        supplies = list_supplies(self.root)
        batteries = [n for n, t in supplies.items() if t == "Battery"]
        if name is None:
            if not batteries:
                raise ConfigError(f"no battery found under {self.root}; supplies present: "
                                  f"{', '.join(f'{n} ({t})' for n, t in supplies.items()) or 'none'}")
            name = batteries[0]
        elif name not in supplies:
            raise ConfigError(f"power supply {name!r} not found under {self.root}; present: "
                              f"{', '.join(supplies) or 'none'}")
        self.name = name
        self.path = self.root / name
        self.external = [n for n, t in supplies.items() if t in EXTERNAL_TYPES]

    def _on_external_power(self, status: str | None) -> bool | None:
        online = [_read_text(self.root / n / "online") for n in self.external]
        known = [o == "1" for o in online if o is not None]
        if known:
            return any(known)
        if status in ("Charging", "Full", "Not charging"):
            return True
        if status == "Discharging":
            return False
        return None

    def read(self) -> PowerReading:
        if not self.path.is_dir():
            raise SensorError(f"battery {self.path} disappeared (unplugged or driver unloaded)")
        status = _read_text(self.path / "status")
        capacity_text = _read_text(self.path / "capacity")
        try:
            percent = None if capacity_text is None else float(capacity_text)
        except ValueError:
            raise SensorError(f"{self.path / 'capacity'}: expected a percentage, got "
                              f"{capacity_text!r}") from None
        volts = _read_micro(self.path / "voltage_now")
        amps = _read_micro(self.path / "current_now")
        watts = _read_micro(self.path / "power_now")
        energy_wh = _read_micro(self.path / "energy_now")
        if amps is not None:
            amps = abs(amps) if status != "Charging" else -abs(amps)
        if watts is not None:
            watts = abs(watts)
        elif volts is not None and amps is not None:
            watts = abs(volts * amps)
        external = self._on_external_power(status)
        if status == "Charging" or external:
            watts = None   # the battery does not carry the machine's draw (or only partly)
        if percent is None and energy_wh is not None:
            full = _read_micro(self.path / "energy_full")
            if full:
                percent = 100.0 * energy_wh / full
        return PowerReading(time=self.clock(), method=self.method, battery_percent=percent,
                            watts=watts, volts=volts, amps=amps,
                            on_external_power=external,
                            charging=None if status is None else status == "Charging")

    def close(self) -> None:
        """Nothing to release: files are opened per read."""

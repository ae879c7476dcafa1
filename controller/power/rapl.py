"""Intel RAPL energy counters, ``/sys/class/powercap/intel-rapl*/energy_uj``.

Each RAPL zone (``intel-rapl:0`` = package 0, subzones core/uncore/dram) exposes a
cumulative energy counter in microjoules that wraps at ``max_energy_range_uj``. The source
unwraps it (one wrap between two reads at most, which at package powers takes minutes to
hours) and reports the cumulative joules in ``energy_joules`` and the mean power since the
previous read in ``watts``. Since Linux 5.10 the counter is readable by root only
(CVE-2020-8694); a clear SensorError says so. RAPL covers the CPU package (and DRAM in
its own zone), not the whole machine.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from tensorslm.controller.errors import ConfigError, SensorError
from .readings import Method, PowerReading

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/sys/class/powercap")

RAPL_RELATIVE_UNCERTAINTY = 0.05
"""RAPL package energy agrees with external meters within a few percent on recent Intel
parts (Haswell onwards, per published validations); 5 % one sigma, package scope only."""


def unwrap(previous_uj: int, current_uj: int, max_range_uj: int) -> int:
    """Microjoules consumed between two counter values, assuming at most one wrap."""
    if current_uj >= previous_uj:
        return current_uj - previous_uj
    return current_uj + (max_range_uj - previous_uj) + 1


def list_zones(root: Path = DEFAULT_ROOT) -> dict[str, str]:
    """Zone directory -> zone name (``package-0``, ``dram``, ...)."""
    if not root.is_dir():
        return {}
    zones = {}
    for d in sorted(root.glob("intel-rapl*")):
        name_file = d / "name"
        zones[d.name] = name_file.read_text().strip() if name_file.exists() else "?"
    return zones


class RaplSource:
    """One RAPL zone (default ``intel-rapl:0``, package 0)."""

    method = Method.RAPL
    relative_uncertainty = RAPL_RELATIVE_UNCERTAINTY

    def __init__(self, zone: str = "intel-rapl:0", *, root: str | Path = DEFAULT_ROOT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = Path(root)
        self.path = self.root / zone
        self.clock = clock
        if not (self.path / "energy_uj").exists():
            zones = list_zones(self.root)
            raise ConfigError(f"no RAPL counter at {self.path / 'energy_uj'}; zones present: "
                              f"{', '.join(zones) or 'none (not an Intel/AMD x86 machine, or powercap not loaded)'}")
        self.max_range_uj = self._read_int("max_energy_range_uj")
        self._last_uj = self._read_int("energy_uj")
        self._last_time = self.clock()
        self._total_uj = 0
        self._lock = threading.Lock()    # the control loop and the meter read concurrently

    def _read_int(self, name: str) -> int:
        path = self.path / name
        try:
            text = path.read_text().strip()
        except PermissionError:
            raise SensorError(f"{path} is readable by root only (since Linux 5.10); run as root or "
                              "grant read access with a udev rule / chmod") from None
        except OSError as exc:
            raise SensorError(f"cannot read {path}: {exc}") from exc
        try:
            return int(text)
        except ValueError:
            raise SensorError(f"{path}: expected an integer, got {text!r}") from None

    def read(self) -> PowerReading:
        with self._lock:
            return self._read()

    def _read(self) -> PowerReading:
        now_uj = self._read_int("energy_uj")
        now = self.clock()
        delta = unwrap(self._last_uj, now_uj, self.max_range_uj)
        elapsed = now - self._last_time
        watts = delta * 1e-6 / elapsed if elapsed > 0 else None
        self._total_uj += delta
        self._last_uj, self._last_time = now_uj, now
        return PowerReading(time=now, method=self.method, watts=watts,
                            energy_joules=self._total_uj * 1e-6)

    def close(self) -> None:
        """Nothing to release."""

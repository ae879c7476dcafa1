"""A power-loss or low-battery input pin read through gpiozero, debounced.

UPS boards signal events on a GPIO line, e.g. the Geekworm X728 drives GPIO6 high when the
external supply is lost. :class:`PowerPinSource` reports ``power_lost`` (and
``on_external_power`` as its inverse) in a :class:`~tensorslm.controller.power.readings.PowerReading`, with
method ``gpio``; it measures no power.

Debouncing is done here, not by the pin library: a new level is accepted only after the
pin has held it for ``bounce_time`` seconds, measured on an injectable clock. Edges arrive
through gpiozero's ``when_activated`` / ``when_deactivated`` callbacks (so short glitches
between two reads are seen) and the level is also polled at every read. gpiozero is
imported lazily; tests drive the pin with ``gpiozero.pins.mock.MockFactory``.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from tensorslm.controller.errors import ConfigError
from .readings import HardwareLibraryMissing, Method, PowerReading

log = logging.getLogger(__name__)


def _input_device(pin: int | str, pull_up: bool | None, active_high: bool) -> Any:
    try:
        from gpiozero import DigitalInputDevice  # noqa: PLC0415 - lazy: off a Pi it is absent
    except ImportError as exc:
        raise HardwareLibraryMissing(
            "reading a GPIO pin needs gpiozero, which is not installed; install it with "
            "pip install 'tensorslm[pi]'") from exc
    if pull_up is None:
        return DigitalInputDevice(pin, pull_up=None, active_state=active_high)
    return DigitalInputDevice(pin, pull_up=pull_up)


class PowerPinSource:
    """Debounced power-loss pin. ``active`` (after ``active_high``) means power is lost.

    ``pin`` is a BCM number or gpiozero pin name ("GPIO6"); ``pull_up`` None leaves the line
    floating (the board drives it), in which case ``active_high`` says which level means
    power lost; with a pull resistor, gpiozero treats the pulled-away level as active.
    ``device`` may be injected (an object with ``is_active`` and the two callbacks).
    """

    method = Method.GPIO
    relative_uncertainty = None

    def __init__(self, pin: int | str = 6, *, active_high: bool = True,
                 pull_up: bool | None = None, bounce_time: float = 0.05,
                 clock: Callable[[], float] = time.monotonic, device: Any = None) -> None:
        if bounce_time < 0:
            raise ConfigError(f"bounce_time must be at least 0 seconds, got {bounce_time}")
        self.bounce_time = bounce_time
        self.clock = clock
        self.device = device if device is not None else _input_device(pin, pull_up, active_high)
        self._lock = threading.Lock()
        now = self.clock()
        level = bool(self.device.is_active)
        self._raw = level
        self._raw_since = now - bounce_time     # the level at start-up counts as settled
        self._stable = level
        self.transitions = 0                     # accepted (debounced) changes
        self.device.when_activated = lambda *_: self._edge(True)
        self.device.when_deactivated = lambda *_: self._edge(False)

    def _edge(self, level: bool) -> None:
        with self._lock:
            self._settle(self.clock())
            if level != self._raw:
                self._raw = level
                self._raw_since = self.clock()

    def _settle(self, now: float) -> None:
        if self._raw != self._stable and now - self._raw_since >= self.bounce_time:
            self._stable = self._raw
            self.transitions += 1
            log.info("power-loss pin now %s", "ACTIVE (power lost)" if self._stable else "inactive")

    @property
    def power_lost(self) -> bool:
        """The debounced level at this instant."""
        level = bool(self.device.is_active)
        with self._lock:
            now = self.clock()
            if level != self._raw:
                self._raw = level
                self._raw_since = now
            self._settle(now)
            return self._stable

    def read(self) -> PowerReading:
        lost = self.power_lost
        return PowerReading(time=self.clock(), method=self.method, power_lost=lost,
                            on_external_power=not lost)

    def close(self) -> None:
        self.device.when_activated = None
        self.device.when_deactivated = None
        self.device.close()

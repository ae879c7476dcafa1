"""The control loop: read the power source, decide, apply the operating point, record switches.

::

    controller = Controller(source, load_policy("battery.yaml"), actuator, interval=5.0,
                            on_switch=lambda s: log.info("%s", s))
    controller.start()            # a daemon thread; controller.stop() ends it
    controller.set_override("full", seconds=600, reason="demo")
    error = controller.reload_policy()   # None, or the ConfigError (old policy kept)

Contract with the :class:`~tensorslm.controller.decision.operating_point.Actuator`: ``apply`` is called from the
loop's thread whenever the chosen point differs from the point last applied. It must not
interrupt a query in progress; the point applies to the next query. If ``apply`` raises, the
previous point stays current, the error is logged and the apply is retried at the next tick.

Sensor faults: a read that raises :class:`~tensorslm.controller.errors.SensorError` is logged and retried
after a capped exponential backoff (``retry_seconds``, doubling, at most ``max_backoff``);
after ``policy.fallback.after_failures`` failures in a row the policy's fallback point is used
until a read succeeds again.

:meth:`Controller.tick` runs one iteration synchronously; tests (and the trace replay) drive
the loop through it with an injected clock instead of the thread.
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .decide import Decider, Decision, Rule
from tensorslm.controller.errors import ConfigError, ControllerError, SensorError
from .operating_point import Actuator, OperatingPoint
from .policy import Policy, load_policy
from tensorslm.controller.power.readings import PowerReading, PowerSource

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Switch:
    """One applied change of operating point."""

    time: float                      # the controller's clock (monotonic seconds)
    wall_time: dt.datetime | None    # local time, for people and the query log
    from_point: str | None           # None for the first point applied
    to_point: str
    rule: Rule
    reason: str
    reading: PowerReading | None     # the reading that led to it (None: sensor failing)

    def __str__(self) -> str:
        return f"{self.from_point or '-'} -> {self.to_point} ({self.rule}: {self.reason})"


class Controller:
    def __init__(self, source: PowerSource, policy: Policy, actuator: Actuator, *,
                 interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 local_time: Callable[[], dt.datetime | None] = dt.datetime.now,
                 on_switch: Callable[[Switch], None] | None = None,
                 retry_seconds: float = 0.5, max_backoff: float = 60.0,
                 history: int = 1000) -> None:
        if interval <= 0:
            raise ControllerError(f"interval: expected seconds > 0, got {interval}")
        if retry_seconds <= 0 or max_backoff < retry_seconds:
            raise ControllerError(f"expected 0 < retry_seconds <= max_backoff, got "
                                  f"retry_seconds={retry_seconds}, max_backoff={max_backoff}")
        self.source = source
        self.actuator = actuator
        self.interval = interval
        self.retry_seconds = retry_seconds
        self.max_backoff = max_backoff
        self._clock = clock
        self._local_time = local_time
        self._on_switch = on_switch
        self._decider = Decider(policy)
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._applied: OperatingPoint | None = None
        self._latest: PowerReading | None = None
        self._failures = 0
        self.next_delay = interval
        self.switches: deque[Switch] = deque(maxlen=history)

    # -- state -------------------------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self._decider.policy

    @property
    def current_point(self) -> OperatingPoint | None:
        """The point last applied through the actuator (None before the first tick)."""
        return self._applied

    @property
    def latest_reading(self) -> PowerReading | None:
        return self._latest

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    # -- one iteration -----------------------------------------------------------------------
    def tick(self) -> Decision | None:
        """Read, decide, apply. Returns the decision, or None when a failed read is retried
        before the fallback applies. Sets :attr:`next_delay` (seconds to the next tick)."""
        now = self._clock()
        try:
            reading: PowerReading | None = self.source.read()
        except SensorError as exc:
            self._failures += 1
            self.next_delay = min(self.retry_seconds * 2 ** (self._failures - 1), self.max_backoff)
            needed = self.policy.fallback.after_failures
            logger.warning("power sensor read failed (%d in a row, fallback after %d); retry in "
                           "%.1f s: %s", self._failures, needed, self.next_delay, exc)
            if self._failures < needed:
                return None
            reading = None
        else:
            self._failures = 0
            self._latest = reading
            self.next_delay = self.interval
        with self._lock:
            decision = self._decider.step(reading, now, self._local_time())
        self._apply(decision, reading, now)
        return decision

    def _apply(self, decision: Decision, reading: PowerReading | None, now: float) -> None:
        point = decision.point
        if self._applied == point:
            return
        try:
            self.actuator.apply(point)
        except Exception:  # the loop must survive a faulty actuator; retried next tick
            logger.exception("actuator failed to apply %s; keeping %s, retrying next tick",
                             point.name, self._applied.name if self._applied else "nothing")
            return
        switch = Switch(time=now, wall_time=self._local_time(),
                        from_point=self._applied.name if self._applied else None,
                        to_point=point.name, rule=decision.rule, reason=decision.reason,
                        reading=reading)
        self._applied = point
        self.switches.append(switch)
        logger.info("operating point %s", switch)
        if self._on_switch is not None:
            try:
                self._on_switch(switch)
            except Exception:  # a failing recorder must not stop the controller
                logger.exception("on_switch callback failed for %s", switch)

    # -- commands from other threads ---------------------------------------------------------
    def set_override(self, point: str, seconds: float, reason: str = "manual override") -> None:
        """Use ``point`` for ``seconds`` (critical battery still wins); applied at once."""
        if seconds <= 0:
            raise ControllerError(f"override duration: expected seconds > 0, got {seconds}")
        with self._lock:
            self._decider.set_override(point, self._clock() + seconds, reason)
        self._wake.set()

    def clear_override(self) -> None:
        with self._lock:
            self._decider.clear_override()
        self._wake.set()

    def reload_policy(self, path: str | Path | None = None) -> ConfigError | None:
        """Re-read the policy (from ``path`` or the file it came from). A bad file keeps the
        old policy; the error is logged and returned."""
        source = path if path is not None else self.policy.file
        if source is None:
            error = ConfigError("policy was not read from a file; give a path to reload from")
            logger.error("policy reload refused: %s", error)
            return error
        try:
            policy = load_policy(source)
        except ConfigError as error:
            logger.error("policy reload failed, keeping the current policy: %s", error)
            return error
        with self._lock:
            self._decider.replace_policy(policy)
        logger.info("policy reloaded from %s", source)
        self._wake.set()
        return None

    # -- the thread --------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise ControllerError("controller already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tensorslm-controller",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> "Controller":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # keep controlling; a bug in one tick must not stop the loop
                logger.exception("controller tick failed; next try in %.1f s", self.interval)
                self.next_delay = self.interval
            self._wake.wait(self.next_delay)
            self._wake.clear()

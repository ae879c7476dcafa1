"""Energy per query: ``begin()`` / ``end(window)`` (or ``with meter.measure() as w``).

Every source is turned into a cumulative energy curve E(t) built from samples:

* ``ina219``, ``fuel_gauge``, ``sysfs`` (power sensors): each sample is a power figure;
  E(t) is the trapezoid integral of the samples. A sampler thread reads the source at
  ``sample_hz`` while any window is open; ``begin`` and ``end`` also take a sample so a
  window's ends are sampled exactly.
* ``rapl``, ``simulated``, ``estimated`` (counters): each reading carries a cumulative
  ``energy_joules`` (the wrap-safe RAPL counter; the simulated battery's load energy; the
  board model's idle x t + per-core watts x process CPU seconds); E(t) is that counter,
  linear between samples, so a window gets exactly the counter difference.

A window's energy is E(t_end) - E(t_begin). Mean watts = joules / seconds; peak watts is
the largest sample (power sensors) or the largest mean power between two samples
(counters) inside the window.

**Overlapping windows** (concurrent queries): with ``overlap="full"`` (the default) every
window gets the whole machine's energy over its own interval, so energies of concurrent
windows overlap and do not add up to the machine's total. With ``overlap="shared"``, the
power at each instant is split equally among the windows open at that instant: a window
alone gets everything, two concurrent windows get half each of the time they share, and
the reports add up to the machine's energy over the union of the windows.

**Idle baseline**: after ``measure_baseline(seconds)`` the baseline watts x seconds (or its
share, when shared) are subtracted from every report (``baseline_subtracted=True``),
leaving the energy the queries added above idle. Results below zero are clamped to zero.

**Sensor faults**: a failed read (SensorError) inside a window is logged and bridged by
linear interpolation between the good samples either side; before the first or after the
last good sample, the nearest sample's power is held. The bridged time is reported in
``missing_seconds`` and adds 0.5 x peak watts x missing seconds to the uncertainty. When
more than ``max_missing_fraction`` of a window is bridged, ``end`` raises SensorError.

**Uncertainty** (one sigma, in quadrature): the source's ``relative_uncertainty`` x joules;
for power sensors a discretisation term 0.25 x sum(|dW| x dt) over the window's sample
intervals (what a step change between two samples can move the trapezoid); the baseline's
own uncertainty x seconds; the bridging term above. When the source has no stated
relative uncertainty, ``uncertainty_joules`` is None.

**Fallback**: with ``fallback=<BoardModel>``, a window the sensor cannot cover (a UPS
board on external power reports no load watts; a dead sensor) is reported from the board
model instead, labelled ``estimated`` (whole window, no baseline, no sharing), rather than
raising. The estimate's counter is read at ``begin`` and ``end`` only.

All timestamps come from the injectable ``clock``; tests drive ``sample()`` by hand with
``sampler=False``.
"""
from __future__ import annotations

import bisect
import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from tensorslm.controller.errors import ConfigError, SensorError
from .power_model import BoardModel, EstimatedSource, process_cpu_seconds
from .readings import EnergyReport, Method, PowerReading, PowerSource

log = logging.getLogger(__name__)

COUNTER_METHODS = frozenset({Method.RAPL, Method.SIMULATED, Method.ESTIMATED})
POWER_METHODS = frozenset({Method.INA219, Method.FUEL_GAUGE, Method.SYSFS})
OVERLAP_MODES = ("full", "shared")


@dataclass
class Window:
    """One metered interval. ``report`` is set by ``end`` (and by the context manager)."""

    id: int
    start: float
    end: float | None = None
    report: EnergyReport | None = None
    fallback_start: float | None = None   # estimated-energy counter at begin (with a fallback)


@dataclass
class _Sample:
    time: float
    energy: float          # cumulative joules (E(t))
    watts: float           # power at the sample (sensor) or mean since previous (counter)
    bridged: bool = False  # a failed read happened between the previous sample and this one


@dataclass
class Baseline:
    watts: float
    uncertainty_watts: float | None
    seconds: float


class EnergyMeter:
    """Meters windows of a PowerSource, or of a board model when no sensor exists.

    ``EnergyMeter(source)`` or ``EnergyMeter(model=BOARDS["raspberry-pi-4"])`` (the latter
    builds an :class:`~tensorslm.controller.power.power_model.EstimatedSource` on this process's CPU time).
    """

    def __init__(self, source: PowerSource | None = None, *, model: BoardModel | None = None,
                 sample_hz: float = 20.0, overlap: str = "full", sampler: bool = True,
                 max_missing_fraction: float = 0.5, clock: Callable[[], float] = time.monotonic,
                 cpu_seconds: Callable[[], float] = process_cpu_seconds,
                 fallback: BoardModel | None = None) -> None:
        if (source is None) == (model is None):
            raise ConfigError("EnergyMeter needs exactly one of a source or a board model; "
                              f"got source={source!r}, model={model!r}")
        if source is None:
            source = EstimatedSource(model, cpu_seconds=cpu_seconds, clock=clock)
        if source.method not in COUNTER_METHODS | POWER_METHODS:
            raise ConfigError(f"a {source.method} source measures no power or energy; meterable "
                              f"methods: {', '.join(sorted(m.value for m in COUNTER_METHODS | POWER_METHODS))}")
        if not (math.isfinite(sample_hz) and sample_hz > 0):
            raise ConfigError(f"sample_hz must be a positive number, got {sample_hz!r}")
        if overlap not in OVERLAP_MODES:
            raise ConfigError(f"overlap must be one of {', '.join(OVERLAP_MODES)}, got {overlap!r}")
        self.source = source
        self.method: Method = source.method
        self.counter = source.method in COUNTER_METHODS
        self.sample_hz = sample_hz
        self.overlap = overlap
        self.max_missing_fraction = max_missing_fraction
        self.clock = clock
        self.use_sampler = sampler
        self.relative_uncertainty: float | None = source.relative_uncertainty
        self.baseline: Baseline | None = None
        self.failures = 0
        self.fallback = (EstimatedSource(fallback, cpu_seconds=cpu_seconds, clock=clock)
                         if fallback is not None and source.method is not Method.ESTIMATED else None)
        self._lock = threading.RLock()
        self._samples: list[_Sample] = []
        self._times: list[float] = []
        self._pending_failure = False
        self._open: dict[int, Window] = {}
        self._closed: list[Window] = []       # recently closed, kept for shared overlap
        self._next_id = 1
        self._active = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- sampling --------------------------------------------------------------------------
    def sample(self) -> bool:
        """Read the source once and append a sample. Returns False on a sensor fault."""
        with self._lock:
            try:
                reading = self.source.read()
            except SensorError as exc:
                self.failures += 1
                self._pending_failure = True
                log.warning("energy meter: %s read failed (%s); bridging", self.method, exc)
                return False
            return self._append(reading)

    def _append(self, reading: PowerReading) -> bool:
        t = reading.time
        last = self._samples[-1] if self._samples else None
        if last is not None and t <= last.time:
            return True            # same instant: nothing new
        if self.counter:
            if reading.energy_joules is None:
                raise SensorError(f"{self.method} source returned no energy_joules counter")
            energy = reading.energy_joules
            if last is None:
                watts = reading.watts if reading.watts is not None else 0.0
            else:
                watts = (energy - last.energy) / (t - last.time)
        else:
            if reading.watts is None:
                self.failures += 1
                self._pending_failure = True
                log.warning("energy meter: %s reading has no watts (e.g. on external power); "
                            "bridging", self.method)
                return False
            watts = reading.watts
            energy = 0.0 if last is None else last.energy + 0.5 * (watts + last.watts) * (t - last.time)
        self._samples.append(_Sample(t, energy, watts, bridged=self._pending_failure))
        self._times.append(t)
        self._pending_failure = False
        return True

    def _run(self, stop: threading.Event) -> None:
        period = 1.0 / self.sample_hz
        while not stop.wait(period):
            self.sample()

    def _activate(self) -> None:
        self._active += 1
        if self.use_sampler and self._active == 1:
            self._stop = threading.Event()      # one event per thread: an old one just exits
            self._thread = threading.Thread(target=self._run, args=(self._stop,),
                                            name="energy-sampler", daemon=True)
            self._thread.start()

    def _deactivate(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._stop.set()

    def _prune(self, keep_after: float) -> None:
        """Drop samples and closed windows that no open window can need any more."""
        if self._open:
            keep_after = min(w.start for w in self._open.values())
        i = max(0, bisect.bisect_left(self._times, keep_after) - 1)
        i = min(i, len(self._samples) - 1) if self._samples else 0
        del self._samples[:i]
        del self._times[:i]
        self._closed = [w for w in self._closed if w.end is not None and w.end > keep_after]

    # -- the curve -------------------------------------------------------------------------
    def _energy_at(self, t: float) -> tuple[float, float]:
        """E(t) and the seconds of [t, nearest sample] held constant when t is outside."""
        s = self._samples
        if t <= s[0].time:
            return s[0].energy - s[0].watts * (s[0].time - t), s[0].time - t
        if t >= s[-1].time:
            return s[-1].energy + s[-1].watts * (t - s[-1].time), t - s[-1].time
        i = bisect.bisect_right(self._times, t)
        a, b = s[i - 1], s[i]
        if self.counter:
            return a.energy + (b.energy - a.energy) * (t - a.time) / (b.time - a.time), 0.0
        # trapezoid of the linear power between a and b, from a to t
        frac = (t - a.time) / (b.time - a.time)
        w_t = a.watts + (b.watts - a.watts) * frac
        return a.energy + 0.5 * (a.watts + w_t) * (t - a.time), 0.0

    def _watts_at(self, t: float) -> float:
        s = self._samples
        if t <= s[0].time:
            return s[0].watts
        if t >= s[-1].time:
            return s[-1].watts
        i = bisect.bisect_right(self._times, t)
        a, b = s[i - 1], s[i]
        if self.counter:
            return b.watts
        return a.watts + (b.watts - a.watts) * (t - a.time) / (b.time - a.time)

    def _window_stats(self, t0: float, t1: float) -> tuple[float, float, float]:
        """Peak watts, bridged seconds and the discretisation sum within [t0, t1]."""
        s = self._samples
        if self.counter:
            peak = self._watts_at(t1) if t1 > t0 else self._watts_at(t0)
        else:
            peak = max(self._watts_at(t0), self._watts_at(t1))
        bridged = 0.0
        disc = 0.0
        for a, b in zip(s, s[1:]):
            lo, hi = max(a.time, t0), min(b.time, t1)
            if hi <= lo:
                continue
            peak = max(peak, b.watts if self.counter else max(self._watts_at(lo), self._watts_at(hi)))
            if b.bridged:
                bridged += hi - lo
            if not self.counter:
                disc += abs(b.watts - a.watts) * (hi - lo)
        # time held constant beyond the ends of the curve
        _, before = self._energy_at(t0)
        _, after = self._energy_at(t1)
        bridged += min(before, t1 - t0) + min(after, t1 - t0)
        return peak, min(bridged, t1 - t0), disc

    def _share_energy(self, window: Window, t0: float, t1: float, baseline_w: float) -> float:
        """Energy of [t0, t1] split among the windows open at each instant."""
        others = [w for w in list(self._open.values()) + self._closed if w.id != window.id]
        cuts = {t0, t1}
        for w in others:
            for t in (w.start, w.end):
                if t is not None and t0 < t < t1:
                    cuts.add(t)
        cuts_sorted = sorted(cuts)
        total = 0.0
        for a, b in zip(cuts_sorted, cuts_sorted[1:]):
            mid = 0.5 * (a + b)
            n = 1 + sum(1 for w in others if w.start <= mid and (w.end is None or w.end > mid))
            total += (self._energy_at(b)[0] - self._energy_at(a)[0] - baseline_w * (b - a)) / n
        return total

    # -- windows ---------------------------------------------------------------------------
    def begin(self) -> Window:
        """Open a window now (takes a sample so the window starts on one)."""
        with self._lock:
            start = self._samples[-1].time if self.sample() else self.clock()
            window = Window(id=self._next_id, start=start)
            if self.fallback is not None:
                window.fallback_start = self.fallback.read().energy_joules
            self._next_id += 1
            self._open[window.id] = window
            self._activate()
            return window

    def end(self, window: Window) -> EnergyReport:
        """Close ``window`` and return its report (see the module docstring for the rules)."""
        with self._lock:
            if window.id not in self._open:
                raise ConfigError(f"window {window.id} is not open (already ended, or from another "
                                  "meter); call begin() for each window and end() once")
            t1 = self._samples[-1].time if self.sample() else self.clock()
            window.end = max(t1, window.start)
            try:
                try:
                    report = self._report(window)
                except SensorError as exc:
                    if self.fallback is None:
                        raise
                    report = self._fallback_report(window, exc)
            finally:
                del self._open[window.id]
                self._closed.append(window)
                self._deactivate()
                self._prune(keep_after=math.inf)
            window.report = report
            return report

    def _report(self, window: Window) -> EnergyReport:
        t0, t1 = window.start, window.end
        seconds = t1 - t0
        if not self._samples:
            raise SensorError(f"no {self.method} reading succeeded during the {seconds:.3f} s "
                              f"window ({self.failures} failed reads); no energy figure")
        e0, _ = self._energy_at(t0)
        e1, _ = self._energy_at(t1)
        full = e1 - e0
        peak, bridged, disc = self._window_stats(t0, t1)
        if seconds > 0 and bridged > self.max_missing_fraction * seconds:
            raise SensorError(
                f"{self.method} sensor failed for {bridged:.3f} s of a {seconds:.3f} s window "
                f"(more than max_missing_fraction={self.max_missing_fraction}); no energy figure")
        baseline_w = self.baseline.watts if self.baseline else 0.0
        if self.overlap == "shared":
            joules = self._share_energy(window, t0, t1, baseline_w)
            share = joules / (full - baseline_w * seconds) if full - baseline_w * seconds else 1.0
        else:
            joules = full - baseline_w * seconds
            share = 1.0
        if joules < 0:
            log.debug("window %d below baseline by %.4f J; clamped to 0", window.id, -joules)
            joules = 0.0
        uncertainty = None
        if self.relative_uncertainty is not None:
            terms = [self.relative_uncertainty * abs(full) * share,
                     0.25 * disc * share,
                     0.5 * max(peak, 0.0) * bridged * share]
            if self.baseline is not None and self.baseline.uncertainty_watts is not None:
                terms.append(self.baseline.uncertainty_watts * seconds * share)
            uncertainty = math.sqrt(sum(x * x for x in terms))
        samples = sum(1 for t in self._times if t0 <= t <= t1)
        return EnergyReport(joules=joules, seconds=seconds,
                            mean_watts=joules / seconds if seconds > 0 else 0.0,
                            peak_watts=max(peak, 0.0), method=self.method,
                            uncertainty_joules=uncertainty,
                            baseline_subtracted=self.baseline is not None,
                            samples=0 if self.counter else samples, missing_seconds=bridged)

    def _fallback_report(self, window: Window, exc: SensorError) -> EnergyReport:
        """The board estimate for a window the sensor could not cover (method ``estimated``)."""
        estimate = self.fallback
        joules = estimate.read().energy_joules - (window.fallback_start or 0.0)
        seconds = window.end - window.start
        log.warning("window %d: %s; reporting the %s estimate instead", window.id, exc,
                    estimate.board.name)
        return EnergyReport(joules=joules, seconds=seconds,
                            mean_watts=joules / seconds if seconds > 0 else 0.0,
                            peak_watts=joules / seconds if seconds > 0 else 0.0,
                            method=Method.ESTIMATED,
                            uncertainty_joules=estimate.relative_uncertainty * joules,
                            missing_seconds=seconds)

    @contextlib.contextmanager
    def measure(self) -> Iterator[Window]:
        """``with meter.measure() as w: ...`` then ``w.report``; ended even on exceptions."""
        window = self.begin()
        try:
            yield window
        finally:
            self.end(window)

    def measure_baseline(self, seconds: float, *, sleep: Callable[[float], None] = time.sleep) -> Baseline:
        """Measure idle power over ``seconds`` (no query running) and subtract it from now on."""
        if not seconds > 0:
            raise ConfigError(f"baseline seconds must be positive, got {seconds!r}")
        saved, self.baseline, overlap = self.baseline, None, self.overlap
        self.overlap = "full"
        try:
            window = self.begin()
            try:
                sleep(seconds)
            finally:
                report = self.end(window)
            with self._lock:   # the baseline window must not share energy with real ones
                self._closed = [w for w in self._closed if w.id != window.id]
        except BaseException:
            self.baseline = saved
            raise
        finally:
            self.overlap = overlap
        self.baseline = Baseline(watts=report.mean_watts, seconds=report.seconds,
                                 uncertainty_watts=None if report.uncertainty_joules is None
                                 else report.uncertainty_joules / report.seconds)
        log.info("idle baseline %.3f W over %.1f s (%s)", self.baseline.watts, report.seconds,
                 self.method)
        return self.baseline

    def close(self) -> None:
        """Stop the sampler thread (the source is closed by its owner)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)

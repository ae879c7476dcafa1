"""Energy policies: the YAML file read into validated, frozen dataclasses.

A policy names its operating points, best first (the first is the *top* point), and the rules
that choose among them. Every error names the file, the line and the field, and says what is
accepted; cross-field checks (an unknown point name, an exit threshold not above its enter
threshold) point at the line of the offending field::

    policy = load_policy("deploy/policies/battery.yaml")
    policy.top.name          # 'full'
    policy.point("eco")      # OperatingPoint(...)

Precedence of the rules, as :func:`tensorslm.controller.decision.decide.decide` applies them (first match wins):

1. ``critical``: smoothed battery at or below ``critical.enter_below`` while not on external
   power (left again above ``exit_above``). Beats a manual override: a flat battery serves
   no one. Entering critical ignores the dwell time.
2. manual override (set at run time, with an expiry). Ignores the dwell time.
3. ``fallback``: the sensor failed ``after_failures`` times in a row; no reading to act on.
4. external power: ``external_power`` (default: the top point).
5. ``battery`` levels, ``schedule`` windows and ``power_budget``: each active rule names a
   ceiling; the most frugal (latest in ``points``) of them wins.
6. otherwise the top point.

Every switch chosen by rules 3-6 (and leaving critical) waits until ``dwell_seconds`` have
passed since the previous switch.
"""
from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from tensorslm.config_file import Section, load_section
from tensorslm.constants import BODY_PRECISIONS, FULL_RUNG
from tensorslm.controller.errors import ConfigError
from .operating_point import OperatingPoint
from tensorslm.controller.power.readings import Method


class Weekday(enum.IntEnum):
    """Days as ``datetime.weekday()`` numbers them; YAML spells them ``mon`` .. ``sun``."""

    MON = 0
    TUE = 1
    WED = 2
    THU = 3
    FRI = 4
    SAT = 5
    SUN = 6


@dataclass(frozen=True)
class BatteryLevel:
    """Below ``enter_below`` percent use at most ``point``; leave the level above ``exit_above``."""

    point: str
    enter_below: float
    exit_above: float


@dataclass(frozen=True)
class Critical:
    point: str
    enter_below: float
    exit_above: float


@dataclass(frozen=True)
class PowerBudget:
    """Keep mean power under ``max_watts``: the best point whose (measured) watts fit.

    A point's mean power observed while it was current replaces its configured ``watts``
    for ``observed_seconds`` after it was last seen (then the configured figure is used
    again, so a point excluded during a busy hour is tried again later)."""

    max_watts: float
    observed_seconds: float = 1800.0


@dataclass(frozen=True)
class ScheduleWindow:
    """From ``start`` to ``end`` local time (wrapping past midnight when end <= start)."""

    point: str
    start: dt.time
    end: dt.time
    days: frozenset[Weekday] | None = None  # None: every day

    def contains(self, moment: dt.datetime) -> bool:
        now = moment.time().replace(tzinfo=None)
        if self.start < self.end:
            inside, day = self.start <= now < self.end, moment.weekday()
        else:  # wraps past midnight: the part after midnight belongs to the previous day
            if now >= self.start:
                inside, day = True, moment.weekday()
            else:
                inside, day = now < self.end, (moment.weekday() - 1) % 7
        return inside and (self.days is None or Weekday(day) in self.days)


@dataclass(frozen=True)
class Fallback:
    """Used when ``after_failures`` sensor reads in a row have failed."""

    point: str
    after_failures: int = 3


@dataclass(frozen=True)
class Policy:
    points: tuple[OperatingPoint, ...]          # best first; points[0] is the top point
    fallback: Fallback
    external_power_point: str
    dwell_seconds: float = 60.0
    smoothing_seconds: float = 30.0             # EMA time constant of the readings; 0: none
    battery_levels: tuple[BatteryLevel, ...] = ()   # ordered by falling enter_below
    critical: Critical | None = None
    power_budget: PowerBudget | None = None
    schedule: tuple[ScheduleWindow, ...] = ()
    file: str | None = None

    @property
    def top(self) -> OperatingPoint:
        return self.points[0]

    def point(self, name: str) -> OperatingPoint:
        for point in self.points:
            if point.name == name:
                return point
        raise ConfigError(f"no operating point named {name!r}; defined: {', '.join(self.names)}",
                          file=self.file)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.points]

    def accelerated(self, factor: float) -> "Policy":
        """This policy for a battery whose time runs ``factor`` times faster than the clock
        (a simulated one): dwell and smoothing shrink by the same factor, so the decisions
        over a discharge are the ones real time would give."""
        if not factor > 0:
            raise ValueError(f"expected an acceleration factor > 0, got {factor!r}")
        return replace(self, dwell_seconds=self.dwell_seconds / factor,
                       smoothing_seconds=self.smoothing_seconds / factor)

    def rank(self, name: str) -> int:
        """0 for the top point; larger is more frugal."""
        return self.names.index(self.point(name).name)

    def rules(self) -> list[str]:
        """One line per rule, in precedence order (for ``tensorslm policy check``)."""
        lines = []
        if self.critical:
            c = self.critical
            lines.append(f"critical: battery <= {c.enter_below:g}% -> {c.point} "
                         f"(until > {c.exit_above:g}%)")
        lines.append("manual override: when set, until it expires")
        lines.append(f"fallback: after {self.fallback.after_failures} failed reads -> "
                     f"{self.fallback.point}")
        lines.append(f"external power -> {self.external_power_point}")
        for level in self.battery_levels:
            lines.append(f"battery < {level.enter_below:g}% -> at most {level.point} "
                         f"(until > {level.exit_above:g}%)")
        for window in self.schedule:
            days = ("every day" if window.days is None else
                    ",".join(d.name.lower() for d in sorted(window.days)))
            lines.append(f"schedule {window.start:%H:%M}-{window.end:%H:%M} {days} -> at most "
                         f"{window.point}")
        if self.power_budget:
            lines.append(f"power budget: mean power <= {self.power_budget.max_watts:g} W -> "
                         "best point that fits")
        lines.append(f"otherwise -> {self.top.name}")
        lines.append(f"dwell {self.dwell_seconds:g} s between switches; readings smoothed "
                     f"over {self.smoothing_seconds:g} s")
        return lines


# -- parsing -------------------------------------------------------------------------------

def load_policy(path: str | Path, *, rungs: Iterable[str] | None = None) -> Policy:
    """Read and validate a policy file. With ``rungs``, rung names are checked against them."""
    return parse_policy(load_section(path), rungs=rungs)


def parse_policy(root: Section, *, rungs: Iterable[str] | None = None) -> Policy:
    known_rungs = list(rungs) if rungs is not None else None
    point_sections = root.sections("points")
    if not point_sections:
        raise root.field_error("points", "expected at least one operating point")
    points = []
    seen: set[str] = set()
    for sec in point_sections:
        point = _point(sec, known_rungs)
        if point.name in seen:
            raise sec.field_error("name", f"duplicate point name {point.name!r}; names must be unique")
        seen.add(point.name)
        points.append(point)
    names = [p.name for p in points]

    def ref(sec: Section, key: str, default: str | None = None) -> str:
        name = sec.str(key) if default is None else sec.str(key, default)
        if name not in names:
            raise sec.field_error(key, f"point {name!r} not defined; defined points: "
                                       f"{', '.join(names)}")
        return name

    dwell = root.float("dwell_seconds", 60.0, minimum=0)
    smoothing = root.float("smoothing_seconds", 30.0, minimum=0)
    external = ref(root, "external_power", names[0])

    levels: list[BatteryLevel] = []
    level_secs = root.sections("battery", default=None)
    for sec in level_secs:
        level = BatteryLevel(point=ref(sec, "point"),
                             enter_below=sec.float("enter_below", minimum=0, maximum=100),
                             exit_above=sec.float("exit_above", minimum=0, maximum=100))
        sec.reject_unknown()
        _check_band(sec, level.enter_below, level.exit_above)
        if levels:
            above = levels[-1]
            if level.enter_below >= above.enter_below:
                raise sec.field_error("enter_below", f"levels must be listed with falling "
                                      f"enter_below; expected below {above.enter_below:g} "
                                      f"(the level above), got {level.enter_below:g}")
            if names.index(level.point) < names.index(above.point):
                raise sec.field_error("point", f"a lower battery level must name a point at least "
                                      f"as frugal as the level above ({above.point!r}, listed "
                                      f"as point {names.index(above.point) + 1}); got "
                                      f"{level.point!r} (point {names.index(level.point) + 1})")
        levels.append(level)

    critical = None
    crit = root.section("critical", default=None)
    if crit is not None:
        critical = Critical(point=ref(crit, "point", names[-1]),
                            enter_below=crit.float("enter_below", minimum=0, maximum=100),
                            exit_above=crit.float("exit_above", minimum=0, maximum=100))
        crit.reject_unknown()
        _check_band(crit, critical.enter_below, critical.exit_above)
        if levels and critical.enter_below >= levels[-1].enter_below:
            raise crit.field_error("enter_below", f"expected below the lowest battery level's "
                                   f"enter_below ({levels[-1].enter_below:g}), got "
                                   f"{critical.enter_below:g}")

    budget = None
    budget_sec = root.section("power_budget", default=None)
    if budget_sec is not None:
        budget = PowerBudget(max_watts=budget_sec.float("max_watts", minimum=0.01),
                             observed_seconds=budget_sec.float("observed_seconds", 1800.0,
                                                               minimum=0))
        budget_sec.reject_unknown()
        if not any(p.watts is not None for p in points):
            raise root.field_error("power_budget", "a power budget needs figures: give at least "
                                   "one point a 'watts' field (its mean power at that point)")

    schedule = tuple(_window(sec, ref) for sec in root.sections("schedule", default=None))

    fallback_sec = root.section("fallback", default=None)
    if fallback_sec is None:
        fallback = Fallback(point=names[-1])
    else:
        fallback = Fallback(point=ref(fallback_sec, "point", names[-1]),
                            after_failures=fallback_sec.int("after_failures", 3, minimum=1))
        fallback_sec.reject_unknown()

    root.reject_unknown()
    return Policy(points=tuple(points), fallback=fallback, external_power_point=external,
                  dwell_seconds=dwell, smoothing_seconds=smoothing, battery_levels=tuple(levels),
                  critical=critical, power_budget=budget, schedule=schedule, file=root.file)


_METHODS = [m.value for m in Method]


def _point(sec: Section, rungs: list[str] | None) -> OperatingPoint:
    name = sec.str("name")
    rung = sec.str("rung", FULL_RUNG, choices=rungs)
    max_new = sec.int("max_new_tokens", 128, minimum=1)
    threads = sec.int("threads", 1, minimum=1, maximum=256)
    max_prompt = sec.int("max_prompt_tokens", None, minimum=1)
    precision = sec.choice("precision", BODY_PRECISIONS, None)
    watts = sec.float("watts", None, minimum=0)
    joules = sec.float("joules_per_query", None, minimum=0)
    method_name = sec.choice("figures_method", _METHODS, None)
    if "extra" in sec:
        raise sec.field_error("extra", "the agent applies only the knobs rung, threads, "
                              "max_new_tokens, max_prompt_tokens and precision; remove 'extra' (its knobs "
                              "would be parsed and never applied)")
    if (watts is not None or joules is not None) and method_name is None:
        raise sec.field_error("figures_method", "required with 'watts' or 'joules_per_query': "
                              f"say how the figures were obtained, one of {', '.join(_METHODS)}")
    sec.reject_unknown()
    return OperatingPoint(name=name, rung=rung, max_new_tokens=max_new, threads=threads,
                          max_prompt_tokens=max_prompt, precision=precision, watts=watts, joules_per_query=joules,
                          figures_method=Method(method_name) if method_name else None)


def _check_band(sec: Section, enter_below: float, exit_above: float) -> None:
    if exit_above <= enter_below:
        raise sec.field_error("exit_above", f"expected above enter_below ({enter_below:g}) so "
                              f"that readings near the threshold do not flap; got {exit_above:g}")


def _window(sec: Section, ref) -> ScheduleWindow:
    point = ref(sec, "point")
    start = _time_of_day(sec, "from")
    end = _time_of_day(sec, "to")
    if start == end:
        raise sec.field_error("to", f"expected a time different from 'from' ({start:%H:%M})")
    days = None
    day_values = sec.list("days", default=None)
    if day_values:
        accepted = [d.name.lower() for d in Weekday]
        parsed = set()
        for value in day_values:
            text = value.plain
            if not isinstance(text, str) or text.lower() not in accepted:
                raise value.error(f"expected one of {', '.join(accepted)}; got {text!r}")
            parsed.add(Weekday[text.upper()])
        days = frozenset(parsed)
    sec.reject_unknown()
    return ScheduleWindow(point=point, start=start, end=end, days=days)


def _time_of_day(sec: Section, key: str) -> dt.time:
    if key not in sec:
        sec.str(key)  # raises "required field is missing" with the right line
    try:
        text = sec.str(key)
    except ConfigError:
        raise sec.field_error(key, "expected a time of day in quotes, e.g. '22:00' (unquoted, "
                              "YAML reads 22:00 as a number)") from None
    try:
        return dt.time.fromisoformat(text)
    except ValueError:
        raise sec.field_error(key, f"expected a time of day HH:MM (00:00 to 23:59), got {text!r}") \
            from None

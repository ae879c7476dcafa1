"""The decision: readings in, operating point out. Pure, so it can be tested on plain lists.

:func:`decide` takes the policy, the previous :class:`DeciderState`, one reading (or ``None``
when the sensor has failed ``fallback.after_failures`` times in a row) and the time, and
returns a :class:`Decision` with the new state. :class:`Decider` is the thin stateful wrapper
the control loop and the trace replay use::

    decider = Decider(policy)
    for reading in readings:
        decision = decider.step(reading, reading.time)
        if decision.switched:
            ...

The rules and their precedence are documented in :mod:`tensorslm.controller.decision.policy`. Times are seconds
on any monotonic scale; ``local_time`` (a datetime) is only needed by ``schedule`` windows.
"""
from __future__ import annotations

import datetime as dt
import enum
import math
from dataclasses import dataclass, field, replace

from tensorslm.controller.errors import ControllerError
from .operating_point import OperatingPoint
from .policy import Policy
from tensorslm.controller.power.readings import PowerReading


class Rule(str, enum.Enum):
    """Which rule chose the point of a decision."""

    CRITICAL = "critical"
    OVERRIDE = "override"
    FALLBACK = "fallback"
    EXTERNAL_POWER = "external_power"
    BATTERY = "battery"
    SCHEDULE = "schedule"
    POWER_BUDGET = "power_budget"
    DEFAULT = "default"
    DWELL = "dwell"          # a rule wanted another point; held until the dwell time has passed

    def __str__(self) -> str:
        return self.value


class DecisionError(ControllerError, ValueError):
    """A decision was asked for with inputs that cannot be right (e.g. time going backwards)."""


@dataclass(frozen=True)
class Override:
    point: str
    until: float          # same time scale as ``now``
    reason: str = "manual override"


@dataclass(frozen=True)
class DeciderState:
    """Everything a decision remembers. Start from ``DeciderState()``."""

    point: str | None = None          # current point (None before the first decision)
    switched_at: float | None = None  # time of the last switch
    last_time: float | None = None    # time of the last smoothed reading
    battery: float | None = None      # EMA of battery percent
    watts: float | None = None        # EMA of watts
    level: int = 0                    # 0: above every battery level; k: level k-1 entered
    critical: bool = False
    override: Override | None = None
    # Mean watts seen while a point was current and settled, with the time last seen; it
    # replaces the point's YAML figure for power_budget.observed_seconds.
    observed_watts: dict[str, tuple[float, float]] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Decision:
    point: OperatingPoint
    rule: Rule
    reason: str
    switched: bool
    previous: str | None
    battery_percent: float | None     # smoothed
    watts: float | None               # smoothed
    time: float


def decide(policy: Policy, state: DeciderState, reading: PowerReading | None, now: float,
           local_time: dt.datetime | None = None) -> tuple[Decision, DeciderState]:
    """One decision. ``reading=None`` means the sensor is failing (the fallback rule)."""
    if state.last_time is not None and now < state.last_time:
        raise DecisionError(f"time went backwards: expected now >= {state.last_time}, got {now}")
    if state.point is not None and state.point not in policy.names:
        raise DecisionError(f"state names point {state.point!r}, which this policy does not "
                            f"define (defined: {', '.join(policy.names)}); start from a fresh "
                            "DeciderState or use Decider.replace_policy")
    state = _smooth(policy, state, reading, now)
    state = _update_levels(policy, state)
    override_expired = state.override is not None and now >= state.override.until
    if override_expired:
        state = replace(state, override=None)

    wanted, rule, reason = _wanted(policy, state, reading, local_time)

    exempt = rule in (Rule.OVERRIDE, Rule.CRITICAL) or override_expired or state.point is None
    if wanted != state.point and not exempt and state.switched_at is not None \
            and now - state.switched_at < policy.dwell_seconds:
        wait = policy.dwell_seconds - (now - state.switched_at)
        reason = (f"holding {state.point} for {wait:.0f} s more (dwell "
                  f"{policy.dwell_seconds:g} s); {rule} wants {wanted}: {reason}")
        wanted, rule = state.point, Rule.DWELL
    elif override_expired and rule is not Rule.CRITICAL:
        reason = f"override expired; {reason}"

    switched = wanted != state.point
    previous = state.point
    if switched:
        state = replace(state, point=wanted, switched_at=now)
    decision = Decision(point=policy.point(wanted), rule=rule, reason=reason, switched=switched,
                        previous=previous, battery_percent=state.battery, watts=state.watts,
                        time=now)
    return decision, state


def _smooth(policy: Policy, state: DeciderState, reading: PowerReading | None,
            now: float) -> DeciderState:
    if reading is None:
        return state
    tau = policy.smoothing_seconds
    if state.last_time is None or tau == 0:
        alpha = 1.0
    else:
        alpha = 1.0 - math.exp(-(now - state.last_time) / tau)

    def ema(old: float | None, new: float | None) -> float | None:
        if new is None:
            return old
        if old is None:
            return float(new)
        return old + alpha * (new - old)

    battery = ema(state.battery, reading.battery_percent)
    watts = ema(state.watts, reading.watts)
    observed = state.observed_watts
    settle = 3 * tau
    if (watts is not None and state.point is not None and state.switched_at is not None
            and now - state.switched_at >= settle and reading.on_external_power is not True):
        observed = {**observed, state.point: (watts, now)}
    return replace(state, battery=battery, watts=watts, last_time=now, observed_watts=observed)


def _update_levels(policy: Policy, state: DeciderState) -> DeciderState:
    """Hysteresis: enter a level below ``enter_below``, leave it above ``exit_above``."""
    battery = state.battery
    if battery is None:
        return state
    levels = policy.battery_levels
    level = state.level
    while level > 0 and battery > levels[level - 1].exit_above:
        level -= 1
    for k in range(len(levels), level, -1):   # deepest level entered wins
        if battery < levels[k - 1].enter_below:
            level = k
            break
    critical = state.critical
    if policy.critical is not None:
        if critical and battery > policy.critical.exit_above:
            critical = False
        elif not critical and battery <= policy.critical.enter_below:
            critical = True
    return replace(state, level=level, critical=critical)


def _wanted(policy: Policy, state: DeciderState, reading: PowerReading | None,
            local_time: dt.datetime | None) -> tuple[str, Rule, str]:
    external = reading is not None and reading.on_external_power is True
    if state.critical and policy.critical is not None and not external:
        return (policy.critical.point, Rule.CRITICAL,
                f"battery {state.battery:.1f}% at or below critical "
                f"{policy.critical.enter_below:g}%")
    if state.override is not None:
        return state.override.point, Rule.OVERRIDE, state.override.reason
    if reading is None:
        return (policy.fallback.point, Rule.FALLBACK,
                f"sensor failed {policy.fallback.after_failures} reads in a row")
    if external:
        return policy.external_power_point, Rule.EXTERNAL_POWER, "on external power"

    ceilings: list[tuple[str, Rule, str]] = []
    if state.level > 0:
        level = policy.battery_levels[state.level - 1]
        ceilings.append((level.point, Rule.BATTERY,
                         f"battery {state.battery:.1f}% (level entered below "
                         f"{level.enter_below:g}%, left above {level.exit_above:g}%)"))
    if local_time is not None:
        for window in policy.schedule:
            if window.contains(local_time):
                ceilings.append((window.point, Rule.SCHEDULE,
                                 f"schedule {window.start:%H:%M}-{window.end:%H:%M} at "
                                 f"{local_time:%H:%M}"))
    if policy.power_budget is not None:
        ceilings.append(_budget_point(policy, state))
    if ceilings:
        return max(ceilings, key=lambda c: policy.rank(c[0]))
    return policy.top.name, Rule.DEFAULT, "no rule restricts; top point"


def _budget_point(policy: Policy, state: DeciderState) -> tuple[str, Rule, str]:
    budget = policy.power_budget.max_watts  # type: ignore[union-attr]
    keep = policy.power_budget.observed_seconds  # type: ignore[union-attr]
    now = state.last_time if state.last_time is not None else 0.0
    figures: list[tuple[OperatingPoint, float, str]] = []
    for point in policy.points:
        seen = state.observed_watts.get(point.name)
        if seen is not None and now - seen[1] <= keep:
            figures.append((point, seen[0], "observed"))
        elif point.watts is not None:
            figures.append((point, point.watts, str(point.figures_method)))
    for point, watts, how in figures:  # best first
        if watts <= budget:
            return (point.name, Rule.POWER_BUDGET,
                    f"best point within {budget:g} W budget ({watts:.2f} W {how})")
    # Nothing fits: the most frugal point (not the lowest figure, which would follow noise
    # in observed figures from point to point).
    lowest = ", ".join(f"{p.name} {w:.2f} W {how}" for p, w, how in figures)
    return (policy.points[-1].name, Rule.POWER_BUDGET,
            f"no point fits {budget:g} W ({lowest}); most frugal point")


class Decider:
    """Keeps the :class:`DeciderState` between calls of :func:`decide`."""

    def __init__(self, policy: Policy, state: DeciderState | None = None) -> None:
        self.policy = policy
        self.state = state or DeciderState()

    def step(self, reading: PowerReading | None, now: float,
             local_time: dt.datetime | None = None) -> Decision:
        decision, self.state = decide(self.policy, self.state, reading, now, local_time)
        return decision

    def set_override(self, point: str, until: float, reason: str = "manual override") -> None:
        """Use ``point`` until ``until`` (critical battery still wins). Takes effect at the
        next :meth:`step`, without waiting for the dwell time."""
        self.policy.point(point)  # raises ConfigError naming the defined points
        self.state = replace(self.state, override=Override(point, until, reason))

    def clear_override(self) -> None:
        self.state = replace(self.state, override=None)

    def replace_policy(self, policy: Policy) -> None:
        """Swap the policy, keeping what still makes sense (smoothing, current point, override)."""
        state = self.state
        if state.point is not None and state.point not in policy.names:
            state = replace(state, point=None, switched_at=None)
        if state.override is not None and state.override.point not in policy.names:
            state = replace(state, override=None)
        if state.level > len(policy.battery_levels):
            state = replace(state, level=len(policy.battery_levels))
        observed = {k: v for k, v in state.observed_watts.items() if k in policy.names}
        self.policy = policy
        self.state = replace(state, observed_watts=observed)

"""Replay a trace of power readings through a policy: what would the controller have done?

A trace is a CSV file with a header row and the columns

==================== ===================================================================
``time``              seconds from the start (``0``, ``5.5``) or a local ISO date-time
                      (``2026-11-23T21:30:00``; schedules then use it)
``battery_percent``   0..100, empty when not known
``watts``             power drawn by the machine, empty when not known
``on_external_power`` true/false (also yes/no, 1/0), empty when not known
==================== ===================================================================

A row whose three readings are all empty stands for a failed sensor read. The replay drives
the real :class:`~tensorslm.controller.decision.control_loop.Controller` (one tick per row, the clock set to the
row's time), so sensor backoff, fallback and dwell behave as on the Pi::

    rows = load_trace("deploy/traces/discharge.csv")
    result = simulate(load_policy("deploy/policies/battery.yaml"), rows)
    result.switches, result.seconds_at
    plot_simulation(result, "decisions.png")
"""
from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from .control_loop import Controller, Switch
from .decide import Decision
from tensorslm.controller.errors import ConfigError, SensorError
from .operating_point import OperatingPoint
from .policy import Policy
from tensorslm.controller.power.readings import Method, PowerReading

COLUMNS = ("time", "battery_percent", "watts", "on_external_power")
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


@dataclass(frozen=True)
class TraceRow:
    line: int                           # line in the CSV file
    time: float                         # seconds from the first row
    battery_percent: float | None
    watts: float | None
    on_external_power: bool | None
    local_time: dt.datetime | None      # when the trace gives dates, or a start was given

    @property
    def failed(self) -> bool:
        return self.battery_percent is None and self.watts is None and self.on_external_power is None


def load_trace(path: str | Path, *, start: dt.datetime | None = None) -> list[TraceRow]:
    """Read a trace CSV. ``start`` gives local times to a trace whose times are seconds."""
    file = str(path)
    try:
        handle = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read trace: {exc.strerror}", file=file) from None
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"empty trace; expected a header row {','.join(COLUMNS)}",
                              file=file, line=1)
        header = [name.strip() for name in header]
        missing = [c for c in COLUMNS if c not in header]
        unknown = [c for c in header if c not in COLUMNS]
        if missing or unknown:
            raise ConfigError(f"expected the columns {', '.join(COLUMNS)}; got {', '.join(header)}"
                              f" (missing: {', '.join(missing) or 'none'}; unknown: "
                              f"{', '.join(unknown) or 'none'})", file=file, line=1)
        index = {name: header.index(name) for name in COLUMNS}
        rows: list[TraceRow] = []
        first: float | dt.datetime | None = None
        for values in reader:
            line = reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise ConfigError(f"expected {len(header)} values, got {len(values)}", file=file,
                                  line=line)
            cell = {name: values[i].strip() for name, i in index.items()}
            stamp = _time(cell["time"], file, line)
            if first is None:
                first = stamp
            if type(stamp) is not type(first):
                raise ConfigError("expected every time in the same form as the first row's "
                                  f"({'date-time' if isinstance(first, dt.datetime) else 'seconds'})"
                                  f", got {cell['time']!r}", file=file, line=line, field="time")
            if isinstance(stamp, dt.datetime):
                seconds, local = (stamp - first).total_seconds(), stamp   # type: ignore[operator]
            else:
                seconds = stamp - first   # type: ignore[operator]
                local = start + dt.timedelta(seconds=stamp) if start is not None else None
            if rows and seconds < rows[-1].time:
                raise ConfigError(f"expected times in increasing order; {cell['time']!r} is "
                                  f"before the previous row", file=file, line=line, field="time")
            rows.append(TraceRow(
                line=line, time=seconds,
                battery_percent=_number(cell["battery_percent"], file, line, "battery_percent",
                                        0.0, 100.0),
                watts=_number(cell["watts"], file, line, "watts", 0.0, None),
                on_external_power=_flag(cell["on_external_power"], file, line),
                local_time=local))
    if not rows:
        raise ConfigError("trace has a header but no rows", file=file, line=2)
    return rows


def _time(text: str, file: str, line: int) -> float | dt.datetime:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"expected seconds (e.g. 12.5) or an ISO date-time "
                          f"(e.g. 2026-11-23T21:30:00), got {text!r}", file=file, line=line,
                          field="time") from None


def _number(text: str, file: str, line: int, column: str, low: float,
            high: float | None) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"expected a number or an empty cell, got {text!r}", file=file,
                          line=line, field=column) from None
    if value < low or (high is not None and value > high):
        valid = f"{low:g}..{high:g}" if high is not None else f">= {low:g}"
        raise ConfigError(f"expected {valid}, got {text}", file=file, line=line, field=column)
    return value


def _flag(text: str, file: str, line: int) -> bool | None:
    if not text:
        return None
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ConfigError(f"expected true/false (or yes/no, 1/0) or an empty cell, got {text!r}",
                      file=file, line=line, field="on_external_power")


# -- replay --------------------------------------------------------------------------------

class _TraceSource:
    method = Method.SIMULATED
    relative_uncertainty = None     # a trace replays figures; their error is not recorded

    def __init__(self) -> None:
        self.row: TraceRow | None = None

    def read(self) -> PowerReading:
        row = self.row
        if row is None or row.failed:
            raise SensorError(f"trace line {row.line if row else '?'}: no reading (empty row)")
        return PowerReading(time=row.time, method=Method.SIMULATED,
                            battery_percent=row.battery_percent, watts=row.watts,
                            on_external_power=row.on_external_power)

    def close(self) -> None:
        pass


class _Recorder:
    def __init__(self) -> None:
        self.point: OperatingPoint | None = None

    def apply(self, point: OperatingPoint) -> None:
        self.point = point


@dataclass
class Simulation:
    policy: Policy
    rows: list[TraceRow]
    decisions: list[Decision | None]         # one per row; None: a failed read being retried
    points: list[str | None]                 # the point in effect after each row
    switches: list[Switch] = field(default_factory=list)

    @property
    def switch_count(self) -> int:
        """Changes of point (the first point applied is not a switch)."""
        return sum(1 for s in self.switches if s.from_point is not None)

    @property
    def seconds_at(self) -> dict[str, float]:
        """Seconds spent at each point (each row's point holds until the next row)."""
        spent = {name: 0.0 for name in self.policy.names}
        for row, nxt, point in zip(self.rows, self.rows[1:], self.points):
            if point is not None:
                spent[point] += nxt.time - row.time
        return spent


def simulate(policy: Policy, rows: list[TraceRow]) -> Simulation:
    """Replay ``rows`` through a :class:`Controller` with ``policy``; one tick per row."""
    source, actuator = _TraceSource(), _Recorder()
    controller = Controller(source, policy, actuator,
                            clock=lambda: source.row.time if source.row else 0.0,
                            local_time=lambda: source.row.local_time if source.row else None)
    decisions: list[Decision | None] = []
    points: list[str | None] = []
    for row in rows:
        source.row = row
        decisions.append(controller.tick())
        points.append(actuator.point.name if actuator.point else None)
    return Simulation(policy=policy, rows=rows, decisions=decisions, points=points,
                      switches=list(controller.switches))


def plot_simulation(result: Simulation, out: str | Path, *, title: str | None = None) -> Path:
    """Battery (and watts) over time with the chosen point beneath it, switches marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = [row.time / 3600 for row in result.rows]
    use_hours = hours[-1] >= 2
    xs = hours if use_hours else [row.time / 60 for row in result.rows]
    unit = "hours" if use_hours else "minutes"
    names = result.policy.names
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5),
                                      gridspec_kw={"height_ratios": [3, 2]})
    battery = [row.battery_percent for row in result.rows]
    top.plot(xs, [b if b is not None else float("nan") for b in battery], color="lightsteelblue",
             linewidth=0.8, label="battery % (trace)")
    smoothed = [d.battery_percent if d is not None else None for d in result.decisions]
    if any(s is not None for s in smoothed):
        top.plot(xs, [s if s is not None else float("nan") for s in smoothed], color="navy",
                 linewidth=1.4, label="battery % (smoothed)")
    for level in result.policy.battery_levels:
        top.axhline(level.enter_below, color="grey", linewidth=0.6, linestyle="--")
    if result.policy.critical:
        top.axhline(result.policy.critical.enter_below, color="tab:red", linewidth=0.6,
                    linestyle="--")
    external = [row.on_external_power for row in result.rows]
    for x0, x1, ext in zip(xs, xs[1:], external):
        if ext:
            top.axvspan(x0, x1, color="tab:green", alpha=0.12, linewidth=0)
    top.set_ylabel("battery %")
    top.set_ylim(0, 100)
    if any(row.watts is not None for row in result.rows):
        watts_ax = top.twinx()
        watts_ax.plot(xs, [r.watts if r.watts is not None else float("nan") for r in result.rows],
                      color="tab:orange", linewidth=0.5, alpha=0.45, label="watts")
        watts_ax.set_ylabel("watts", color="tab:orange")
    top.legend(loc="upper right", fontsize=8)
    levels = [names.index(p) if p is not None else float("nan") for p in result.points]
    bottom.step(xs, levels, where="post", color="black")
    bottom.set_yticks(range(len(names)), names)
    bottom.set_ylim(len(names) - 0.5, -0.5)
    bottom.set_ylabel("operating point")
    bottom.set_xlabel(unit)
    scale = 3600 if use_hours else 60
    for switch in result.switches:
        if switch.from_point is None:
            continue
        x = switch.time / scale
        bottom.axvline(x, color="tab:red", linewidth=0.6, alpha=0.6)
        top.axvline(x, color="tab:red", linewidth=0.6, alpha=0.6)
    top.set_title(title or f"{Path(result.policy.file or 'policy').name}: "
                  f"{result.switch_count} switches "
                  "(red lines); external power shaded")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

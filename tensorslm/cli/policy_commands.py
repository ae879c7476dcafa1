"""``tensorslm policy``: check an energy policy file, replay a trace of readings through it."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from .errors import library_errors

POLICY_FILE = click.Path(dir_okay=False, path_type=Path)


@click.group()
def policy() -> None:
    """Energy policies: validate a policy file, replay a trace of power readings through it."""


@policy.command()
@click.argument("file", type=POLICY_FILE)
@click.option("--store", type=click.Path(file_okay=False, path_type=Path),
              help="The ladder (rank store) the policy will drive: every rung it names must be "
                   "in it.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="An agent.yaml: check the rungs against its model.store (a config without "
                   "a store serves only the full embedding).")
@library_errors
def check(file: Path, store: Path | None, config_path: Path | None) -> None:
    """Validate FILE and print its operating points and rules (exit 1 on an error).

    With --store or --config the ladder is known, and a point naming a rung the ladder does
    not have is an error (the agent would refuse the policy at start-up)."""
    from tensorslm.controller.decision.policy import load_policy

    if store is not None and config_path is not None:
        raise click.UsageError("give --store or --config, not both")
    rungs = ladder_rungs(store, config_path)
    rungs_source = f"({', '.join(rungs)})" if rungs is not None else ""
    loaded = load_policy(file, rungs=rungs)
    console = _console()
    console.print(points_table(loaded))
    console.print("[bold]Rules[/bold], first match wins:")
    for number, line in enumerate(loaded.rules(), start=1):
        console.print(f"  {number}. {line}", markup=False, highlight=False)
    against = f" against the ladder {rungs_source}" if rungs is not None else ""
    console.print(f"{file}: OK{against}", style="green", markup=False)


@policy.command()
@click.argument("file", type=POLICY_FILE)
@click.option("--trace", "trace_file", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="CSV of readings: time,battery_percent,watts,on_external_power.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Save a plot of battery and chosen point over time (PNG).")
@click.option("--start", type=click.DateTime(["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%H:%M"]),
              help="Local time of the first row, when the trace's times are seconds "
                   "(schedules need it).")
@click.option("--every", is_flag=True, help="Print every row, not only the changes.")
@library_errors
def simulate(file: Path, trace_file: Path, plot_file: Path | None, start: dt.datetime | None,
             every: bool) -> None:
    """Replay the readings of a trace through policy FILE; print (and plot) the decisions."""
    from tensorslm.controller.decision.policy import load_policy
    from tensorslm.controller.decision.trace import load_trace, plot_simulation
    from tensorslm.controller.decision.trace import simulate as replay

    if start is not None and start.year == 1900:   # "%H:%M" only: today
        start = dt.datetime.combine(dt.date.today(), start.time())
    result = replay(load_policy(file), load_trace(trace_file, start=start))
    console = _console()
    console.print(decisions_table(result, every=every))
    console.print(summary_table(result))
    if plot_file is not None:
        out = plot_simulation(result, plot_file)
        console.print(f"plot saved to {out}")


def ladder_rungs(store: Path | None, config_path: Path | None) -> list[str] | None:
    """The rung names of the ladder a policy will drive, when it is known."""
    if config_path is not None:
        from tensorslm.agent.config import load_config
        from tensorslm.constants import FULL_RUNG

        store = load_config(config_path).model.store
        if store is None:
            return [FULL_RUNG]
    if store is None:
        return None
    from tensorslm.rank_store.store import RankStore

    return list(RankStore.open(store).rung_names)


def points_table(loaded):
    from rich.table import Table

    table = Table(title=f"Operating points of {loaded.file} (best first)")
    for column in ("point", "rung", "threads", "max new", "max prompt", "watts", "J/query"):
        table.add_column(column)
    for point in loaded.points:
        figures = f" ({point.figures_method})" if point.figures_method else ""
        table.add_row(point.name, point.rung, str(point.threads), str(point.max_new_tokens),
                      _or_dash(point.max_prompt_tokens),
                      _or_dash(point.watts) + (figures if point.watts is not None else ""),
                      _or_dash(point.joules_per_query))
    return table


def decisions_table(result, *, every: bool):
    from rich.table import Table

    table = Table(title="Decisions" + ("" if every else " (changes of point or rule)"))
    for column in ("time", "batt %", "smooth", "W", "ext", "point", "rule"):
        table.add_column(column, no_wrap=True)
    table.add_column("reason", min_width=24, overflow="fold")
    previous = None
    for row, decision, point in zip(result.rows, result.decisions, result.points):
        key = (point, decision.rule if decision else None)
        if not every and key == previous:
            continue
        previous = key
        when = row.local_time.strftime("%m-%d %H:%M:%S") if row.local_time else _duration(row.time)
        switched = decision is not None and decision.switched
        table.add_row(
            when, _or_dash(row.battery_percent),
            _or_dash(None if decision is None else decision.battery_percent, ".1f"),
            _or_dash(row.watts), {True: "yes", False: "no", None: "-"}[row.on_external_power],
            f"[bold]{point}[/bold]" if switched else str(point),
            str(decision.rule) if decision else "read failed",
            decision.reason if decision else "sensor read failed; retrying",
        )
    return table


def summary_table(result):
    from rich.table import Table

    total = result.rows[-1].time - result.rows[0].time
    count = result.switch_count
    table = Table(title=f"{count} switch{'' if count == 1 else 'es'} over {_duration(total)}")
    table.add_column("point")
    table.add_column("time at point")
    table.add_column("share")
    for name, seconds in result.seconds_at.items():
        share = f"{100 * seconds / total:.0f} %" if total else "-"
        table.add_row(name, _duration(seconds), share)
    return table


def _console():
    from rich.console import Console

    console = Console()
    # Piped output (files, CI logs) is not cut to 80 columns: the reasons are the point.
    return console if console.is_terminal else Console(width=140)


def _or_dash(value, spec: str = "g") -> str:
    return "-" if value is None else format(value, spec)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


COMMANDS = [policy]

"""Simulated battery discharge: the example policy against a fixed top point, same battery.

    python bench/bench_discharge.py [--policy deploy/policies/battery.yaml] [--capacity-wh 20]
                                    [--query-every 20] [--reply-tokens 200] [--board raspberry-pi-4]
                                    [--plot bench/results/discharge.png]
                                    [--measured bench/results/rung_energy.json --model smollm2-135m]
                                    [--points bench/results/operating_points.json --model gemma3-270m
                                     --head tied] [--target 1.5]

Everything here is SIMULATED, and the power figures are ESTIMATED, not measured:

* Load per operating point, from the ``estimated`` board model (tensorslm.controller.power.power_model:
  idle watts + watts per busy core) and a workload: one query every ``--query-every`` seconds,
  each wanting ``--reply-tokens`` tokens, capped at the point's ``max_new_tokens``. Decode time
  per token is the SmolLM2-135M figure measured on the 2-core development machine (not a Pi):
  71 ms with 1 thread, 66.5 ms with 2 threads (mid-points of 65-77 and 63-70 ms), with
  ``threads`` cores busy while decoding. Prefill and the rung's effect on time are left out
  (the rung changes the embedding lookup, not the decode loop's matmuls). A query that does
  not finish before the next arrives makes the load saturate at ``threads`` busy cores.
* ``--measured``: the decode time per token of each point is the one measured at the point's
  rung (``bench/bench_rung_energy.py``, decode CPU ms/token at 1 thread, the head tied; with 2
  threads scaled by the ratio above), so the rung moves the load; the run also reports the mean
  perplexity of the served tokens (each point's rung's measured perplexity, weighted by tokens).
* ``--points``: each point's cost per query is the one measured at that point
  (``bench/bench_operating_points.py``, the model and head chosen, medians): its CPU seconds (with
  the board model, the point's power at the workload's query rate, prefill included), its wall
  seconds (a query longer than the period saturates the load) and its output tokens (the
  replies as the point's cap cut them; ``--reply-tokens`` is then unused); the mean perplexity of
  the served tokens comes from the points' rungs as measured there.
* ``--target``: besides the board as modelled, the idle watts the board would need for the policy
  to serve ``--target`` times the top point's queries (a bisection over the board model's idle
  term, everything else unchanged): what a board that sleeps between queries must reach.
* The battery is tensorslm.controller.power.simulated_battery (Li-ion voltage curve, internal resistance,
  read through the real INA219 driver on the register model), so the controller sees the
  battery percentage a UPS board would report, sag under load included.
* The real Controller (policy, dwell, smoothing, hysteresis) runs on a simulated clock, one
  tick every ``--interval`` seconds, until the battery is empty.

Prints the per-point watts, the number of switches, the time to empty, the queries and the
tokens served for both runs (the policy answers more queries, with shorter replies), and
saves a plot.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tensorslm.controller.decision.control_loop import Controller  # noqa: E402
from tensorslm.controller.decision.operating_point import OperatingPoint  # noqa: E402
from tensorslm.controller.decision.policy import Fallback, Policy, load_policy  # noqa: E402
from tensorslm.controller.power.power_model import BoardModel, board_model  # noqa: E402
from tensorslm.controller.power.simulated_battery import SimulatedBattery, SimulatedBatterySource  # noqa: E402

MS_PER_TOKEN = {1: 71.0, 2: 66.5}   # SmolLM2-135M greedy decode on 2 cores, mid-points


@dataclass(frozen=True)
class PointCost:
    """One operating point's measured cost per query (medians of bench_operating_points.py)."""

    cpu_s: float
    wall_s: float
    tokens: float
    perplexity: float | None = None


def point_costs(path: Path, model: str, head: str) -> dict[str, PointCost]:
    """Per point name, the cost measured by ``bench_operating_points.py`` for ``model`` and ``head``."""
    import json

    data = json.loads(path.read_text())
    runs = data.get("runs") or [{"model": data.get("model", "smollm2-135m"), **data}]
    for run in runs:
        if run["model"] == model and run["head"] == head and run["points"]:
            return {p["config"]: PointCost(p["cpu_s"], p["wall_s"], p["output_tokens"],
                                           p["extra"].get("perplexity")) for p in run["points"]}
    raise SystemExit(f"{path} has no points measured for {model}, head {head}; it has: "
                     + ", ".join(f"{r['model']} head {r['head']}" for r in runs))


@dataclass(frozen=True)
class Workload:
    query_every: float    # seconds between queries
    reply_tokens: int     # tokens a query would generate without a cap
    rung_ms: dict[str, float] | None = None  # measured decode ms/token at 1 thread, per rung
    measured: dict[str, PointCost] | None = None  # measured cost per query, per point name

    def cost(self, point: OperatingPoint) -> PointCost | None:
        if self.measured is None:
            return None
        if point.name not in self.measured:
            raise SystemExit(f"point {point.name!r} has no measurement; measured: {', '.join(self.measured)}")
        return self.measured[point.name]

    def tokens(self, point: OperatingPoint) -> float:
        cost = self.cost(point)
        return cost.tokens if cost else min(self.reply_tokens, point.max_new_tokens)

    def ms_per_token(self, point: OperatingPoint) -> float:
        ms = MS_PER_TOKEN.get(point.threads, MS_PER_TOKEN[2])
        if self.rung_ms is None:
            return ms
        if point.rung not in self.rung_ms:
            raise SystemExit(f"point {point.name!r}: rung {point.rung!r} has no measurement; measured: "
                             f"{', '.join(self.rung_ms)}")
        return self.rung_ms[point.rung] * ms / MS_PER_TOKEN[1]

    def busy_cores(self, point: OperatingPoint) -> float:
        """Mean busy cores at ``point``: threads x decode seconds per query / query period (measured:
        CPU seconds per query / period, at most ``threads``)."""
        cost = self.cost(point)
        if cost:
            return min(point.threads, cost.cpu_s / max(self.query_every, cost.wall_s))
        ms = self.ms_per_token(point)
        decode_seconds = self.tokens(point) * ms / 1000
        return point.threads * min(1.0, decode_seconds / self.query_every)

    def queries_per_second(self, point: OperatingPoint) -> float:
        """One query every period, or back to back when a query takes longer than that."""
        cost = self.cost(point)
        seconds = cost.wall_s if cost else self.tokens(point) * self.ms_per_token(point) / 1000
        return 1 / max(self.query_every, seconds)

    def tokens_per_second(self, point: OperatingPoint) -> float:
        return self.tokens(point) * self.queries_per_second(point)


def estimated_watts(point: OperatingPoint, board: BoardModel, workload: Workload) -> float:
    return board.watts(workload.busy_cores(point))


def fixed_top(policy: Policy) -> Policy:
    """The same top point, always: no levels, no critical, no schedule, no budget."""
    top = policy.top
    return replace(policy, points=(top,), battery_levels=(), critical=None, schedule=(),
                   power_budget=None, fallback=Fallback(top.name), external_power_point=top.name)


@dataclass
class Run:
    name: str
    times: list[float]
    battery: list[float]
    points: list[str]
    switches: int
    seconds_to_empty: float
    tokens: float
    tokens_by_point: dict[str, float] = field(default_factory=dict)
    queries: float = 0.0


class _Actuator:
    def __init__(self) -> None:
        self.point: OperatingPoint | None = None

    def apply(self, point: OperatingPoint) -> None:
        self.point = point


def discharge(name: str, policy: Policy, watts: dict[str, float], workload: Workload, *,
              capacity_wh: float, interval: float, limit_hours: float | None = None) -> Run:
    clock = [0.0]
    actuator = _Actuator()

    def load() -> float:
        return watts[actuator.point.name] if actuator.point else watts[policy.top.name]

    battery = SimulatedBattery(capacity_wh=capacity_wh, load=load, clock=lambda: clock[0])
    controller = Controller(SimulatedBatterySource(battery), policy, actuator, interval=interval,
                            clock=lambda: clock[0], local_time=lambda: None)
    run = Run(name, [], [], [], 0, math.nan, 0.0)
    if limit_hours is None:   # twice as long as the pack lasts at the lightest load
        limit_hours = 2 * capacity_wh / min(watts.values())
    while not battery.empty and clock[0] < limit_hours * 3600:
        controller.tick()
        reading = controller.latest_reading
        run.times.append(clock[0])
        run.battery.append(reading.battery_percent if reading else math.nan)
        run.points.append(actuator.point.name)
        served = workload.tokens_per_second(actuator.point) * interval
        run.queries += workload.queries_per_second(actuator.point) * interval
        run.tokens += served
        run.tokens_by_point[actuator.point.name] = run.tokens_by_point.get(actuator.point.name, 0.0) + served
        clock[0] += interval
    battery.advance(clock[0])
    run.seconds_to_empty = clock[0] if battery.empty else math.nan
    run.switches = sum(1 for s in controller.switches if s.from_point is not None)
    return run


def plot(runs: list[Run], policy: Policy, out: Path, subtitle: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5),
                                      gridspec_kw={"height_ratios": [3, 2]})
    names = policy.names
    colours = ["tab:blue", "tab:grey"]
    for run, colour in zip(runs, colours):
        hours = [t / 3600 for t in run.times]
        top.plot(hours, run.battery, color=colour,
                 label=f"{run.name}: empty after {run.seconds_to_empty / 3600:.2f} h, "
                       f"{run.switches} switches")
        top.axvline(run.seconds_to_empty / 3600, color=colour, linestyle="--", linewidth=0.8)
        bottom.step(hours, [names.index(p) for p in run.points], where="post", color=colour)
    for level in policy.battery_levels:
        top.axhline(level.enter_below, color="lightgrey", linewidth=0.6, linestyle="--")
    top.set_ylabel("battery % (as the UPS board reads it)")
    top.set_ylim(0, 100)
    top.legend(loc="upper right", fontsize=8)
    top.set_title(f"Simulated discharge, estimated load: {subtitle}", fontsize=9)
    bottom.set_yticks(range(len(names)), names)
    bottom.set_ylim(len(names) - 0.5, -0.5)
    bottom.set_ylabel("operating point")
    bottom.set_xlabel("hours")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def both_runs(policy: Policy, board: BoardModel, workload: Workload, *, capacity_wh: float,
              interval: float, policy_name: str) -> tuple[Run, Run]:
    """The policy and the fixed top point on the same battery, board and workload."""
    watts = {p.name: estimated_watts(p, board, workload) for p in policy.points}
    return (discharge(f"policy {policy_name}", policy, watts, workload, capacity_wh=capacity_wh,
                      interval=interval),
            discharge(f"fixed top point '{policy.top.name}'", fixed_top(policy), watts, workload,
                      capacity_wh=capacity_wh, interval=interval))


#: the lowest idle power the search tries: a board asleep between queries (watts)
MIN_IDLE = 0.05


def idle_watts_for(target: float, policy: Policy, board: BoardModel, workload: Workload, *,
                   capacity_wh: float, interval: float, policy_name: str) -> float | None:
    """The board's idle watts at which the policy serves ``target`` times the fixed top point's
    queries (bisection to 1/1000 of the modelled idle: the ratio falls as idle power rises),
    None if not even ``MIN_IDLE`` reaches it."""
    def ratio(idle: float) -> float:
        runs = both_runs(policy, replace(board, idle_watts=idle), workload, capacity_wh=capacity_wh,
                         interval=interval, policy_name=policy_name)
        return runs[0].queries / runs[1].queries

    low, high = MIN_IDLE, board.idle_watts
    if ratio(low) < target:
        return None
    if ratio(high) >= target:
        return high
    for _ in range(10):
        mid = (low + high) / 2
        low, high = (mid, high) if ratio(mid) >= target else (low, mid)
    return low


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", type=Path, default=ROOT / "deploy" / "policies" / "battery.yaml")
    parser.add_argument("--capacity-wh", type=float, default=20.0)
    parser.add_argument("--query-every", type=float, default=20.0)
    parser.add_argument("--reply-tokens", type=int, default=200)
    parser.add_argument("--board", default="raspberry-pi-4")
    parser.add_argument("--interval", type=float, default=30.0)
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "results" / "discharge.png")
    parser.add_argument("--measured", type=Path, default=None,
                        help="rows of bench_rung_energy.py (JSON): decode ms/token and perplexity per rung")
    parser.add_argument("--points", type=Path, default=None,
                        help="bench_operating_points.py's JSON: each point's measured cost per query")
    parser.add_argument("--model", default="smollm2-135m", help="the model of --measured's or --points' rows")
    parser.add_argument("--head", default="tied", help="the head of --points' rows")
    parser.add_argument("--target", type=float, default=None,
                        help="also find the board idle watts at which the policy serves this many times "
                             "the top point's queries")
    parser.add_argument("--report", type=Path, default=None,
                        help="also append what is printed to this file (markdown, in a code block)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line)
        lines.extend(line.split("\n"))

    if args.measured is not None and args.points is not None:
        parser.error("give --measured (per rung) or --points (per point), not both")

    policy = load_policy(args.policy)
    board = board_model(args.board)
    rung_ms = ppl = measured = None
    if args.measured is not None:
        import json

        data = json.loads(args.measured.read_text())
        rows = [r for r in (data["rows"] if isinstance(data, dict) else data)
                if r["model"] == args.model and r["head"] == "tied"]
        rung_ms = {r["rung"]: r["decode_cpu_ms_per_token"] for r in rows}
        ppl = {r["rung"]: r["perplexity"] for r in rows if r.get("perplexity")}
        say(f"MEASURED decode CPU ms/token at 1 thread, head tied, {args.model} ({args.measured}): "
              + ", ".join(f"{k} {v:.1f}" for k, v in rung_ms.items()))
    if args.points is not None:
        measured = point_costs(args.points, args.model, args.head)
        ppl = {p.rung: measured[p.name].perplexity for p in policy.points
               if p.name in measured and measured[p.name].perplexity}
        say(f"MEASURED per query, {args.model}, head {args.head} ({args.points}, medians): "
              + ", ".join(f"{name} {c.cpu_s:.2f} CPU s, {c.wall_s:.2f} s, {c.tokens:g} tokens"
                          for name, c in measured.items()))
    workload = Workload(args.query_every, args.reply_tokens, rung_ms, measured)
    watts = {p.name: estimated_watts(p, board, workload) for p in policy.points}

    wanting = "" if measured else f" wanting {workload.reply_tokens} tokens"
    say(f"ESTIMATED load per point ({board.name} model, +/-{board.relative_uncertainty:.0%}; "
          f"a query every {workload.query_every:g} s{wanting}):")
    for p in policy.points:
        say(f"  {p.name:<10} threads {p.threads}  max_new_tokens {p.max_new_tokens:>4}  "
              f"busy cores {workload.busy_cores(p):.3f}  {watts[p.name]:.3f} W  "
              f"{workload.tokens_per_second(p):.2f} tokens/s  "
              f"answers {workload.queries_per_second(p) * workload.query_every:.0%} of the queries")
    runs = both_runs(policy, board, workload, capacity_wh=args.capacity_wh, interval=args.interval,
                     policy_name=args.policy.name)
    say(f"\nSIMULATED discharge of a {args.capacity_wh:g} Wh 2-cell pack from full:")
    say(f"  {'run':<32} {'switches':>8} {'time to empty':>14} {'queries':>8} "
          f"{'tokens served':>14}")
    for run in runs:
        say(f"  {run.name:<32} {run.switches:>8} {run.seconds_to_empty / 3600:>12.2f} h "
              f"{run.queries:>8,.0f} {run.tokens:>14,.0f}")
    say(f"  the policy runs {runs[0].seconds_to_empty / runs[1].seconds_to_empty - 1:+.0%} longer on the "
          f"same charge and serves {runs[0].queries / runs[1].queries:.2f}x the queries")
    if ppl:
        points = {p.name: p.rung for p in policy.points}
        for run in runs:
            mean = sum(n * ppl[points[name]] for name, n in run.tokens_by_point.items()) / run.tokens
            say(f"  {run.name}: mean perplexity of the served tokens {mean:.2f} "
                  f"({', '.join(f'{name} {n / run.tokens:.0%}' for name, n in run.tokens_by_point.items())})")
    if args.target is not None:
        idle = idle_watts_for(args.target, policy, board, workload, capacity_wh=args.capacity_wh,
                              interval=args.interval, policy_name=args.policy.name)
        if idle is None:
            say(f"  {args.target:g}x the queries: out of reach even at {MIN_IDLE:g} W idle on this workload")
        elif idle >= board.idle_watts:
            say(f"  {args.target:g}x the queries: reached on the board as modelled ({board.idle_watts:g} W idle)")
        else:
            say(f"  {args.target:g}x the queries needs the board to idle at {idle:.2f} W or less "
                  f"(modelled: {board.idle_watts:g} W idle + {board.watts_per_core:g} W per busy core)")
    plot(list(runs), policy, args.plot, f"{board.name}, {args.capacity_wh:g} Wh, a query every "
         f"{workload.query_every:g} s")
    say(f"\nplot: {args.plot.relative_to(ROOT) if args.plot.is_relative_to(ROOT) else args.plot}")
    shown = " ".join(argv) if argv else " ".join(sys.argv[1:])
    say(f"reproduce: python bench/bench_discharge.py {shown}".rstrip())
    if args.report is not None:
        with args.report.open("a", encoding="utf-8") as report:
            report.write("```\n" + "\n".join(lines).strip() + "\n```\n\n")


if __name__ == "__main__":
    main()

"""bench/bench_discharge.py with each point's measured cost per query: the load it puts on the
board, the queries it answers when a query outlasts the period, and the idle power a target needs."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_discharge import (PointCost, Workload, both_runs, idle_watts_for,  # noqa: E402
                             point_costs)

from tensorslm.controller.decision.policy import load_policy  # noqa: E402
from tensorslm.controller.power.power_model import board_model  # noqa: E402

POLICY = load_policy(ROOT / "deploy" / "policies" / "battery.yaml")
COSTS = {"full": PointCost(cpu_s=18.0, wall_s=19.0, tokens=256, perplexity=19.0),
         "balanced": PointCost(cpu_s=3.0, wall_s=3.2, tokens=96, perplexity=19.1),
         "eco": PointCost(cpu_s=1.0, wall_s=1.1, tokens=32, perplexity=19.2)}


def test_a_point_loads_the_board_with_its_cpu_seconds_per_period():
    workload = Workload(query_every=20, reply_tokens=200, measured=COSTS)
    full, eco = POLICY.point("full"), POLICY.point("eco")
    assert workload.busy_cores(full) == pytest.approx(18.0 / 20)
    assert workload.busy_cores(eco) == pytest.approx(1.0 / 20)
    assert workload.tokens(eco) == 32                        # the measured reply, not --reply-tokens
    assert workload.queries_per_second(full) == pytest.approx(1 / 20)


def test_a_query_longer_than_the_period_saturates_and_answers_fewer_queries():
    workload = Workload(query_every=5, reply_tokens=200, measured=COSTS)
    full = POLICY.point("full")
    assert workload.queries_per_second(full) == pytest.approx(1 / 19.0)   # back to back
    assert workload.busy_cores(full) == pytest.approx(18.0 / 19.0)
    assert workload.tokens_per_second(full) == pytest.approx(256 / 19.0)


def test_costs_come_from_the_operating_points_json_of_one_model_and_head(tmp_path):
    def point(name: str, cpu: float) -> dict:
        return {"config": name, "cpu_s": cpu, "wall_s": cpu, "output_tokens": 10,
                "extra": {"perplexity": 20.0}}

    path = tmp_path / "points.json"
    path.write_text(json.dumps({"runs": [
        {"model": "m", "head": "tied", "points": [point("full", 2.0), point("eco", 0.5)]},
        {"model": "m", "head": "dense", "points": [point("full", 3.0)]}]}))
    costs = point_costs(path, "m", "tied")
    assert costs == {"full": PointCost(2.0, 2.0, 10, 20.0), "eco": PointCost(0.5, 0.5, 10, 20.0)}
    with pytest.raises(SystemExit, match="no points measured for other, head tied; it has: m head tied, m head dense"):
        point_costs(path, "other", "tied")


def test_the_idle_power_found_gives_the_target_ratio():
    workload = Workload(query_every=20, reply_tokens=200, measured=COSTS)
    board = board_model("raspberry-pi-4")
    options = {"capacity_wh": 5.0, "interval": 60.0, "policy_name": "battery.yaml"}
    policy_run, top_run = both_runs(POLICY, board, workload, **options)
    assert 1.0 < policy_run.queries / top_run.queries < 1.5   # idle draw dominates on a Pi 4
    idle = idle_watts_for(1.5, POLICY, board, workload, **options)
    assert 0.05 < idle < board.idle_watts
    policy_run, top_run = both_runs(POLICY, replace(board, idle_watts=idle), workload, **options)
    assert policy_run.queries / top_run.queries == pytest.approx(1.5, abs=0.03)

"""Pareto front and domination on a hand-made set, picks per ratio."""
import math

import pytest

from rank_store.frontier import FrontierError, Point, dominated_by, pareto_front, pick_for_ratios

POINTS = [
    Point("full", 1000, 10.0),
    Point("a", 500, 10.5),
    Point("b", 600, 12.0),   # dominated by a and c (c is smaller)
    Point("c", 250, 11.0),
    Point("d", 250, 13.0),   # dominated by c (same bytes, worse)
    Point("e", 125, 20.0),
    Point("f", 300, 20.0),   # dominated by c and e
]


def test_front() -> None:
    assert [p.name for p in pareto_front(POINTS)] == ["e", "c", "a", "full"]


def test_dominated_by() -> None:
    assert dominated_by(POINTS) == {"full": None, "a": None, "b": "c", "c": None, "d": "c", "e": None, "f": "e"}


def test_pick_for_ratios() -> None:
    picks = pick_for_ratios(POINTS, 1000, [1, 2, 3, 4, 8, 16])
    assert [p.name if p else None for p in picks] == ["full", "a", "c", "c", "e", None]


def test_bad_point() -> None:
    with pytest.raises(FrontierError, match="finite quality"):
        pareto_front([Point("x", 1, math.nan)])

"""The frontier of a ladder: which rungs are worth a place.

A rung (or any configuration) is a point (bytes, quality) where lower is better on both axes
(quality = perplexity, or relative error). Point a dominates b when a is no larger and no worse,
and strictly better on one of them. The Pareto front is the set of points nobody dominates;
:func:`dominated_by` tells, for each point, which point dominates it (for ``tensorslm inspect``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import RankStoreError


class FrontierError(RankStoreError, ValueError):
    """Points that cannot be compared (missing or non-finite values)."""


@dataclass(frozen=True)
class Point:
    name: str
    nbytes: float
    quality: float  # lower is better (perplexity, error)


def _check(points: Sequence[Point]) -> None:
    for p in points:
        if not (p.nbytes >= 0 and p.quality == p.quality and abs(p.quality) != float("inf")):
            raise FrontierError(f"point {p.name!r} needs bytes >= 0 and a finite quality, got {p.nbytes}, {p.quality}")


def dominates(a: Point, b: Point) -> bool:
    """a is no larger and no worse than b, and strictly better in one."""
    return a.nbytes <= b.nbytes and a.quality <= b.quality and (a.nbytes < b.nbytes or a.quality < b.quality)


def dominated_by(points: Sequence[Point]) -> dict[str, str | None]:
    """For each point's name, the name of the smallest point that dominates it, or None."""
    _check(points)
    out: dict[str, str | None] = {}
    for p in points:
        rivals = sorted((q for q in points if dominates(q, p)), key=lambda q: (q.nbytes, q.quality))
        out[p.name] = rivals[0].name if rivals else None
    return out


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The non-dominated points, sorted by bytes (ascending); duplicates are all kept."""
    _check(points)
    front = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda p: (p.nbytes, p.quality))


def pick_for_ratios(points: Sequence[Point], full_nbytes: float, ratios: Sequence[float]) -> list[Point | None]:
    """For each compression ratio, the best-quality frontier point at least that small (None if none)."""
    front = pareto_front(points)
    picks: list[Point | None] = []
    for ratio in ratios:
        if ratio <= 0:
            raise FrontierError(f"compression ratios must be > 0, got {ratio}")
        fitting = [p for p in front if p.nbytes * ratio <= full_nbytes * (1 + 1e-9)]
        picks.append(min(fitting, key=lambda p: p.quality) if fitting else None)
    return picks


def store_domination(store) -> tuple[str, dict[str, str | None]]:
    """For a :class:`tensorslm.rank_store.store.RankStore`: which rungs another rung dominates.

    Quality is the perplexity recorded by ``evaluate`` for the head ``dense`` (else ``tied``)
    when every rung has one, otherwise the relative Frobenius error. Returns (the measure
    used, {rung: dominating rung or None}).
    """
    infos = [store.info(name) for name in store.rung_names]
    for head in ("dense", "tied"):
        ppl = [info.results.get(head, {}).get("perplexity") if isinstance(info.results.get(head), dict) else None
               for info in infos]
        if all(p is not None for p in ppl):
            points = [Point(i.name, i.nbytes, float(p)) for i, p in zip(infos, ppl)]
            return f"perplexity (head {head})", dominated_by(points)
    return "relative error", dominated_by([Point(i.name, i.nbytes, i.rel_error) for i in infos])

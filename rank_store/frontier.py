"""The frontier of a ladder: which rungs are worth a place.

A rung (or any configuration) is a point (bytes, quality) where lower is better on both axes
(quality = perplexity, or relative error). Point a dominates b when a is no larger and no worse,
and strictly better on one of them. The Pareto front is the set of points nobody dominates;
:func:`dominated_by` tells, for each point, which point dominates it (for ``tensorslm inspect``).

A measured perplexity carries the noise of the text it was measured on, so comparisons may take
a relative ``tolerance``: qualities closer than ``tolerance`` (as a fraction of the larger
point's quality) count as equal. Then a dominates b when a is no larger, no worse beyond the
tolerance, and either smaller or better by more than the tolerance: a smaller rung with the same
perplexity within noise dominates, and two rungs of equal size are never ranked on a perplexity
difference below the noise. :data:`PERPLEXITY_NOISE` is the tolerance ``inspect`` uses.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tensorslm.constants import HEAD_MODES

from .errors import RankStoreError


#: relative perplexity differences below this are within the evaluation's noise. The noise is two
#: standard errors of the paired per-window log-perplexity difference between two rungs
#: (``python bench/bench_frontier.py --models smollm2 --noise ...``, bench/results/frontier_noise.json);
#: for rungs near dense it is far below this on 8,192 tokens and stays below it at the 4,096 tokens
#: ``tensorslm evaluate`` reads by default and down to about 1,000 (it grows as 1/sqrt(tokens))
PERPLEXITY_NOISE = 0.005


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


def dominates(a: Point, b: Point, tolerance: float = 0.0) -> bool:
    """a is no larger and no worse than b, and strictly better in one; qualities within
    ``tolerance`` (relative) of each other count as equal."""
    if tolerance < 0:
        raise FrontierError(f"tolerance must be >= 0, got {tolerance}")
    slack = tolerance * max(abs(a.quality), abs(b.quality))
    no_worse = a.quality <= b.quality + slack
    better = a.nbytes < b.nbytes or a.quality < b.quality - slack
    return a.nbytes <= b.nbytes and no_worse and better


def dominated_by(points: Sequence[Point], tolerance: float = 0.0) -> dict[str, str | None]:
    """For each point's name, the name of the smallest point that dominates it, or None."""
    _check(points)
    out: dict[str, str | None] = {}
    for p in points:
        rivals = sorted((q for q in points if dominates(q, p, tolerance)), key=lambda q: (q.nbytes, q.quality))
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


def store_domination(store, noise: float = PERPLEXITY_NOISE) -> tuple[str, dict[str, str | None]]:
    """For a :class:`tensorslm.rank_store.store.RankStore`: which rungs another rung dominates.

    Quality is the perplexity recorded by ``evaluate`` for the head ``dense`` (else ``tied``)
    when every rung has one, compared with the tolerance ``noise``; otherwise the relative
    Frobenius error, which is exact (no tolerance). Returns (the measure used, as a phrase that
    names the tolerance, {rung: dominating rung or None}).
    """
    infos = [store.info(name) for name in store.rung_names]
    for head in HEAD_MODES:
        ppl = [info.results.get(head, {}).get("perplexity") if isinstance(info.results.get(head), dict) else None
               for info in infos]
        if all(p is not None for p in ppl):
            points = [Point(i.name, i.nbytes, float(p)) for i, p in zip(infos, ppl)]
            measure = f"perplexity (head {head}; differences under {100 * noise:g}% count as evaluation noise)"
            return measure, dominated_by(points, noise)
    return "relative error", dominated_by([Point(i.name, i.nbytes, i.rel_error) for i in infos])

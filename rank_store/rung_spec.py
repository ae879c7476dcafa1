"""Rung specifications: how the user names the rungs of a ladder.

Three families, each a comma-separated list:

* ranks: ``6x8,4x6,max`` -- explicit inner TT ranks r_1 x ... x r_{N-1}; ``max`` is the
  exact decomposition (ranks clamped to the unfolding sizes). Names ``tt-6x8``, ``tt-max``.
* ratios: ``1.25,2`` -- the largest uniform ranks whose rung is at least that many times
  smaller than the fp32 table. Names ``ratio-1.25``, ``ratio-2``.
* tolerances: ``0.1,0.3`` -- a relative error tolerance eps met by every token, ranks chosen
  per token. Names ``eps-0.1``, ``eps-0.3``.
* recipes: ``tt-max+perm+mean+int8,budget-8+perm+mean+int8`` -- TT with the ladder techniques
  of :mod:`tensorslm.rank_store.recipes` (permutation, mean/shared basis, quantised cores, sparse
  residual, per-token byte budget); named by the recipe with ``_`` for ``+``. ``auto-<ratio>`` picks the recipe the
  measured frontier recommends for that ratio (:func:`tensorslm.rank_store.recipes.auto_recipe`).
"""
from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

from .errors import RungSpecError

_RANKS = re.compile(r"^[0-9]+(x[0-9]+)*$")


class RungKind(str, enum.Enum):
    RANKS = "ranks"
    RATIO = "ratio"
    TOLERANCE = "tolerance"
    RECIPE = "recipe"


@dataclass(frozen=True)
class RungSpec:
    """One requested rung. ``ranks`` is None for ``max`` (and for ratio/tolerance rungs)."""

    kind: RungKind
    ranks: tuple[int, ...] | None = None
    ratio: float | None = None
    tolerance: float | None = None
    recipe: str | None = None

    @property
    def name(self) -> str:
        if self.kind is RungKind.RECIPE:  # store names allow no '+': tt-max_perm_mean_int8
            return str(self.recipe).replace("+", "_")
        if self.kind is RungKind.RANKS:
            return "tt-" + ("max" if self.ranks is None else "x".join(map(str, self.ranks)))
        if self.kind is RungKind.RATIO:
            return f"ratio-{self.ratio:g}"
        return f"eps-{self.tolerance:g}"

    def __str__(self) -> str:
        return self.name


def _items(text: str | None, option: str) -> list[str]:
    if text is None:
        return []
    items = [item.strip() for item in str(text).split(",")]
    for position, item in enumerate(items, 1):
        if not item:
            raise RungSpecError(f"{option}: item {position} of {text!r} is empty; expected a comma-separated list")
    return items


def _parse_rank(item: str) -> RungSpec:
    if item.lower() == "max":
        return RungSpec(RungKind.RANKS)
    if not _RANKS.match(item.lower()):
        raise RungSpecError(
            f"ranks: {item!r} is not a rank list; expected inner TT ranks joined by 'x' "
            f"(like '6x8' for an order-3 tensor) or 'max'"
        )
    ranks = tuple(int(r) for r in item.lower().split("x"))
    if any(r < 1 for r in ranks):
        raise RungSpecError(f"ranks: {item!r} has a rank below 1; every TT rank must be >= 1")
    return RungSpec(RungKind.RANKS, ranks=ranks)


def _parse_float(item: str, option: str, what: str) -> float:
    try:
        value = float(item)
    except ValueError:
        raise RungSpecError(f"{option}: {item!r} is not a number; expected {what}") from None
    if not math.isfinite(value):
        raise RungSpecError(f"{option}: {item!r} is not finite; expected {what}")
    return value


def _parse_recipe(item: str) -> RungSpec:
    from .recipes import Recipe, RecipeError

    text = item.strip().lower()
    if m := re.fullmatch(r"auto-([0-9]+(?:\.[0-9]+)?)", text):
        if float(m.group(1)) <= 0:
            raise RungSpecError(f"recipes: {item!r} needs a compression ratio > 0, e.g. auto-4")
        return RungSpec(RungKind.RECIPE, recipe=f"auto-{float(m.group(1)):g}")
    try:
        return RungSpec(RungKind.RECIPE, recipe=Recipe.parse(text).name)
    except RecipeError as exc:
        raise RungSpecError(f"recipes: {exc}") from None


def parse_rung_specs(
    ranks: str | None = None, ratios: str | None = None, tolerances: str | None = None,
    recipes: str | None = None,
) -> list[RungSpec]:
    """Parse the three comma-separated lists into rung specs, in the order given.

    >>> [s.name for s in parse_rung_specs("6x8,max", "2", "0.1")]
    ['tt-6x8', 'tt-max', 'ratio-2', 'eps-0.1']
    """
    specs = [_parse_rank(item) for item in _items(ranks, "ranks")]
    for item in _items(ratios, "ratios"):
        value = _parse_float(item, "ratios", "a compression ratio > 0 such as 1.5 or 2")
        if value <= 0:
            raise RungSpecError(f"ratios: {item!r} must be > 0 (a compression ratio against the fp32 table, e.g. 2)")
        specs.append(RungSpec(RungKind.RATIO, ratio=value))
    for item in _items(tolerances, "tolerances"):
        value = _parse_float(item, "tolerances", "a relative error in (0, 1) such as 0.1")
        if not 0 < value < 1:
            raise RungSpecError(
                f"tolerances: {item!r} must be in (0, 1) (a relative error per token, e.g. 0.1); "
                f"for the exact decomposition use ranks 'max'"
            )
        specs.append(RungSpec(RungKind.TOLERANCE, tolerance=value))
    specs += [_parse_recipe(item) for item in _items(recipes, "recipes")]
    if not specs:
        raise RungSpecError("no rung given; pass ranks (e.g. '6x8,4x6'), ratios (e.g. '1.5,2') or tolerances (e.g. '0.1')")
    seen: dict[str, RungSpec] = {}
    for spec in specs:
        if spec.name in seen:
            raise RungSpecError(f"rung {spec.name!r} is requested twice; each rung name must be unique")
        seen[spec.name] = spec
    return specs

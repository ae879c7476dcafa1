"""Compress an embedding table into rungs: plain per-token TT at explicit ranks, at a target
compression ratio, or at a per-token error tolerance.

All fixed-rank rungs (explicit, ``max`` and ratio-resolved) are decomposed in one pass by
:func:`tensorslm.rank_store.tt.tt_svd_ladder`, which computes the first unfolding's SVD once per chunk
of tokens and truncates it at each rung's r_1. Recipe rungs (permutation, mean, quantised
cores, sparse residual, byte budget) are built by :func:`tensorslm.rank_store.recipes.build`.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from .errors import RungSpecError, TensorShapeError
from .rung import Rung
from .rung_spec import RungKind, RungSpec
from .tensorize import resolve_shape
from .tt import DEFAULT_CHUNK_SIZE, clamp_ranks, max_ranks, num_params, tt_svd_ladder, tt_svd_tolerance

log = logging.getLogger(__name__)


def valid_rank_lists(shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Every inner rank list that TT-SVD can produce for ``shape`` (ranks already clamped)."""
    bounds = max_ranks(shape)
    return [r for r in itertools.product(*(range(1, b + 1) for b in bounds)) if clamp_ranks(shape, r) == r]


def ranks_for_ratio(shape: Sequence[int], ratio: float) -> tuple[int, ...]:
    """The largest uniform ranks (most parameters) whose fp32 cores are >= ``ratio`` x smaller than d floats.

    Ties in parameter count go to the lexicographically largest ranks (more rank early, where
    the first unfolding holds most of a vector's energy).
    """
    d = math.prod(shape)
    fitting = [r for r in valid_rank_lists(shape) if d / num_params(shape, r) >= ratio]
    if not fitting:
        best = d / num_params(shape, (1,) * (len(shape) - 1))
        raise RungSpecError(
            f"ratio {ratio:g} cannot be reached with shape {'x'.join(map(str, shape))}: "
            f"the smallest plain TT (all ranks 1) gives {best:.2f}x; ask for at most that"
        )
    return max(fitting, key=lambda r: (num_params(shape, r), r))


def compress_table(
    weight: Tensor,
    specs: Sequence[RungSpec],
    *,
    shape: Sequence[int] | None = None,
    order: int = 3,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    usage: Tensor | None = None,
) -> dict[str, Rung]:
    """Rungs for ``weight`` (V, d), one per spec, keyed by spec name (``tt-6x8``, ``ratio-2``, ``eps-0.1``).

    ``shape`` is the tensorization (n_1..n_N); by default the balanced factorization of d of
    the given ``order``. ``usage`` (V,) weights the tokens of budget recipes (default: the Zipf
    prior over token ids, :func:`tensorslm.rank_store.budget.frequency_prior`).
    """
    weight = torch.as_tensor(weight)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise TensorShapeError(f"expected a float table of shape (V, d), got {weight.dtype} {tuple(weight.shape)}")
    shape = resolve_shape(weight.shape[1], shape, order)
    fixed: dict[str, tuple[RungSpec, tuple[int, ...]]] = {}
    for spec in specs:
        if spec.kind is RungKind.RANKS:
            if spec.ranks is not None and len(spec.ranks) != len(shape) - 1:
                raise RungSpecError(
                    f"rung {spec.name}: shape {'x'.join(map(str, shape))} needs {len(shape) - 1} ranks "
                    f"joined by 'x' (e.g. {'x'.join(map(str, max_ranks(shape)))}), got {len(spec.ranks)}"
                )
            fixed[spec.name] = (spec, clamp_ranks(shape, spec.ranks))
        elif spec.kind is RungKind.RATIO:
            fixed[spec.name] = (spec, ranks_for_ratio(shape, spec.ratio))
    rungs: dict[str, Rung] = {}
    if fixed:
        ladders = tt_svd_ladder(weight, shape, [r for _, r in fixed.values()], chunk_size=chunk_size,
                                progress=progress)
        for (name, (spec, ranks)), cores in zip(fixed.items(), ladders):
            rungs[name] = Rung.from_tt(cores, spec=name, kind=spec.kind.value)
            log.info("rung %s: ranks %s, %.2fx", name, "x".join(map(str, ranks)), rungs[name].ratio)
    for spec in specs:
        if spec.kind is RungKind.TOLERANCE:
            groups = tt_svd_tolerance(weight, shape, spec.tolerance, chunk_size=chunk_size, progress=progress)
            rungs[spec.name] = Rung.from_groups(groups, weight.shape[0], spec=spec.name, kind=spec.kind.value,
                                                tolerance=f"{spec.tolerance:g}")
            log.info("rung %s: %d rank groups, %.2fx", spec.name, len(groups), rungs[spec.name].ratio)
    recipes = [spec for spec in specs if spec.kind is RungKind.RECIPE]
    # Recipe rungs take seconds to minutes each: one bar step per rung, named as it starts.
    bar = tqdm(recipes, desc="rungs", unit="rung", disable=not progress or not recipes)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        rungs[spec.name] = _recipe_rung(weight, spec, shape, chunk_size, usage)
    return {spec.name: rungs[spec.name] for spec in specs}


def _recipe_rung(weight: Tensor, spec: RungSpec, shape: tuple[int, ...], chunk_size: int,
                 usage: Tensor | None = None) -> Rung:
    """A rung from a recipe string; ``auto-<ratio>`` resolved against the measured frontier."""
    from .recipes import Recipe, auto_recipe, build

    recipe = spec.recipe
    if recipe.startswith("auto-"):
        recipe = auto_recipe(float(recipe[len("auto-"):]), shape, vocab_size=weight.shape[0])
    parsed = Recipe.parse(recipe)
    if parsed.shape is None and not parsed.row and len(shape) > 1:
        parsed = dataclasses.replace(parsed, shape=shape)
    started = time.perf_counter()
    rung = build(weight, parsed, chunk_size=max(chunk_size, 8192), weights=usage, spec=spec.name, kind=spec.kind.value)
    log.info("rung %s (%s): %.2fx in %.1f s", spec.name, rung.meta["recipe"], rung.ratio, time.perf_counter() - started)
    return rung

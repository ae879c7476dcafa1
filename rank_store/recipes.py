"""Recipes: one string names how a rung is made, and :func:`build` makes it.

Grammar: ``+``-joined parts, the first names the ranks, the rest are options in any order::

    tt-6x8                      plain per-token TT (the paper's method), ranks 6x8
    tt-max+mean+int8            exact TT of (row - mean), int8 cores
    tt-4x6+perm+mean+sparse32   variance-permuted, mean removed, 32 residual entries per token
    budget-8+mean+perm          ranks and core dtype chosen per token for 8x, by a frequency prior
    budget-16+mean+norm+rows    the same, where a token may also be stored as a whole quantised row
    row+int8                    order 1 (no TT): per-row int8 quantisation in the same rung format
    row+mean+norm+int4          per-row int4 of the centred table with every coordinate scaled
    row+mean+norm+int4g32       the same with one fp16 scale per 32 coordinates of a row
    rows-6+mean+norm+g32        whole rows only, int8, int6 or int4 (a scale per 32 coordinates)
                                picked per token for 6x

ranks part
    ``tt-<r1>x<r2>...`` or ``tt-max`` (ranks clamped as in :func:`tensorslm.rank_store.tt.clamp_ranks`),
    ``row`` (the order-1 "TT" of shape (d,): each row stored whole, so ``row+int8`` is per-row
    int8 quantisation with fp16 scales, storable as a rung), or
    ``budget-<ratio>``: a menu of rank signatures and core dtypes (int8, int6, int4; ``+int8``
    keeps int8 only), one picked per token by
    :func:`tensorslm.rank_store.budget.allocate_budget` so that the whole rung (every byte counted) is at
    least ``ratio`` times smaller than the fp32 table; ``rows-<ratio>``: the same budget over
    whole rows only (no TT core: every token goes through a packed row kernel in the tied head).
options
    ``perm`` (variance order) or ``corr`` (correlated blocks): coordinate order;
    ``mean``: remove the mean row; ``pca<k>``: remove the mean and a shared k-dim basis
    (fp16 basis and coefficients); ``norm``: divide every coordinate by its root-mean-square
    over the vocabulary (stored as ``col_scale``, d floats) before decomposing or quantising;
    ``rows`` (budget rungs only): the menu also offers whole rows (order 1) in the same dtypes;
    ``fp16``, ``int8``, ``int6``, ``int4``: core dtype (per-(token, core) fp16 scales; int6 and
    int4 packed along n_k);
    ``int4g<k>`` (``row`` only, k in 32, 64, 128, 256 dividing d): int4 rows with one fp16 scale
    per k consecutive coordinates instead of one per row (4 + 16/k bits per coordinate; the
    tied head runs them through the grouped int4 kernel); ``g<k>`` (budgets with whole rows):
    the menu's int4 rows carry those scales;
    ``sparse<k>``: the k largest residual entries per token (after quantisation);
    ``shape<n1>x<n2>x<n3>``: the tensorisation (default: balanced, as the core picks).

The result is a :class:`~tensorslm.rank_store.rung.Rung`: the object the store writes and the Pi
serves, so its bytes (:attr:`~tensorslm.rank_store.rung.Rung.nbytes`, int4 and int6 codes packed
along n_k) and its rows (:func:`~tensorslm.rank_store.rung.reconstruct_rows`) are the ones measured.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from tensorslm.constants import SCALE_BYTES

from .budget import allocate_budget, frequency_prior
from .core_quant import CoreDtype
from .errors import RankStoreError
from .kernels import INT4_GROUP_SIZES
from .permutation import correlation_permutation, variance_permutation
from .rung import RankGroup, Rung, group_map_dtype, reconstruct_rows
from .shared_basis import column_scale, fit_shared_basis, mean_offset
from .sparse import BYTES_PER_ENTRY, sparse_residual
from .tensorize import resolve_shape
from .tt import clamp_ranks, tt_svd_ladder

log = logging.getLogger(__name__)

#: rank signatures offered to a budget rung (clamped to the shape, duplicates dropped)
BUDGET_RANKS: tuple[tuple[int, int] | None, ...] = (
    None, (8, 8), (6, 8), (5, 6), (4, 6), (4, 4), (3, 4), (2, 3), (2, 2), (1, 2), (1, 1))
BUDGET_DTYPES = (CoreDtype.INT8, CoreDtype.INT6, CoreDtype.INT4)
#: the rank signature of an order-1 option: the row stored whole (per-token quantisation)
ROW: tuple[int, ...] = ()
#: coordinates per scale a grouped int4 row recipe (``int4g<k>``) takes: the grouped int4
#: kernel's group sizes (kernels.INT4_GROUP_SIZES)
SCALE_GROUPS = tuple(sorted(INT4_GROUP_SIZES))


class RecipeError(RankStoreError, ValueError):
    """A recipe string that cannot be parsed, or a recipe the target format cannot hold."""


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe string; see the module docstring."""

    ranks: tuple[int, ...] | None = None  # None = max
    budget_ratio: float | None = None
    perm: str | None = None  # "perm" | "corr"
    mean: bool = False
    pca: int = 0
    dtype: CoreDtype = CoreDtype.FP32
    sparse: int = 0
    shape: tuple[int, ...] | None = None
    row: bool = False
    with_rows: bool = False  # budget menu also offers order-1 rows
    norm: bool = False  # divide each coordinate by its root-mean-square before decomposing
    scale_group: int = 0  # row int4 only: coordinates per fp16 scale (0: one scale per row)

    @classmethod
    def parse(cls, text: str) -> Recipe:
        parts = [p.strip().lower() for p in re.split(r"[+_]", text.strip())]  # '_' in store names
        head, options = parts[0], parts[1:]
        kwargs: dict = {}
        if m := re.fullmatch(r"tt-(max|\d+(?:x\d+)*)", head):
            kwargs["ranks"] = None if m.group(1) == "max" else tuple(int(r) for r in m.group(1).split("x"))
        elif head == "row":
            kwargs["row"] = True
        elif m := re.fullmatch(r"rows-(\d+(?:\.\d+)?)", head):
            kwargs["row"], kwargs["with_rows"], kwargs["budget_ratio"] = True, True, float(m.group(1))
        elif m := re.fullmatch(r"budget-(\d+(?:\.\d+)?)", head):
            kwargs["budget_ratio"] = float(m.group(1))
        else:
            raise RecipeError(f"recipe {text!r}: the first part must be tt-<ranks>, tt-max, row, "
                              f"budget-<ratio> or rows-<ratio> (e.g. tt-6x8, budget-8), got {head!r}")
        for option in options:
            if option in ("perm", "corr"):
                kwargs["perm"] = option
            elif option == "mean":
                kwargs["mean"] = True
            elif option == "rows":
                kwargs["with_rows"] = True
            elif option == "norm":
                kwargs["norm"] = True
            elif m := re.fullmatch(r"pca(\d+)", option):
                kwargs["pca"], kwargs["mean"] = int(m.group(1)), True
            elif option in ("fp32", "fp16", "int8", "int6", "int4"):
                kwargs["dtype"] = CoreDtype(option)
            elif m := re.fullmatch(r"int4g(\d+)", option):
                kwargs["dtype"], kwargs["scale_group"] = CoreDtype.INT4, int(m.group(1))
            elif m := re.fullmatch(r"g(\d+)", option):
                kwargs["scale_group"] = int(m.group(1))
            elif m := re.fullmatch(r"sparse(\d+)", option):
                kwargs["sparse"] = int(m.group(1))
            elif m := re.fullmatch(r"shape(\d+(?:x\d+)+)", option):
                kwargs["shape"] = tuple(int(n) for n in m.group(1).split("x"))
            else:
                raise RecipeError(f"recipe {text!r}: unknown option {option!r}; valid: perm, corr, mean, "
                                  f"pca<k>, norm, rows, fp16, int8, int6, int4, int4g<k>, g<k>, sparse<k>, "
                                  f"shape<n1>x<n2>...")
        if kwargs.get("scale_group"):
            budget = "budget_ratio" in kwargs
            if not (kwargs.get("row") or kwargs.get("with_rows")):
                raise RecipeError(f"recipe {text!r}: a scale per k coordinates is for whole int4 rows; it "
                                  f"needs row, rows-<ratio> or budget-<ratio>+rows (e.g. row+mean+norm+int4g32)")
            if not budget and kwargs.get("dtype") is not CoreDtype.INT4:
                raise RecipeError(f"recipe {text!r}: g<k> scales int4 rows; write int4g<k> for a row recipe")
            if budget and kwargs.get("dtype", CoreDtype.FP32) is not CoreDtype.FP32:
                raise RecipeError(f"recipe {text!r}: a budget's g<k> applies to the int4 rows of its menu of "
                                  f"int8, int6 and int4; drop the dtype (write g<k>, not int4g<k>)")
            if kwargs["scale_group"] not in SCALE_GROUPS:
                raise RecipeError(f"recipe {text!r}: int4g<k> takes k in {', '.join(map(str, SCALE_GROUPS))} "
                                  f"(the grouped int4 kernel's group sizes), got {kwargs['scale_group']}")
        if kwargs.get("with_rows") and "budget_ratio" not in kwargs:
            raise RecipeError(f"recipe {text!r}: 'rows' adds whole-row options to a budget menu; "
                              f"it needs budget-<ratio> as the first part")
        if "budget_ratio" in kwargs and kwargs.get("dtype") in (CoreDtype.FP32, CoreDtype.FP16):
            raise RecipeError(f"recipe {text!r}: a budget rung picks int8, int6 or int4 cores per token; "
                              f"add int8 to allow int8 only, or no dtype for both")
        return cls(**kwargs)

    @property
    def name(self) -> str:
        head = (f"rows-{self.budget_ratio:g}" if self.budget_ratio is not None and self.row
                else f"budget-{self.budget_ratio:g}" if self.budget_ratio is not None else "row" if self.row
                else "tt-" + ("max" if self.ranks is None else "x".join(map(str, self.ranks))))
        opts = [self.perm] if self.perm else []
        opts += [f"pca{self.pca}"] if self.pca else (["mean"] if self.mean else [])
        opts += ["norm"] if self.norm else []
        opts += ["rows"] if self.with_rows and not self.row else []
        if self.scale_group and self.budget_ratio is not None:
            opts += [f"g{self.scale_group}"]
        elif self.scale_group:
            opts += [f"{self.dtype.value}g{self.scale_group}"]
        elif self.dtype is not CoreDtype.FP32:
            opts += [self.dtype.value]
        opts += [f"sparse{self.sparse}"] if self.sparse else []
        opts += ["shape" + "x".join(map(str, self.shape))] if self.shape else []
        return "+".join([head, *opts])


def _budget_menu(shape: tuple[int, ...], rows: bool = False) -> list[tuple[int, ...]]:
    menu: list[tuple[int, ...]] = [ROW] if rows else []
    for ranks in BUDGET_RANKS:
        r = clamp_ranks(shape, None if ranks is None else (ranks + (ranks[-1],) * len(shape))[: len(shape) - 1])
        if r not in menu:
            menu.append(r)
    return menu


def _option_cores(x: Tensor, ranks: tuple[int, ...], shape: tuple[int, ...],
                  ladder: dict | None = None, chunk_size: int = 8192) -> list[Tensor]:
    """The float cores of rows x (c, d) under one menu signature (ROW: one core (c, 1, d, 1))."""
    if ranks == ROW:
        return [x.reshape(x.shape[0], 1, x.shape[1], 1)]  # (c, 1, d, 1)
    if ladder is not None:
        return list(ladder[ranks].cores)
    return list(tt_svd_ladder(x, shape, [ranks], chunk_size=chunk_size)[0].cores)


_ERRORS_MEMO: dict[tuple, tuple[Tensor, Tensor]] = {}  # the last menu's errors, shared by a ladder's rungs


def _option_group_size(ranks: tuple[int, ...], dtype: CoreDtype, scale_group: int) -> int | None:
    """The scale group of one menu option: ``scale_group`` for whole int4 rows, else None."""
    return scale_group if scale_group and ranks == ROW and dtype is CoreDtype.INT4 else None


def _option_errors(rest: Tensor, shape: tuple[int, ...], options: list, menu: list,
                   chunk_size: int, scale_group: int = 0) -> tuple[Tensor, Tensor]:
    """Squared error (V, M) of every token under every (ranks, dtype) option, and bytes per token
    (M,), both of the group as the rung stores and rebuilds it (int6/int4 codes are lossless to
    pack, so the errors are taken before packing, which is slow)."""
    key = (rest.shape, tuple(options), scale_group, float(rest[:64].sum()), float(rest[-64:].abs().sum()))
    if key in _ERRORS_MEMO:
        return _ERRORS_MEMO[key]
    V = rest.shape[0]
    errors = torch.empty(V, len(options))  # (V, M)
    costs = torch.empty(len(options), dtype=torch.float64)  # (M,)
    tt_menu = [r for r in menu if r != ROW]
    for start in range(0, V, chunk_size):
        x = rest[start : start + chunk_size]  # (c, d)
        positions = torch.arange(x.shape[0])  # (c,)
        ladder = dict(zip(tt_menu, tt_svd_ladder(x, shape, tt_menu, chunk_size=chunk_size)))
        for m, (r, dt) in enumerate(options):
            cores = _option_cores(x, r, shape, ladder)
            group = _option_group_size(r, dt, scale_group)
            rows = RankGroup.quantize(cores, dt, pack=False, group_size=group).rows(positions)  # (c, d), as rebuilt
            errors[start : start + chunk_size, m] = ((x - rows) ** 2).sum(1)  # (c,)
            costs[m] = RankGroup.quantize([c[:1] for c in cores], dt, group_size=group).nbytes  # one token, as stored
    _ERRORS_MEMO.clear()
    _ERRORS_MEMO[key] = (errors, costs)
    return errors, costs


def _budget_groups(rest: Tensor, shape: tuple[int, ...], byte_budget: float, weights: Tensor,
                   chunk_size: int, dtypes: tuple[CoreDtype, ...] = BUDGET_DTYPES,
                   rows: bool = False, scale_group: int = 0) -> list[RankGroup]:
    """Per-token choice of (ranks, dtype) under ``byte_budget`` core bytes, then the groups."""
    menu = _budget_menu(shape, rows)
    options = [(r, dt) for r in menu for dt in dtypes]
    errors, costs = _option_errors(rest, shape, options, menu, chunk_size, scale_group)
    choice = allocate_budget(errors, costs, byte_budget, weights)  # (V,)
    groups = []
    for m in torch.unique(choice).tolist():  # loop over options, never over tokens
        ids = (choice == m).nonzero().squeeze(1)  # (V_g,)
        r, dt = options[m]
        groups.append(RankGroup.quantize(_option_cores(rest[ids], r, shape, chunk_size=chunk_size), dt, ids,
                                         group_size=_option_group_size(r, dt, scale_group)))
    return groups


def budget_choice(rung: Rung) -> dict[str, int]:
    """Tokens per stored option of a rung, keyed ``<ranks>/<dtype>`` (``row/int4`` for whole rows)."""
    return {f"{'x'.join(map(str, g.ranks[1:-1])) or 'row'}/{g.dtype_name}": g.size for g in rung.groups}


def build(weight: Tensor, recipe: str | Recipe, *, weights: Tensor | None = None,
          chunk_size: int = 8192, **meta: str) -> Rung:
    """Compress ``weight`` (V, d) by ``recipe`` into the rung the store writes and the Pi serves.

    ``weights`` (V,) are the token usage weights for budget rungs (default: :func:`frequency_prior`).
    ``meta`` is recorded in the rung beside ``recipe`` (the recipe's canonical name).
    """
    started = time.perf_counter()
    spec = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    if weight.dim() != 2:
        raise RecipeError(f"expected a (V, d) table, got shape {tuple(weight.shape)}")
    table = weight.float()
    V, d = table.shape
    shape = (d,) if spec.row else resolve_shape(d, spec.shape)
    offset = basis = coeffs = None
    if spec.pca:
        offset, basis, coeffs = fit_shared_basis(table, spec.pca)
        basis, coeffs = basis.half(), coeffs.half()  # (k, d), (V, k)
        rest = table - offset - coeffs.float() @ basis.float()  # (V, d)
    elif spec.mean:
        offset = mean_offset(table)  # (d,)
        rest = table - offset
    else:
        rest = table
    col_scale = None
    if spec.norm:
        col_scale = column_scale(rest)  # (d,)
        rest = rest / col_scale
    perm = None
    if spec.perm == "perm":
        perm = variance_permutation(rest)
    elif spec.perm == "corr":
        perm = correlation_permutation(rest, shape)
    rest_p = rest if perm is None else rest[:, perm]  # (V, d) tensorised order
    if spec.budget_ratio is not None:
        dtypes = BUDGET_DTYPES if spec.dtype is CoreDtype.FP32 else (spec.dtype,)
        menu_size = len(_budget_menu(shape, spec.with_rows)) * len(dtypes)
        fixed = sum(t.numel() * t.element_size() for t in (perm, offset, col_scale, basis, coeffs) if t is not None)
        fixed += V * spec.sparse * BYTES_PER_ENTRY  # the sparse residual, built after the groups
        fixed += V * group_map_dtype(menu_size).itemsize  # at most one group per menu option
        byte_budget = V * d * 4 / spec.budget_ratio - fixed
        usage = frequency_prior(V) if weights is None else weights
        if spec.scale_group and d % spec.scale_group:
            raise RecipeError(f"recipe {spec.name!r}: the scale group {spec.scale_group} must divide the "
                              f"row width d = {d}")
        groups = _budget_groups(rest_p, shape, byte_budget, usage, chunk_size, dtypes, spec.with_rows,
                                spec.scale_group)
    elif spec.scale_group:
        if d % spec.scale_group:
            raise RecipeError(f"recipe {spec.name!r}: the scale group {spec.scale_group} must divide the "
                              f"row width d = {d}")
        groups = [RankGroup.quantize([rest_p.reshape(V, 1, d, 1)], spec.dtype, group_size=spec.scale_group)]
    else:
        cores = tt_svd_ladder(rest_p, shape, [spec.ranks], chunk_size=chunk_size)[0]
        groups = [RankGroup.quantize(cores.cores, spec.dtype)]
    rung = Rung(shape, V, tuple(groups), perm=perm, offset=offset, basis=basis, coeffs=coeffs,
                col_scale=col_scale, meta={"recipe": spec.name, **meta})
    if spec.sparse:
        residual = table - reconstruct_rows(rung, torch.arange(V))  # (V, d)
        sparse_idx, sparse_val = sparse_residual(residual, spec.sparse)  # (V, s) each
        rung = dataclasses.replace(rung, sparse_idx=sparse_idx, sparse_val=sparse_val)
    log.info("%s: %.2fx in %.1f s", spec.name, rung.ratio, time.perf_counter() - started)
    return rung


#: the recipe that fills a compression ratio up to the exact-TT int8 rung
EXACT_INT8 = "tt-max+perm+mean+int8"
#: per-row int8 after removing the mean row and evening out the coordinates' spread
ROW_INT8 = "row+mean+norm+int8"
#: per-row int4 after removing the mean row and evening out the coordinates' spread
ROW_INT4 = "row+mean+norm+int4"
#: a fixed recipe serves a requested ratio it misses by at most this fraction (per-row int8 falls
#: just short of 4x once its fp16 scales are counted; everyone calls it 4x)
RATIO_SLACK = 0.01


#: vocabularies at least this large take the TT+rows budget at 8x instead of per-row int4
LARGE_VOCAB = 100_000
#: coordinates per scale of the int4 rows in the rows-only budgets auto_recipe picks
ROW_SCALE_GROUP = 32


def auto_recipe(ratio: float, shape: tuple[int, ...], vocab_size: int | None = None) -> str:
    """The recipe the measured frontier (bench/results/frontier.md) recommends for ``ratio``.

    Up to the ratio of exact TT with int8 cores, that rung (within noise of dense perplexity on
    both measured models; per-row int8 at about 4x is as good, so the default ladder,
    :data:`tensorslm.constants.AUTO_LADDER_BUDGETS`, starts there). Up to about 4x per-row int8
    after mean removal and per-coordinate scaling. About 8x: per-row int4 the same way, except for
    vocabularies of ``LARGE_VOCAB`` tokens or more (most tokens rare in the text served), where the
    TT+rows budget wins by shrinking the rare tokens to small TT cores and spending the bytes on
    the frequent ones. Between 4x and the ratio of int4 rows with a scale per 32 coordinates
    (about 7.1x), where d is a multiple of 32: whole rows only, int8, int6 or int4 with those
    scales picked per token (``rows-<ratio>+mean+norm+g32``): every token then runs through a
    packed row kernel in the tied head, and the grouped int4 rows cost far less perplexity with
    the tied head than int4 rows with one scale each (bench/results/rung_energy_*.md). Otherwise
    between 4x and 8x, and beyond 8x, the TT+rows budget (mixing int8, int6 and int4 rows and TT
    cores to hit the ratio asked for); per-row int2 is far worse.
    """
    if ratio <= 0:
        raise RecipeError(f"a compression ratio must be > 0, got {ratio}")
    d = math.prod(shape)
    exact = clamp_ranks(shape, None)
    # bytes per token: int8 codes, and one fp16 scale per core (TT) or per row
    exact_bytes = sum(a * n * b for a, n, b in zip((1, *exact), shape, (*exact, 1))) + SCALE_BYTES * len(shape)
    if ratio <= d * 4 / exact_bytes * (1 + RATIO_SLACK):
        return EXACT_INT8
    if ratio <= d * 4 / (d + SCALE_BYTES) * (1 + RATIO_SLACK):
        return ROW_INT8
    int4_ratio = d * 4 / (math.ceil(d / 2) + SCALE_BYTES)
    if abs(ratio / int4_ratio - 1) <= RATIO_SLACK and (vocab_size or 0) < LARGE_VOCAB:
        return ROW_INT4
    grouped_ratio = d * 4 / (d / 2 + SCALE_BYTES * d / ROW_SCALE_GROUP)  # int4 rows, fp16 scale per 32
    if d % ROW_SCALE_GROUP == 0 and ratio <= grouped_ratio:
        return f"rows-{ratio:g}+mean+norm+g{ROW_SCALE_GROUP}"
    return f"budget-{ratio:g}+mean+norm+rows"

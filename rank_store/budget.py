"""One byte budget across the vocabulary: richer rungs for the tokens that are used.

Tokens are not equally used, so spending the same bytes on each is wasteful. Given, for every
token and every candidate option (a TT rank signature, a core dtype, ...), the squared error it
leaves and the bytes it costs, :func:`allocate_budget` picks one option per token to minimise the
usage-weighted error sum_v w_v * err[v, choice_v] under sum_v cost[v, choice_v] <= budget.

It solves the Lagrangian relaxation (each token takes argmin w * err + lam * cost) and bisects
on lam for the smallest multiplier that meets the budget, so the result never exceeds it. This
is the classic convex-hull solution of the multiple-choice knapsack: exact on the lower convex
hull of each token's (cost, error) options, vectorised over the vocabulary.

Usage weights come without evaluation data from :func:`frequency_prior` (byte-pair-encoding ids
are roughly ordered by merge frequency, so a Zipf law over the id is a fair guess) or from
:func:`calibration_counts` on a text that is not the evaluation text.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor

from .errors import RankStoreError

log = logging.getLogger(__name__)


class BudgetError(RankStoreError, ValueError):
    """The byte budget cannot be met, or the allocation inputs disagree in shape."""


def frequency_prior(vocab_size: int, offset: float = 256.0, exponent: float = 1.0) -> Tensor:
    """Zipf weights over token ids, normalised to sum 1: (V,) with w_i ∝ (i + offset)^-exponent.

    BPE vocabularies are built by merges in order of frequency, so a low id is, roughly, a
    frequent token; ``offset`` flattens the head (special and byte tokens come first).
    """
    if vocab_size < 1 or offset <= 0 or exponent < 0:
        raise BudgetError(f"need vocab_size >= 1, offset > 0, exponent >= 0; got {vocab_size}, {offset}, {exponent}")
    w = (torch.arange(vocab_size, dtype=torch.float64) + offset) ** -exponent  # (V,)
    return (w / w.sum()).float()


def calibration_counts(token_ids: Iterable[int] | Tensor, vocab_size: int, smoothing: float = 0.5,
                       prior: Tensor | None = None) -> Tensor:
    """Usage weights (V,) from token ids of a calibration text, add-``smoothing`` counts mixed
    with ``prior`` (if given) for tokens the text never uses; normalised to sum 1."""
    ids = torch.as_tensor(list(token_ids) if not isinstance(token_ids, Tensor) else token_ids, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise BudgetError(f"calibration token ids must lie in 0..{vocab_size - 1}")
    counts = torch.bincount(ids, minlength=vocab_size).double() + smoothing  # (V,)
    if prior is not None:
        counts = counts + prior.double() * smoothing * vocab_size
    return (counts / counts.sum()).float()


def _choose(weighted: Tensor, costs: Tensor, lam: float) -> Tensor:
    return torch.argmin(weighted + lam * costs, dim=1)  # (V,)


def allocate_budget(errors: Tensor, costs: Tensor, byte_budget: float, weights: Tensor | None = None,
                    iterations: int = 60) -> Tensor:
    """Pick one option per token under ``byte_budget`` total bytes.

    errors  (V, M): squared reconstruction error of token v under option m (or any loss).
    costs   (M,) or (V, M): bytes of option m (per token).
    weights (V,): usage of each token (default uniform).
    Returns choice (V,) int64 with sum(cost[v, choice[v]]) <= byte_budget, raising
    :class:`BudgetError` if even the cheapest option per token exceeds it.
    """
    if errors.dim() != 2:
        raise BudgetError(f"errors must be (V, M), got shape {tuple(errors.shape)}")
    V, M = errors.shape
    costs = costs.double()
    if costs.dim() == 1:
        costs = costs.expand(V, M)
    if costs.shape != (V, M):
        raise BudgetError(f"costs must be ({M},) or ({V}, {M}), got {tuple(costs.shape)}")
    weights = torch.ones(V, dtype=torch.float64) if weights is None else weights.double()
    if weights.shape != (V,):
        raise BudgetError(f"weights must be ({V},), got {tuple(weights.shape)}")
    weighted = errors.double() * weights[:, None]  # (V, M)

    def spent(choice: Tensor) -> float:
        return float(costs.gather(1, choice[:, None]).sum())  # (V, 1) summed

    cheapest = float(costs.min(1).values.sum())
    if cheapest > byte_budget:
        raise BudgetError(f"budget of {byte_budget:.0f} bytes is below the {cheapest:.0f} bytes of the "
                          f"cheapest option for every token; raise the budget or add a cheaper option")
    best = _choose(weighted, costs, 0.0)
    if spent(best) <= byte_budget:
        return best
    lo, hi = 0.0, 1.0
    while spent(_choose(weighted, costs, hi)) > byte_budget:
        hi *= 4.0
        if hi > 1e300:  # ties at equal error: fall back to the cheapest option
            return torch.argmin(costs, dim=1)  # (V,)
    for _ in range(iterations):  # invariant: hi meets the budget, lo does not
        mid = (lo + hi) / 2
        if spent(_choose(weighted, costs, mid)) <= byte_budget:
            hi = mid
        else:
            lo = mid
    choice = _choose(weighted, costs, hi)
    log.info("budget %.0f bytes: spent %.0f, lambda %.3g", byte_budget, spent(choice), hi)
    return choice

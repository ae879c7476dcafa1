"""Coordinate orders for tensorisation: which of the d coordinates share a TT mode.

Per-token TT-SVD reshapes a token vector x (d,) into an (n_1, ..., n_N) tensor; which coordinate
lands where is arbitrary, and it matters: the TT ranks needed depend on how the energy is laid
out over the modes. A permutation ``perm`` (d,) says the tensorised vector is ``x[perm]``; the
rung stores it and lookup puts coordinates back with the inverse (``x = y[argsort(perm)]``).

* :func:`variance_permutation`: coordinates in decreasing variance over the vocabulary, so the
  strong coordinates gather in the first slices of mode 1 (bench/results/frontier.md compares
  ``tt-4x6`` with ``tt-4x6+perm``).
* :func:`correlation_permutation`: coordinates grouped so that each block of the last mode
  holds mutually correlated coordinates (greedy clustering on |corr|), which lets a small last
  rank capture them together.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import RankStoreError


class PermutationError(RankStoreError, ValueError):
    """A permutation or its inputs are malformed."""


def _check_table(weight: Tensor) -> Tensor:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise PermutationError(f"expected a float (V, d) table, got {weight.dtype} {tuple(weight.shape)}")
    return weight.float()


def variance_permutation(weight: Tensor) -> Tensor:
    """Coordinates sorted by decreasing variance over the vocabulary: (d,) int64."""
    table = _check_table(weight)
    return torch.argsort(table.var(0), descending=True, stable=True)  # (d,)


def correlation_permutation(weight: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Coordinates grouped in blocks of ``shape[-1]`` mutually correlated coordinates: (d,) int64.

    Greedy: repeatedly seed a block with the highest-variance unused coordinate and fill it
    with the unused coordinates most correlated (in absolute value) with the block so far.
    Blocks are ordered by the variance of their seed. The loop runs over d / n_N blocks, never
    over tokens.
    """
    table = _check_table(weight)
    d = table.shape[1]
    if math.prod(shape) != d:
        raise PermutationError(f"shape {shape} has {math.prod(shape)} entries, the table has d={d}")
    block = shape[-1]
    centred = table - table.mean(0)
    cov = centred.T @ centred  # (d, d)
    std = cov.diagonal().clamp_min(1e-12).sqrt()
    corr = (cov / std[:, None] / std[None, :]).abs()  # (d, d)
    unused = torch.ones(d, dtype=torch.bool)
    order: list[Tensor] = []
    var = cov.diagonal()
    for _ in range(d // block):
        seed = int(torch.where(unused, var, torch.tensor(-1.0)).argmax())
        members = [seed]
        unused[seed] = False
        affinity = corr[seed].clone()  # (d,)
        for _ in range(block - 1):
            pick = int(torch.where(unused, affinity, torch.tensor(-1.0)).argmax())
            members.append(pick)
            unused[pick] = False
            affinity += corr[pick]
        order.append(torch.tensor(members))  # (n_N,) one block
    return torch.cat(order).to(torch.int64)  # (d,)

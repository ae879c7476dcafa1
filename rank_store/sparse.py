"""Sparse augmentation of a low-rank approximation (the Saten idea, without training).

After TT, each token keeps the k entries of its residual with the largest magnitude: indices
(V, k) int16 and values (V, k) float16, added back at lookup. The kept entries are exact (up to
fp16), the others keep the TT error. Costs 4 bytes per kept entry.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .errors import RankStoreError

BYTES_PER_ENTRY = torch.int16.itemsize + torch.float16.itemsize  # index + value: 4


class SparseError(RankStoreError, ValueError):
    """Bad inputs for the sparse residual."""


def sparse_residual(residual: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest-magnitude entries of every row of ``residual`` (V, d).

    Returns (idx (V, k) int16, val (V, k) float16), sorted by decreasing magnitude.
    """
    if residual.dim() != 2:
        raise SparseError(f"residual must be (V, d), got shape {tuple(residual.shape)}")
    d = residual.shape[1]
    if not 0 <= k <= d:
        raise SparseError(f"k must lie in 0..{d} (the row length), got {k}")
    if d > torch.iinfo(torch.int16).max:
        raise SparseError(f"int16 indices hold d <= 32767, got d={d}")
    idx = residual.abs().topk(k, dim=1).indices  # (V, k)
    val = residual.gather(1, idx)  # (V, k)
    return idx.to(torch.int16), val.to(torch.float16)

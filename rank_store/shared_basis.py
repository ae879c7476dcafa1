"""A component shared by all tokens: the mean vector and a small basis learned from the table.

Every row is split as  w = offset + coeffs @ basis + remainder; the remainder is what the
per-token TT then decomposes. ``offset`` (d,) is the mean row (on the measured models it holds a
large share of the table's energy, which plain per-token TT pays for in every token); ``basis`` (k, d)
holds the top-k principal directions of the centred table and ``coeffs`` (V, k) each token's
coordinates in it. The basis costs k*d values once; the coefficients k values per token.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .errors import RankStoreError


class SharedBasisError(RankStoreError, ValueError):
    """Bad inputs for the shared basis."""


def mean_offset(weight: Tensor) -> Tensor:
    """The mean row of the table: (d,) float32."""
    if weight.dim() != 2:
        raise SharedBasisError(f"expected a (V, d) table, got shape {tuple(weight.shape)}")
    return weight.float().mean(0)


def column_scale(rest: Tensor) -> Tensor:
    """Each coordinate's root-mean-square over the vocabulary: (d,) float32, never zero.

    Dividing by it gives every coordinate the same spread before quantisation, so a per-token
    scale is no longer set by the few high-variance coordinates alone.
    """
    if rest.dim() != 2:
        raise SharedBasisError(f"expected a (V, d) table, got shape {tuple(rest.shape)}")
    rms = rest.float().pow(2).mean(0).sqrt()  # (d,)
    return torch.where(rms > 0, rms, torch.ones_like(rms))


def fit_shared_basis(weight: Tensor, k: int, center: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Offset, top-k principal basis and per-token coefficients of ``weight`` (V, d).

    Returns (offset (d,), basis (k, d) with orthonormal rows, coeffs (V, k)) so that
    offset + coeffs @ basis is the best rank-k affine approximation of the table (Eckart-Young).
    With ``center=False`` the offset is zero.
    """
    if weight.dim() != 2:
        raise SharedBasisError(f"expected a (V, d) table, got shape {tuple(weight.shape)}")
    V, d = weight.shape
    if not 0 <= k <= min(V, d):
        raise SharedBasisError(f"k must lie in 0..{min(V, d)}, got {k}")
    table = weight.float()
    offset = table.mean(0) if center else torch.zeros(d)
    centred = table - offset  # (V, d)
    # eigen-decomposition of the d x d Gram matrix: cheaper than an SVD of the V x d table
    gram = centred.T.double() @ centred.double()  # (d, d)
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    basis = vecs[:, -k:].flip(1).T.float() if k else torch.zeros(0, d)  # (k, d)
    coeffs = centred @ basis.T  # (V, k)
    return offset, basis, coeffs

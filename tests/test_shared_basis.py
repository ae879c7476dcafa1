"""Shared basis: exact recovery of a table of known affine rank, error falling with k."""
import dataclasses

import pytest
import torch

from tensorslm.rank_store.rung import Rung, reconstruct_rows
from tensorslm.rank_store.shared_basis import SharedBasisError, fit_shared_basis, mean_offset


def shared_part(offset: torch.Tensor, basis: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """offset + coeffs @ basis for every token, rebuilt by a rung whose cores are all zero."""
    V, d = coeffs.shape[0], offset.shape[0]
    rung = dataclasses.replace(Rung.dense(torch.zeros(V, d)), offset=offset, basis=basis, coeffs=coeffs)
    return reconstruct_rows(rung, torch.arange(V))  # (V, d)


def test_recovers_affine_low_rank_table() -> None:
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(32, generator=g)
    table = mean + torch.randn(300, 5, generator=g) @ torch.randn(5, 32, generator=g)
    offset, basis, coeffs = fit_shared_basis(table, 5)
    assert basis.shape == (5, 32) and coeffs.shape == (300, 5)
    torch.testing.assert_close(basis @ basis.T, torch.eye(5), atol=1e-5, rtol=0)
    rebuilt = shared_part(offset, basis, coeffs)
    assert float((rebuilt - table).norm() / table.norm()) < 1e-5


def test_error_falls_with_k_and_mean_alone() -> None:
    g = torch.Generator().manual_seed(1)
    table = torch.randn(200, 16, generator=g) + 3.0
    errors = []
    for k in (0, 2, 4, 8, 16):
        offset, basis, coeffs = fit_shared_basis(table, k)
        errors.append(float((table - shared_part(offset, basis, coeffs)).norm()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3
    torch.testing.assert_close(mean_offset(table), table.mean(0))


def test_bad_k() -> None:
    with pytest.raises(SharedBasisError, match=r"k must lie in 0..16, got 17"):
        fit_shared_basis(torch.zeros(20, 16), 17)

"""Coordinate permutations: valid, invertible, and they order what they claim."""
import dataclasses

import pytest
import torch

from tensorslm.rank_store.errors import RungFormatError
from tensorslm.rank_store.permutation import PermutationError, correlation_permutation, variance_permutation
from tensorslm.rank_store.rung import Rung, reconstruct_rows


def permuted_rung(w: torch.Tensor, perm: torch.Tensor) -> Rung:
    """A dense rung of the table in tensorised order w[:, perm], storing ``perm`` for lookup."""
    return dataclasses.replace(Rung.dense(w[:, perm]), perm=perm)


def _table() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(200, 24, generator=g) * torch.linspace(0.1, 3.0, 24)[torch.randperm(24, generator=g)]


@pytest.mark.parametrize("make", [variance_permutation, lambda w: correlation_permutation(w, (2, 3, 4))])
def test_round_trip(make) -> None:
    w = _table()
    perm = make(w)
    assert torch.equal(reconstruct_rows(permuted_rung(w, perm), torch.arange(200)), w)


def test_variance_order_is_decreasing() -> None:
    w = _table()
    v = w[:, variance_permutation(w)].var(0)
    assert bool((v[:-1] >= v[1:]).all())


def test_correlation_groups_correlated_coordinates() -> None:
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(500, 3, generator=g)
    # coordinate j follows latent j % 3: three blocks of 4 correlated coordinates, interleaved
    w = latent[:, torch.arange(12) % 3] + 0.01 * torch.randn(500, 12, generator=g)
    perm = correlation_permutation(w, (3, 4))
    blocks = (perm % 3).reshape(3, 4)
    assert all(len(set(b.tolist())) == 1 for b in blocks)


@pytest.mark.parametrize("perm, message", [
    (torch.tensor([0, 1, 1]), "a permutation of 0..2"),
    (torch.tensor([0, 1]), r"shape \(3,\)"),
    (torch.tensor([0.0, 1.0, 2.0]), "int64"),
])
def test_bad_permutation(perm: torch.Tensor, message: str) -> None:
    with pytest.raises(RungFormatError, match=message):
        dataclasses.replace(Rung.dense(torch.zeros(2, 3)), perm=perm)


def test_shape_mismatch() -> None:
    with pytest.raises(PermutationError, match="has 20 entries, the table has d=24"):
        correlation_permutation(_table(), (4, 5))

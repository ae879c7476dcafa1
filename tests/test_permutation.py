"""Coordinate permutations: valid, invertible, and they order what they claim."""
import pytest
import torch

from tensorslm.rank_store.permutation import (PermutationError, apply_permutation, check_permutation,
                                    correlation_permutation, undo_permutation, variance_permutation)


def _table() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(200, 24, generator=g) * torch.linspace(0.1, 3.0, 24)[torch.randperm(24, generator=g)]


@pytest.mark.parametrize("make", [variance_permutation, lambda w: correlation_permutation(w, (2, 3, 4))])
def test_round_trip(make) -> None:
    w = _table()
    perm = make(w)
    check_permutation(perm, 24)
    assert torch.equal(undo_permutation(apply_permutation(w, perm), perm), w)


def test_variance_order_is_decreasing() -> None:
    w = _table()
    v = apply_permutation(w, variance_permutation(w)).var(0)
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
    (torch.tensor([0, 1, 1]), "exactly once"),
    (torch.tensor([0, 1]), r"shape \(3,\)"),
    (torch.tensor([0.0, 1.0, 2.0]), "int64"),
])
def test_bad_permutation(perm: torch.Tensor, message: str) -> None:
    with pytest.raises(PermutationError, match=message):
        check_permutation(perm, 3)


def test_shape_mismatch() -> None:
    with pytest.raises(PermutationError, match="has 20 entries, the table has d=24"):
        correlation_permutation(_table(), (4, 5))

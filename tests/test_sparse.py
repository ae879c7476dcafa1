"""Sparse residual: the kept entries are exact (to fp16), the largest ones are kept, errors help."""
import dataclasses

import pytest
import torch

from tensorslm.rank_store.errors import RankStoreError
from tensorslm.rank_store.rung import Rung, reconstruct_rows
from tensorslm.rank_store.sparse import SparseError, sparse_residual


def test_kept_entries_are_exact_and_largest() -> None:
    g = torch.Generator().manual_seed(0)
    residual = torch.randn(50, 24, generator=g)
    idx, val = sparse_residual(residual, 5)
    assert idx.dtype == torch.int16 and val.dtype == torch.float16 and idx.shape == (50, 5)
    kept = residual.gather(1, idx.long())
    torch.testing.assert_close(val.float(), kept, rtol=1e-3, atol=0)  # fp16 rounding only
    smallest_kept = kept.abs().min(1).values
    mask = torch.ones_like(residual, dtype=torch.bool).scatter_(1, idx.long(), False)
    largest_dropped = torch.where(mask, residual.abs(), torch.zeros_like(residual)).max(1).values
    assert bool((smallest_kept >= largest_dropped).all())


def test_adding_sparse_part_zeroes_kept_residual_entries() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.randn(30, 16, generator=g)
    approx = target + 0.1 * torch.randn(30, 16, generator=g)
    idx, val = sparse_residual(target - approx, 4)
    rung = dataclasses.replace(Rung.dense(approx), sparse_idx=idx, sparse_val=val)  # approx + sparse part
    fixed = reconstruct_rows(rung, torch.arange(30))
    err = (target - fixed).gather(1, idx.long())
    assert float(err.abs().max()) < 1e-3
    assert float((target - fixed).norm()) < float((target - approx).norm())


@pytest.mark.parametrize("k, message", [(-1, "k must lie in 0..8"), (9, "k must lie in 0..8")])
def test_bad_k(k: int, message: str) -> None:
    with pytest.raises(SparseError, match=message) as info:
        sparse_residual(torch.zeros(3, 8), k)
    assert isinstance(info.value, RankStoreError)

"""Recovery tests of the per-token TT-SVD (tensorly style): known ranks in, tight error out."""
from __future__ import annotations

import pytest
import torch

from tensorslm.rank_store.errors import TensorShapeError
from tensorslm.rank_store.rung import Rung, reconstruct_rows
from tensorslm.rank_store.tensorize import balanced_factors, check_shape
from tensorslm.rank_store.tt import (
    TTCores,
    clamp_ranks,
    contract,
    max_ranks,
    tt_svd,
    tt_svd_ladder,
    tt_svd_tolerance,
)


def reconstruct(cores: TTCores, ids: torch.Tensor) -> torch.Tensor:
    """The rows ``ids`` rebuilt as the Pi rebuilds them: a plain rung of these cores."""
    return reconstruct_rows(Rung.from_tt(cores), ids)


def random_tt_table(vocab: int, shape: tuple[int, ...], ranks: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A (V, d) table whose rows have TT ranks at most ``ranks``."""
    gen = torch.Generator().manual_seed(seed)
    full = (1, *ranks, 1)
    cores = [torch.randn(vocab, full[k], n, full[k + 1], generator=gen) for k, n in enumerate(shape)]
    return contract(cores)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "d, order, expected",
    [(576, 3, (8, 8, 9)), (640, 3, (8, 8, 10)), (768, 3, (8, 8, 12)), (64, 2, (8, 8)), (7, 3, (1, 1, 7)), (12, 1, (12,))],
)
def test_balanced_factors(d, order, expected):
    assert balanced_factors(d, order) == expected


@pytest.mark.parametrize("d, order, message", [(0, 3, "positive integer"), (576, 0, "order must be")])
def test_balanced_factors_rejects(d, order, message):
    with pytest.raises(TensorShapeError, match=message):
        balanced_factors(d, order)


def test_check_shape_names_expected_product():
    with pytest.raises(TensorShapeError, match="has 512 entries, but the vectors have dimension 576"):
        check_shape((8, 8, 8), 576)


@pytest.mark.parametrize("shape, ranks", [((4, 5, 6), (2, 3)), ((8, 8, 9), (3, 5)), ((3, 4, 2, 5), (2, 4, 3))])
def test_exact_recovery_of_known_rank(shape, ranks):
    table = random_tt_table(64, shape, ranks)
    ids = torch.arange(64)
    for requested in (None, ranks):  # 'max' and the known ranks both recover the table
        cores = tt_svd(table, shape, requested)
        assert rel_error(reconstruct(cores, ids), table) < 1e-5
    assert tt_svd(table, shape, ranks).ranks == (1, *ranks, 1)


def test_error_non_increasing_with_rank():
    table = torch.randn(200, 72, generator=torch.Generator().manual_seed(1))
    shape = (4, 2, 9)
    rank_lists = [(1, 1), (2, 2), (2, 4), (4, 4), (4, 8), None]
    errors = [rel_error(reconstruct(c, torch.arange(200)), table) for c in tt_svd_ladder(table, shape, rank_lists)]
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[0] > 0.3 and errors[-1] < 1e-5


def test_ladder_matches_separate_decompositions_and_chunking():
    table = torch.randn(150, 120, generator=torch.Generator().manual_seed(2))
    shape = (4, 5, 6)
    ladder = tt_svd_ladder(table, shape, [(3, 4), (2, 4), (3, 2)], chunk_size=40)
    for ranks, shared in zip([(3, 4), (2, 4), (3, 2)], ladder):
        alone = tt_svd(table, shape, ranks)
        ids = torch.arange(150)
        assert torch.allclose(reconstruct(shared, ids), reconstruct(alone, ids), atol=1e-5)


def test_clamp_ranks():
    assert max_ranks((8, 8, 9)) == (8, 9)
    assert clamp_ranks((8, 8, 9), None) == (8, 9)
    assert clamp_ranks((8, 8, 9), (100, 100)) == (8, 9)
    assert clamp_ranks((8, 8, 9), (1, 20)) == (1, 8)  # r2 <= r1 * n2
    with pytest.raises(TensorShapeError, match="needs 2 inner ranks, got 3"):
        clamp_ranks((8, 8, 9), (2, 2, 2))


@pytest.mark.parametrize("tolerance", [0.05, 0.2, 0.5])
def test_tolerance_met_by_every_token(tolerance):
    gen = torch.Generator().manual_seed(3)
    # Mix compressible and random rows so that rank signatures differ between tokens.
    table = torch.cat([random_tt_table(100, (4, 5, 6), (1, 2), seed=4), torch.randn(100, 120, generator=gen)])
    table[7] = 0.0  # a zero row must not break the budget arithmetic
    groups = tt_svd_tolerance(table, (4, 5, 6), tolerance, chunk_size=64)
    covered = torch.cat([ids for ids, _ in groups.values()])
    assert torch.equal(torch.sort(covered).values, torch.arange(200))
    assert len(groups) > 1
    for signature, (ids, cores) in groups.items():
        assert cores.ranks == (1, *signature, 1)
        rows = reconstruct(cores, torch.arange(len(ids)))
        exact = table[ids]
        err = (rows - exact).norm(dim=1)
        assert bool((err <= tolerance * exact.norm(dim=1) + 1e-6).all()), (signature, err.max())
    # the compressible rows need small ranks
    low = [sig for sig, (ids, _) in groups.items() if bool((ids < 100).any())]
    assert max(r for sig in low for r in sig) <= 2


def test_ttcores_validation_messages():
    with pytest.raises(TensorShapeError, match="core 1 has left rank 3, expected 2"):
        TTCores((torch.zeros(5, 1, 4, 2), torch.zeros(5, 3, 4, 1)))
    with pytest.raises(TensorShapeError, match="last core must have right rank 1"):
        TTCores((torch.zeros(5, 1, 4, 2),))


def naive_tt_svd_row(x: torch.Tensor, shape: tuple[int, ...], ranks: tuple[int, ...]) -> torch.Tensor:
    """Textbook sequential TT-SVD of one vector, rebuilt: the reference for the batched code."""
    left, rest, previous = torch.ones(1, 1, dtype=torch.float64), x.double().reshape(1, -1), 1
    for k, r in enumerate(ranks):
        u, s, vh = torch.linalg.svd(rest.reshape(previous * shape[k], -1), full_matrices=False)
        left = (left @ u[:, :r].reshape(previous, -1)).reshape(-1, r)
        rest, previous = s[:r, None] * vh[:r], r
    return (left @ rest).reshape(-1).float()


@pytest.mark.parametrize(
    "shape, ranks",
    # (4, 4, 2, 4) at 4x4x2 has a tall middle unfolding followed by a truncation
    [((4, 4, 4, 2), (4, 3, 2)), ((4, 4, 2, 4), (4, 4, 2)), ((8, 8, 9), (4, 6)), ((2, 3, 4, 5), (2, 5, 3))],
)
def test_matches_textbook_tt_svd_per_token(shape, ranks):
    table = torch.randn(40, int(torch.tensor(shape).prod()), generator=torch.Generator().manual_seed(6))
    expected = torch.stack([naive_tt_svd_row(row, shape, ranks) for row in table])
    rebuilt = reconstruct(tt_svd(table, shape, ranks, chunk_size=16), torch.arange(40))
    assert torch.allclose(rebuilt, expected, atol=1e-4)

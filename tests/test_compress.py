from __future__ import annotations

import pytest
import torch

from tensorslm.rank_store.compress import compress_table, ranks_for_ratio, valid_rank_lists
from tensorslm.rank_store.errors import RungSpecError
from tensorslm.rank_store.rung import reconstruct_rows
from tensorslm.rank_store.rung_spec import parse_rung_specs
from tensorslm.rank_store.tt import num_params
from tests.test_tt import random_tt_table


def test_names_order_and_exact_max():
    table = random_tt_table(120, (4, 5, 6), (2, 3))
    rungs = compress_table(table, parse_rung_specs("2x3,max,1x1", None, "0.2"), shape=(4, 5, 6), progress=False)
    assert list(rungs) == ["tt-2x3", "tt-max", "tt-1x1", "eps-0.2"]
    ids = torch.arange(120)
    for name in ("tt-2x3", "tt-max"):
        rows = reconstruct_rows(rungs[name], ids)
        assert float((rows - table).norm() / table.norm()) < 1e-5
    assert rungs["tt-max"].ranks == (4, 6)
    assert rungs["tt-2x3"].nbytes == 120 * num_params((4, 5, 6), (2, 3)) * 4


def test_default_shape_is_balanced():
    rungs = compress_table(torch.randn(10, 576), parse_rung_specs("2x2"), progress=False)
    assert rungs["tt-2x2"].shape == (8, 8, 9)


@pytest.mark.parametrize("ratio", [1.0, 1.25, 2.0, 4.0])
def test_ratio_mode_meets_ratio_with_largest_ranks(ratio):
    shape = (8, 8, 9)
    rung = compress_table(torch.randn(64, 576), parse_rung_specs(None, str(ratio)), progress=False)[f"ratio-{ratio:g}"]
    assert rung.ratio >= ratio
    # no valid rank list with more parameters also meets the ratio
    chosen = num_params(shape, rung.ranks)
    assert all(num_params(shape, r) <= chosen for r in valid_rank_lists(shape) if 576 / num_params(shape, r) >= ratio)


def test_ratio_out_of_reach():
    with pytest.raises(RungSpecError, match=r"ratio 50 cannot be reached.*all ranks 1\) gives 23.04x"):
        ranks_for_ratio((8, 8, 9), 50)


def test_rank_count_must_match_shape():
    with pytest.raises(RungSpecError, match=r"rung tt-2x2x2: shape 8x8x9 needs 2 ranks"):
        compress_table(torch.randn(4, 576), parse_rung_specs("2x2x2"), progress=False)


def test_tolerance_rung_groups_and_meets_eps():
    gen = torch.Generator().manual_seed(5)
    table = torch.cat([random_tt_table(50, (4, 5, 6), (1, 1)), torch.randn(50, 120, generator=gen)])
    rung = compress_table(table, parse_rung_specs(None, None, "0.25"), shape=(4, 5, 6), progress=False)["eps-0.25"]
    assert len(rung.groups) > 1 and rung.group_of is not None
    rows = reconstruct_rows(rung, torch.arange(100))
    err = (rows - table).norm(dim=1) / table.norm(dim=1)
    assert float(err.max()) <= 0.25 + 1e-6
    assert rung.meta["tolerance"] == "0.25"

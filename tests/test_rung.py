"""Rungs built by hand with every optional part, checked against a naive per-token reference."""
from __future__ import annotations

import pytest
import torch

from tensorslm.rank_store.core_quant import pack_codes, quantize_core, unpack_codes
from tensorslm.rank_store.errors import RungFormatError, TokenIndexError
from tensorslm.rank_store.rung import RankGroup, Rung, reconstruct_rows

SHAPE = (2, 3, 4)
V, D = 30, 24


def naive_tt_row(cores: list[torch.Tensor]) -> torch.Tensor:
    """One token's TT tensor by explicit index loops over the tensor entries, flattened."""
    n1, n2, n3 = (c.shape[1] for c in cores)
    out = torch.zeros(n1, n2, n3)
    for i in range(n1):
        for j in range(n2):
            for k in range(n3):
                out[i, j, k] = (cores[0][:, i, :] @ cores[1][:, j, :] @ cores[2][:, k, :]).squeeze()
    return out.reshape(-1)


def make_group(token_ids, ranks, dtype, gen):
    """A group of random cores; ranks () makes an order-1 group (whole rows), dtype "int4" packs."""
    shape = SHAPE if ranks else (D,)
    full = (1, *ranks, 1)
    cores = [torch.randn(len(token_ids), full[k], n, full[k + 1], generator=gen) for k, n in enumerate(shape)]
    if dtype in ("int4", "int6"):
        quantized = [quantize_core(c, dtype) for c in cores]
        return RankGroup(tuple(pack_codes(q, dtype, dim=2) for q, _ in quantized),
                         torch.tensor(token_ids, dtype=torch.int32), scales=tuple(s for _, s in quantized),
                         widths=shape, bits=int(dtype[3:]))
    if dtype == torch.int8:
        quantized = [quantize_core(c, "int8") for c in cores]
        return RankGroup(tuple(q for q, _ in quantized), torch.tensor(token_ids, dtype=torch.int32),
                         scales=tuple(s for _, s in quantized))
    return RankGroup(tuple(c.to(dtype) for c in cores), torch.tensor(token_ids, dtype=torch.int32))


def dequantized(group: RankGroup, row: int) -> list[torch.Tensor]:
    cores = []
    for k, core in enumerate(group.cores):
        c = core[row]
        c = unpack_codes(c, f"int{group.bits}", group.widths[k], dim=1).float() if group.widths is not None else c.float()
        if group.scales is not None:
            c = c * float(group.scales[k][row])
        cores.append(c)
    return cores


def naive_row(rung: Rung, token: int) -> torch.Tensor:
    for group in rung.groups:
        ids = group.token_ids.tolist() if group.token_ids is not None else list(range(rung.vocab_size))
        if token in ids:
            cores = dequantized(group, ids.index(token))
            tt = cores[0].reshape(-1) if len(cores) == 1 else naive_tt_row(cores)
    row = torch.zeros(D)
    if rung.perm is not None:
        for j, p in enumerate(rung.perm.tolist()):
            row[p] = tt[j]
    else:
        row = tt
    if rung.col_scale is not None:
        row = row * rung.col_scale
    if rung.offset is not None:
        row = row + rung.offset.float()
    if rung.basis is not None:
        row = row + sum(float(rung.coeffs[token, i]) * rung.basis[i].float() for i in range(rung.basis.shape[0]))
    if rung.sparse_idx is not None:
        for i, v in zip(rung.sparse_idx[token].tolist(), rung.sparse_val[token].tolist()):
            row[i] += v
    return row


def full_rung(dtypes=(torch.float32, torch.float16, torch.int8, "int6", "int4", "int6")) -> Rung:
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(V, generator=gen).tolist()
    parts = [order[:6], order[6:12], order[12:18], order[18:22], order[22:26], order[26:]]
    ranks = [(1, 2), (2, 3), (2, 4), (2, 2), (), ()]
    groups = [make_group(ids, r, dt, gen) for ids, r, dt in zip(parts, ranks, dtypes)]
    return Rung(
        SHAPE, V, tuple(groups),
        perm=torch.randperm(D, generator=gen),
        col_scale=torch.rand(D, generator=gen) + 0.5,
        offset=torch.randn(D, generator=gen),
        basis=torch.randn(3, D, generator=gen).half(),
        coeffs=torch.randn(V, 3, generator=gen),
        sparse_idx=torch.randint(0, D, (V, 4), generator=gen).to(torch.int16),
        sparse_val=torch.randn(V, 4, generator=gen).half(),
        meta={"spec": "hand"},
    )


def test_all_parts_match_naive_reference():
    rung = full_rung()
    ids = torch.tensor([[3, 0, 29], [3, 17, 11]])
    rows = reconstruct_rows(rung, ids)
    assert rows.shape == (6, D) and rows.dtype == torch.float32
    expected = torch.stack([naive_row(rung, t) for t in ids.reshape(-1).tolist()])
    assert torch.allclose(rows, expected, atol=1e-4)


@pytest.mark.parametrize("part", ["perm", "col_scale", "offset", "basis", "sparse"])
def test_each_part_alone(part):
    gen = torch.Generator().manual_seed(1)
    group = make_group(list(range(V)), (2, 2), torch.float32, gen)
    base = dict(groups=(RankGroup(group.cores),))
    extra = {
        "perm": dict(perm=torch.randperm(D, generator=gen)),
        "col_scale": dict(col_scale=torch.rand(D, generator=gen) + 0.5),
        "offset": dict(offset=torch.randn(D, generator=gen)),
        "basis": dict(basis=torch.randn(2, D, generator=gen), coeffs=torch.randn(V, 2, generator=gen).half()),
        "sparse": dict(sparse_idx=torch.randint(0, D, (V, 2), generator=gen).to(torch.int16),
                       sparse_val=torch.randn(V, 2, generator=gen).half()),
    }[part]
    rung = Rung(SHAPE, V, **base, **extra)
    plain = Rung(SHAPE, V, **base)
    ids = torch.arange(V)
    rows = reconstruct_rows(rung, ids)
    assert torch.allclose(rows, torch.stack([naive_row(rung, t) for t in range(V)]), atol=1e-4)
    assert not torch.allclose(rows, reconstruct_rows(plain, ids))  # the part changes the result


def test_int8_cores_close_to_float():
    gen = torch.Generator().manual_seed(2)
    core = torch.randn(50, 2, 3, 4, generator=gen)
    q, scale = quantize_core(core, "int8")
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (50,)
    back = q.float() * scale.float()[:, None, None, None]
    assert float((back - core).abs().max() / core.abs().max()) < 1 / 127 + 1e-3


def test_nbytes_counts_every_tensor():
    rung = full_rung()
    expected = 0
    for g in rung.groups:
        expected += sum(c.numel() * c.element_size() for c in g.cores)
        expected += sum(s.numel() * 2 for s in (g.scales or ()))
    expected += V  # group_of uint8: token ids and rows within groups are derived from it
    expected += D * 8 + D * 4 + D * 4 + 3 * D * 2 + V * 3 * 4 + V * 4 * 2 + V * 4 * 2  # perm, col_scale, offset,
    # basis, coeffs, sparse
    assert rung.nbytes == expected
    assert rung.ratio == pytest.approx(V * D * 4 / expected)
    assert rung.dtype == "mixed" and rung.ranks is None


def test_tensors_round_trip():
    rung = full_rung()
    again = Rung.from_tensors(rung.tensors(), rung.metadata())
    assert again.meta == {"spec": "hand"}
    assert torch.equal(reconstruct_rows(again, torch.arange(V)), reconstruct_rows(rung, torch.arange(V)))


def test_dense_rung_is_exact():
    weight = torch.randn(V, D)
    rung = Rung.dense(weight)
    assert rung.is_dense and rung.nbytes == V * D * 4 and rung.ratio == 1.0
    assert torch.equal(reconstruct_rows(rung, torch.tensor([5, 1])), weight[[5, 1]])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(perm=torch.zeros(D, dtype=torch.int64)), "perm must be a permutation"),
        (dict(offset=torch.zeros(D + 1)), r"offset must be float32/float16 of shape \(24,\)"),
        (dict(basis=torch.zeros(2, D)), "basis and coeffs come together"),
        (dict(sparse_idx=torch.zeros(V, 2, dtype=torch.int16), sparse_val=torch.zeros(V, 2)),
         "sparse_val must be float16"),
        (dict(sparse_idx=torch.full((V, 1), D, dtype=torch.int16), sparse_val=torch.zeros(V, 1).half()),
         r"sparse_idx must lie in 0..23"),
    ],
)
def test_validation_messages(kwargs, message):
    group = RankGroup((torch.zeros(V, 1, 2, 1), torch.zeros(V, 1, 3, 1), torch.zeros(V, 1, 4, 1)))
    with pytest.raises(RungFormatError, match=message):
        Rung(SHAPE, V, (group,), **kwargs)


def test_groups_must_cover_vocabulary():
    gen = torch.Generator().manual_seed(3)
    groups = (make_group([0, 1], (1, 1), torch.float32, gen), make_group([1, 2], (1, 1), torch.float32, gen))
    with pytest.raises(RungFormatError, match="cover each of the 3 tokens exactly once"):
        Rung(SHAPE, 3, groups)


def test_int8_needs_scales():
    with pytest.raises(RungFormatError, match="int8/int6/int4 cores need one float16 scale vector per core"):
        RankGroup((torch.zeros(4, 1, 2, 1, dtype=torch.int8),))


def test_int4_cores_are_packed_two_per_byte():
    gen = torch.Generator().manual_seed(4)
    group = make_group(list(range(V)), (2, 3), "int4", gen)
    assert [c.shape[2] for c in group.cores] == [1, 2, 2] and group.shape == SHAPE  # ceil(n / 2)
    assert group.cores[0].dtype == torch.uint8
    rung = Rung(SHAPE, V, (RankGroup(group.cores, scales=group.scales, widths=SHAPE),))
    assert rung.dtype == "int4" and rung.num_params == V * (2 * 2 + 2 * 3 * 3 + 3 * 4)
    again = Rung.from_tensors(rung.tensors(), rung.metadata())
    assert torch.equal(reconstruct_rows(again, torch.arange(V)), reconstruct_rows(rung, torch.arange(V)))
    with pytest.raises(RungFormatError, match="int4 cores need their unpacked widths"):
        RankGroup(group.cores, scales=group.scales)
    with pytest.raises(RungFormatError, match=r"packs n_3 = 5 codes into 3 bytes, got 2"):
        RankGroup(group.cores, scales=group.scales, widths=(2, 3, 5))


def test_groups_are_stored_in_ascending_id_order_behind_a_one_byte_map():
    rung = full_rung()
    assert rung.group_of.dtype == torch.uint8 and "group0.token_ids" not in rung.tensors()
    for group in rung.groups:
        assert torch.equal(group.token_ids, torch.sort(group.token_ids).values)
    again = Rung.from_tensors(rung.tensors(), rung.metadata())
    assert [torch.equal(a.token_ids, b.token_ids) for a, b in zip(rung.groups, again.groups)] == [True] * 6
    tensors = rung.tensors()
    tensors["group_of"] = torch.full((V,), 7, dtype=torch.uint8)
    with pytest.raises(RungFormatError, match="group_of names a group beyond the 6 stored"):
        Rung.from_tensors(tensors, rung.metadata())


def test_row_groups_must_span_the_whole_vector():
    gen = torch.Generator().manual_seed(5)
    bad = RankGroup((torch.randn(V, 1, D - 1, 1, generator=gen),))
    with pytest.raises(RungFormatError, match=r"has tensor shape \(23,\), the rung has \(2, 3, 4\)"):
        Rung(SHAPE, V, (bad,))


def test_out_of_range_ids():
    rung = Rung.dense(torch.zeros(V, D))
    with pytest.raises(TokenIndexError, match="token id 30 is outside the vocabulary 0..29"):
        reconstruct_rows(rung, torch.tensor([1, 30]))


def test_a_rung_in_the_old_group_format_asks_for_a_rebuild():
    rung = full_rung()
    tensors = rung.tensors()
    tensors["group0.token_ids"] = rung.groups[0].token_ids  # what the format stored before the group map
    tensors["row_in_group"] = torch.zeros(V, dtype=torch.int32)
    with pytest.raises(RungFormatError, match="rebuild the store with `tensorslm compress`"):
        Rung.from_tensors(tensors, rung.metadata())

"""Quantization baselines: errors within their bounds, bytes exact, packing lossless."""
from __future__ import annotations

import pytest
import torch

from tensorslm.rank_store.errors import EvaluationError, RankStoreError
from tensorslm.rank_store.quantize import BASELINES, quantize


def table(vocab: int = 300, dim: int = 37, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=generator)
    weight[5] = 0.0  # an all-zero row must not divide by zero
    weight[7] *= 1e3  # rows of very different magnitude get their own scale
    return weight


@pytest.mark.parametrize("name, qmax", [("int8", 127), ("int4", 7)])
def test_per_row_error_within_half_a_step(name, qmax):
    weight = table()
    q = quantize(weight, name)
    approx = q.dequantize()
    step = q.scales.float().unsqueeze(1)  # (V, 1): the stored fp16 scale
    # Rounding error is half a step; fp16 rounding of the scale may push the row maximum one
    # part in 2**11 past qmax, which the clamp turns into at most that much more error.
    bound = step / 2 + weight.abs().amax(dim=1, keepdim=True) * 2.0 ** -10
    assert torch.all((approx - weight).abs() <= bound)
    assert torch.equal(approx[5], torch.zeros(weight.shape[1]))
    # the step is what the row's maximum asks for, so a finer grid would not fit (the all-zero
    # row's step is never used: its codes are all 0)
    expected = weight.abs().amax(dim=1) / qmax
    nonzero = expected > 0
    assert torch.allclose(q.scales.float()[nonzero], expected[nonzero], rtol=2.0 ** -10)


def test_int8_is_much_finer_than_int4():
    weight = table()
    err8 = (quantize(weight, "int8").dequantize() - weight).norm() / weight.norm()
    err4 = (quantize(weight, "int4").dequantize() - weight).norm() / weight.norm()
    assert err8 < err4 / 10


def test_fp16_error_is_half_precision():
    weight = table()
    approx = quantize(weight, "fp16").dequantize()
    assert torch.all((approx - weight).abs() <= weight.abs() * 2.0 ** -11)


@pytest.mark.parametrize("dim", [36, 37])
def test_bytes_are_exact(dim):
    vocab = 300
    weight = table(vocab, dim)
    assert quantize(weight, "fp32").nbytes == vocab * dim * 4
    assert quantize(weight, "fp16").nbytes == vocab * dim * 2
    assert quantize(weight, "int8").nbytes == vocab * dim + vocab * 2
    int4 = quantize(weight, "int4")
    assert int4.nbytes == vocab * ((dim + 1) // 2) + vocab * 2  # two codes per byte, fp16 scales
    assert int4.codes.dtype == torch.uint8 and int4.codes.shape == (vocab, (dim + 1) // 2)


def test_int4_packing_round_trips_every_code():
    codes = torch.arange(-7, 8, dtype=torch.float32).repeat(4, 1)  # (4, 15): every int4 code
    q = quantize(codes, "int4")  # row maximum 7 -> scale 1, codes are the values themselves
    assert torch.equal(q.dequantize(), codes)


def test_lookup_matches_dequantized_rows():
    weight = table()
    ids = torch.tensor([[3, 7, 5], [299, 0, 7]])
    for name in BASELINES:
        q = quantize(weight, name)
        assert torch.equal(q.lookup(ids), q.dequantize()[ids])


@pytest.mark.parametrize("bad, message", [
    ("int2", "unknown baseline 'int2'; valid baselines: fp32, fp16, int8, int4"),
])
def test_unknown_baseline(bad, message):
    with pytest.raises(EvaluationError, match=message):
        quantize(table(), bad)


def test_rejects_non_tables():
    with pytest.raises(RankStoreError, match=r"expected a floating-point \(V, d\) embedding table, got Tensor \(3,\)"):
        quantize(torch.ones(3), "int8")
    with pytest.raises(ValueError):
        quantize(torch.ones(3, 4, dtype=torch.long), "int4")

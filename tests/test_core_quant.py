"""Quantised cores: within half a step of the stored scale, honest bytes, expected TT error."""
import pytest
import torch

from tensorslm.rank_store.core_quant import (CoreQuantError, pack_codes, pack_int4, packed_length, quantize_core,
                                             unpack_codes, unpack_int4)
from tensorslm.rank_store.rung import RankGroup, Rung, reconstruct_rows
from tensorslm.rank_store.tt import tt_svd


def dequantize_core(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The reference dequantisation q * scale, the scale broadcast per token (V,) or per slice (V, n)."""
    if scale is None:
        return q.float()
    return q.float() * (scale.float()[:, None, None, None] if scale.dim() == 1 else scale.float()[:, None, :, None])


@pytest.mark.parametrize("dtype, per", [("int8", "core"), ("int8", "slice"), ("int4", "core"), ("int4", "slice")])
def test_entrywise_error_within_half_step(dtype: str, per: str) -> None:
    g = torch.Generator().manual_seed(0)
    core = torch.randn(40, 3, 5, 4, generator=g)
    q, scale = quantize_core(core, dtype, per)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    assert scale.shape == ((40,) if per == "core" else (40, 5))
    step = scale.float()[:, None, None, None] if per == "core" else scale.float()[:, None, :, None]
    err = (dequantize_core(q, scale) - core).abs()
    assert bool((err <= step / 2 + 1e-6).all())
    assert int(q.abs().max()) <= (127 if dtype == "int8" else 7)


def test_tt_of_int8_cores_close_to_exact() -> None:
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(64, 24, generator=g)
    cores = tt_svd(rows, (2, 3, 4))  # exact
    rebuilt = {}
    for dtype in ("fp16", "int8", "int4"):
        rung = Rung(cores.shape, cores.vocab_size, (RankGroup.quantize(cores.cores, dtype),))
        rebuilt[dtype] = reconstruct_rows(rung, torch.arange(64))
    rel = {k: float((v - rows).norm() / rows.norm()) for k, v in rebuilt.items()}
    assert rel["fp16"] < 1e-3 < rel["int8"] < 0.03 < rel["int4"] < 0.4


def test_bytes_are_packed_for_int4() -> None:
    cores = [torch.randn(10, 1, 3, 2), torch.randn(10, 2, 3, 1)]  # 12 entries a token
    scales = 2 * 10 * 2  # one fp16 scale per token per core
    assert RankGroup.quantize(cores, "int4").nbytes == 10 * (1 * 2 * 2 + 2 * 2 * 1) + scales  # 3 codes: 2 bytes
    assert RankGroup.quantize(cores, "int8").nbytes == 10 * 12 + scales
    fp16 = RankGroup.quantize(cores, "fp16")
    assert fp16.scales is None and fp16.nbytes == 10 * 12 * 2


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "int3"}, "core dtype must be one of"),
    ({"per": "row"}, "per must be 'core' or 'slice'"),
])
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(CoreQuantError, match=message):
        quantize_core(torch.zeros(2, 1, 3, 1), **kwargs)


@pytest.mark.parametrize("length", [1, 2, 5, 8])
def test_int4_pack_round_trip_along_any_dim(length: int) -> None:
    codes = torch.randint(-8, 8, (3, 2, length, 4), dtype=torch.int8)
    packed = pack_int4(codes, dim=2)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, (length + 1) // 2, 4)
    assert torch.equal(unpack_int4(packed, length, dim=2), codes)


@pytest.mark.parametrize("length", [1, 3, 4, 9, 10, 576])
def test_int6_pack_round_trip_four_codes_in_three_bytes(length: int) -> None:
    codes = torch.randint(-32, 32, (3, 2, length, 4), dtype=torch.int8)
    packed = pack_codes(codes, "int6", dim=2)
    assert packed.dtype == torch.uint8 and packed.shape[2] == packed_length(length, "int6") == 3 * ((length + 3) // 4)
    assert torch.equal(unpack_codes(packed, "int6", length, dim=2), codes)


def test_int6_sits_between_int8_and_int4() -> None:
    g = torch.Generator().manual_seed(1)
    core = torch.randn(200, 2, 8, 3, generator=g)
    err = {dt: float((dequantize_core(*quantize_core(core, dt)) - core).norm() / core.norm())
           for dt in ("int8", "int6", "int4")}
    assert err["int8"] < err["int6"] < err["int4"]
    cores = [core[:, :1, :, :2], core[:, :2, :, :1]]  # a chain (1, 8, 2), (2, 8, 1)
    assert RankGroup.quantize(cores, "int6").nbytes == 200 * (2 * 6 + 2 * 6) + 2 * 200 * 2  # 8 codes of 6 bits: 6 bytes

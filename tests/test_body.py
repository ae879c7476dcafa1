"""int4 bodies with a zero point per group: the kernels compute codes * scale + zero, skewed
groups lose less than with symmetric ones, a weight already on a 4-bit grid comes back exactly,
and the store keeps the zeros under the body's hash (bodies without zeros still load)."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from tensorslm.rank_store import kernels as K
from tensorslm.rank_store.body import (LINEARS, BodyFormatError, body_for, default_int8_linears,
                                       load_body, quantize_body, store_body)
from tensorslm.rank_store.engine import Engine
from tensorslm.rank_store.kernels import Precision

from .test_engine import IDS, _store, assert_refused_after_a_bit_flip, tiny_gemma3, tiny_llama

#: kernels that take zero points and run on this machine (the tinygemm kernel with fp32
#: activations runs on x86 too when forced)
ZERO_POINT_KERNELS = [k.name for k in K.REGISTRY[Precision.INT4]
                      if k.zero_points and (k.requires(K.cpu_features()) or k.name == "int4pack-fp32")]


def _skewed(n: int = 64, k: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(n, k, generator=generator).abs() ** 1.5 + 0.1  # every group one-sided


def _rounded(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


@pytest.mark.parametrize("name", ZERO_POINT_KERNELS)
def test_asymmetric_kernels_compute_codes_times_scale_plus_zero(name):
    codes, scales, zeros = K.quantize_int4_groups_asymmetric(_skewed(), 32)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(4))
    with K.force_kernel(name):
        linear = K.pack_int4_groups(codes, scales, 32, zeros=zeros)
    assert linear.kernel == name
    if name == "int4-dequant":   # fp32 throughout: exact
        expected = x @ K.dequantize_int4_groups(codes, scales, zeros).t()
        assert torch.allclose(linear(x), expected, rtol=1e-5, atol=1e-5)
    else:   # the tinygemm kernels keep scale and zero in bf16 (and bf16 activations)
        expected = x @ K.dequantize_int4_groups(codes, _rounded(scales), _rounded(zeros)).t()
        err = float((linear(x) - expected).norm() / expected.norm())
        assert err < 5e-3, err
        no_zeros = K.pack_int4_groups(codes, scales, 32)   # the zeros are what make it right
        assert float((no_zeros(x) - expected).norm() / expected.norm()) > 0.5


def test_asymmetric_groups_lose_less_on_a_skewed_weight():
    weight = _skewed()
    sym = K.dequantize_int4_groups(*K.quantize_int4_groups(weight, 32))
    asym = K.dequantize_int4_groups(*K.quantize_int4_groups_asymmetric(weight, 32))
    sym_err = float((sym - weight).norm() / weight.norm())
    asym_err = float((asym - weight).norm() / weight.norm())
    assert asym_err < 0.6 * sym_err, (asym_err, sym_err)


@pytest.mark.parametrize("bottom, top", [(0, 15), (1, 15), (0, 14), (1, 14)])
def test_a_weight_on_a_four_bit_grid_comes_back_exactly(bottom, top):
    generator = torch.Generator().manual_seed(5)
    n, k, g = 32, 128, 32
    levels = torch.randint(bottom, top + 1, (n, k), generator=generator).float()
    levels[:, ::g], levels[:, 1::g] = bottom, top   # the levels each group uses, at most 16
    step = torch.rand(n, k // g, generator=generator) * 0.01 + 0.001
    low = torch.randn(n, k // g, generator=generator) * 0.02
    weight = (levels.reshape(n, k // g, g) * step[:, :, None] + low[:, :, None]).reshape(n, k)
    codes, scales, zeros = K.quantize_int4_groups_asymmetric(weight, g)
    assert torch.equal(codes, (levels - bottom - 8).to(torch.int8))
    assert torch.allclose(K.dequantize_int4_groups(codes, scales, zeros), weight, atol=1e-6)
    sym = K.dequantize_int4_groups(*K.quantize_int4_groups(weight, g))
    assert float((sym - weight).norm() / weight.norm()) > 0.01


def test_zero_points_choose_a_kernel_that_takes_them():
    pi5 = K.CpuFeatures(arch="aarch64", capability="DEFAULT", bf16=False, neon=True, kleidiai=True)
    assert K.select_kernel("int4", pi5).name == "int4-dynquant"
    assert K.select_kernel("int4", pi5, zero_points=True).name == "int4pack-fp32"
    codes, scales, zeros = K.quantize_int4_groups_asymmetric(_skewed(), 32)
    with K.force_kernel("int4-dynquant"), pytest.raises(
            K.KernelError, match="int4-dynquant takes no zero points; asymmetric int4 runs on "
                                 "int4pack-bf16, int4pack-fp32, int4-dequant"):
        K.pack_int4_groups(codes, scales, 32, zeros=zeros)
    with pytest.raises(K.KernelError, match=r"expected zeros of shape \(64, 4\) for codes "
                                            r"\(64, 128\), got \(64, 2\)"):
        K.pack_int4_groups(codes, scales, 32, zeros=zeros[:, :2])
    with pytest.raises(K.KernelError, match="zero points apply to int4 groups; got precision int8"):
        K.pack_linear(_skewed(), "int8", zero_points=True)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_store_round_trip_keeps_the_zeros(tmp_path, make):
    model = make()
    store = _store(tmp_path, model)
    store_body(store, model, "int4")
    assert store.manifest["bodies"]["int4"]["meta"]["zero_points"] == "true"
    tensors = quantize_body(model, "int4")
    assert {key.rsplit(".", 1)[1] for key in tensors} == {"codes", "scales", "zeros"}
    loaded = Engine(model, load_body(store, model, "int4"), Precision.INT4).score(IDS)
    fresh = Engine(model, body_for(model, "int4"), Precision.INT4).score(IDS)
    assert torch.equal(loaded, fresh)
    symmetric = Engine(model, body_for(model, "int4", zero_points=False), Precision.INT4).score(IDS)
    assert not torch.allclose(loaded, symmetric, atol=1e-3)   # the zeros are in use


def _tensor_bytes(file, name: str) -> tuple[int, int]:
    """(start, stop) file offsets of tensor ``name`` in a safetensors file."""
    data = file.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    start, stop = json.loads(data[8 : 8 + size])[name]["data_offsets"]
    return 8 + size + start, 8 + size + stop


def test_store_refuses_a_body_whose_zeros_changed(tmp_path):
    model = tiny_llama()
    store = _store(tmp_path, model)
    store_body(store, model, "int4")
    start, _ = _tensor_bytes(store.path / "body-int4.safetensors", "layers.1.down.zeros")
    assert_refused_after_a_bit_flip(store, model, "int4", start + 1)   # one bit of one zero point


def test_a_body_without_zeros_loads_symmetric_and_one_missing_them_is_refused(tmp_path):
    model = tiny_llama()
    store = _store(tmp_path, model)
    store_body(store, model, "int4", zero_points=False)
    meta = store.manifest["bodies"]["int4"]["meta"]
    assert meta["zero_points"] == "false"
    got = Engine(model, load_body(store, model, "int4"), Precision.INT4).score(IDS)
    expected = Engine(model, body_for(model, "int4", zero_points=False), Precision.INT4).score(IDS)
    assert torch.equal(got, expected)
    tensors = quantize_body(model, "int4")
    del tensors["layers.0.o.zeros"]
    store.add_body("int4", tensors, {**meta, "zero_points": "true"})
    with pytest.raises(BodyFormatError, match="meta says zero_points true but it has no "
                                              "layers.0.o.zeros"):
        load_body(store, model, "int4")


def test_an_int4_body_keeps_the_linears_it_is_told_at_int8(tmp_path):
    model = tiny_llama()
    tensors = quantize_body(model, "int4", int8_linears=("down",))
    assert tensors["layers.0.down.scales"].shape == (64,) and "layers.0.down.zeros" not in tensors
    assert tensors["layers.0.o.scales"].shape == (64, 2) and "layers.0.o.zeros" in tensors
    store = _store(tmp_path, model)
    store_body(store, model, "int4", int8_linears=("down",))
    assert store.manifest["bodies"]["int4"]["meta"]["int8_linears"] == "down"
    body = load_body(store, model, "int4")
    assert body["layers.1.down"].precision is Precision.INT8
    assert body["layers.1.gate_up"].precision is Precision.INT4
    loaded = Engine(model, body, Precision.INT4).score(IDS)
    fresh = Engine(model, body_for(model, "int4", int8_linears=("down",)), Precision.INT4).score(IDS)
    assert torch.equal(loaded, fresh)
    ref = Engine.from_model(model, "fp32").score(IDS)
    all_int4 = Engine(model, body_for(model, "int4"), Precision.INT4).score(IDS)
    assert (loaded - ref).norm() < (all_int4 - ref).norm()


@pytest.mark.parametrize("precision, linears, message", [
    ("int4", ("mlp",), "int8_linears must name fused linears among qkv, o, gate_up, down; got mlp"),
    ("int8", ("down",), "int8_linears apply to int4 bodies; got precision int8"),
])
def test_int8_linears_are_checked(precision, linears, message):
    with pytest.raises(BodyFormatError, match=message):
        quantize_body(tiny_llama(), precision, int8_linears=linears)


def _int8_rows(tensors: dict[str, torch.Tensor]) -> set[str]:
    """The fused linears (of layer 0) an int4 body holds as int8 rows."""
    return {key.split(".")[2] for key, t in tensors.items()
            if key.startswith("layers.0.") and key.endswith(".scales") and t.dim() == 1}


@pytest.mark.parametrize("make, kept", [(tiny_gemma3, "qkv,gate_up"), (tiny_llama, "")])
def test_an_int4_body_keeps_the_family_default_at_int8(tmp_path, make, kept):
    model = make()
    assert _int8_rows(quantize_body(model, "int4")) == set(kept.split(",")) - {""}
    store = _store(tmp_path, model)
    store_body(store, model, "int4")
    assert store.manifest["bodies"]["int4"]["meta"]["int8_linears"] == kept
    engine = Engine.from_model(model, "int4")   # quantized on the fly: the same default
    assert {lin for lin in LINEARS if engine.body[f"layers.1.{lin}"].precision is
            Precision.INT8} == set(kept.split(",")) - {""}
    loaded = Engine(model, load_body(store, model, "int4"), Precision.INT4).score(IDS)
    assert torch.equal(loaded, engine.score(IDS))


def test_the_int4_default_is_overridden_by_an_explicit_choice(tmp_path):
    model = tiny_gemma3()
    assert _int8_rows(quantize_body(model, "int4", int8_linears=())) == set()   # all int4
    assert _int8_rows(quantize_body(model, "int4", int8_linears=("down",))) == {"down"}
    store = _store(tmp_path, model)
    store_body(store, model, "int4", int8_linears=())
    assert store.manifest["bodies"]["int4"]["meta"]["int8_linears"] == ""
    ref = Engine.from_model(model, "fp32").score(IDS)
    default = Engine.from_model(model, "int4").score(IDS)
    all_int4 = Engine(model, load_body(store, model, "int4"), Precision.INT4).score(IDS)
    assert (default - ref).norm() < (all_int4 - ref).norm()
    assert _int8_rows(quantize_body(model, "int8")) == set(LINEARS)   # other precisions: no mix


def test_default_int8_linears_name_the_family_or_refuse_the_model_type():
    assert default_int8_linears("gemma3_text") == "qkv,gate_up"
    assert default_int8_linears("llama") == ""
    with pytest.raises(BodyFormatError, match="the engine runs model types llama, gemma3_text, "
                                              "gemma3; got 'gpt2'"):
        default_int8_linears("gpt2")

"""The w8a8 body: each token's input quantised to 8 bits at run time and multiplied by int8
codes, SmoothQuant input scales computed from calibration text and kept in the store, and
``down`` left at bf16 activations."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from tensorslm.rank_store import kernels as K
from tensorslm.rank_store.body import (W8A8_LINEARS, body_for, load_body, quantize_body,
                                       store_body)
from tensorslm.rank_store.engine import Engine
from tensorslm.rank_store.head import int8_activation_rows
from tensorslm.rank_store.kernels import CpuFeatures, Precision
from tensorslm.rank_store.models import load_model
from tensorslm.rank_store.smoothing import (SmoothingError, channel_maxima, input_scales,
                                            self_calibration)

from .test_engine import IDS, _store, tiny_gemma3, tiny_llama

#: the kernels with int8 activations this CPU runs (the w8a8 list also holds the int8 kernels
#: a CPU without an int8 x int8 engine falls back to)
W8A8_KERNELS = [k.name for k in K.REGISTRY[Precision.W8A8]
                if k.precision is Precision.W8A8 and k.requires(K.cpu_features())]
CALIBRATION = torch.tensor([[7, 21, 4, 90, 43, 11, 62, 1, 35, 73, 14, 52],
                            [3, 3, 80, 19, 27, 66, 8, 44, 58, 30, 2, 91]])


def _per_token(x: torch.Tensor) -> torch.Tensor:
    """Each row quantised to uint8 over [min(x, 0), max(x, 0)] and back (the dynamic step)."""
    lo, hi = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 255
    zero = torch.round(-lo / scale).clamp(0, 255)
    return (torch.round(x / scale + zero).clamp(0, 255) - zero) * scale


@pytest.mark.parametrize("name", W8A8_KERNELS)
@pytest.mark.parametrize("rows", [1, 4])
def test_each_token_is_quantised_on_its_own_then_multiplied_by_the_codes(name, rows):
    torch.manual_seed(0)
    weight, x = torch.randn(96, 256), torch.randn(rows, 256)
    x[-1] *= 50   # a loud token must not coarsen the others' steps
    with K.force_kernel(name):
        linear = K.pack_linear(weight, Precision.W8A8)
    codes, scales = K.quantize_int8_rows(weight)
    ref = _per_token(x) @ (codes.float() * scales[:, None]).T
    y = linear.matmul(x)
    assert linear.kernel == name
    assert float((y - ref).norm() / ref.norm()) < 1e-4
    assert float((y[0] - ref[0]).norm() / ref[0].norm()) < 1e-4


@pytest.mark.skipif("w8a8-dynamic" not in W8A8_KERNELS,
                    reason="no w8a8-dynamic kernel on this CPU (fbgemm with VNNI, or qnnpack)")
def test_a_prefill_in_one_int8_gemm_equals_its_tokens_one_at_a_time():
    torch.manual_seed(2)
    weight, x = torch.randn(200, 320) * 0.05, torch.randn(9, 320)
    x[1] *= 40             # a loud token
    x[2] = x[2].abs()      # a token with no negative entry: its grid starts at zero
    x[3] = -x[3].abs()     # and one with no positive entry
    x[4] = 0.0             # an all-zero token stays zero
    linear = K.pack_linear(weight, Precision.W8A8)
    assert linear.kernel == "w8a8-dynamic"
    batched = linear.matmul(x)
    one_by_one = torch.cat([linear.matmul(row) for row in x.split(1)])
    assert torch.equal(batched[4], torch.zeros(200))
    assert float((batched - one_by_one).abs().max() / one_by_one.abs().max()) < 1e-5


def test_input_scales_keep_an_outlier_channel_from_flattening_the_rest():
    torch.manual_seed(1)
    weight = torch.randn(128, 256) * 0.05
    x = torch.randn(64, 256)
    x[:, :3] *= 80   # the outlier channels every transformer layer has
    exact = x @ weight.T
    s = input_scales(x.abs().amax(0), weight)

    def error(scale: torch.Tensor) -> float:
        codes, row_scales = K.quantize_int8_rows(weight * scale)
        linear = K.pack_int8_rows(codes, row_scales, precision=Precision.W8A8,
                                  input_scale=1 / scale)
        return float((linear.matmul(x) - exact).norm() / exact.norm())

    assert error(s) < 0.5 * error(torch.ones(256))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_a_calibrated_body_keeps_its_scales_in_the_store_and_down_at_bf16_activations(
        tmp_path, make):
    model = make()
    store = _store(tmp_path, model)
    store_body(store, model, "w8a8", calibration=CALIBRATION)
    assert store.manifest["bodies"]["w8a8"]["meta"]["calibration"].startswith("smoothquant:24 ")
    tensors = quantize_body(model, "w8a8", calibration=CALIBRATION)
    assert {k.rsplit(".", 2)[1] for k in tensors if k.endswith(".smooth")} == set(W8A8_LINEARS)
    body = load_body(store, model, "w8a8")
    assert {body[f"layers.0.{lin}"].precision for lin in W8A8_LINEARS} == {Precision.W8A8}
    assert body["layers.0.down"].precision is Precision.INT8
    assert body["layers.0.qkv"].input_scale is not None
    assert body["layers.0.down"].input_scale is None
    got = Engine(model, body, Precision.W8A8).score(IDS)
    ref = Engine.from_model(model, "fp32").score(IDS)
    assert float((got - ref).norm() / ref.norm()) < 0.07
    assert Engine(model, body, Precision.W8A8).generate(IDS[0, :4].tolist(), 3)


def test_an_uncalibrated_body_has_no_scales_and_still_serves():
    model = tiny_llama()
    assert not [k for k in quantize_body(model, "w8a8") if k.endswith(".smooth")]
    body = body_for(model, "w8a8")
    assert body["layers.1.gate_up"].precision is Precision.W8A8
    assert body["layers.1.down"].precision is Precision.INT8


def test_the_model_writes_its_own_calibration_text_reproducibly():
    model = tiny_llama()
    ids = self_calibration(model, 5, sequences=3, length=20)
    assert ids.shape == (3, 20) and ids.dtype == torch.int64
    assert ids[:, 0].tolist() == [5, 5, 5]
    assert 0 <= int(ids.min()) and int(ids.max()) < model.config.vocab_size
    assert len({tuple(row) for row in ids.tolist()}) == 3   # sampled, not greedy
    assert torch.equal(ids, self_calibration(model, 5, sequences=3, length=20))
    assert not torch.equal(ids, self_calibration(model, 5, sequences=3, length=20, seed=1))
    scales = {n: t for n, t in quantize_body(model, "w8a8", calibration=ids).items()
              if n.endswith(".smooth")}
    assert scales and all(not torch.equal(s, torch.ones_like(s)) for s in scales.values())


def test_calibration_needs_the_whole_model_and_token_ids():
    model = tiny_llama()
    layer = model.model.layers[0].mlp.down_proj
    with pytest.raises(SmoothingError, match="integer token ids of shape"):
        channel_maxima(model, CALIBRATION.float())
    layer.weight = nn.Parameter(torch.empty_like(layer.weight, device="meta"))
    with pytest.raises(SmoothingError, match="skeleton load"):
        channel_maxima(model, CALIBRATION)
    with pytest.raises(SmoothingError, match="skeleton load"):
        self_calibration(model, 1)
    with pytest.raises(SmoothingError, match=r"alpha must lie in \[0, 1\], got 1.5"):
        input_scales(torch.ones(4), torch.ones(2, 4), alpha=1.5)


@pytest.mark.parametrize("engine,bf16,neon,expected", [
    ("fbgemm", True, False, "w8a8-dynamic"), ("qnnpack", False, True, "w8a8-dynamic"),
    (None, True, False, "int8-planes-bf16"), (None, False, True, "int8pack-fp32"),
    (None, False, False, "w8a8-dequant")])
def test_w8a8_runs_int8_x_int8_where_torch_has_an_engine_else_the_int8_kernels(engine, bf16, neon,
                                                                              expected):
    arch = "aarch64" if neon else "x86_64"
    cpu = CpuFeatures(arch, "DEFAULT", bf16=bf16, neon=neon, kleidiai=False, int8_engine=engine)
    assert K.select_kernel("w8a8", cpu).name == expected


def test_w8a8_codes_through_an_int8_kernel_keep_their_input_scale(monkeypatch):
    torch.manual_seed(3)
    weight, x = torch.randn(64, 128), torch.randn(3, 128)
    smooth = torch.rand(128) + 0.5
    codes, scales = K.quantize_int8_rows(weight * smooth)
    no_engine = dataclasses.replace(K.cpu_features(), int8_engine=None)
    monkeypatch.setattr(K, "cpu_features", lambda: no_engine)
    linear = K.pack_int8_rows(codes, scales, precision=Precision.W8A8, input_scale=1.0 / smooth)
    assert linear.kernel == K.select_kernel("w8a8", no_engine, shape=(64, 128)).name
    assert linear.precision is (Precision.INT8 if no_engine.bf16 or no_engine.neon
                                else Precision.W8A8)
    ref = (x / smooth) @ (codes.float() * scales[:, None]).T
    assert float((linear.matmul(x) - ref).norm() / ref.norm()) < 1e-2   # bf16 activations


@pytest.mark.skipif(not int8_activation_rows(),
                    reason="no w8a8-dynamic kernel on this CPU (fbgemm with VNNI, or qnnpack)")
def test_a_w8a8_agent_runs_its_tied_head_with_int8_activations(tmp_path):
    from tensorslm.agent.protocol import Request
    from tensorslm.agent.wiring import load_serving
    from tensorslm.rank_store.compress import compress_table
    from tensorslm.rank_store.rung_spec import parse_rung_specs
    from tensorslm.rank_store.store import RankStore, SourceInfo

    from .test_shell import _save

    path = _save(tmp_path, tiny_llama(), "m")
    whole = load_model(path)
    weight = whole.model.get_input_embeddings().weight.detach()
    store = RankStore.create(tmp_path / "store", SourceInfo("tiny"), weight,
                             compress_table(weight, parse_rung_specs(recipes="row+int8"),
                                            progress=False))
    request = Request(request_id="r", received_at=0.0, prompt="the small model runs on a pi")
    for precision, kernel in (("w8a8", "w8a8-dynamic"), ("int8", "int8-planes-bf16")):
        serving = load_serving(str(path), store.path, release_model_body=True,
                               precision=precision, rungs=["row_int8"])
        serving.embedding.set_rung("row_int8")
        head = serving.loaded.model.get_output_embeddings().prepared()
        assert [part.kernel for part in head.parts] == [kernel]
        assert serving.generator.generate(request, max_new_tokens=4).output_tokens == 4

"""The decode step as one TorchScript call: the same logits and tokens as the step run from
Python, for both families and every kernel with a TorchScript call; bodies with another kernel
decode from Python; the kernels it runs are counted as run."""
from __future__ import annotations

import pytest
import torch

from tensorslm.rank_store import decode_step, kernels
from tensorslm.rank_store.body import body_for, pack_body, quantize_body
from tensorslm.rank_store.engine import Engine
from tensorslm.rank_store.kernels import Precision

from .test_engine import IDS, MODELS
from .test_w8a8 import CALIBRATION

#: (precision, kernel, zero points) for every kernel of kernels.SCRIPTED_KERNELS
SCRIPTED = [("fp32", "fp32-matmul", False), ("bf16", "bf16-matmul", False),
            ("int8", "int8-planes-bf16", False), ("int8", "int8pack-bf16", False),
            ("int8", "int8pack-fp32", False), ("int4", "int4pack-bf16", True),
            ("int4", "int4pack-fp32", True), ("int4", "int4-dynquant", False),
            ("w8a8", "w8a8-dynamic", False)]


def _engine(model, precision: str, kernel: str, zero_points: bool = False, **kwargs) -> Engine:
    with kernels.force_kernel(kernel):
        body = body_for(model, precision, zero_points=zero_points, int8_linears=())
    return Engine(model, body, Precision.parse(precision), **kwargs)


def test_every_scripted_kernel_is_listed_once():
    assert sorted(k for _, k, _ in SCRIPTED) == sorted(kernels.SCRIPTED_KERNELS)
    assert set(kernels.SCRIPTED_KERNELS) <= set(kernels.kernel_names())


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("precision,kernel,zero_points", SCRIPTED)
def test_scripted_step_is_the_python_step(family, precision, kernel, zero_points):
    model = MODELS[family]()
    engine = _engine(model, precision, kernel, zero_points)
    assert engine.scripted and kernel in engine.kernels
    engine.prefill(IDS[0, :3].tolist())
    with torch.inference_mode():
        for pos in range(3, IDS.shape[1]):   # past the tiny Gemma's sliding window of 6
            x = engine.embed(IDS[:, pos])  # (1, d)
            scripted = engine._decode(x, pos)
            written = [(k[:, pos].clone(), v[:, pos].clone()) for k, v in engine._cache]
            python = engine._decode_python(x, pos)   # writes the same position again
            assert torch.equal(scripted, python), pos
            assert all(torch.equal(k, c[:, pos]) and torch.equal(v, cv[:, pos])
                       for (k, v), (c, cv) in zip(written, engine._cache)), pos


@pytest.mark.parametrize("family", MODELS)
def test_a_calibrated_w8a8_body_scripts_its_input_scales(family):
    model = MODELS[family]()
    tensors = quantize_body(model, "w8a8", calibration=CALIBRATION)
    body = pack_body(tensors, "w8a8", model.config.num_hidden_layers)
    assert body["layers.0.qkv"].input_scale is not None
    scripted = Engine(model, body, Precision.W8A8)
    python = Engine(model, body, Precision.W8A8, scripted=False)
    assert scripted.scripted
    prompt = IDS[0, :4].tolist()
    assert scripted.generate(prompt, 12) == python.generate(prompt, 12)


@pytest.mark.parametrize("family", MODELS)
def test_generation_is_the_same_scripted_or_not(family):
    model = MODELS[family]()
    scripted = Engine.from_model(model, "int8")
    python = Engine.from_model(model, "int8", scripted=False)
    assert scripted.scripted and not python.scripted
    prompt = IDS[0, :4].tolist()
    assert scripted.generate(prompt, 12) == python.generate(prompt, 12)
    scripted.release()   # the cache is rebuilt, and the script follows it
    assert scripted.generate(prompt, 12) == python.generate(prompt, 12)


def test_a_long_query_grows_the_cache_the_script_writes():
    model = MODELS["llama"]()
    scripted = Engine.from_model(model, "int8", max_positions=512)
    python = Engine.from_model(model, "int8", scripted=False, max_positions=512)
    prompt = IDS[0].tolist()
    # the first query leaves a cache of 256 positions; the second needs 262, so it grows
    scripted.generate(prompt[:2], 2)
    assert scripted.generate(prompt, 250) == python.generate(prompt, 250)


@pytest.mark.parametrize("precision,kernel", [("w8a8", "w8a8-dequant"), ("int8", "int8-dequant"),
                                              ("int4", "int4-dequant")])
def test_kernels_without_a_script_call_decode_from_python(precision, kernel):
    model = MODELS["llama"]()
    engine = _engine(model, precision, kernel)
    assert not engine.scripted
    assert engine.generate(IDS[0, :4].tolist(), 3) == \
        _engine(model, precision, kernel, scripted=False).generate(IDS[0, :4].tolist(), 3)


def test_the_scripted_kernels_count_as_run():
    kernels.reset_kernels_used()
    engine = _engine(MODELS["llama"](), "int8", "int8-planes-bf16")
    # before the first step nothing has run; then each of the 2 x 4 linears once
    assert kernels.kernels_used() == {}
    engine.generate(IDS[0, :4].tolist(), 2)
    assert kernels.kernels_used() == {"int8-planes-bf16": 8}


def test_an_engine_decodes_from_python_when_torchscript_fails(monkeypatch):
    monkeypatch.setattr(decode_step, "scripted", lambda: None)
    model = MODELS["gemma3"]()
    engine = Engine.from_model(model, "int8")
    assert not engine.scripted
    assert engine.generate(IDS[0, :4].tolist(), 5) == \
        Engine.from_model(model, "int8", scripted=False).generate(IDS[0, :4].tolist(), 5)

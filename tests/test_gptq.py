"""GPTQ int4: today's int4 format, a smaller layer output error than round-to-nearest on the
calibration inputs, the model left as it was, and the calibration named in the store."""
from __future__ import annotations

import pytest
import torch

from tensorslm.rank_store.body import (BodyFormatError, float_body, float_body_shapes, load_body,
                                       quantize_body, store_body)
from tensorslm.rank_store.engine import Engine
from tensorslm.rank_store.gptq import (CalibrationError, GPTQSettings, calibration_ids,
                                       calibration_label, gptq_int4, output_error)
from tensorslm.rank_store.kernels import (Precision, dequantize_int4_groups, quantize_int4_groups,
                                          quantize_int4_groups_asymmetric)

from .test_engine import IDS, _store, tiny_gemma3, tiny_llama


def _calibration(vocab: int = 96, sequences: int = 8, length: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (sequences, length), generator=generator)


def _correlated_inputs(tokens: int, k: int) -> torch.Tensor:
    """Inputs with a few strong, correlated directions, as real activations have."""
    generator = torch.Generator().manual_seed(2)
    mix = torch.randn(k, k, generator=generator) * torch.logspace(0, -2, k)[:, None]
    return torch.randn(tokens, k, generator=generator) @ mix  # (T, K)


@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_the_output_error(act_order, asymmetric):
    torch.manual_seed(0)
    weight = torch.randn(48, 128)
    x = _correlated_inputs(512, 128)
    hessian = x.t() @ x
    codes, scales, zeros = gptq_int4(weight, hessian,
                                     GPTQSettings(act_order=act_order, asymmetric=asymmetric))
    assert codes.dtype == torch.int8 and codes.shape == (48, 128)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert scales.dtype == torch.float32 and scales.shape == (48, 128 // 32)
    assert (zeros is not None) == asymmetric
    if asymmetric:
        assert zeros.dtype == torch.float32 and zeros.shape == scales.shape
    rtn = (quantize_int4_groups_asymmetric if asymmetric else quantize_int4_groups)(weight, 32)
    gptq = output_error(weight, dequantize_int4_groups(codes, scales, zeros), hessian)
    rtn = output_error(weight, dequantize_int4_groups(*rtn), hessian)
    assert gptq < 0.7 * rtn, (gptq, rtn)


def test_a_hessian_of_the_wrong_size_is_refused():
    with pytest.raises(CalibrationError, match=r"must be \(64, 64\); got \(32, 32\)"):
        gptq_int4(torch.randn(8, 64), torch.eye(32))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_calibrated_body_has_todays_format_and_leaves_the_model_as_it_was(make):
    model = make()
    before = {name: w.clone() for name, w in float_body(model)}
    tensors = quantize_body(model, "int4", calibration=_calibration())
    plain = quantize_body(model, "int4")
    assert tensors.keys() == plain.keys()
    for key, value in tensors.items():
        assert value.dtype == plain[key].dtype and value.shape == plain[key].shape, key
    for name, w in float_body(model):
        assert torch.equal(w, before[name]), name
    assert set(float_body_shapes(model)) == {key.rsplit(".", 1)[0] for key in tensors}


def test_calibrated_body_is_closer_to_fp32_on_the_calibration_text():
    model = tiny_llama()
    calibration = _calibration()
    ref = Engine.from_model(model, "fp32").score(calibration[:2].reshape(1, -1))

    def distance(tensors):
        from tensorslm.rank_store.body import pack_body

        body = pack_body(tensors, Precision.INT4, len(model.model.layers))
        got = Engine(model, body, Precision.INT4).score(calibration[:2].reshape(1, -1))
        return float((got - ref).norm() / ref.norm())

    calibrated = distance(quantize_body(model, "int4", calibration=calibration))
    plain = distance(quantize_body(model, "int4"))
    assert calibrated < plain, (calibrated, plain)


def test_store_keeps_the_calibration_in_the_body_meta(tmp_path):
    model = tiny_llama()
    store = _store(tmp_path, model)
    calibration = _calibration()
    store_body(store, model, "int4", calibration=calibration)
    meta = store.manifest["bodies"]["int4"]["meta"]
    assert meta["calibration"] == calibration_label(calibration)
    assert meta["calibration"].startswith("gptq:512 tokens sha256:")
    body = load_body(store, model, "int4")
    logits = Engine(model, body, Precision.INT4).score(IDS)
    assert torch.isfinite(logits).all()


def test_calibration_is_for_int4_only():
    with pytest.raises(BodyFormatError, match="calibration applies to int4 and w8a8 bodies; "
                                              "got precision int8"):
        quantize_body(tiny_llama(), "int8", calibration=_calibration())


def test_calibration_ids_cut_sequences_with_a_bos():
    ids = torch.arange(100)
    rows = calibration_ids(ids, sequences=3, length=10, bos_id=2)
    assert rows.shape == (3, 10)
    assert rows[:, 0].tolist() == [2, 2, 2]
    assert rows[1, 1:].tolist() == list(range(9, 18))
    with pytest.raises(CalibrationError, match="at least 200 tokens .* got 100"):
        calibration_ids(ids, length=200)


def test_compress_calibrates_the_int4_and_w8a8_bodies_from_a_text(tmp_path):
    from .test_cli_store import WORDS, run, word_tokenizer

    model_dir = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)   # in_features 64 and 128: int4 groups of 32
    word_tokenizer(WORDS).save_pretrained(model_dir)
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(WORDS[(i * 5) % len(WORDS)] for i in range(300)))
    refused = run("compress", model_dir, "-o", tmp_path / "s0", "--ranks", "max",
                  "--bodies", "int8", "--body-calibration", text)
    assert refused.exit_code == 2
    assert ("--body-calibration calibrates the int4 and w8a8 bodies; --bodies 'int8' has "
            "neither") in refused.output
    result = run("compress", model_dir, "-o", tmp_path / "s", "--ranks", "max",
                 "--bodies", "int8,int4,w8a8", "--body-calibration", text)
    assert result.exit_code == 0, result.output
    from tensorslm.rank_store.store import RankStore

    bodies = RankStore.open(tmp_path / "s").manifest["bodies"]
    assert "calibration" not in bodies["int8"]["meta"]
    assert bodies["int4"]["meta"]["calibration"].startswith("gptq:")
    # the w8a8 scales come from the same text (here one sequence, so the same tokens)
    assert bodies["w8a8"]["meta"]["calibration"] == \
        bodies["int4"]["meta"]["calibration"].replace("gptq:", "smoothquant:")


def test_calibrated_body_keeps_int8_linears_as_rows():
    model = tiny_gemma3()
    tensors = quantize_body(model, "int4", calibration=_calibration(), int8_linears=("qkv",))
    assert tensors["layers.0.qkv.scales"].dim() == 1 and "layers.0.qkv.zeros" not in tensors
    assert tensors["layers.0.gate_up.scales"].dim() == 2 and "layers.0.gate_up.zeros" in tensors


def test_compress_keeps_the_named_linears_of_the_int4_body_at_int8(tmp_path):
    from tensorslm.rank_store.store import RankStore

    from .test_cli_store import WORDS, run, word_tokenizer

    model_dir = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    word_tokenizer(WORDS).save_pretrained(model_dir)
    refused = run("compress", model_dir, "-o", tmp_path / "s0", "--ranks", "max",
                  "--bodies", "int8", "--body-int8", "down")
    assert refused.exit_code == 2
    assert "--body-int8 applies to the int4 body; --bodies 'int8' has no int4" in refused.output
    wrong = run("compress", model_dir, "-o", tmp_path / "s1", "--ranks", "max",
                "--bodies", "int4", "--body-int8", "ffn")
    assert wrong.exit_code == 1
    assert "int8_linears must name fused linears among qkv, o, gate_up, down; got ffn" in wrong.output
    result = run("compress", model_dir, "-o", tmp_path / "s", "--ranks", "max",
                 "--bodies", "int8,int4", "--body-int8", "qkv,down")
    assert result.exit_code == 0, result.output
    store = RankStore.open(tmp_path / "s")
    assert store.manifest["bodies"]["int4"]["meta"]["int8_linears"] == "qkv,down"
    tensors, _ = store.load_body("int4")
    assert tensors["layers.0.down.scales"].dim() == 1 and tensors["layers.0.o.scales"].dim() == 2


@pytest.mark.parametrize("given, kept", [((), "qkv,gate_up"), (("--body-int8", ""), ""),
                                         (("--body-int8", "down"), "down")])
def test_compress_keeps_the_family_default_at_int8_unless_told(tmp_path, given, kept):
    from tensorslm.rank_store.store import RankStore

    from .test_cli_store import WORDS, run, word_tokenizer

    model_dir = tmp_path / "tiny-gemma3"
    tiny_gemma3().save_pretrained(model_dir)
    word_tokenizer(WORDS).save_pretrained(model_dir)
    result = run("compress", model_dir, "-o", tmp_path / "s", "--ranks", "max",
                 "--bodies", "int8,int4", *given)
    assert result.exit_code == 0, result.output
    assert f"body int4: {tmp_path / 's'}/body-int4.safetensors (" in result.output
    assert (f"{kept} at int8" in result.output) == bool(kept)
    bodies = RankStore.open(tmp_path / "s").manifest["bodies"]
    assert bodies["int4"]["meta"]["int8_linears"] == kept
    assert "int8_linears" not in bodies["int8"]["meta"]
    shown = run("inspect", tmp_path / "s")
    assert shown.exit_code == 0, shown.output
    int4_mb = int(bodies["int4"]["bytes"]) / 1e6
    assert f"body int4: {int4_mb:.1f} MB" + (f", {kept} at int8" if kept else "\n") in shown.output

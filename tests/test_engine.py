"""The engine: its fp32 forward is the Hugging Face forward (Llama and Gemma 3, sliding windows
included), decode steps agree with the batched prefill, each body precision stays within a
stated distance of fp32, the store's precomputed body is verified by hash, and a rung switch
between queries takes effect while the quantized engine serves."""
from __future__ import annotations

import pytest
import torch

from tensorslm.rank_store.body import BodyFormatError, body_for, load_body, store_body
from tensorslm.rank_store.engine import Engine
from tensorslm.rank_store.errors import StoreCorruptError, UnknownRungError
from tensorslm.rank_store.kernels import Precision

from .tiny_model import tiny_model


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def tiny_gemma3(seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                              head_dim=32, max_position_embeddings=256, sliding_window=6,
                              layer_types=["sliding_attention", "sliding_attention",
                                           "full_attention"],
                              query_pre_attn_scalar=32, attn_implementation="eager")
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():   # Gemma's norms start at zero (1 + w); give them something to do
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3}
IDS = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 12, 50]])   # longer than the window


@pytest.mark.parametrize("family", MODELS)
def test_fp32_engine_is_the_hugging_face_forward(family):
    model = MODELS[family]()
    with torch.inference_mode():
        ref = model(IDS).logits[0]  # (T, V)
    got = Engine.from_model(model, "fp32").score(IDS)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", MODELS)
def test_decode_steps_agree_with_the_batched_prefill(family):
    engine = Engine.from_model(MODELS[family](), "fp32")
    full = engine.score(IDS)  # (T, V)
    prompt = IDS[0, :3].tolist()
    logits = engine.prefill(prompt)
    assert torch.allclose(logits, full[2], atol=1e-4)
    for pos in range(3, IDS.shape[1]):   # past the sliding window of 6
        logits = engine.step(int(IDS[0, pos]), pos)
        assert torch.allclose(logits, full[pos], atol=1e-4), pos


@pytest.mark.parametrize("family", MODELS)
def test_greedy_generation_matches_hugging_face_generate(family):
    model = MODELS[family]()
    with torch.inference_mode():
        hf = model.generate(IDS[:, :4], max_new_tokens=10, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, 4:].tolist()
    assert Engine.from_model(model, "fp32").generate(IDS[0, :4].tolist(), 10) == hf


#: relative distance ||logits - logits_fp32|| / ||logits_fp32|| on the tiny random models,
#: measured over every kernel of the precision: bf16 0.002-0.003 (Llama) / 0.007-0.011 (Gemma,
#: whose random sandwich norms amplify errors), int8 0.007-0.010 / 0.025-0.045, int4 (groups of
#: 32) 0.11 / 0.27. Bounds about 1.5x the worst; a wrong kernel lands near 1.
TOLERANCE = {"bf16": 0.02, "int8": 0.07, "w8a8": 0.07, "int4": 0.4}


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("precision", TOLERANCE)
def test_each_precision_stays_near_fp32(family, precision):
    model = MODELS[family]()
    ref = Engine.from_model(model, "fp32").score(IDS)
    engine = Engine.from_model(model, precision)
    got = engine.score(IDS)
    assert float((got - ref).norm() / ref.norm()) < TOLERANCE[precision]
    assert engine.body_nbytes < Engine.from_model(model, "fp32").body_nbytes
    step = engine.generate(IDS[0, :4].tolist(), 3)   # the decode path runs the same kernels
    assert len(step) == 3


def test_narrower_bodies_hold_fewer_bytes():
    model = tiny_llama()
    sizes = [Engine.from_model(model, p).body_nbytes for p in ("fp32", "bf16", "int8", "int4")]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 5 * sizes[-1]


def _store(tmp_path, model):
    from tensorslm.rank_store.compress import compress_table
    from tensorslm.rank_store.rung_spec import parse_rung_specs
    from tensorslm.rank_store.store import RankStore, SourceInfo

    weight = model.get_input_embeddings().weight.detach()
    rungs = compress_table(weight, parse_rung_specs("max,2x2"), progress=False)
    return RankStore.create(tmp_path / "store", SourceInfo("tiny"), weight, rungs)


def test_store_keeps_the_body_once_and_loads_the_same_logits(tmp_path):
    model = tiny_llama()
    store = _store(tmp_path, model)
    store_body(store, model, "int8")
    assert store.body_precisions == ["int8"]
    loaded = Engine(model, load_body(store, model, "int8"), Precision.INT8).score(IDS)
    fresh = Engine(model, body_for(model, "int8"), Precision.INT8).score(IDS)
    assert torch.equal(loaded, fresh)
    with pytest.raises(UnknownRungError, match="no body precision 'int4'; the store holds int8"):
        load_body(store, model, "int4")


def test_a_stored_int8_body_serves_w8a8_as_an_uncalibrated_w8a8_body_would(tmp_path):
    from tensorslm.rank_store.body import stored_body

    model = tiny_llama()
    store = _store(tmp_path, model)
    assert stored_body(store, "w8a8") is None
    store_body(store, model, "int8")
    assert stored_body(store, "w8a8") == "int8" and stored_body(store, "int4") is None
    from_int8 = load_body(store, model, "w8a8")
    fresh = body_for(model, "w8a8")
    assert {n: p.kernel for n, p in from_int8.items()} == {n: p.kernel for n, p in fresh.items()}
    assert torch.equal(Engine(model, from_int8, Precision.W8A8).score(IDS),
                       Engine(model, fresh, Precision.W8A8).score(IDS))
    store_body(store, model, "w8a8")   # a w8a8 body of its own comes first
    assert stored_body(store, "w8a8") == "w8a8"


def assert_refused_after_a_bit_flip(store, model, precision: str, offset: int) -> None:
    """Flip one bit of the stored ``precision`` body at byte ``offset``: loading is refused."""
    file = store.path / f"body-{precision}.safetensors"
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="sha256 .* does not match the manifest"):
        load_body(store, model, precision)


def test_store_refuses_a_body_whose_hash_is_wrong(tmp_path):
    model = tiny_llama()
    store = _store(tmp_path, model)
    store_body(store, model, "int4")
    assert_refused_after_a_bit_flip(store, model, "int4", -1)   # one bit of one code


def test_store_refuses_a_body_of_another_model(tmp_path):
    model = tiny_llama()
    store = _store(tmp_path, model)
    store_body(store, model, "int8")
    other = MODELS["gemma3"]()
    with pytest.raises(BodyFormatError, match="int8 body is for a llama model of 2 layers"):
        load_body(store, other, "int8")


def test_rung_switch_between_queries_while_the_quantized_engine_serves(tmp_path):
    from tensorslm.agent.generation import EngineGenerator
    from tensorslm.agent.protocol import Request
    from tensorslm.rank_store.embedding import TTEmbedding, install

    model, tokenizer = tiny_model(hidden=64)
    store = _store(tmp_path, model)
    embedding = TTEmbedding.from_store(store)
    install(model, embedding, head="dense")
    generator = EngineGenerator(model, tokenizer, embedding,
                                {"int8": body_for(model, "int8"), "int4": body_for(model, "int4")},
                                "int4")
    request = Request(request_id="r", received_at=0.0, prompt="the small model runs on a raspberry pi")
    ids = generator.encode(request)
    seen = {}
    for rung in ("full", "tt-2x2", "full"):
        embedding.set_rung(rung)
        calls = []
        original = embedding.forward
        embedding.forward = lambda x, calls=calls, original=original: (calls.append(1),
                                                                       original(x))[1]
        result = generator.generate(request, max_new_tokens=6)
        del embedding.forward
        assert calls, "the engine must look the embedding up through the model's module"
        assert generator.rung == rung and result.output_tokens == 6
        logits = generator.engine.prefill(ids)
        seen.setdefault(rung, []).append(logits)
    assert torch.equal(seen["full"][0], seen["full"][1])   # back to full: the same model
    assert not torch.allclose(seen["full"][0], seen["tt-2x2"][0])   # the rung took effect
    generator.set_precision("int8")
    assert generator.precision == "int8" and generator.engine.precision is Precision.INT8
    assert not torch.equal(generator.engine.prefill(ids), seen["full"][0])


def test_agent_serves_with_the_engine_and_records_the_precision_of_each_query(mosquitto,
                                                                              tmp_path):
    from tensorslm.agent.actuator import AgentActuator
    from tensorslm.agent.broker_config import BrokerConfig
    from tensorslm.agent.client import AskClient
    from tensorslm.agent.config import ServingConfig
    from tensorslm.agent.query_log import QueryLog
    from tensorslm.agent.wiring import make_generator
    from tensorslm.controller.decision.operating_point import OperatingPoint

    from .agents import running_agent
    from .tiny_model import tiny_loaded_model

    loaded = tiny_loaded_model(hidden=64)
    store = _store(tmp_path, loaded.model)
    store_body(store, loaded.model, "int4")
    generator = make_generator(loaded, None, precision="int4", precisions=["int8"], store=store)
    assert generator.precisions == ["int4", "int8"]
    actuator = AgentActuator(generator)
    with (running_agent(mosquitto.url, "pi-e", generator, tmp_path / "e.db", actuator=actuator,
                        serving=ServingConfig(max_new_tokens=5)) as agent,
          AskClient(BrokerConfig.from_url(mosquitto.url)) as client):
        first = client.ask("hello world", device="pi-e", timeout=30)
        actuator.apply(OperatingPoint("eco", precision="int8", max_new_tokens=3, threads=1))
        second = client.ask("hello world", device="pi-e", timeout=30)
        telemetry = agent.telemetry()
    assert (first.body["precision"], first.body["output_tokens"]) == ("int4", 5)
    assert (second.body["precision"], second.body["output_tokens"]) == ("int8", 3)
    assert telemetry["precision"] == "int8"
    rows = {r["request_id"]: r for r in QueryLog(tmp_path / "e.db", "pi-e").queries()}
    assert (rows[first.request_id]["precision"], rows[second.request_id]["precision"]) == (
        "int4", "int8")
    with pytest.raises(Exception, match="body precision 'bf16' is not resident; resident: int4, int8"):
        generator.set_precision("bf16")


def test_a_family_the_engine_does_not_run_is_served_by_the_hugging_face_forward(caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tensorslm.agent.generation import HFGenerator
    from tensorslm.agent.wiring import make_generator
    from tensorslm.rank_store.models import LoadedModel

    from .tiny_model import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1,
                                       n_head=2, bos_token_id=2, eos_token_id=3)).eval()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, ref="gpt2", name="gpt2",
                         revision="none", context_length=64, needs_bos=False,
                         load_seconds=0.0, from_cache=False)
    generator = make_generator(loaded, None, precision="int8")
    assert isinstance(generator, HFGenerator) and generator.precision == "fp32"
    assert "got 'gpt2'; serving the fp32 body through the Hugging Face forward instead of int8" \
        in caplog.text

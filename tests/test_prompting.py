"""tensorslm.agent.prompting: chat template, BOS, completion prompts, truncation.

The fast tests use the tiny in-test tokenizer (with and without its chat template); the slow
ones the real SmolLM2 (a chat model) and Gemma-3-270m (a base model) tokenizers and models.
"""
from __future__ import annotations

import time

import pytest

from tensorslm.agent.generation import HFGenerator
from tensorslm.agent.prompting import PromptError, is_chat_model, prompt_ids
from tensorslm.agent.protocol import ErrorCode, Request

from .tiny_model import tiny_tokenizer


def chat(*messages: tuple[str, str]) -> Request:
    return Request("r1", time.time(), messages=tuple({"role": r, "content": c}
                                                     for r, c in messages))


def raw(prompt: str) -> Request:
    return Request("r1", time.time(), prompt=prompt)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def base_tok():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


def words(tokenizer, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids)


def test_messages_go_through_the_chat_template(tok):
    ids = prompt_ids(tok, chat(("user", "hello world")), needs_bos=False, max_prompt_tokens=64)
    assert words(tok, ids) == ["user", ":", "hello", "world", "assistant", ":"]


def test_a_completion_prompt_is_the_text_as_it_is(tok):
    ids = prompt_ids(tok, raw("hello world"), needs_bos=False, max_prompt_tokens=64)
    assert words(tok, ids) == ["hello", "world"]


@pytest.mark.parametrize("request_", [chat(("user", "hello")), raw("hello")])
def test_needs_bos_puts_exactly_one_bos_first(tok, request_):
    ids = prompt_ids(tok, request_, needs_bos=True, max_prompt_tokens=64)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert prompt_ids(tok, request_, needs_bos=False, max_prompt_tokens=64) == ids[1:]


def test_a_template_that_writes_bos_does_not_get_a_second(tok):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    ids = prompt_ids(tokenizer, chat(("user", "hello")), needs_bos=True, max_prompt_tokens=64)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_truncation_keeps_the_last_tokens_and_the_bos(tok):
    ids = prompt_ids(tok, raw("the small model runs on a raspberry pi"), needs_bos=True,
                     max_prompt_tokens=4)
    assert words(tok, ids) == ["<s>", "a", "raspberry", "pi"]


def test_a_chat_request_to_a_base_model_is_refused_with_its_code(base_tok):
    assert not is_chat_model(base_tok)
    with pytest.raises(PromptError) as caught:
        prompt_ids(base_tok, chat(("user", "hello")), needs_bos=True, max_prompt_tokens=64,
                   model_ref="gemma3-270m")
    assert caught.value.code is ErrorCode.NOT_A_CHAT_MODEL
    assert "the served model gemma3-270m is not a chat model" in str(caught.value)
    assert "--raw" in str(caught.value)
    # the same model takes a completion prompt
    assert prompt_ids(base_tok, raw("hello"), needs_bos=True, max_prompt_tokens=64)[0] == \
        base_tok.bos_token_id


def test_a_template_refusing_a_role_is_bad_messages(tok):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('no system role') }}{% endif %}"
                               "{{ m['content'] }}{% endfor %}")
    with pytest.raises(PromptError) as caught:
        prompt_ids(tokenizer, chat(("system", "be brief"), ("user", "hello")), needs_bos=False,
                   max_prompt_tokens=64)
    assert caught.value.code is ErrorCode.BAD_MESSAGES and "no system role" in str(caught.value)


def test_a_prompt_of_no_tokens_is_empty_prompt(tok):
    with pytest.raises(PromptError) as caught:
        prompt_ids(tok, raw("   "), needs_bos=False, max_prompt_tokens=64)
    assert caught.value.code is ErrorCode.EMPTY_PROMPT


def test_hf_generator_encodes_through_prompting(tok):
    generator = HFGenerator(object(), tok, needs_bos=True, max_prompt_tokens=64, model_ref="m")
    assert generator.encode(raw("hello")) == prompt_ids(tok, raw("hello"), needs_bos=True,
                                                        max_prompt_tokens=64)


# -- real models ------------------------------------------------------------------------------

def generate(name: str, request: Request, max_new_tokens: int = 16) -> str:
    from tensorslm.rank_store.models import load_model

    loaded = load_model(name)
    generator = HFGenerator(loaded.model, loaded.tokenizer, needs_bos=loaded.needs_bos,
                            model_ref=name)
    return generator.generate(request, max_new_tokens=max_new_tokens).text


@pytest.mark.slow
def test_smollm2_answers_a_chat_question():
    text = generate("smollm2-135m", chat(("user", "What is the capital of France?")))
    assert "Paris" in text


@pytest.mark.slow
def test_gemma_is_a_base_model_served_completions_with_bos():
    from tensorslm.rank_store.models import load_model

    loaded = load_model("gemma3-270m")
    assert loaded.needs_bos and not is_chat_model(loaded.tokenizer)
    prompt = raw("The Eiffel Tower is in the city of")

    def complete(needs_bos: bool) -> str:
        generator = HFGenerator(loaded.model, loaded.tokenizer, needs_bos=needs_bos)
        assert (generator.encode(prompt)[0] == loaded.tokenizer.bos_token_id) == needs_bos
        return generator.generate(prompt, max_new_tokens=8).text

    assert "Paris" in complete(True)
    assert "Paris" not in complete(False)   # without its BOS the model only repeats itself
    generator = HFGenerator(loaded.model, loaded.tokenizer, needs_bos=True, model_ref="gemma3-270m")
    with pytest.raises(PromptError) as caught:
        generator.generate(chat(("user", "What is the capital of France?")), max_new_tokens=8)
    assert caught.value.code is ErrorCode.NOT_A_CHAT_MODEL

"""A tiny, randomly initialised causal LM and a real tokenizer trained in-test, for fast tests
that need real generation (no download). Shared by the agent and fleet tests.

``tiny_model()`` returns ``(model, tokenizer)``: a 2-layer ``LlamaForCausalLM`` with a
WordLevel tokenizer trained on a few sentences and a small chat template;
``tiny_loaded_model()`` wraps them as the model loader would, for the agent's wiring.
``CpuTimeMeter`` is a real (if coarse) energy meter: CPU seconds of this process times a
documented wattage per busy core, labelled ``Method.ESTIMATED``. ``SlowGenerator`` wraps a
generator and sleeps per token, for tests about plumbing (SIGTERM or kill -9 mid-query).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from tensorslm.controller.power.readings import EnergyReport, Method

SENTENCES = [
    "the small model runs on a raspberry pi",
    "energy per query is measured in joules",
    "the battery drains faster when the model thinks",
    "a compressed embedding saves memory and energy",
    "prompts arrive over mqtt and answers go back",
    "hello world this is a tiny test sentence",
    "user assistant system",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)


def tiny_tokenizer():
    """A WordLevel tokenizer over the words of SENTENCES, wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>", ":"])
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(seed: int = 0, hidden: int = 32, layers: int = 2):
    """``(model, tokenizer)``: a randomly initialised tiny Llama and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id,
                         # no eos: random weights would otherwise stop at random lengths
                         eos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tiny_loaded_model(hidden: int = 32):
    """``tiny_model(hidden=hidden)`` as the model loader hands a model to the agent's wiring
    (``make_generator``): a ``LoadedModel`` named "tiny", 512 positions, no BOS token."""
    from tensorslm.rank_store.models import LoadedModel

    model, tokenizer = tiny_model(hidden=hidden)
    return LoadedModel(model=model, tokenizer=tokenizer, ref="tiny", name="tiny",
                       revision="none", context_length=512, needs_bos=False,
                       load_seconds=0.0, from_cache=False)


@dataclass
class _Window:
    cpu: float
    wall: float


class CpuTimeMeter:
    """Energy from this process's CPU time: ``joules = cpu_seconds * WATTS_PER_BUSY_CORE``.

    2.0 W per busy core is a rough figure for a Raspberry Pi 4/5 core under load above idle;
    the report says ``Method.ESTIMATED`` and carries a 50 % one-sigma uncertainty.
    """

    WATTS_PER_BUSY_CORE = 2.0

    def begin(self) -> _Window:
        return _Window(time.process_time(), time.monotonic())

    def end(self, window: _Window) -> EnergyReport:
        cpu = time.process_time() - window.cpu
        wall = max(time.monotonic() - window.wall, 1e-9)
        joules = cpu * self.WATTS_PER_BUSY_CORE
        return EnergyReport(joules=joules, seconds=wall, mean_watts=joules / wall,
                            peak_watts=joules / wall, method=Method.ESTIMATED,
                            uncertainty_joules=0.5 * joules)


class SlowGenerator:
    """Wraps a generator; sleeps ``per_token_s`` before passing on each token."""

    def __init__(self, inner: Any, per_token_s: float) -> None:
        self.inner = inner
        self.per_token_s = per_token_s

    def generate(self, request: Any, *, max_new_tokens: int,
                 on_token: Callable[[str], None] | None = None, stop: Any = None):
        def slow(token: str) -> None:
            time.sleep(self.per_token_s)
            if on_token is not None:
                on_token(token)

        return self.inner.generate(request, max_new_tokens=max_new_tokens, on_token=slow,
                                   stop=stop)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

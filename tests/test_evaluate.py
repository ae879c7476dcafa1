"""Perplexity against a hand computation, windows and BOS, table swaps, results and plot."""
from __future__ import annotations

import math

import pytest
import torch

from tensorslm.rank_store.errors import EvaluationError
from tensorslm.rank_store.evaluate import (Result, encode_text, perplexity, plot_results, relative_error,
                                 results_table, table_swapped, windows)


def tiny_llama(context: int = 8, vocab: int = 50, tie: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=context, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


@torch.inference_mode()
def hand_perplexity(model, ids: list[int], window: int, bos: int | None) -> float:
    """Each token's log-probability from a separate forward over its own prefix in its window."""
    step = window - 1 if bos is not None else window
    logprobs = []
    for start in range(0, len(ids), step):
        chunk = ([bos] if bos is not None else []) + ids[start:start + step]
        for t in range(1, len(chunk)):
            logits = model(input_ids=torch.tensor([chunk[:t]])).logits[0, -1]
            logprobs.append(float(torch.log_softmax(logits.double(), dim=-1)[chunk[t]]))
    return math.exp(-sum(logprobs) / len(logprobs))


@pytest.mark.parametrize("bos", [None, 1])
@pytest.mark.parametrize("length", [17, 24, 25])
def test_perplexity_matches_hand_computation(bos, length):
    model = tiny_llama(context=8)
    ids = torch.randint(2, 50, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    got = perplexity(model, torch.tensor(ids), context_length=8, bos_id=bos, progress=False)
    assert got == pytest.approx(hand_perplexity(model, ids, 8, bos), rel=1e-5)


def test_windows_cap_at_1024_and_count_predicted_tokens():
    ids = torch.arange(3000)
    plain = windows(ids, context_length=8192, bos_id=None)
    assert [w.numel() for w in plain] == [1024, 1024, 952]
    assert sum(w.numel() - 1 for w in plain) == 3000 - 3
    with_bos = windows(ids, context_length=8192, bos_id=7)
    assert all(w[0] == 7 for w in with_bos) and max(w.numel() for w in with_bos) == 1024
    assert sum(w.numel() - 1 for w in with_bos) == 3000  # the BOS predicts every first token
    short = windows(torch.arange(9), context_length=8, bos_id=None)
    assert [w.numel() for w in short] == [8]  # a lone last token predicts nothing: dropped


def test_encode_text_prefix_equals_whole_text():
    words = [f"w{i}" for i in range(40)]
    tok = word_tokenizer(words)
    text = " ".join(words[i % 40] for i in range(3000))
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert encode_text(tok, text, 100).tolist() == whole[:100]
    assert encode_text(tok, text).tolist() == whole


@pytest.mark.parametrize("tokens, message", [
    (1, "--tokens must be at least 2"),
    (500, "the text has 3 tokens, fewer than the 500 requested"),
])
def test_encode_text_errors(tokens, message):
    with pytest.raises(EvaluationError, match=message):
        encode_text(word_tokenizer(["a", "b"]), "a b a", tokens)


def test_table_swap_dense_keeps_head_tied_replaces_it_and_restores():
    model = tiny_llama()
    original = model.get_input_embeddings().weight.detach().clone()
    ids = torch.tensor([[3, 4, 5]])
    before = model(input_ids=ids).logits
    table = torch.randn_like(original)
    with table_swapped(model, table, "dense"):
        assert torch.equal(model.get_input_embeddings().weight, table)
        assert torch.equal(model.get_output_embeddings().weight, original)
    with table_swapped(model, table, "tied"):
        assert torch.equal(model.get_output_embeddings().weight, table)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(model(input_ids=ids).logits, before)
    with table_swapped(model, original.clone(), "tied"):
        assert torch.allclose(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("head, tie, message", [
    ("shared", True, "unknown head mode 'shared'; valid modes: dense, tied"),
    ("tied", False, "head 'tied' needs a model whose LM head is tied"),
])
def test_head_errors(head, tie, message):
    model = tiny_llama(tie=tie)
    with pytest.raises(EvaluationError, match=message):
        with table_swapped(model, model.get_input_embeddings().weight.detach(), head):
            pass


def test_relative_error_blockwise():
    reference = torch.randn(100, 6)
    noisy = reference + 0.1 * torch.randn(100, 6)
    expected = float((reference - noisy).norm() / reference.norm())
    assert relative_error(reference, lambda ids: noisy[ids], block=7) == pytest.approx(expected)


def results():
    return [Result("fp32", "baseline", 4000, 1.0, 0.0, 20.0, 0.1, "dense", 100),
            Result("int8", "baseline", 1020, 3.92, 0.01, 20.2, 0.2, "dense", 100),
            Result("6x8", "rung", 3500, 1.14, 0.2, 30.0, 0.5, "dense", 100)]


def test_table_and_plot(tmp_path):
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(results_table(results(), title="ladder"))
    text = console.export_text()
    assert "6x8" in text and "+50.0%" in text and "3.92x" in text and "+1.0%" in text
    assert "(int8)" in text and "0.00102" in text  # baselines in parentheses, bytes in MB
    path = plot_results(results(), tmp_path / "plot.png", title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000

"""TTEmbedding installed into tiny, randomly initialised models of every listed architecture.

At the ``max`` rung the model must give the original logits, with the head dense or tied; a
low rung must change them; generate() must run with the embedding installed.
"""
from __future__ import annotations

import pytest
import torch

VOCAB = 96
DIM = 24  # balanced order-3 tensorization 2 x 3 x 4


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=DIM, n_layer=2, n_head=2,
                                      n_positions=64))


def opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=DIM, word_embed_proj_dim=DIM,
                                    num_hidden_layers=2, ffn_dim=48, num_attention_heads=2,
                                    max_position_embeddings=64, pad_token_id=1))


def gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=48,
                                            max_position_embeddings=64, tie_word_embeddings=False))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, max_position_embeddings=64,
                                        tie_word_embeddings=True))


def gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=2,
                                              num_key_value_heads=1, head_dim=12,
                                              max_position_embeddings=64, sliding_window=16))


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, max_position_embeddings=64,
                                        tie_word_embeddings=True))


ARCHITECTURES = {"gpt2": gpt2, "opt": opt, "gpt_neox": gpt_neox, "llama": llama,
                 "gemma3": gemma3, "qwen2": qwen2}
CASES = [(arch, head) for arch in ARCHITECTURES for head in ("dense", "tied")]


def build_store(model, path):
    from tensorslm.rank_store.compress import compress_table
    from tensorslm.rank_store.rung_spec import parse_rung_specs
    from tensorslm.rank_store.store import RankStore, SourceInfo

    weight = model.get_input_embeddings().weight.detach()  # (V, d)
    rungs = compress_table(weight, parse_rung_specs("max,1x1"), progress=False)
    source = SourceInfo(model=f"tiny-{type(model).__name__}", revision="random-init",
                        architecture=type(model).__name__, vocab_size=VOCAB, dim=DIM)
    return RankStore.create(path, source, weight, rungs)


@pytest.mark.parametrize("arch, head", CASES)
def test_max_rung_reproduces_logits_and_generate_runs(arch, head, tmp_path):
    from tensorslm.rank_store.embedding import TTEmbedding, install

    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().eval()
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = model(input_ids=ids).logits
    store = build_store(model, tmp_path / "store")
    embedding = TTEmbedding.from_store(store)
    install(model, embedding, head=head)
    assert model.get_input_embeddings() is embedding

    embedding.set_rung("tt-max")
    with torch.inference_mode():
        exact = model(input_ids=ids).logits
    assert torch.allclose(exact, reference, atol=1e-4, rtol=1e-4), \
        f"max rung differs by {(exact - reference).abs().max():.2e}"

    embedding.set_rung("tt-1x1")
    with torch.inference_mode():
        coarse = model(input_ids=ids).logits
    assert (coarse - reference).abs().max() > 1e-3  # the rung really is in use

    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (2, 17) and torch.equal(out[:, :12], ids)


def test_tied_head_on_an_untied_model_keeps_its_own_head(tmp_path):
    from tensorslm.rank_store.embedding import TTEmbedding, install

    model = gpt_neox().eval()
    head = model.get_output_embeddings()
    original = head.weight.detach().clone()
    embedding = TTEmbedding.from_store(build_store(model, tmp_path / "store"), active="tt-1x1")
    install(model, embedding, head="tied")
    assert model.get_output_embeddings() is head and torch.equal(head.weight, original)

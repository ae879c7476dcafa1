from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tensorslm.rank_store.compress import compress_table
from tensorslm.rank_store.embedding import TiedTTHead, TTEmbedding, install
from tensorslm.rank_store.errors import InstallError, UnknownRungError
from tensorslm.rank_store.rung import Rung
from tensorslm.rank_store.rung_spec import parse_rung_specs
from tensorslm.rank_store.store import RankStore, SourceInfo

VOCAB, DIM = 256, 48


def tiny_llama(tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def store(tmp_path):
    weight = tiny_llama().get_input_embeddings().weight.detach()
    rungs = compress_table(weight, parse_rung_specs("max,2x2"), progress=False)
    return RankStore.create(tmp_path / "store", SourceInfo("tiny-llama"), weight, rungs)


@pytest.mark.parametrize("head", ["dense", "tied"])
def test_install_max_rung_reproduces_logits_and_generates(store, head):
    reference = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        expected_text = reference.generate(ids[:1], max_new_tokens=6, do_sample=False)
    model = install(tiny_llama(), TTEmbedding.from_store(store, active="tt-max"), head=head)
    assert isinstance(model.get_output_embeddings(), TiedTTHead) == (head == "tied")
    assert model.config.tie_word_embeddings is False
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-4)
        assert torch.equal(model.generate(ids[:1], max_new_tokens=6, do_sample=False), expected_text)
        model.get_input_embeddings().set_rung("tt-2x2")
        assert not torch.allclose(model(ids).logits, expected, atol=1e-2)  # the switch takes effect


def test_tied_head_follows_rung(store):
    model = install(tiny_llama(), TTEmbedding.from_store(store, active="tt-2x2"), head="tied")
    head = model.get_output_embeddings()
    hidden = torch.randn(3, DIM)
    w_hat = model.get_input_embeddings()(torch.arange(VOCAB))  # (V, d)
    assert torch.allclose(head(hidden), hidden @ w_hat.T, atol=1e-5)


def test_untied_model_keeps_its_head(store):
    model = tiny_llama(tied=False)
    original = model.get_output_embeddings()
    install(model, TTEmbedding.from_store(store, active="tt-max"), head="tied")
    assert model.get_output_embeddings() is original


def test_embed_scale_preserved(store):
    class Scaled(torch.nn.Embedding):  # like Gemma3TextScaledWordEmbedding
        def __init__(self, weight):
            super().__init__(*weight.shape)
            self.weight.data.copy_(weight)
            self.embed_scale = torch.tensor(DIM**0.5)

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale.to(self.weight.dtype)

    model = tiny_llama()
    scaled = Scaled(model.get_input_embeddings().weight.detach())
    model.set_input_embeddings(scaled)
    ids = torch.arange(10)
    expected = scaled(ids)
    install(model, TTEmbedding.from_store(store, active="tt-max"), head="dense")
    assert torch.allclose(model.get_input_embeddings()(ids), expected, atol=1e-4)


def test_install_rejects_wrong_sizes_and_modes(store):
    embedding = TTEmbedding({"full": Rung.dense(torch.zeros(10, DIM))})
    with pytest.raises(InstallError, match=r"store is for a 10x48 table, the model's embedding is 256x48"):
        install(tiny_llama(), embedding)
    with pytest.raises(InstallError, match="head must be one of dense, tied, got 'both'"):
        install(tiny_llama(), TTEmbedding.from_store(store), head="both")


def test_ladder_names_lazy_load_and_errors(store):
    embedding = TTEmbedding.from_store(store, rungs=["tt-2x2"])
    assert embedding.rung_names == ["tt-2x2"] and embedding.active_rung == "tt-2x2"
    embedding.set_rung("full")  # loaded on first use, once
    assert embedding.rung_names == ["full", "tt-2x2"] and embedding.active_rung == "full"
    with pytest.raises(UnknownRungError, match="no rung 'tt-7x7'; valid rungs: full, tt-2x2, tt-max"):
        embedding.set_rung("tt-7x7")
    assert embedding.active_rung == "full"
    assert embedding.state_dict() == {}  # rungs are data of the ladder, not module weights


def test_set_rung_during_concurrent_forwards(store):
    embedding = TTEmbedding.from_store(store, active="full")
    ids = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(2))
    expected = {name: embedding.rung(name) for name in embedding.rung_names}
    outputs = {}
    for name in expected:
        embedding.set_rung(name)
        outputs[name] = embedding(ids)
    results, errors = [], []

    def worker():
        try:
            for _ in range(40):
                out = embedding(ids)
                results.append(out)
        except Exception as exc:  # recorded and re-checked below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    names = list(expected)
    for i in range(60):
        embedding.set_rung(names[i % len(names)])
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 120
    # every output is exactly one rung's result: no forward mixed two rungs
    for out in results:
        assert any(torch.equal(out, ref) for ref in outputs.values())


def test_forward_keeps_the_rung_it_started_with(store, monkeypatch):
    import tensorslm.rank_store.embedding as embedding_module

    embedding = TTEmbedding.from_store(store, active="tt-max")
    real = embedding_module.reconstruct_rows
    used = []

    def switching(rung, ids):  # a set_rung arrives while this forward is running
        embedding.set_rung("tt-2x2")
        used.append(rung)
        return real(rung, ids)

    monkeypatch.setattr(embedding_module, "reconstruct_rows", switching)
    embedding(torch.tensor([1, 2]))
    assert used == [embedding.rung("tt-max")] and embedding.active_rung == "tt-2x2"


@pytest.mark.parametrize("head", ["dense", "tied"])
def test_gemma3_scaled_embedding_and_generate(head):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    def gemma():
        torch.manual_seed(0)
        config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                  max_position_embeddings=64, sliding_window=16, tie_word_embeddings=True)
        return Gemma3ForCausalLM(config).eval()

    reference = gemma()
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids).logits
        expected_text = reference.generate(ids, max_new_tokens=5, do_sample=False)
    weight = reference.get_input_embeddings().weight.detach()
    embedding = TTEmbedding(compress_table(weight, parse_rung_specs("max"), progress=False))
    model = install(gemma(), embedding, head=head)
    assert float(embedding.embed_scale) == pytest.approx(DIM**0.5)  # Gemma scales rows by sqrt(d)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-4)
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), expected_text)


def test_tied_head_on_the_full_rung_is_the_original_head(store):
    original = tiny_llama()
    hidden = torch.randn(2, 3, DIM)
    expected = original.get_output_embeddings()(hidden)
    model = install(tiny_llama(), TTEmbedding.from_store(store, active="full"), head="tied")
    assert torch.allclose(model.get_output_embeddings()(hidden), expected, atol=1e-6)


def test_adopt_swaps_the_ladder_and_refuses_a_bad_one(store, tmp_path):
    model = install(tiny_llama(), TTEmbedding.from_store(store, active="tt-2x2"), head="tied")
    embedding = model.get_input_embeddings()
    ids = torch.arange(VOCAB)
    weight = store.load_dense()
    new_store = RankStore.create(tmp_path / "new", SourceInfo("tiny-llama"), weight,
                                 compress_table(weight, parse_rung_specs("2x2,1x1"), progress=False))
    embedding.adopt(TTEmbedding.from_store(new_store))
    assert embedding.active_rung == "tt-2x2" and embedding.store is new_store
    embedding.set_rung("tt-1x1")
    expected = TTEmbedding.from_store(new_store, active="tt-1x1")(ids)
    assert torch.equal(embedding(ids), expected)
    # the installed tied head follows the new ladder too
    hidden = torch.randn(2, DIM)
    assert torch.allclose(model.get_output_embeddings()(hidden), hidden @ expected.T, atol=1e-5)

    # a ladder without the rung being served is refused, and the old one keeps serving
    other = RankStore.create(tmp_path / "other", SourceInfo("tiny-llama"), weight,
                             compress_table(weight, parse_rung_specs("2x2"), progress=False))
    with pytest.raises(UnknownRungError, match="the new ladder has no rung 'tt-1x1'"):
        embedding.adopt(TTEmbedding.from_store(other))
    assert embedding.active_rung == "tt-1x1" and torch.equal(embedding(ids), expected)

    small = torch.randn(VOCAB - 1, DIM)
    wrong = RankStore.create(tmp_path / "wrong", SourceInfo("other"), small,
                             compress_table(small, parse_rung_specs("2x2"), progress=False))
    with pytest.raises(InstallError, match=f"the new ladder is for a {VOCAB - 1}x{DIM} table"):
        embedding.adopt(TTEmbedding.from_store(wrong), active="tt-2x2")
    assert embedding.store is new_store

"""The real SmolLM2-135M end to end: load from its wheel, compress, install, generate, and the
``max`` rung reproducing the original perplexity within 0.1% (head dense and tied)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

TOKENS = 512  # half a window: the test stays well under two minutes on 2 shared cores


@pytest.fixture(scope="module")
def smollm2():
    from tensorslm.rank_store.models import load_model

    return load_model("smollm2-135m")


def test_smollm2_compress_install_generate(smollm2, wikitext_path, tmp_path):
    from tensorslm.rank_store.embedding import TTEmbedding, install
    from tensorslm.rank_store.evaluate import encode_text, loaded_perplexity, model_restored
    from tensorslm.rank_store.ladder import build_ladder
    from tensorslm.rank_store.rung_spec import parse_rung_specs

    assert (smollm2.architecture, smollm2.vocab_size, smollm2.dim) == ("LlamaForCausalLM", 49152, 576)
    assert smollm2.model.config.tie_word_embeddings and not smollm2.needs_bos
    ids = encode_text(smollm2.tokenizer, wikitext_path.read_text(encoding="utf-8"), TOKENS)
    dense_ppl = loaded_perplexity(smollm2, ids, progress=False)
    assert 5 < dense_ppl < 100  # a working language model on English prose

    prompt = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    original = smollm2.model.generate(prompt, max_new_tokens=4, do_sample=False)
    with torch.inference_mode():
        original_logits = smollm2.model(input_ids=prompt).logits

    store = build_ladder("smollm2-135m", tmp_path / "store", parse_rung_specs("max,2x2"),
                         loaded=smollm2, progress=False)
    assert store.rung_names[0] == "full" and {"tt-max", "tt-2x2"} <= set(store.rung_names)

    for head in ("dense", "tied"):
        with model_restored(smollm2.model):
            embedding = TTEmbedding.from_store(store, rungs=["tt-max", "tt-2x2"], active="tt-max")
            install(smollm2.model, embedding, head=head)
            max_ppl = loaded_perplexity(smollm2, ids, progress=False)
            assert max_ppl == pytest.approx(dense_ppl, rel=1e-3), head
            new_tokens = 4 if head == "dense" else 2  # the tied head rebuilds the table per step
            generated = smollm2.model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
            assert torch.equal(generated, original[:, :prompt.shape[1] + new_tokens]), head
            text = smollm2.tokenizer.decode(generated[0, prompt.shape[1]:], skip_special_tokens=True)
            assert len(text.strip()) > 0
            if head == "dense":
                embedding.set_rung("tt-2x2")
                assert loaded_perplexity(smollm2, ids, progress=False) > dense_ppl * 1.05
    # restored: the original model again
    assert smollm2.model.get_output_embeddings().weight is smollm2.model.get_input_embeddings().weight
    with torch.inference_mode():
        assert torch.equal(smollm2.model(input_ids=prompt).logits, original_logits)

"""Loading a model without its large weights: the body and the input table stay in the
checkpoint (meta device), are read one tensor at a time when needed, and serving from such a
skeleton gives the same tokens as serving the whole model; the store still refuses a table it
was not built from."""
from __future__ import annotations

import pytest
import torch

from tensorslm.rank_store.body import body_for
from tensorslm.rank_store.embedding import InstallError, TTEmbedding, install
from tensorslm.rank_store.engine import Engine
from tensorslm.rank_store.errors import StoreSourceMismatchError
from tensorslm.rank_store.kernels import Precision
from tensorslm.rank_store.models import load_model
from tensorslm.rank_store.store import RankStore, SourceInfo, weights_sha256

from .test_engine import IDS, tiny_gemma3
from .tiny_model import tiny_model


@pytest.fixture
def model_dir(tmp_path):
    model, tokenizer = tiny_model(hidden=64)
    path = tmp_path / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _store(path, loaded, rungs="max,2x2"):
    from tensorslm.rank_store.compress import compress_table
    from tensorslm.rank_store.rung_spec import parse_rung_specs

    weight = loaded.model.get_input_embeddings().weight.detach()
    return RankStore.create(path, SourceInfo("tiny"), weight,
                            compress_table(weight, parse_rung_specs(rungs), progress=False))


def test_a_skeleton_leaves_body_and_table_in_the_checkpoint(model_dir):
    whole = load_model(model_dir)
    bare = load_model(model_dir, body=False, table=False)
    layer = bare.model.model.layers[0]
    assert layer.self_attn.q_proj.weight.is_meta and layer.mlp.down_proj.weight.is_meta
    assert not bare.table_loaded and whole.table_loaded
    assert not layer.input_layernorm.weight.is_meta   # the norms are read
    assert torch.equal(layer.input_layernorm.weight, whole.model.model.layers[0].input_layernorm.weight)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(bare.read_weight(name), whole.model.get_parameter(name))
    # the table's hash is streamed from the file and equals the loaded table's
    assert bare.table_sha256() == weights_sha256(whole.model.get_input_embeddings().weight)
    assert (bare.vocab_size, bare.dim) == (whole.vocab_size, whole.dim)


def test_a_skeleton_with_its_table_keeps_the_head_tied(tmp_path):
    from .test_engine import tiny_llama
    from .tiny_model import tiny_tokenizer

    tiny_llama().save_pretrained(tmp_path / "tied")
    tiny_tokenizer().save_pretrained(tmp_path / "tied")
    bare = load_model(tmp_path / "tied", body=False)
    assert bare.table_loaded
    assert bare.model.get_output_embeddings().weight is bare.model.get_input_embeddings().weight


def test_the_engine_over_a_skeleton_computes_the_whole_models_logits(model_dir):
    whole = load_model(model_dir)
    bare = load_model(model_dir, body=False)
    for precision in (Precision.FP32, Precision.INT8):
        expected = Engine(whole.model, body_for(whole.model, precision), precision).score(IDS % 30)
        got = Engine(bare.model, body_for(bare.model, precision, read=bare.read_weight),
                     precision).score(IDS % 30)
        assert torch.equal(got, expected)


def test_gemma3_skeleton_keeps_its_computed_buffers(tmp_path):
    model = tiny_gemma3()
    model.save_pretrained(tmp_path / "g")
    from .tiny_model import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "g")
    bare = load_model(tmp_path / "g", body=False, table=False)
    scale = bare.model.get_input_embeddings().embed_scale
    assert not scale.is_meta and float(scale) == pytest.approx(64 ** 0.5)
    for name, buffer in bare.model.named_buffers():
        assert not buffer.is_meta, name
        assert torch.equal(buffer, model.get_buffer(name)), name


def test_serving_from_a_skeleton_gives_the_whole_models_tokens(model_dir, tmp_path):
    from tensorslm.agent.protocol import Request
    from tensorslm.agent.wiring import load_serving

    store = _store(tmp_path / "store", load_model(model_dir))
    request = Request(request_id="r", received_at=0.0, prompt="the small model runs on a raspberry pi")
    out = {}
    for lean in (False, True):
        serving = load_serving(str(model_dir), store.path, release_model_body=lean)
        assert (serving.loaded.checkpoint is not None) == lean   # a skeleton when lean
        for rung in ("full", "tt-2x2"):
            serving.embedding.set_rung(rung)
            out[lean, rung] = serving.generator.generate(request, max_new_tokens=6).text
    assert out[True, "full"] == out[False, "full"]
    assert out[True, "tt-2x2"] == out[False, "tt-2x2"]


def test_a_store_of_another_table_is_refused_by_its_hash(model_dir, tmp_path):
    other, _ = tiny_model(seed=1, hidden=64)
    store = RankStore.create(tmp_path / "other", SourceInfo("tiny"),
                             other.get_input_embeddings().weight.detach(), {})
    bare = load_model(model_dir, body=False, table=False)
    with pytest.raises(StoreSourceMismatchError, match="hashes to"):
        install(bare.model, TTEmbedding.from_store(store), table_sha256=bare.table_sha256())


def test_a_table_left_in_the_checkpoint_cannot_serve_the_dense_head(tmp_path):
    from .test_engine import tiny_llama
    from .tiny_model import tiny_tokenizer

    tiny_llama().save_pretrained(tmp_path / "tied")
    tiny_tokenizer().save_pretrained(tmp_path / "tied")
    store = _store(tmp_path / "store", load_model(tmp_path / "tied"))
    bare = load_model(tmp_path / "tied", body=False, table=False)
    with pytest.raises(InstallError, match="left in its checkpoint"):
        install(bare.model, TTEmbedding.from_store(store), head="dense",
                table_sha256=bare.table_sha256())


def test_a_family_the_engine_does_not_run_is_loaded_whole(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from .tiny_model import tiny_tokenizer

    GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    tiny_tokenizer().save_pretrained(tmp_path / "gpt2")
    loaded = load_model(tmp_path / "gpt2", body=False, table=False)
    assert not any(p.is_meta for p in loaded.model.parameters())


def _mapped_kb(file) -> int:
    """Resident kB of this process's mappings of ``file`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:   # a mapping's header line
            inside = fields[-1] == str(file)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_a_rows_rung_is_mapped_and_its_pages_are_returned_once_the_head_has_packed_them(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tensorslm.rank_store.compress import compress_table
    from tensorslm.rank_store.rung import reconstruct_rows
    from tensorslm.rank_store.rung_spec import parse_rung_specs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    table = model.get_input_embeddings().weight.detach()   # 256 KiB of int8 codes: many pages
    store = RankStore.create(tmp_path / "s", SourceInfo("tiny"), table, compress_table(
        table, parse_rung_specs(recipes="row+int8"), progress=False))
    embedding = TTEmbedding.from_store(store, rungs=["row_int8"])
    file = (store.path / store.info("row_int8").file).resolve()
    ids = torch.tensor([[3, 4000, 17]])
    before = embedding(ids)
    assert _mapped_kb(file) > 0   # a lookup paged some rows in
    install(model, embedding, head="tied")
    head = model.get_output_embeddings()
    h = torch.randn(1, 64)
    logits = head(h)   # packs the head, then hands the rung's pages back
    assert head.prepared().packs_own_copy
    assert _mapped_kb(file) < 16, "the rung's codes should no longer be resident"
    assert torch.equal(embedding(ids), before)   # lookups page their rows in again
    rows = reconstruct_rows(embedding.rung(), torch.arange(4096))   # (V, d)
    assert torch.allclose(logits, h @ rows.T, atol=1e-2 * float(h.norm() * rows.norm(dim=1).max()))


def _rows_store(tmp_path, vocab=32768, dim=64):
    from tensorslm.rank_store.compress import compress_table
    from tensorslm.rank_store.rung_spec import parse_rung_specs

    torch.manual_seed(0)
    table = torch.randn(vocab, dim)   # 2 MiB of int8 codes at the default size
    return RankStore.create(tmp_path / "s", SourceInfo("tiny"), table, compress_table(
        table, parse_rung_specs(recipes="row+int8"), progress=False))


def test_a_range_of_a_mapped_rung_is_released_and_reads_the_same_again(tmp_path):
    store = _rows_store(tmp_path)
    file = (store.path / store.info("row_int8").file).resolve()
    codes = store.load_rung("row_int8").groups[0].cores[0].reshape(32768, 64)   # a view of the map
    copy = codes.clone()
    assert int(codes.sum()) == int(copy.sum())   # every page touched
    whole = _mapped_kb(file)
    assert whole >= 2048
    store.release_range("row_int8", codes[: 16384])
    assert _mapped_kb(file) < whole - 900   # the first half's pages (but for a partial page)
    assert torch.equal(codes, copy)   # read from the file again
    store.release_range("row_int8", copy)   # not of the map: left alone
    assert torch.equal(codes, copy)


def test_a_head_packing_a_mapped_rung_hands_its_pages_back_block_by_block(tmp_path,
                                                                           monkeypatch):
    from tensorslm.rank_store import kernels
    from tensorslm.rank_store.embedding import TiedTTHead

    vocab = 131072   # 8 MiB of int8 codes, 32 blocks of rows
    if kernels.select_kernel(Precision.INT8, shape=(vocab, 64)).name != kernels.PLANES_KERNEL:
        pytest.skip("the int8 head kernel here reads the rung's codes in place")
    store = _rows_store(tmp_path, vocab=vocab)
    file = (store.path / store.info("row_int8").file).resolve()
    embedding = TTEmbedding.from_store(store, rungs=["row_int8"])
    calls: list[int] = []
    resident: list[int] = []
    release = store.release_range

    def measured(name, view):
        calls.append(1)
        if len(calls) % 4 == 1:   # reading smaps is slow
            resident.append(_mapped_kb(file))
        release(name, view)

    monkeypatch.setattr(store, "release_range", measured)
    head = TiedTTHead(embedding)
    head.prepared()
    assert len(calls) >= 32   # a call per block read
    # a fault maps the pages around it (a whole folio, up to 2 MiB); never the whole file
    assert max(resident) < 8192 * 3 // 4, "the rung's codes were resident whole while packing"
    assert _mapped_kb(file) < 16
    h = torch.randn(2, 64)
    rows = embedding(torch.arange(vocab))   # (V, d), lookups page rows in again
    assert torch.allclose(head(h), h @ rows.T, atol=1e-2 * float(h.norm() * rows.norm(dim=1).max()))


def test_a_head_packing_a_mapped_rung_for_int8_activations_never_holds_it_whole(tmp_path,
                                                                                 monkeypatch):
    from tensorslm.rank_store import kernels
    from tensorslm.rank_store.embedding import TiedTTHead
    from tensorslm.rank_store.head import int8_activation_rows

    if not int8_activation_rows():
        pytest.skip("no w8a8-dynamic kernel on this CPU (fbgemm with VNNI, or qnnpack)")
    vocab = 131072   # 8 MiB of int8 codes, 32 blocks of rows
    store = _rows_store(tmp_path, vocab=vocab)
    file = (store.path / store.info("row_int8").file).resolve()
    embedding = TTEmbedding.from_store(store, rungs=["row_int8"])
    at_prepack: list[int] = []
    prepack = torch.ops.quantized.linear_prepack

    def measured(weight, bias):   # the rung's pages resident while fbgemm packs the whole weight
        at_prepack.append(_mapped_kb(file))
        return prepack(weight, bias)

    monkeypatch.setattr(torch.ops.quantized, "linear_prepack", measured)
    head = TiedTTHead(embedding, int8_activations=True)
    prepared = head.prepared()
    assert prepared.parts[0].kernel == "w8a8-dynamic"
    assert at_prepack and max(at_prepack) < 8192 * 3 // 4, \
        "the rung's codes were resident whole beside the quantized copy"
    group = embedding.rung().groups[0]
    whole = prepack(torch._make_per_channel_quantized_tensor(   # the whole table in one copy
        group.cores[0].reshape(vocab, 64).contiguous(), group.row_scales[:, 0].double(),
        torch.zeros(vocab, dtype=torch.long), 0), None)
    h = torch.randn(1, 64)
    assert torch.equal(head(h), torch.ops.quantized.linear_dynamic(h, whole, False))


@pytest.mark.parametrize("precision", ["int8", "int4", "fp32"])
def test_a_stored_body_is_mapped_and_packs_as_the_read_one(model_dir, tmp_path, monkeypatch,
                                                           precision):
    from tensorslm.rank_store.body import load_body, pack_body, store_body

    loaded = load_model(model_dir)
    store = _store(tmp_path / "store", loaded, rungs="max")
    store_body(store, loaded.model, precision)
    released: list[int] = []
    release = store.release_range
    monkeypatch.setattr(store, "release_range", lambda name, view: (
        released.append(view.numel()), release(name, view)))
    mapped = load_body(store, loaded.model, precision)
    tensors, _ = store.load_body(precision)   # read into memory of its own
    read = pack_body(tensors, precision, len(loaded.model.model.layers))
    for name, linear in read.items():
        x = torch.randn(3, linear.in_features)
        assert torch.equal(mapped[name](x), linear(x)), name
    # a linear packed into a copy of its own hands its stored tensors' pages back (every int4
    # kernel copies; int8 ones keep the codes or not; fp32 ones use the stored weight as it is)
    if precision == "int4":
        assert len(released) == len(tensors)
    elif precision == "int8":
        assert released

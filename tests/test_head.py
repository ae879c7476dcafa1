"""The compressed-domain head against the reconstructed head, the two-stage head, the mapped full.

Tolerance: for every token v and hidden state h, |head_v - reference_v| <= the head's stated
arithmetic bound (``CompressedHead.arithmetic_bound``: the rounding of the activations each
kernel computes with, times the token's stored row norm; bf16 kernels 3.1 * 2^-8 ||h||, dynamic
int8 kernels sqrt(d) * range(h) / 254, fp32 2^-12 ||h||) + 1e-5 ||h|| ||row_v||, where the
reference rebuilds the rows with ``reconstruct_rows`` and multiplies in fp32.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tensorslm.rank_store import head as head_module
from tensorslm.rank_store import kernels
from tensorslm.rank_store.embedding import TiedTTHead, TTEmbedding, install
from tensorslm.rank_store.head import CompressedHead, HeadError, TwoStageHead, reconstructed_logits
from tensorslm.rank_store.recipes import build
from tensorslm.rank_store.rung import Rung, reconstruct_rows
from tensorslm.rank_store.store import RankStore, SourceInfo

RECIPES = [
    "row+int8", "row+int6", "row+int4", "row+mean+norm+int4",  # whole rows through the kernels
    "tt-4x6", "tt-4x6+int8", "tt-3x3+int4", "tt-4x6+int6", "tt-max",  # TT groups
    "budget-8+mean+norm+rows", "budget-4+perm+mean",  # budget mixes: rows and several TT groups
    "tt-4x6+pca4",  # shared basis
    "tt-4x6+sparse4",  # sparse residual
    "tt-4x6+perm", "tt-4x6+corr",  # permutation
    "tt-4x6+norm+mean",  # column scale and offset
]


def table(V: int = 300, d: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, d, generator=g) * (torch.rand(d, generator=g) * 2 + 0.2) + 0.3


def check_close(rung: Rung, got: torch.Tensor, hidden: torch.Tensor, head: CompressedHead) -> float:
    """|got - reference| within the head's stated bound (plus 1e-5 of ||h|| ||row||); returns
    the largest error as a fraction of the bound."""
    ref = reconstructed_logits(rung, hidden)
    rows = reconstruct_rows(rung, torch.arange(rung.vocab_size))
    bound = head.arithmetic_bound(hidden) + 1e-5 * hidden.norm(dim=1, keepdim=True) * rows.norm(dim=1)
    worst = ((got - ref).abs() / bound).max().item()
    assert worst <= 1, f"{rung.meta.get('recipe')}: error {worst:.2f}x the bound"
    return worst


@pytest.mark.parametrize("d", [64, 48])  # 48: int4 rows of a width the int4 kernel refuses
@pytest.mark.parametrize("tt_mode", ["contract", "decode"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_compressed_head_matches_reconstructed(recipe, tt_mode, d):
    rung = build(table(d=d), recipe)
    hidden = torch.randn(3, d, generator=torch.Generator().manual_seed(1)) * 4
    head = CompressedHead(rung, tt_mode=tt_mode)
    check_close(rung, head(hidden), hidden, head)


def test_dense_rung_is_exact():
    weight = table()
    hidden = torch.randn(5, 64)
    head = CompressedHead(Rung.dense(weight))
    assert head.nbytes == 0  # the stored table is used as it is
    assert torch.allclose(head(hidden), hidden @ weight.T, atol=1e-5)


def test_rows_run_on_the_packed_kernels_and_count_their_bytes():
    kernels.reset_kernels_used()
    rung = build(table(), "row+int4")
    head = CompressedHead(rung)
    head(torch.randn(1, 64))
    expected = kernels.select_kernel("int4").name
    assert expected in kernels.kernels_used()
    assert head.nbytes >= 300 * 64 // 2  # the repacked codes are resident, and counted


def test_no_row_is_rebuilt(monkeypatch):
    rung = build(table(), "budget-8+mean+norm+rows")
    head = CompressedHead(rung, tt_mode="contract")
    hidden = torch.randn(2, 64)
    expected = reconstructed_logits(rung, hidden)

    def forbidden(*args, **kwargs):
        raise AssertionError("the compressed-domain head rebuilt rows")

    monkeypatch.setattr(head_module, "reconstruct_rows", forbidden)
    monkeypatch.setattr("tensorslm.rank_store.rung.RankGroup.rows", forbidden)
    assert torch.allclose(head(hidden), expected, atol=0.05 * expected.abs().max().item())


def test_auto_mode_measures_both_ways_and_picks_by_batch():
    rung = build(table(), "tt-4x6+int8")
    head = CompressedHead(rung, tt_mode="auto")
    part = head.parts[0]
    assert set(part.seconds) == {"contract", "decode"} and all(s > 0 for s in part.seconds.values())
    for batch in (1, 64):
        hidden = torch.randn(batch, 64)
        check_close(rung, head(hidden), hidden, head)


def test_bad_inputs_name_what_was_expected():
    rung = build(table(), "row+int8")
    with pytest.raises(HeadError, match="tt_mode must be one of auto, contract, decode"):
        CompressedHead(rung, tt_mode="fast")
    with pytest.raises(HeadError, match="d = 64"):
        CompressedHead(rung)(torch.randn(2, 63))


INT8_ROW_RECIPES = ["row+int8", "row+mean+norm+int8", "row+int6"]


@pytest.mark.skipif(not head_module.int8_activation_rows(),
                    reason="no w8a8-dynamic kernel on this CPU (fbgemm with VNNI, or qnnpack)")
@pytest.mark.parametrize("recipe", INT8_ROW_RECIPES)
def test_int8_activation_rows_stay_within_their_bound(recipe):
    rung = build(table(d=64), recipe)
    head = CompressedHead(rung, int8_activations=True)
    assert head.parts[0].kernel == "w8a8-dynamic"
    for batch in (1, 3):   # one token (decode) and several (a prefill: each row its own step)
        hidden = torch.randn(batch, 64, generator=torch.Generator().manual_seed(batch)) * 4
        hidden[:, 5] *= 20   # an outlier channel widens every row's quantisation step
        check_close(rung, head(hidden), hidden, head)


@pytest.mark.skipif(not head_module.int8_activation_rows(),
                    reason="no w8a8-dynamic kernel on this CPU (fbgemm with VNNI, or qnnpack)")
def test_two_stage_argmax_with_int8_activations_is_the_fine_rungs():
    weight = table(V=2000, d=64, seed=3)
    head = TwoStageHead(CompressedHead(build(weight, "row+mean+norm+int8"), int8_activations=True),
                        Rung.dense(weight))
    hidden = torch.randn(200, 64, generator=torch.Generator().manual_seed(4)) * 3
    assert torch.equal(head(hidden).argmax(1), (hidden @ weight.T).argmax(1))
    assert 0 < head.stats.mean_fraction < 0.5


def test_int8_activation_rows_fall_back_where_the_kernel_is_missing(monkeypatch):
    monkeypatch.setattr(head_module, "int8_activation_rows", lambda: False)
    head = CompressedHead(build(table(d=64), "row+int8"), int8_activations=True)
    assert head.parts[0].kernel == kernels.select_kernel("int8", shape=(300, 64)).name


# --------------------------------------------------------------------------- two stages


@pytest.mark.parametrize("recipe", ["row+mean+norm+int8", "row+int4", "tt-4x6+perm+mean+int8"])
def test_two_stage_argmax_is_the_fine_rungs(recipe):
    weight = table(V=2000, d=64, seed=3)
    fine = Rung.dense(weight)
    head = TwoStageHead(CompressedHead(build(weight, recipe)), fine)
    hidden = torch.randn(400, 64, generator=torch.Generator().manual_seed(4)) * 3
    exact = hidden @ weight.T
    logits = head(hidden)
    assert torch.equal(logits.argmax(1), exact.argmax(1))
    rescored = head.candidates(head.coarse(hidden), hidden)
    assert torch.allclose(logits[rescored], exact[rescored], atol=1e-4)  # candidates are exact
    assert 0 < head.stats.mean_fraction <= 1 and head.stats.steps == 400


def test_two_stage_rescoring_shrinks_with_a_finer_coarse_rung():
    weight = table(V=2000, d=64, seed=3)
    hidden = torch.randn(100, 64) * 3
    fractions = {}
    for recipe in ("row+int4", "row+int8"):
        head = TwoStageHead(CompressedHead(build(weight, recipe)), Rung.dense(weight))
        head(hidden)
        fractions[recipe] = head.stats.mean_fraction
    assert fractions["row+int8"] < fractions["row+int4"]


def test_top_k_mode_rescores_k_per_step():
    weight = table(V=2000, d=64, seed=3)
    head = TwoStageHead(CompressedHead(build(weight, "row+int4")), Rung.dense(weight), top_k=8)
    hidden = torch.randn(50, 64) * 3
    head(hidden)
    assert head.stats.rescored == 8 * 50
    with pytest.raises(HeadError, match="top_k must be >= 1"):
        TwoStageHead(head.coarse, Rung.dense(weight), top_k=0)


# --------------------------------------------------------------------------- the mapped full


def rss_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_full_is_memory_mapped_and_paged_in_by_use(tmp_path):
    weight = table(V=40_000, d=256, seed=5)  # 39 MiB
    store = RankStore.create(tmp_path / "s", SourceInfo("random"), weight, {"rows": build(weight, "row+int8")})
    before = rss_file_mb()
    full = store.load_rung("full")
    mapped = full.groups[0].cores[0]
    assert rss_file_mb() - before < 8  # opened, hashed, mapped: not read into this process
    assert torch.equal(reconstruct_rows(full, [7, 39_999]), weight[[7, 39_999]])
    assert rss_file_mb() - before < 8  # two rows read: a few pages
    assert float(mapped.sum()) == pytest.approx(float(weight.sum()), rel=1e-4)
    assert rss_file_mb() - before > 30  # every row read: the file's pages are resident now
    mapped[0, 0] = 1e6  # a private map: the store's file is not changed
    assert torch.equal(RankStore.open(store.path).load_dense()[0], weight[0])


# --------------------------------------------------------------------------- in a model


def tiny_store(tmp_path):
    from tests.test_embedding import tiny_llama

    weight = tiny_llama().get_input_embeddings().weight.detach()
    rungs = {name: build(weight, recipe) for name, recipe in
             (("rows8", "row+mean+norm+int8"), ("tt", "tt-4x4+perm+mean+int8"), ("rows4", "row+int4"))}
    return RankStore.create(tmp_path / "store", SourceInfo("tiny-llama"), weight, rungs)


def test_rung_switch_between_queries_with_the_new_head(tmp_path):
    from tests.test_embedding import tiny_llama

    store = tiny_store(tmp_path)
    embedding = TTEmbedding.from_store(store, active="rows8")
    model = install(tiny_llama(), embedding, head="tied")
    head = model.get_output_embeddings()
    assert isinstance(head, TiedTTHead)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    seen = {}
    with torch.no_grad():
        for name in ("rows8", "tt", "full", "rows8"):
            embedding.set_rung(name)
            hidden = model.model(ids).last_hidden_state  # (1, T, d)
            logits = model(ids).logits
            check_close(embedding.rung(name), logits[0], hidden[0], head.prepared(name))
            seen[name] = logits
            model.generate(ids, max_new_tokens=3, do_sample=False)
    assert not torch.allclose(seen["rows8"], seen["tt"], atol=1e-3)  # the switch took effect
    assert len(head._prepared) <= head.keep  # memory follows the rung


def test_install_with_rescore_gives_fulls_greedy_from_a_coarse_rung(tmp_path):
    from tests.test_embedding import tiny_llama

    store = tiny_store(tmp_path)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    reference = install(tiny_llama(), TTEmbedding.from_store(store, active="full"), head="tied")
    model = install(tiny_llama(), TTEmbedding.from_store(store, active="rows4"), head="tied", rescore="full")
    with torch.no_grad():
        expected = reference.generate(ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), expected)
    stats = model.get_output_embeddings().prepared("rows4").stats
    assert stats.steps >= 12 and 0 < stats.mean_fraction <= 1


# --------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    from tensorslm.rank_store.models import load_model

    return load_model("smollm2-135m")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["row+mean+norm+int8", "row+mean+norm+int6", "row+mean+norm+int4",
                                    "budget-8+mean+norm+rows", "tt-max+perm+mean+int8", "tt-4x6+pca8",
                                    "tt-4x6+norm+sparse8"])
def test_compressed_head_on_the_real_table(smollm2, recipe):
    weight = smollm2.model.get_input_embeddings().weight.detach().float()
    ids = smollm2.tokenizer("The tide comes in twice a day because", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = smollm2.model.model(ids).last_hidden_state[0, -4:]  # (4, 576) real final states
    rung = build(weight, recipe)
    head = CompressedHead(rung, tt_mode="contract")
    worst = check_close(rung, head(hidden), hidden, head)
    print(f"{recipe}: largest error {worst:.2f} of the stated bound; {head.describe()}")


@pytest.mark.slow
def test_two_stage_greedy_is_fulls_on_50_chat_prompts(capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_two_stage import run

    result = run("smollm2-135m", ("auto-4",), prompts=50, tokens=64)
    r = result["rungs"]["auto-4"]
    with capsys.disabled():
        print(f"\nauto-4 with rescore=full: {r['identical']}/{r['of']} identical; rescored fraction per step "
              f"mean {r['rescored_fraction_mean']:.4%}, p99 {r['rescored_fraction_p99']:.4%}, "
              f"max {r['rescored_fraction_max']:.4%}")
    assert r["identical"] == r["of"] == 50
    assert r["steps"] >= 50 * 64 and r["rescored_fraction_mean"] < 0.01

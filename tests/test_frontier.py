"""Pareto front and domination on a hand-made set, picks per ratio."""
import math

import pytest

from tensorslm.rank_store.frontier import (PERPLEXITY_NOISE, FrontierError, Point, dominated_by, pareto_front,
                                          pick_for_ratios)

POINTS = [
    Point("full", 1000, 10.0),
    Point("a", 500, 10.5),
    Point("b", 600, 12.0),   # dominated by a and c (c is smaller)
    Point("c", 250, 11.0),
    Point("d", 250, 13.0),   # dominated by c (same bytes, worse)
    Point("e", 125, 20.0),
    Point("f", 300, 20.0),   # dominated by c and e
]


def test_front() -> None:
    assert [p.name for p in pareto_front(POINTS)] == ["e", "c", "a", "full"]


def test_dominated_by() -> None:
    assert dominated_by(POINTS) == {"full": None, "a": None, "b": "c", "c": None, "d": "c", "e": None, "f": "e"}


def test_pick_for_ratios() -> None:
    picks = pick_for_ratios(POINTS, 1000, [1, 2, 3, 4, 8, 16])
    assert [p.name if p else None for p in picks] == ["full", "a", "c", "c", "e", None]


@pytest.mark.parametrize("a, b, dominated", [
    (Point("a", 100, 29.19), Point("b", 100, 29.17), False),  # same size, 0.07% apart: noise, no ranking
    (Point("a", 100, 29.19), Point("b", 80, 29.17), True),    # b smaller and as good within noise
    (Point("a", 100, 29.17), Point("b", 80, 29.19), True),    # b smaller, 0.07% worse: still as good
    (Point("a", 100, 29.17), Point("b", 80, 29.40), False),   # b 0.8% worse: beyond the noise
    (Point("a", 100, 30.00), Point("b", 100, 29.00), True),   # same size, 3% better: dominated
])
def test_perplexity_differences_below_the_noise_count_as_equal(a: Point, b: Point, dominated: bool) -> None:
    assert dominated_by([a, b], tolerance=PERPLEXITY_NOISE)["a"] == ("b" if dominated else None)
    assert dominated_by([a, b], tolerance=PERPLEXITY_NOISE)["b"] is None


def test_without_tolerance_any_difference_ranks() -> None:
    assert dominated_by([Point("a", 100, 29.19), Point("b", 100, 29.17)]) == {"a": "b", "b": None}


def test_bad_point() -> None:
    with pytest.raises(FrontierError, match="finite quality"):
        pareto_front([Point("x", 1, math.nan)])


# ---- recipes: the techniques composed, through the core's rung format ------------------------
import dataclasses  # noqa: E402

import torch  # noqa: E402

from tensorslm.rank_store.compress import compress_table  # noqa: E402
from tensorslm.rank_store.recipes import Recipe, RecipeError, auto_recipe, budget_choice, build  # noqa: E402
from tensorslm.rank_store.core_quant import unpack_codes  # noqa: E402
from tensorslm.rank_store.rung import RankGroup, Rung, reconstruct_rows  # noqa: E402
from tensorslm.rank_store.rung_spec import parse_rung_specs  # noqa: E402


def _rows(rung: Rung) -> torch.Tensor:
    return reconstruct_rows(rung, torch.arange(rung.vocab_size))  # (V, d)


def _table(V: int = 300, d: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(V, d, generator=g) * torch.linspace(0.2, 2.0, d) + 0.5


def _unpacked(rung: Rung) -> Rung:
    """The same rung with every packed (int4/int6) group stored as plain int8 codes."""
    groups = tuple(RankGroup(tuple(unpack_codes(c, f"int{g.bits}", n, dim=2) for c, n in zip(g.cores, g.widths)),
                             token_ids=g.token_ids, scales=g.scales) if g.widths is not None else g
                   for g in rung.groups)
    return dataclasses.replace(rung, groups=groups)


@pytest.mark.parametrize("recipe", ["tt-max+perm+mean+int8", "tt-2x2+corr+pca3+fp16+sparse4",
                                    "budget-3+perm+mean+int8", "tt-3x3+mean", "tt-2x2+int4",
                                    "tt-max+mean+norm+int4", "row+mean+norm+int4", "budget-5+mean+norm+rows",
                                    "tt-max+mean+int6", "row+int6"])
def test_recipe_rung_round_trips_packed_and_on_disk_format(recipe: str) -> None:
    """Packing int4/int6 codes loses nothing, and the stored tensors rebuild the same rows and bytes."""
    w = _table()
    rung = build(w, recipe)
    ids = torch.arange(w.shape[0])
    rows = reconstruct_rows(rung, ids)
    assert torch.equal(reconstruct_rows(_unpacked(rung), ids), rows)
    again = Rung.from_tensors(rung.tensors(), rung.metadata())
    assert torch.equal(reconstruct_rows(again, ids), rows)
    assert again.nbytes == rung.nbytes == sum(t.numel() * t.element_size() for t in rung.tensors().values())
    assert rung.meta["recipe"] == Recipe.parse(recipe).name


def test_recipe_techniques_lower_the_error() -> None:
    w = _table()
    err = {r: float((w - _rows(build(w, r))).norm() / w.norm())
           for r in ["tt-2x2", "tt-2x2+mean", "tt-2x2+mean+sparse4", "tt-max+int8", "tt-max"]}
    assert err["tt-2x2"] > err["tt-2x2+mean"] > err["tt-2x2+mean+sparse4"]
    assert err["tt-max"] < 1e-5 < err["tt-max+int8"] < 0.02


def test_budget_recipe_meets_its_ratio() -> None:
    w = _table(2000, 24)
    for ratio in (2.5, 3.0):
        rung = build(w, f"budget-{ratio:g}+perm+mean")
        assert rung.ratio >= ratio and len(rung.groups) > 1


def test_budget_with_rows_mixes_whole_rows_and_tt_groups() -> None:
    w = _table(2000, 64)  # int4 rows are 7.5x: 10x needs cheaper TT options for the rare tokens
    rung = build(w, "budget-10+mean+norm+rows+shape4x4x4")
    kinds = {len(g.cores) for g in rung.groups}  # 1 core: a whole row; 3 cores: a TT
    assert rung.ratio >= 10 and kinds == {1, 3}, budget_choice(rung)
    assert rung.group_of.dtype == torch.uint8
    assert sum(budget_choice(rung).values()) == 2000


def test_norm_evens_out_the_coordinates_before_quantising() -> None:
    w = _table()  # coordinates spread 0.2 .. 2.0: a per-row int4 step set by the wide ones drowns the narrow
    spread = (w - w.mean(0)).pow(2).mean(0).sqrt()  # (d,)

    def worst_coordinate(recipe: str) -> float:
        return float(((w - _rows(build(w, recipe))).pow(2).mean(0).sqrt() / spread).max())

    plain, normed = worst_coordinate("row+mean+int4"), worst_coordinate("row+mean+norm+int4")
    assert normed < 0.5 * plain, (plain, normed)


@pytest.mark.parametrize("text, message", [
    ("svd-4", "the first part must be tt-<ranks>"),
    ("tt-4x4+foo", "unknown option 'foo'"),
    ("budget-4+fp16", "a budget rung picks int8, int6 or int4"),
    ("tt-4x4+rows", "'rows' adds whole-row options to a budget menu"),
])
def test_bad_recipes(text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        Recipe.parse(text)


def test_compress_table_with_recipes_and_auto() -> None:
    w = _table()
    specs = parse_rung_specs(ranks="2x2", recipes="tt-max+mean+perm+int8,auto-1.5,auto-3")
    assert [s.name for s in specs] == ["tt-2x2", "tt-max_perm_mean_int8", "auto-1.5", "auto-3"]
    rungs = compress_table(w, specs, shape=(2, 3, 4), progress=False)
    assert rungs["auto-1.5"].meta["recipe"].startswith("tt-max+perm+mean+int8")
    assert rungs["auto-3"].ratio >= 3 and rungs["auto-3"].meta["recipe"] == "row+mean+norm+int8"  # order 1
    assert auto_recipe(2, (8, 8, 9)) == "tt-max+perm+mean+int8"
    assert auto_recipe(4, (8, 8, 9)) == "row+mean+norm+int8"
    assert auto_recipe(8, (8, 8, 9)) == "row+mean+norm+int4"  # 7.94x, within the 1% slack
    assert auto_recipe(16, (8, 8, 9)) == "budget-16+mean+norm+rows"
    assert auto_recipe(6, (8, 8, 9)) == "rows-6+mean+norm+g32"  # int8, int6 and int4g32 rows mixed to hit 6x
    assert auto_recipe(6, (5, 5, 5)) == "budget-6+mean+norm+rows"  # d = 125: no scale groups of 32
    assert auto_recipe(8, (8, 8, 10), vocab_size=262_144) == "budget-8+mean+norm+rows"  # Gemma: +2.2% vs +8.0%
    assert auto_recipe(8, (8, 8, 9), vocab_size=49_152) == "row+mean+norm+int4"  # SmolLM2: +1.1% vs +3.1%


def test_cli_compress_auto_ladder_and_inspect_marks_dominated(tmp_path) -> None:
    from click.testing import CliRunner

    from tensorslm.cli import cli
    from tests.test_evaluate import tiny_llama, word_tokenizer

    words = [f"w{i}" for i in range(40)]
    model = tmp_path / "tiny-llama"
    tiny_llama(context=32, vocab=len(words) + 2).save_pretrained(model)
    word_tokenizer(words).save_pretrained(model)
    store = tmp_path / "store"
    # tt-2x2 with int8 cores (26 bytes a token) is smaller and better than tt-1x1 in fp32 (32 bytes)
    result = CliRunner().invoke(cli, ["compress", str(model), "-o", str(store), "--ladder", "auto", "--budgets",
                                      "1.2", "--recipes", "tt-2x2+int8,tt-1x1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(cli, ["inspect", str(store)], catch_exceptions=False).output
    assert "auto-1.2" in shown and "tt-2x2_int8" in shown, shown
    assert "dominated: tt-1x1 (by tt-2x2_int8, on bytes and relative error)" in shown, shown


def test_store_domination_prefers_recorded_perplexity() -> None:
    from types import SimpleNamespace

    from tensorslm.rank_store.frontier import store_domination

    infos = {  # name: (bytes, rel_error, dense perplexity or None)
        "full": (1000, 0.0, 29.2), "tt-max_perm_mean_int8": (316, 0.011, 29.17),
        "budget-8_perm_mean_int8": (125, 0.51, 58.1), "tt-6x8_int8": (221, 0.41, 41.7)}

    class Store:
        rung_names = list(infos)

        def __init__(self, with_ppl: bool) -> None:
            self.with_ppl = with_ppl

        def info(self, name: str) -> SimpleNamespace:
            nbytes, err, ppl = infos[name]
            results = {"dense": {"perplexity": ppl}} if self.with_ppl else {}
            return SimpleNamespace(name=name, nbytes=nbytes, rel_error=err, results=results)

    measure, dominated = store_domination(Store(True))
    assert measure == "perplexity (head dense; differences under 0.5% count as evaluation noise)"
    assert dominated == {"full": "tt-max_perm_mean_int8", "tt-max_perm_mean_int8": None,
                         "budget-8_perm_mean_int8": None, "tt-6x8_int8": None}
    measure, dominated = store_domination(Store(False))
    assert measure == "relative error" and dominated["full"] is None


def test_new_rung_kinds_survive_a_store_on_disk(tmp_path) -> None:
    """int4 cores, whole-row groups, the 1-byte group map and col_scale, written and read back."""
    from tensorslm.rank_store.store import RankStore, SourceInfo

    w = _table(2000, 64)
    built = {r.replace("+", "_"): build(w, r + "+shape4x4x4")
             for r in ["budget-10+mean+norm+rows", "tt-max+mean+norm+int4", "row+mean+norm+int4"]}
    source = SourceInfo("toy", architecture="LlamaForCausalLM", vocab_size=2000, dim=64)
    store = RankStore.create(tmp_path / "s", source, w, built)
    again = RankStore.open(tmp_path / "s")
    for name, b in built.items():
        rung = again.load_rung(name)
        assert again.info(name).nbytes == b.nbytes == rung.nbytes, name
        torch.testing.assert_close(reconstruct_rows(rung, torch.arange(2000)), _rows(b), atol=1e-4, rtol=0)
    assert again.info("tt-max_mean_norm_int4").dtype == "int4"
    assert len(store.info("budget-10_mean_norm_rows").groups) > 1


# ---- the default auto ladder against the measured frontier ------------------------------------
#: the two models of bench/results/frontier.json: tensorisation and vocabulary size
MEASURED_MODELS = {"smollm2": ((8, 8, 9), 49_152), "gemma": ((8, 8, 10), 262_144)}


def _auto_points(budgets, model: str, head: str = "dense") -> list[Point]:
    """The measured (bytes, perplexity with ``head``) of the recipe each auto-<budget> resolves to."""
    import json
    from pathlib import Path

    measured = json.loads((Path(__file__).resolve().parents[1] / "bench/results/frontier.json").read_text())[model]
    shape, vocab = MEASURED_MODELS[model]
    points = []
    for budget in budgets:
        recipe = auto_recipe(budget, shape, vocab_size=vocab)
        assert f"ppl_{head}" in measured.get(recipe, {}), \
            f"{model}: auto-{budget} is {recipe}, which bench_frontier has not measured with head {head}"
        points.append(Point(f"auto-{budget:g}", measured[recipe]["nbytes"], measured[recipe][f"ppl_{head}"]))
    return points


@pytest.mark.parametrize("model", sorted(MEASURED_MODELS))
def test_default_auto_ladder_has_no_dominated_rung(model: str) -> None:
    """With the head agents serve by default (tied): with the dense head the 6x rows are within
    noise of auto-4 (+0.4% SmolLM2, +0.1% Gemma), with the tied head 1.2% and 0.6% above it."""
    from tensorslm.constants import AUTO_LADDER_BUDGETS, HEAD_TIED

    points = _auto_points(AUTO_LADDER_BUDGETS, model, HEAD_TIED)
    assert len({p.nbytes for p in points}) == len(points)  # distinct rungs
    assert dominated_by(points, PERPLEXITY_NOISE) == {p.name: None for p in points}


@pytest.mark.parametrize("model", sorted(MEASURED_MODELS))
def test_auto_2_is_dominated_by_auto_4_so_it_is_not_a_default(model: str) -> None:
    """The rule bites: exact TT with int8 cores (auto-2, 3.2x) is no better than per-row int8 (auto-4)."""
    assert dominated_by(_auto_points((2, 4, 8, 16), model), PERPLEXITY_NOISE)["auto-2"] == "auto-4"

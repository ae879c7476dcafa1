"""Whole int4 rows with one scale per group of coordinates (``int4g<k>``, ``rows-<ratio>+g<k>``):
the quantiser, the rung format on disk, the lookup, and the tied head against rebuilt rows.

Head tolerance as in tests/test_head.py: ``CompressedHead.arithmetic_bound`` plus 1e-5 ||h|| ||row||.
"""
from __future__ import annotations

import pytest
import torch

from tensorslm.rank_store.embedding import TTEmbedding
from tensorslm.rank_store.head import CompressedHead, TwoStageHead
from tensorslm.rank_store.recipes import Recipe, RecipeError, build
from tensorslm.rank_store.rung import RankGroup, Rung, RungFormatError, quantize_row_groups, reconstruct_rows
from tensorslm.rank_store.store import RankStore, SourceInfo
from tests.test_head import check_close


def uneven_table(V: int = 400, d: int = 128, seed: int = 0) -> torch.Tensor:
    """Rows whose coordinate groups differ in magnitude by up to 100x: one scale per row wastes
    the int4 levels on the small groups."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-1, 1, d // 32).repeat_interleave(32)  # (d,) one magnitude per 32 coordinates
    return torch.randn(V, d, generator=g) * spread


def small_coordinates_error(weight: torch.Tensor, recipe: str) -> float:
    """Relative error on the 32 coordinates of the smallest magnitude (the first 32)."""
    rows = reconstruct_rows(build(weight, recipe), torch.arange(weight.shape[0]))
    return float((rows - weight)[:, :32].norm() / weight[:, :32].norm())


def test_error_falls_as_the_scale_groups_shrink():
    weight = uneven_table()
    errors = [small_coordinates_error(weight, r) for r in ("row+int4", "row+int4g128", "row+int4g64", "row+int4g32")]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.2 * errors[0], errors


def test_quantiser_codes_scales_and_error():
    weight = uneven_table(V=64, d=64)
    codes, scales = quantize_row_groups(weight, 32)
    assert codes.dtype == torch.int8 and codes.shape == (64, 64) and int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert scales.dtype == torch.float16 and scales.shape == (64, 2)
    rebuilt = (codes.float().reshape(64, 2, 32) * scales.float()[:, :, None]).reshape(64, 64)
    amax = weight.reshape(64, 2, 32).abs().amax(-1)  # (64, 2)
    # each group's scale is a clip of its maximum (ratio 0.8..1) over 7, rounded to fp16
    ratio = scales.float() * 7 / amax
    assert torch.all((ratio > 0.8 * (1 - 2 ** -10)) & (ratio < 1 + 2 ** -10))
    # within half a step of its group, or clipped at most (1 - 0.8) of the group's maximum
    step = scales.float().repeat_interleave(32, dim=1)
    assert torch.all((rebuilt - weight).abs() <= torch.maximum(step / 2, 0.2 * amax.repeat_interleave(32, 1)) + 1e-6)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("recipe", ["row+int4g32", "row+mean+norm+int4g32", "row+int4g64",
                                    "rows-6+mean+norm+g32", "rows-6.5+g64", "budget-6+mean+norm+rows+g32"])
def test_head_matches_rebuilt_rows(recipe, d):
    weight = uneven_table(d=d)
    rung = build(weight, recipe)
    assert any(g.group_size for g in rung.groups)
    hidden = torch.randn(3, d, generator=torch.Generator().manual_seed(1)) * 4
    head = CompressedHead(rung)
    check_close(rung, head(hidden), hidden, head)
    assert "int4g" in head.describe()


def test_head_row_norms_are_the_dequantised_rows():
    """The bound scales with ||t_v||: with group scales that is the dequantised row's norm, not
    ||codes|| times one scale (on this table the two differ by up to 10x)."""
    rung = build(uneven_table(), "row+int4g32")
    head = CompressedHead(rung)
    rows = reconstruct_rows(rung, torch.arange(rung.vocab_size))
    assert torch.allclose(head.part_norms(), rows.norm(dim=1), rtol=1e-5)
    group = rung.groups[0]
    one_scale = head.parts[0].norms / group.scales[0].float().amax(1)  # what a per-row formula would give
    assert not torch.allclose(one_scale * group.scales[0].float()[:, 0], rows.norm(dim=1), rtol=0.1)


def test_grouped_rows_cost_their_bytes():
    V, d = 400, 128
    rung = build(uneven_table(V, d), "row+int4g32")
    assert rung.nbytes == V * d // 2 + V * (d // 32) * 2  # codes two per byte, an fp16 scale per 32
    assert rung.ratio == pytest.approx(4 * 32 / (16 + 2))  # 4.5 bits per weight against 32


def test_two_stage_argmax_is_the_fine_rungs_from_grouped_rows():
    weight = uneven_table(V=2000, d=64, seed=3)
    head = TwoStageHead(CompressedHead(build(weight, "row+int4g32")), Rung.dense(weight))
    hidden = torch.randn(200, 64, generator=torch.Generator().manual_seed(4)) * 3
    assert torch.equal(head(hidden).argmax(1), (hidden @ weight.T).argmax(1))


def test_store_round_trip_verifies_and_serves_the_same_rows(tmp_path):
    weight = uneven_table(V=300, d=64)
    rungs = {"g32": build(weight, "row+mean+norm+int4g32"), "mix": build(weight, "rows-6+mean+norm+g32")}
    store = RankStore.create(tmp_path / "s", SourceInfo("random"), weight, rungs)
    reopened = RankStore.open(store.path)
    ids = torch.tensor([0, 7, 299, 7])
    for name, rung in rungs.items():
        loaded = reopened.load_rung(name)
        assert [g.group_size for g in loaded.groups] == [g.group_size for g in rung.groups]
        assert torch.equal(reconstruct_rows(loaded, ids), reconstruct_rows(rung, ids))
    embedding = TTEmbedding.from_store(reopened, active="g32")
    assert torch.equal(embedding(ids[None])[0], reconstruct_rows(rungs["g32"], ids))


def test_a_changed_grouped_rung_file_is_refused(tmp_path):
    from tensorslm.rank_store.errors import StoreCorruptError

    weight = uneven_table(V=300, d=64)
    store = RankStore.create(tmp_path / "s", SourceInfo("random"), weight, {"g32": build(weight, "row+int4g32")})
    file = next(p for p in store.path.iterdir() if p.name.startswith("g32"))
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF  # one code of the last row
    file.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError):
        RankStore.open(store.path).load_rung("g32")


@pytest.mark.parametrize("recipe, message", [
    ("tt-4x6+int4g32", "needs row, rows-<ratio> or budget-<ratio>\\+rows"),
    ("row+int4g16", "takes k in 32, 64, 128, 256"),
    ("row+int8+g32", "write int4g<k> for a row recipe"),
    ("rows-6+int4g32", "drop the dtype"),
    ("row+int4g2x", "unknown option 'int4g2x'"),
])
def test_bad_recipes_say_what_is_valid(recipe, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.parse(recipe)


def test_recipe_names_survive_the_store_spelling():
    for text in ("row+mean+norm+int4g32", "rows-6+mean+norm+g32", "budget-8+mean+norm+rows+g64"):
        name = Recipe.parse(text).name
        assert name == text and Recipe.parse(name.replace("+", "_")).name == text


def test_width_not_divisible_by_the_group_is_refused():
    with pytest.raises(RecipeError, match="must divide the row width d = 48"):
        build(torch.randn(10, 48), "row+int4g32")
    codes = torch.zeros(4, 1, 32, 1, dtype=torch.uint8)
    with pytest.raises(RungFormatError, match=r"scale 0 must be float16 of shape \(4, 2\)"):
        RankGroup((codes,), scales=(torch.ones(4, dtype=torch.float16),), widths=(64,), bits=4, group_size=32)
    with pytest.raises(RungFormatError, match="scale groups are for whole int4 rows"):
        RankGroup((torch.zeros(4, 1, 64, 1, dtype=torch.int8),), scales=(torch.ones(4, 2, dtype=torch.float16),),
                  group_size=32)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["row+mean+norm+int4g32", "rows-6+mean+norm+g32"])
def test_head_on_the_real_table(recipe):
    from tensorslm.rank_store.models import load_model

    smollm2 = load_model("smollm2-135m")
    weight = smollm2.model.get_input_embeddings().weight.detach().float()
    ids = torch.tensor([smollm2.tokenizer("The tide comes in twice a day because")["input_ids"]])
    with torch.no_grad():
        hidden = smollm2.model.model(ids).last_hidden_state[0, -4:]  # (4, 576) real final states
    rung = build(weight, recipe)
    head = CompressedHead(rung)
    worst = check_close(rung, head(hidden), hidden, head)
    print(f"{recipe}: largest error {worst:.2f} of the stated bound; {head.describe()}")

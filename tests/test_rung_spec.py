from __future__ import annotations

import pytest

from tensorslm.rank_store.errors import RungSpecError
from tensorslm.rank_store.rung_spec import RungKind, RungSpec, parse_rung_specs


@pytest.mark.parametrize(
    "ranks, ratios, tolerances, names",
    [
        ("6x8,4x6,max", None, None, ["tt-6x8", "tt-4x6", "tt-max"]),
        (None, "1.25,2", None, ["ratio-1.25", "ratio-2"]),
        (None, None, "0.1, 0.3", ["eps-0.1", "eps-0.3"]),
        ("MAX", "1.5", "0.05", ["tt-max", "ratio-1.5", "eps-0.05"]),
        ("3x2x4", None, None, ["tt-3x2x4"]),
    ],
)
def test_parse(ranks, ratios, tolerances, names):
    assert [s.name for s in parse_rung_specs(ranks, ratios, tolerances)] == names


def test_parsed_values():
    ranks, ratio, eps = parse_rung_specs("6x8", "2", "0.1")
    assert ranks == RungSpec(RungKind.RANKS, ranks=(6, 8))
    assert ratio == RungSpec(RungKind.RATIO, ratio=2.0)
    assert eps == RungSpec(RungKind.TOLERANCE, tolerance=0.1)
    assert parse_rung_specs("max")[0].ranks is None


@pytest.mark.parametrize(
    "ranks, ratios, tolerances, message",
    [
        ("6x8,,4x4", None, None, r"ranks: item 2 of '6x8,,4x4' is empty"),
        ("6*8", None, None, r"ranks: '6\*8' is not a rank list; expected inner TT ranks joined by 'x'"),
        ("6x0", None, None, r"ranks: '6x0' has a rank below 1"),
        ("big", None, None, r"ranks: 'big' is not a rank list"),
        (None, "two", None, r"ratios: 'two' is not a number; expected a compression ratio"),
        (None, "-2", None, r"ratios: '-2' must be > 0"),
        (None, "inf", None, r"ratios: 'inf' is not finite"),
        (None, None, "1.5", r"tolerances: '1.5' must be in \(0, 1\)"),
        (None, None, "0", r"tolerances: '0' must be in \(0, 1\).*use ranks 'max'"),
        ("6x8,6x8", None, None, r"rung 'tt-6x8' is requested twice"),
        (None, None, None, r"no rung given"),
    ],
)
def test_parse_errors(ranks, ratios, tolerances, message):
    with pytest.raises(RungSpecError, match=message):
        parse_rung_specs(ranks, ratios, tolerances)


def test_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_rung_specs("x")

"""The ladder plot the demo (and ``tensorslm evaluate``) saves: a legend naming each point's
family, plain tick labels, and point names that never overlap one another."""
from __future__ import annotations

import pytest

from tensorslm.rank_store.evaluate import Result, results_figure, rung_family


def result(name: str, kind: str, mb: float, ppl: float) -> Result:
    return Result(name=name, kind=kind, nbytes=int(mb * 1e6), ratio=113.2 / mb, rel_error=0.0,
                  perplexity=ppl, latency_ms=0.1, head="dense", tokens=1024)


# As the frontier lays them out on SmolLM2: int8 and auto-4 at the same bytes and perplexity,
# fp32/fp16 and the int4 rungs close together.
RESULTS = [result("fp32", "baseline", 113.2, 13.705), result("fp16", "baseline", 56.6, 13.705),
           result("int8", "baseline", 28.41, 13.716), result("int4", "baseline", 14.25, 14.02),
           result("auto-4", "rung", 28.41, 13.716), result("auto-8", "rung", 14.26, 13.77),
           result("auto-2", "rung", 35.7, 13.70), result("auto-16", "rung", 7.08, 25.3)]
FAMILIES = {"auto-2": rung_family("auto-2", "tt-max+perm+mean+int8"),
            "auto-4": rung_family("auto-4", "row+mean+norm+int8"),
            "auto-8": rung_family("auto-8", "row+mean+norm+int4"),
            "auto-16": rung_family("auto-16", "budget-16+mean+norm+rows")}


@pytest.mark.parametrize("name, recipe, family", [
    ("fp32", None, "dense reference"), ("full", None, "dense reference"),
    ("int4", None, "per-row quantisation"), ("auto-4", "row+mean+norm+int8", "per-row quantisation"),
    ("int8-row", None, "per-row quantisation"), ("auto-2", "tt-max+perm+mean+int8", "TT"),
    ("tt-4x6", None, "TT"), ("auto-16", "budget-16+mean+norm+rows", "TT+rows"),
])
def test_each_point_gets_its_family(name, recipe, family):
    assert rung_family(name, recipe) == family


@pytest.fixture
def figure():
    import matplotlib.pyplot as plt

    fig = results_figure(RESULTS, title="smollm2-135m, 1024 tokens of wiki.test.raw, head dense",
                         families=FAMILIES)
    fig.canvas.draw()
    yield fig
    plt.close(fig)


def test_legend_names_the_families_present(figure):
    legend = figure.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "dense reference", "per-row quantisation", "TT", "TT+rows"]


def test_tick_labels_are_plain_numbers(figure):
    ax = figure.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
    assert len(labels) >= 4
    for label in labels:
        assert "$" not in label and "times" not in label and "^" not in label, label
        float(label)


def test_point_names_do_not_overlap(figure):
    ax = figure.axes[0]
    renderer = figure.canvas.get_renderer()
    names = [t for t in ax.texts]
    assert {t.get_text() for t in names} <= {r.name for r in RESULTS}
    assert len(names) >= len(RESULTS) - 1      # at most one name without room
    boxes = [t.get_window_extent(renderer) for t in names]
    for i, a in enumerate(boxes):
        for j, b in enumerate(boxes[i + 1:], start=i + 1):
            assert not a.overlaps(b), (names[i].get_text(), names[j].get_text())


def test_near_equal_perplexities_are_not_magnified():
    """fp32 and auto-4 within 0.03 % of each other: the axis spans at least 2 % of the value."""
    import matplotlib.pyplot as plt

    fig = results_figure([result("fp32", "baseline", 113.2, 13.7045),
                          result("auto-4", "rung", 28.41, 13.7002)],
                         families={"auto-4": "per-row quantisation"})
    low, high = fig.axes[0].get_ylim()
    plt.close(fig)
    assert low <= 13.7002 and high >= 13.7045
    assert high - low >= 0.02 * 13.7002 * 0.999

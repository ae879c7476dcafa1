"""The pure parts of bench/bench_operating_points.py: medians, the CPU share, the saving, the table."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_operating_points import QueryRecord, markdown_table, saving, summarise  # noqa: E402


def record(joules: float, cpu: float, tokens: int, *, method: str = "estimated",
           ttft: float | None = 0.5) -> QueryRecord:
    return QueryRecord(config="p", prompt=0, prompt_tokens=30, output_tokens=tokens, wall_s=2 * cpu,
                       cpu_s=cpu, ttft_s=ttft, joules=joules, uncertainty_j=0.3 * joules,
                       method=method)


def test_summary_takes_medians_spread_and_cpu_share():
    s = summarise("eco", [record(10, 1.0, 10), record(30, 3.0, 30), record(20, 2.0, 20, ttft=None)],
                  watts_per_core=0.9)
    assert (s.joules, s.joules_min, s.joules_max) == (20, 10, 30)
    assert s.cpu_s == 2.0 and s.wall_s == 4.0 and s.output_tokens == 20
    assert s.joules_above_idle == pytest.approx(1.8)        # 0.9 W x median CPU seconds
    assert s.ttft_s == 0.5                                  # queries without a TTFT are skipped
    assert s.cpu_ms_per_token == pytest.approx(100.0)       # 6 CPU s over 60 tokens
    assert s.method == "estimated" and s.queries == 3


@pytest.mark.parametrize("records, message", [
    ([], "has no queries"),
    ([record(1, 1, 1), record(1, 1, 1, method="rapl")], "mixes energy methods"),
])
def test_summary_refuses_what_it_cannot_summarise(records, message):
    with pytest.raises(ValueError, match=message):
        summarise("x", records, watts_per_core=0.9)


def test_uncontended_joules_take_wall_time_as_cpu_seconds_over_threads():
    one = record(99, 2.0, 10)                       # measured wall (4 s) and joules are ignored
    two = record(99, 4.0, 10)
    two.threads = 2
    s1 = summarise("a", [one], watts_per_core=0.9, idle_watts=2.7)
    s2 = summarise("b", [two], watts_per_core=0.9, idle_watts=2.7)
    assert s1.joules_uncontended == pytest.approx(2.7 * 2.0 + 0.9 * 2.0)
    assert s2.joules_uncontended == pytest.approx(2.7 * 2.0 + 0.9 * 4.0)


def test_saving_is_the_fraction_of_the_top_points_joules():
    top = summarise("full", [record(40, 4, 40)], 0.9)
    low = summarise("eco", [record(10, 1, 10)], 0.9)
    assert saving(top, low) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="cannot compare"):
        saving(summarise("z", [record(0, 0, 1)], 0.9), low)


def test_table_has_a_row_per_point_with_perplexity():
    s = summarise("eco", [record(12.34, 1.0, 10)], 0.9)
    s.extra = {"knobs": "rung full, 1 thread", "perplexity": 29.2}
    lines = markdown_table([s]).splitlines()
    assert len(lines) == 3 and lines[1].count("---") == lines[0].count("|") - 1
    assert lines[2].startswith("| eco | rung full, 1 thread | 12.3 (12.3..12.3) | 0.9 | 0.9 |")
    assert lines[2].endswith("| 29.20 |")


def test_page_renders_from_json_and_resummarises_old_records():
    from dataclasses import asdict

    from bench_operating_points import render_markdown

    top = summarise("full", [record(40, 4, 40)], 0.9, 2.7)
    low = summarise("eco", [record(10, 1, 10)], 0.9, 2.7)
    old = asdict(low)
    del old["joules_uncontended"]                     # a file from before that column
    old["extra"] = {"records": [asdict(record(10, 1, 10))]}
    page = render_markdown({"command": "python bench/x.py", "head": "tied",
                            "board": "raspberry-pi-4", "points": [asdict(top), old]})
    assert "Command: `python bench/x.py`" in page and "**estimated**" in page
    assert "## SmolLM2-135M, head `tied`" in page              # a file of one run, before `runs`
    assert "* `eco` / `full`: 0.25 of the metered joules per query, 0.25 if uncontended, " \
           "0.25 of the CPU seconds (medians), 1.00 of the joules per token" in page


def test_page_has_a_section_per_model_and_head():
    from dataclasses import asdict

    from bench_operating_points import render_markdown

    top = summarise("full", [record(40, 4, 40)], 0.9, 2.7)
    low = summarise("eco", [record(5, 1, 10)], 0.9, 2.7)
    runs = [{"model": model, "head": head, "load": "1.0 to 1.2", "points": [asdict(top), asdict(low)]}
            for model in ("smollm2-135m", "gemma3-270m") for head in ("tied", "dense")]
    page = render_markdown({"command": "python bench/x.py", "board": "raspberry-pi-4", "runs": runs})
    sections = [line for line in page.splitlines() if line.startswith("## ")]
    assert sections == ["## SmolLM2-135M, head `tied`", "## SmolLM2-135M, head `dense`",
                        "## Gemma-3-270m, head `tied`", "## Gemma-3-270m, head `dense`"]
    assert page.count("0.50 of the joules per token") == 4     # 0.5 J/token against 1.0

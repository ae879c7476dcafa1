"""The demo end to end: real SmolLM2, its ladder, the amqtt broker in process, the real agent,
a simulated battery through the INA219 driver, the policy switching points, the query log."""
from __future__ import annotations

import io
import sqlite3

import pytest
from rich.console import Console

from tensorslm.cli.demo import DemoOptions, run_demo

POLICY = """\
points:
  - {name: full, rung: full, threads: 2, max_new_tokens: 12}
  - {name: eco, rung: tt-4x6, threads: 1, max_new_tokens: 6}
dwell_seconds: 1
smoothing_seconds: 0
battery:
  - {point: eco, enter_below: 60, exit_above: 70}
"""


@pytest.mark.slow
def test_demo_serves_prompts_switches_and_logs(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    out = io.StringIO()
    # 70 % is well above the 60 % threshold when the first prompt goes out; the battery then
    # drains (about 3 % per second at this acceleration) until the demo stops at empty.
    options = DemoOptions(prompts=60, max_new_tokens=12, workdir=tmp_path / "demo", policy=policy,
                          text=None, ladder_specs="tt-4x6", battery_wh=0.5, start_percent=70,
                          acceleration=20, live=False)
    summary = run_demo(options, Console(file=out, width=140, color_system=None))
    text = out.getvalue()

    assert summary.broker.startswith("mqtt://127.0.0.1:")        # the embedded amqtt broker
    rows = sqlite3.connect(summary.log_path).execute(
        "select outcome, output_tokens, energy_j, energy_method, operating_point, rung "
        "from queries order by received_at").fetchall()
    assert 2 <= len(rows) < 60, rows
    assert "the battery is empty: the demo stops here" in text
    assert all(r[0] == "ok" and r[1] >= 1 for r in rows), rows
    # Metered while the battery lasted; the query it ran empty in has no energy (the agent
    # does not record a window the source stopped reading in).
    assert all(r[2] > 0 and r[3] == "simulated" for r in rows[:-1]), rows
    # The battery crossed 60 %: the policy moved from the top point to eco, and the rung followed.
    assert rows[0][4:] == ("full", "full")
    assert rows[-1][4:] == ("eco", "tt-4x6")
    assert ("full", "eco") in [(s["from_point"], s["to_point"]) for s in summary.switches]
    assert summary.battery_end < 1 < 60 < summary.battery_start
    assert max(r[1] for r in rows if r[4] == "eco") <= 6              # eco's token cap applied
    assert "what it cost" in text and str(summary.log_path) in text
    # Not a terminal: a line per answer, then the whole view once with every prompt sent.
    assert all(f"prompt {i}/60: ok" in text for i in range(1, len(rows) + 1)), text
    assert text.count("J/token") == 1 and "energy method: simulated" in text
    assert "tt-4x6" in text                                          # the ladder table was shown


def test_summary_table_gives_cost_per_point_with_its_method(tmp_path):
    from tensorslm.cli.demo import DemoSummary, summary_table

    rows = [{"outcome": "ok", "operating_point": "eco", "rung": "full", "output_tokens": 10,
             "latency_s": 1.0, "energy_j": 2.0, "energy_method": "simulated"}] * 3
    table = summary_table(DemoSummary(log_path=tmp_path / "q.db", store_dir=tmp_path, plot=None,
                                      queries=rows, battery_start=70, battery_end=20))
    console = Console(width=80, record=True, color_system=None)   # a pipe's width
    console.print(table)
    text = console.export_text()
    assert "battery 70.0% → 20.0%, 0 operating-point switches" in text
    assert "│ eco   │ full │       3 │         10.0 │    1.00 │    2.00 │   0.200 │" in text
    assert "tokens/query" in text and "…" not in text
    assert "energy method: simulated" in text


def test_cost_per_token_counts_only_the_metered_queries(tmp_path):
    """A query without energy (the battery ran empty in it) adds its tokens to tokens/query but
    neither joules nor tokens to J/token."""
    from tensorslm.cli.demo import DemoSummary, summary_table

    row = {"outcome": "ok", "operating_point": "eco", "rung": "auto-8", "latency_s": 1.0,
           "energy_method": "simulated"}
    rows = [{**row, "output_tokens": 10, "energy_j": 2.0},
            {**row, "output_tokens": 30, "energy_j": None}]
    table = summary_table(DemoSummary(log_path=tmp_path / "q.db", store_dir=tmp_path, plot=None,
                                      queries=rows, battery_start=20, battery_end=0))
    console = Console(width=100, record=True, color_system=None)
    console.print(table)
    assert "│ eco   │ auto-8 │       2 │         20.0 │    1.00 │    2.00 │   0.200 │" in \
        console.export_text()


def test_a_cached_ladder_of_an_older_format_is_rebuilt(tmp_path):
    import json

    from tensorslm.cli.demo import prepare_ladder
    from tensorslm.rank_store.models import load_model
    from tensorslm.rank_store.store import FORMAT_VERSION, RankStore
    from tests.test_evaluate import tiny_llama, word_tokenizer

    words = [f"w{i}" for i in range(40)]
    model_dir = tmp_path / "tiny-llama"
    tiny_llama(context=32, vocab=len(words) + 2).save_pretrained(model_dir)
    word_tokenizer(words).save_pretrained(model_dir)
    loaded = load_model(model_dir)
    # a policy of its own: the shipped one's 6x rung does not fit a 42 x 16 table
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.replace("tt-4x6", "tt-2x2"))
    options = DemoOptions(workdir=tmp_path / "demo", text=None, policy=policy, live=False)
    said: list[str] = []
    prepare_ladder(options, loaded, lambda message: said.append(str(message)))
    store_dir = options.workdir / f"{loaded.name}-ladder"
    manifest = store_dir / "manifest.json"
    old = json.loads(manifest.read_text())
    old["format_version"] = FORMAT_VERSION - 1  # as an older tensorslm wrote it
    manifest.write_text(json.dumps(old))

    said.clear()
    store, _ = prepare_ladder(options, loaded, lambda message: said.append(str(message)))

    assert any("is not usable" in m and "format version 1" in m for m in said), said
    assert any(m.startswith("compressing") for m in said), said
    assert RankStore.open(store_dir).rung_names == store.rung_names
    assert "tt-2x2" in store.rung_names


def _tiny_loaded(tmp_path):
    from tensorslm.rank_store.models import load_model
    from tests.test_evaluate import tiny_llama, word_tokenizer

    words = [f"w{i}" for i in range(40)]
    model_dir = tmp_path / "tiny-llama"
    tiny_llama(context=32, vocab=len(words) + 2).save_pretrained(model_dir)
    word_tokenizer(words).save_pretrained(model_dir)
    return load_model(model_dir), words


def test_the_ladder_holds_every_rung_the_policy_serves(tmp_path):
    from tensorslm.cli.demo import default_specs

    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)                      # eco serves tt-4x6
    assert [s.name for s in default_specs(None, policy)] == ["tt-4x6"]
    assert [s.name for s in default_specs("tt-2x2", policy)] == ["tt-2x2", "tt-4x6"]
    assert [s.name for s in default_specs("tt-4x6,tt-2x2", policy)] == ["tt-4x6", "tt-2x2"]
    full_only = tmp_path / "full.yaml"
    full_only.write_text(POLICY.replace("tt-4x6", "full"))
    assert [s.name for s in default_specs(None, full_only)] == ["auto-4"]   # one to show


def test_the_ladder_is_evaluated_once_and_says_on_how_many_tokens(tmp_path):
    """The first run measures the fp32 reference and each rung on eval_tokens tokens and keeps
    them in the manifest; the next run reuses them and measures nothing."""
    from tensorslm.cli.demo import evaluated_tokens, prepare_ladder

    loaded, words = _tiny_loaded(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(words[i % 40] for i in range(3000)))
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.replace("tt-4x6", "tt-2x2"))
    options = DemoOptions(workdir=tmp_path / "demo", text=text, eval_tokens=200, policy=policy,
                          ladder_specs="tt-1x1", live=False)
    first: list[str] = []
    store, plot = prepare_ladder(options, loaded, lambda m: first.append(str(m)))
    assert set(store.rung_names) == {"full", "tt-1x1", "tt-2x2"}
    assert any(m.startswith("evaluating the fp32 reference and every rung on the first 200 tokens")
               for m in first), first
    assert any("perplexity: first 200 tokens" in m for m in first), first
    assert plot is not None and plot.exists()
    assert evaluated_tokens(store, options.head) == 200
    baselines = store.info("full").results.get(f"baselines-{options.head}", {})
    assert set(baselines) <= {"fp32"}               # no fp16/int8/int4 in the demo
    from tensorslm.rank_store.ladder import ladder_table

    console = Console(width=80, record=True, color_system=None)   # a pipe's width
    console.print(ladder_table(store))
    table = console.export_text()
    assert "…" not in table and "rel.err" in table and "ppl" in table and "tt-2x2" in table

    again: list[str] = []
    store, _ = prepare_ladder(options, loaded, lambda m: again.append(str(m)))
    assert not any(m.startswith(("evaluating", "compressing")) for m in again), again
    assert any("perplexity: first 200 tokens" in m for m in again), again


def test_the_demo_store_keeps_a_self_calibrated_w8a8_body_once(tmp_path):
    """The agent serves the w8a8 body by default: the demo calibrates its input scales on a
    short sample the model writes, stores it once, and a second run reuses it."""
    from tensorslm.cli.demo import prepare_body, prepare_ladder
    from tensorslm.rank_store.smoothing import SHORT_SELF_CALIBRATION

    loaded, _ = _tiny_loaded(tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.replace("tt-4x6", "tt-2x2"))
    options = DemoOptions(workdir=tmp_path / "demo", text=None, policy=policy, live=False)
    store, _ = prepare_ladder(options, loaded, lambda m: None)
    said: list[str] = []
    prepare_body(store, loaded, [], said.append)

    assert store.body_precisions == ["w8a8"]
    meta = store.manifest["bodies"]["w8a8"]["meta"]
    sequences, length = SHORT_SELF_CALIBRATION
    written = sequences * min(length, loaded.context_length)   # the tiny model's context is 32
    assert meta["calibration"].startswith(f"smoothquant:{written} tokens")
    assert meta["calibration"].endswith("self-written")
    assert any(m.startswith(f"calibrating the w8a8 body on {sequences} x {length} tokens")
               for m in said), said
    said.clear()
    prepare_body(store, loaded, [], said.append)   # the next run: nothing to do
    assert said == []

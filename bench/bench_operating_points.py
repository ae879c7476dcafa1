"""Energy per query at each operating point of an energy policy, per model and head, and the knobs.

    python bench/bench_operating_points.py [--policy deploy/policies/battery.yaml]
        [--models smollm2-135m,gemma3-270m] [--heads tied,dense]
        [--ranks 6x8,...] [--recipes auto-4,...] [--store DIR] [--board raspberry-pi-4]
        [--repeats 1] [--prompts 8] [--knobs [--no-points] [--knob-set all|threads]]
        [--out bench/results/operating_points]
    python bench/bench_operating_points.py --render POINTS.json [KNOBS.json ...]

What it does, in this process, with the agent's own code path, for each model of ``--models``:

* builds the model's ladder with ``tensorslm.rank_store.ladder.build_ladder`` at ``--ranks`` and
  ``--recipes`` (default: every rung the policy serves), or reuses the store (``--store``, by
  default one per model under ~/.cache/tensorslm/bench-ladders) when it already holds those rungs,
  and for each head of ``--heads`` serves it as ``tensorslm serve`` does
  (``tensorslm.agent.wiring.load_serving``: the engine at the default body precision);
* for every point of ``--policy``: applies it through ``tensorslm.agent.actuator.AgentActuator`` (rung,
  torch threads, prompt cap) and serves the fixed prompts below as chat requests with greedy
  decoding and the point's ``max_new_tokens`` cap, each query inside an
  ``tensorslm.controller.power.energy_meter.EnergyMeter`` window on the ``--board`` power model;
* records per query: joules (method ``estimated``: board idle watts x wall seconds + watts
  per busy core x this process's CPU seconds), the CPU seconds and wall seconds really
  measured on this machine, time to first token, prompt and output tokens;
* perplexity of each point's rung (first 4,096 tokens of WikiText-2 test, same head mode);
* ``--knobs``: one knob at a time from a base point, to find what moves energy per query.

There is no power sensor here: every joule is the board model's estimate from CPU time
measured on this (x86, shared) machine, not a Pi. The CPU and wall seconds are the real
measurements; a Pi 4 is several times slower per token.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from tensorslm.constants import DEFAULT_BODY_PRECISION, FULL_RUNG, HEAD_MODES, HEAD_TIED

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
LADDERS = Path.home() / ".cache" / "tensorslm" / "bench-ladders"
#: how the results page names the models
MODEL_TITLES = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270m"}
PPL_TOKENS = 4096

log = logging.getLogger("bench_operating_points")

# Fixed prompts: questions an edge assistant gets, most with answers longer than 48 tokens.
PROMPTS: tuple[str, ...] = (
    "Explain how a battery stores energy.",
    "What is the capital of France, and what is it famous for?",
    "Write a short poem about the sea.",
    "Give three tips for saving electricity at home.",
    "How does a refrigerator keep food cold?",
    "Summarise the water cycle in a few sentences.",
    "What is machine learning? Answer briefly.",
    "List the planets of the solar system in order from the sun.",
)


# --------------------------------------------------------------------------- pure parts


@dataclass
class QueryRecord:
    """One served query."""

    config: str
    prompt: int
    prompt_tokens: int
    output_tokens: int
    wall_s: float
    cpu_s: float
    ttft_s: float | None
    joules: float
    uncertainty_j: float | None
    method: str
    threads: int = 1


@dataclass
class Summary:
    """Medians over a configuration's queries, with the spread (min..max) of joules."""

    config: str
    queries: int
    joules: float
    joules_min: float
    joules_max: float
    joules_above_idle: float
    joules_uncontended: float
    uncertainty_j: float | None
    cpu_s: float
    wall_s: float
    ttft_s: float | None
    output_tokens: float
    prompt_tokens: float
    cpu_ms_per_token: float
    method: str
    #: joules of all the queries over all their output tokens (None in files from before it)
    joules_per_token: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def median(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def summarise(config: str, records: Sequence[QueryRecord], watts_per_core: float,
              idle_watts: float = 0.0) -> Summary:
    """Medians of ``records`` (one configuration). ``joules_above_idle`` is the board model's
    CPU term alone (watts per busy core x CPU seconds): what the query added above idle.
    ``joules_uncontended`` is the same board model with the wall time a dedicated board
    would take, CPU seconds / threads (at batch size 1 every torch thread is busy for the
    whole query), instead of the wall time measured on a shared machine."""
    if not records:
        raise ValueError(f"configuration {config!r} has no queries to summarise")
    methods = {r.method for r in records}
    if len(methods) != 1:
        raise ValueError(f"configuration {config!r} mixes energy methods {sorted(methods)}")
    joules = [r.joules for r in records]
    tokens = sum(r.output_tokens for r in records)
    cpu = sum(r.cpu_s for r in records)
    return Summary(
        config=config, queries=len(records), joules=statistics.median(joules),
        joules_min=min(joules), joules_max=max(joules),
        joules_above_idle=watts_per_core * statistics.median(r.cpu_s for r in records),
        joules_uncontended=statistics.median(idle_watts * r.cpu_s / r.threads + watts_per_core * r.cpu_s
                                             for r in records),
        uncertainty_j=median(r.uncertainty_j for r in records),
        cpu_s=statistics.median(r.cpu_s for r in records),
        wall_s=statistics.median(r.wall_s for r in records),
        ttft_s=median(r.ttft_s for r in records),
        output_tokens=statistics.median(r.output_tokens for r in records),
        prompt_tokens=statistics.median(r.prompt_tokens for r in records),
        cpu_ms_per_token=1000 * cpu / tokens if tokens else float("nan"),
        method=methods.pop(),
        joules_per_token=sum(joules) / tokens if tokens else None)


def saving(top: Summary, low: Summary) -> float:
    """Fraction of the top point's median joules that the low point saves (0.5 = halved)."""
    if top.joules <= 0:
        raise ValueError(f"top point {top.config!r} has {top.joules} J; cannot compare")
    return 1.0 - low.joules / top.joules


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: Sequence[Summary]) -> str:
    """The table the README shows: one row per configuration."""
    head = ("| point | knobs | J/query (median, min..max) | J above idle | J if uncontended | CPU s | wall s "
            "| TTFT s | out tokens | CPU ms/token | J/token | ppl |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in rows:
        ppl = s.extra.get("perplexity")
        lines.append(
            f"| {s.config} | {s.extra.get('knobs', '')} "
            f"| {s.joules:.1f} ({s.joules_min:.1f}..{s.joules_max:.1f}) "
            f"| {s.joules_above_idle:.1f} | {s.joules_uncontended:.1f} | {s.cpu_s:.2f} | {s.wall_s:.2f} "
            f"| {_fmt(s.ttft_s, '.3f')} | {s.output_tokens:g} | {s.cpu_ms_per_token:.1f} "
            f"| {_fmt(s.joules_per_token, '.3f')} | {_fmt(ppl, '.2f')} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- measuring


def chat_request(index: int, prompt: str, chat: bool = True) -> Any:
    """A chat request, or the plain prompt for a base model (no chat template)."""
    from tensorslm.agent.protocol import Request

    if not chat:
        return Request(request_id=f"bench-{index}", received_at=time.time(), prompt=prompt)
    return Request(request_id=f"bench-{index}", received_at=time.time(),
                   messages=({"role": "user", "content": prompt},))


def long_context_prompt(tokens_of_text: int = 600) -> str:
    """A question after a long passage (for the prompt-cap knob)."""
    words = TEXT.read_text(encoding="utf-8").split()[: int(tokens_of_text * 0.75)]
    return " ".join(words) + "\n\nIn one sentence, what is the passage above about?"


def serve(generator: Any, meter: Any, config: str, prompts: Sequence[str], max_new_tokens: int,
          *, temperature: float | None = None, repeats: int = 1, chat: bool = True) -> list[QueryRecord]:
    """``chat``: chat requests (False: plain prompts, for a base model without a chat template)."""
    import torch

    records = []
    for _ in range(repeats):
        for i, prompt in enumerate(prompts):
            request = chat_request(i, prompt, chat)
            if temperature is not None:
                request = replace(request, temperature=temperature, seed=i)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            window = meter.begin()
            result = generator.generate(request, max_new_tokens=max_new_tokens)
            report = meter.end(window)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            records.append(QueryRecord(config=config, prompt=i, prompt_tokens=result.prompt_tokens,
                                       output_tokens=result.output_tokens, wall_s=wall, cpu_s=cpu,
                                       ttft_s=result.ttft_s, joules=report.joules,
                                       uncertainty_j=report.uncertainty_joules,
                                       method=str(report.method), threads=torch.get_num_threads()))
            log.info("%s prompt %d: %d+%d tokens, %.2f s wall, %.2f s CPU, %.1f J", config, i,
                     result.prompt_tokens, result.output_tokens, wall, cpu, report.joules)
    return records


def is_chat_model(loaded: Any) -> bool:
    """An instruct model answers chat messages; a base model (no chat template) plain prompts."""
    return bool(loaded.tokenizer.chat_template)


def open_ladder(loaded: Any, store_dir: Path, ranks: str | None, recipes: str | None = None) -> Any:
    """The store at ``store_dir`` if it holds the rungs of ``ranks`` (and ``recipes``), else build it."""
    from tensorslm.rank_store.errors import RankStoreError
    from tensorslm.rank_store.ladder import build_ladder
    from tensorslm.rank_store.rung_spec import parse_rung_specs
    from tensorslm.rank_store.store import RankStore

    specs = parse_rung_specs(ranks, recipes=recipes) if ranks else parse_rung_specs(recipes=recipes)
    if (store_dir / "manifest.json").is_file():
        try:
            store = RankStore.open(store_dir, expect_source=loaded.source)
            if all(spec.name in store.rung_names for spec in specs):
                return store
        except RankStoreError as exc:
            log.warning("rebuilding %s: %s", store_dir, exc)
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    return build_ladder(loaded.ref, store_dir, specs, overwrite=True, progress=False, loaded=loaded)


def rung_perplexity(loaded: Any, embedding: Any, rung: str, text_ids: Any, cache: dict) -> float:
    from tensorslm.rank_store.evaluate import loaded_perplexity

    if rung not in cache:
        previous = embedding.active_rung
        embedding.set_rung(rung)
        try:
            cache[rung] = loaded_perplexity(loaded, text_ids, progress=False, desc=rung)
        finally:
            embedding.set_rung(previous)
    return cache[rung]


def run_points(args: argparse.Namespace, servings: Sequence[tuple[str, Any]], meter: Any,
               text_ids: Any) -> dict[str, list[Summary]]:
    """Every point of the policy under every (head, serving model) of one model, interleaved."""
    from tensorslm.agent.actuator import AgentActuator
    from tensorslm.controller.decision.policy import load_policy

    from tensorslm.rank_store.embedding import TiedTTHead

    policy = load_policy(args.policy, rungs=servings[0][1].embedding.rung_names)
    actuators = {head: AgentActuator(serving.generator) for head, serving in servings}
    lm_heads = {head: serving.loaded.model.get_output_embeddings() for head, serving in servings}
    records: dict[tuple[str, str], list[QueryRecord]] = {
        (head, point.name): [] for head, _ in servings for point in policy.points}
    # Interleaved (prompt by prompt, every head and point in turn) so that the load of the
    # shared machine falls on every configuration alike.
    for _ in range(args.repeats):
        for i, prompt in enumerate(PROMPTS[:args.prompts]):
            for head, serving in servings:
                for point in policy.points:
                    actuator = actuators[head]
                    actuator.apply(point)
                    actuator.take()
                    if isinstance(lm_heads[head], TiedTTHead):
                        # the rung's head is packed once per switch (between queries, as a point
                        # lasts minutes): not part of a query's cost
                        lm_heads[head].prepared()
                    record, = serve(serving.generator, meter, point.name, [prompt],
                                    actuator.cap(None, point.max_new_tokens),
                                    chat=is_chat_model(serving.loaded))
                    record.prompt = i
                    records[head, point.name].append(record)
    out: dict[str, list[Summary]] = {}
    for head, serving in servings:
        ppl_cache: dict[str, float] = {}
        out[head] = []
        for point in policy.points:
            s = summarise(point.name, records[head, point.name], meter.source.board.watts_per_core,
                          meter.source.board.idle_watts)
            s.extra = {"knobs": point.describe().split(" (", 1)[1].rstrip(")"),
                       "rung": point.rung, "threads": point.threads,
                       "max_new_tokens": point.max_new_tokens,
                       "max_prompt_tokens": point.max_prompt_tokens,
                       "perplexity": rung_perplexity(serving.loaded, serving.embedding, point.rung,
                                                     text_ids, ppl_cache),
                       "records": [asdict(r) for r in records[head, point.name]]}
            out[head].append(s)
            print(f"head {head}: " + markdown_table([s]).splitlines()[-1], flush=True)
    return out


def run_knobs(args: argparse.Namespace, loaded: Any, embedding: Any, generator: Any, meter: Any,
              text_ids: Any, ppl_cache: dict, head: str, store_dir: Path) -> list[Summary]:
    """One knob at a time from a base: rung full, head as installed, 1 thread,
    ``--knob-tokens`` new tokens, greedy, KV cache on, the first ``--knob-prompts`` prompts."""
    import torch

    prompts = PROMPTS[:args.knob_prompts]
    base_cap = args.knob_tokens
    watts = meter.source.board.watts_per_core
    idle = meter.source.board.idle_watts
    out: list[Summary] = []

    chat = is_chat_model(loaded)

    def run(name: str, knobs: str, *, prompts=prompts, cap=base_cap, temperature=None) -> None:
        records = serve(generator, meter, name, prompts, cap, temperature=temperature, chat=chat)
        s = summarise(name, records, watts, idle)
        s.extra = {"knobs": knobs, "perplexity": ppl_cache.get(embedding.active_rung),
                   "records": [asdict(r) for r in records]}
        out.append(s)
        print(markdown_table([s]).splitlines()[-1], flush=True)

    embedding.set_rung(FULL_RUNG)
    generator.max_prompt_tokens = 1024
    torch.set_num_threads(1)
    run("base", f"full, head {head}, 1 thread, {base_cap} new, greedy, cache on")
    if args.knob_set == "rungs":
        for rung in embedding.rung_names:
            if rung != FULL_RUNG:
                rung_perplexity(loaded, embedding, rung, text_ids, ppl_cache)
                embedding.set_rung(rung)
                run(f"rung {rung}", f"as base, rung {rung}")
        embedding.set_rung(FULL_RUNG)
        return out
    torch.set_num_threads(2)
    run("threads=2", "as base, 2 threads")
    torch.set_num_threads(1)
    if args.knob_set == "threads":
        return out
    run(f"cap={base_cap // 4}", f"as base, max_new_tokens {base_cap // 4}", cap=base_cap // 4)
    run(f"cap={base_cap * 2}", f"as base, max_new_tokens {base_cap * 2}", cap=base_cap * 2)
    long = [long_context_prompt()]
    run("prompt~600", "one ~600-token prompt, 16 new", prompts=long, cap=16)
    generator.max_prompt_tokens = 128
    run("prompt cap 128", "same prompt cut to 128 tokens, 16 new", prompts=long, cap=16)
    generator.max_prompt_tokens = 1024
    run("sampling", "as base, temperature 0.7", temperature=0.7)
    gen_config = loaded.model.generation_config
    gen_config.use_cache = False
    try:
        run("no KV cache", "as base, use_cache False")
    finally:
        gen_config.use_cache = True
    for rung in embedding.rung_names:
        if rung == FULL_RUNG:
            continue
        embedding.set_rung(rung)
        run(f"rung {rung}", f"as base, rung {rung}")
    embedding.set_rung(FULL_RUNG)
    if head == HEAD_TIED:
        from tensorslm.agent.generation import HFGenerator
        from tensorslm.rank_store.embedding import TTEmbedding, install
        from tensorslm.rank_store.store import RankStore
        from tensorslm.rank_store.models import load_model

        dense = load_model(loaded.ref)
        emb = TTEmbedding.from_store(RankStore.open(store_dir), rungs=[FULL_RUNG])
        install(dense.model, emb, head="dense")
        saved, generator_dense = generator, HFGenerator(dense.model, dense.tokenizer, emb)
        generator = generator_dense
        records = serve(generator, meter, "head dense", prompts, base_cap, chat=chat)
        s = summarise("head dense", records, watts, idle)
        s.extra = {"knobs": "as base, head dense (original matrix)",
                   "records": [asdict(r) for r in records]}
        out.append(s)
        print(markdown_table([s]).splitlines()[-1], flush=True)
        generator = saved
    return out


def plot(runs: Sequence[tuple[str, Sequence[Summary]]], path: Path, board: str) -> Path:
    """One row per (title, points): joules per query split into the idle and CPU shares, and
    energy against the rung's perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.6 * len(runs)), squeeze=False)
    for (title, points), (ax1, ax2) in zip(runs, axes):
        names = [s.config for s in points]
        med = [s.joules for s in points]
        err = [[s.joules - s.joules_min for s in points], [s.joules_max - s.joules for s in points]]
        idle = [s.joules - s.joules_above_idle for s in points]
        ax1.bar(names, idle, color="#bbbbbb", label="board idle share (2.7 W x wall s)")
        ax1.bar(names, [s.joules_above_idle for s in points], bottom=idle, color="#4477aa",
                label="CPU share (0.9 W x CPU s)")
        ax1.errorbar(names, med, yerr=err, fmt="none", ecolor="black", capsize=4, label="min..max")
        ax1.set_ylabel(f"J per query (estimated, {board} model)")
        ax1.set_title(f"{title}: energy per query by operating point", fontsize=9)
        ax1.legend(fontsize=7)
        for s in points:
            ppl = s.extra.get("perplexity")
            ax2.scatter(s.joules_per_token, ppl, s=40)
            ax2.annotate(f"{s.config}\n{s.extra.get('rung')}", (s.joules_per_token, ppl), fontsize=8,
                         xytext=(4, 4), textcoords="offset points")
        ax2.set_xlabel("J per output token (estimated)")
        ax2.set_ylabel("perplexity of the rung (4,096 tokens)")
        ax2.set_title(f"{title}: energy per token vs quality", fontsize=9)
    fig.suptitle("greedy, batch 1; CPU time measured on a shared 2-core x86 machine, joules estimated",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_from_dict(data: dict, board: str = "raspberry-pi-4") -> Summary:
    """A Summary from the JSON; older files without ``joules_uncontended`` or
    ``joules_per_token`` are summarised again from their per-query records."""
    if "joules_uncontended" in data and "joules_per_token" in data:
        return Summary(**data)
    from tensorslm.controller.power.power_model import board_model

    model = board_model(board)
    records = [QueryRecord(**r) for r in data["extra"]["records"]]
    summary = summarise(data["config"], records, model.watts_per_core, model.idle_watts)
    summary.extra = data["extra"]
    return summary


def result_runs(result: dict) -> list[dict]:
    """The (model, head) runs of a results JSON; a file of one run (before ``runs``) is one."""
    if "runs" in result:
        return result["runs"]
    return [{"model": result.get("model", "smollm2-135m"), "head": result["head"],
             "load": result.get("load", "not recorded"), "points": result["points"],
             "knobs": result.get("knobs", [])}]


def render_markdown(result: dict, knob_runs: Sequence[dict] = ()) -> str:
    """The results page from the JSON this benchmark writes (runs of points, and knob runs)."""
    board = result["board"]
    lines = [
        "# Energy per query at each operating point",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Greedy decoding, batch size 1, fixed chat prompts (interleaved: every point in turn, "
        f"prompt by prompt), policy `{result.get('policy', 'deploy/policies/battery.yaml')}`, the "
        f"engine at its default body ({DEFAULT_BODY_PRECISION}) where a point names none. There is no power sensor on "
        "this machine: joules are "
        f"**estimated** (method `estimated`), the `{board}` board model of "
        "controller/power/power_model.py (2.7 W idle x wall seconds + 0.9 W per busy core x CPU "
        "seconds, +-30 %) applied to the CPU and wall seconds really measured here, on a shared "
        "2-core x86 machine (1-minute load average per run below), not on a Pi. A Pi 4 is several "
        "times slower per token.",
        "",
        "* `J/query`: what the agent's meter reports (wall time inflated by the other work).",
        "* `J above idle`: the CPU term alone (0.9 W x CPU s).",
        "* `J if uncontended`: the same board model with the wall time a dedicated board would "
        "take, CPU s / threads (every torch thread is busy for the whole query at batch 1).",
        "* `CPU ms/token`, `J/token`: over all the point's queries, prefill included.",
        "* `ppl`: perplexity of the point's rung, first 4,096 tokens of WikiText-2 test, same head, "
        "with the model's own fp32 body: a point's body precision adds its own change "
        "(bench/results/body_int4_default.md for int4).",
    ]
    for run in result_runs(result):
        points = [summary_from_dict(d, board) for d in run["points"]]
        top = points[0]
        title = MODEL_TITLES.get(run["model"], run["model"])
        lines += ["", f"## {title}, head `{run['head']}`", "",
                  f"{top.queries} prompts per point; load average {run.get('load', 'not recorded')}.", "",
                  markdown_table(points), ""]
        for low in points[1:]:
            per_token = (f", {low.joules_per_token / top.joules_per_token:.2f} of the joules per token"
                         if low.joules_per_token and top.joules_per_token else "")
            lines.append(f"* `{low.config}` / `{top.config}`: {low.joules / top.joules:.2f} of the metered "
                         f"joules per query, {low.joules_uncontended / top.joules_uncontended:.2f} if "
                         f"uncontended, {low.cpu_s / top.cpu_s:.2f} of the CPU seconds (medians)"
                         f"{per_token}, {low.cpu_ms_per_token / top.cpu_ms_per_token:.2f} of the CPU "
                         "per token.")
    for run in knob_runs:
        knobs = [summary_from_dict(d, run["board"]) for d in run["knobs"]]
        lines += ["", f"## One knob at a time: `{run['command']}`", "",
                  "Base: rung `full`, 1 thread, greedy, KV cache on, the first prompts; each row "
                  "changes one thing. CPU ms/token = CPU seconds / output tokens (prefill "
                  "included).", "", markdown_table(knobs)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", type=Path, default=ROOT / "deploy" / "policies" / "battery.yaml")
    parser.add_argument("--models", default="smollm2-135m", help="comma-separated model references")
    parser.add_argument("--ranks", default=None, help="plain TT rungs added to the ladder, e.g. 6x8,4x6")
    parser.add_argument("--recipes", default=None,
                        help="recipes of the ladder, e.g. auto-4,tt-max+perm+mean+int8 "
                             "(default: the rungs the policy serves)")
    parser.add_argument("--store", type=Path, default=None,
                        help=f"the ladder of a single model (default: {LADDERS}/<model>-default)")
    parser.add_argument("--heads", default=HEAD_TIED,
                        help=f"comma-separated heads among {', '.join(HEAD_MODES)}, served side by side")
    parser.add_argument("--board", default="raspberry-pi-4")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--knobs", action="store_true", help="also vary one knob at a time")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="prompts per point")
    parser.add_argument("--knob-prompts", type=int, default=4, help="prompts per knob setting")
    parser.add_argument("--knob-tokens", type=int, default=64, help="base max_new_tokens of --knobs")
    parser.add_argument("--knob-set", choices=("all", "threads", "rungs"), default="all",
                        help="threads: only the base and 2 threads; rungs: the base and every rung")
    parser.add_argument("--no-points", action="store_true", help="skip the policy's points")
    parser.add_argument("--out", type=Path, default=None,
                        help="results path without suffix (default bench/results/operating_points; "
                             "with --no-points nothing is written unless given)")
    parser.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                        help="only re-render the page and plot from this points JSON (knob runs "
                             "given after it are merged into it), written to --out")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    if not models or not heads or not set(heads) <= set(HEAD_MODES):
        parser.error(f"--models needs at least one model and --heads heads among {', '.join(HEAD_MODES)}; "
                     f"got {args.models!r}, {args.heads!r}")
    if args.store is not None and len(models) > 1:
        parser.error(f"--store is one model's ladder; got {len(models)} models")
    if args.out is None and not (args.no_points and not args.render):
        args.out = ROOT / "bench" / "results" / "operating_points"
    if args.render:
        runs = [json.loads(p.read_text()) for p in args.render]
        runs[0]["knob_runs"] = runs[0].get("knob_runs", []) + runs[1:]   # kept in the points JSON
        args.out.with_suffix(".json").write_text(json.dumps(runs[0], indent=1) + "\n")
        args.out.with_suffix(".md").write_text(render_markdown(runs[0], runs[0]["knob_runs"]))
        plot(_plot_runs(runs[0]), args.out.with_suffix(".png"), runs[0]["board"])
        print(args.out.with_suffix(".md").read_text())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    command = (f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} " if "OMP_WAIT_POLICY" in os.environ
               else "") + "python bench/bench_operating_points.py " + " ".join(sys.argv[1:] if argv is None else argv)

    import gc

    import torch

    from tensorslm.agent.wiring import load_serving
    from tensorslm.controller.power.energy_meter import EnergyMeter
    from tensorslm.controller.power.power_model import board_model
    from tensorslm.rank_store.evaluate import encode_text
    from tensorslm.rank_store.models import load_model

    from tensorslm.controller.decision.policy import load_policy

    torch.set_grad_enabled(False)
    policy_points = load_policy(args.policy).points
    if args.recipes is None and args.ranks is None:   # the ladder the policy serves, nothing more
        args.recipes = ",".join(dict.fromkeys(point.rung for point in policy_points
                                              if point.rung != FULL_RUNG)) or None
    # every body a point names stays resident, as `tensorslm serve` keeps it
    precisions = [point.precision for point in policy_points if point.precision is not None]
    meter = EnergyMeter(model=board_model(args.board), sampler=False)
    result = {"command": command, "board": args.board,
              "policy": str(args.policy.relative_to(ROOT) if args.policy.is_relative_to(ROOT) else args.policy),
              "machine": "shared 2-core x86, no power sensor", "runs": []}
    knob_runs = []
    for model in models:
        load_before = os.getloadavg()[0]
        store_dir = args.store or LADDERS / f"{model}-default"
        store = open_ladder(load_model(model), store_dir, args.ranks, args.recipes)
        gc.collect()
        servings = [(head, load_serving(model, store, head, precisions=precisions))  # as `tensorslm serve`
                    for head in heads]
        loaded = servings[0][1].loaded
        text_ids = encode_text(loaded.tokenizer, TEXT.read_text(encoding="utf-8"), PPL_TOKENS)
        torch.set_num_threads(1)
        for _, serving in servings:
            serve(serving.generator, meter, "warm-up", PROMPTS[:1], 8, chat=is_chat_model(serving.loaded))
        points = {} if args.no_points else run_points(args, servings, meter, text_ids)
        for head, serving in servings:
            knobs = run_knobs(args, serving.loaded, serving.embedding, serving.generator, meter, text_ids,
                              {}, head, store_dir) if args.knobs else []
            result["runs"].append({
                "model": model, "head": head,
                # the 1-minute load average before and after this model's measurements
                "load": f"{load_before:.1f} to {os.getloadavg()[0]:.1f}",
                "points": [asdict(s) for s in points.get(head, [])], "knobs": [asdict(s) for s in knobs]})
            if knobs:
                knob_runs.append({"command": f"{command} ({model}, head {head})", "board": args.board,
                                  "knobs": result["runs"][-1]["knobs"]})
            print(markdown_table(points.get(head, []) + knobs))
        del servings, serving, loaded, store
        gc.collect()
    result["knob_runs"] = knob_runs
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        if not args.no_points:
            plot(_plot_runs(result), args.out.with_suffix(".png"), args.board)
            args.out.with_suffix(".md").write_text(render_markdown(result, knob_runs))
    print(f"command: {command}")
    return 0


def _plot_runs(result: dict) -> list[tuple[str, list[Summary]]]:
    return [(f"{MODEL_TITLES.get(run['model'], run['model'])}, head {run['head']}",
             [summary_from_dict(d, result["board"]) for d in run["points"]])
            for run in result_runs(result) if run["points"]]


if __name__ == "__main__":
    raise SystemExit(main())

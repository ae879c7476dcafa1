"""Exact greedy from a cheap rung: the two-stage head against the fine rung, prompt by prompt.

    python bench/bench_two_stage.py [--model smollm2-135m] [--rungs auto-4,auto-8] [--prompts 50]
        [--tokens 64] [--top-k 16] [--body fp32] [--json OUT]

Installs the ladder with head ``tied`` and ``rescore=full`` (lookups read ``full``'s rows, the
head rescores its candidates from the memory-mapped ``full`` table), generates ``--tokens``
greedy tokens for each of ``--prompts`` chat prompts with ``full`` active (the reference), then
with each coarse rung of ``--rungs`` active, and prints: how many outputs are identical, the
first differing position where one differs, and the fraction of the vocabulary rescored per
step (mean, median, 99th percentile, max). ``--top-k K``: rescore the K best coarse logits
instead of the provable candidate set (agreement measured, not proved). The prompts are
generated below (topics x requests), not the demo's. The body is the engine's at ``--body``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TOPICS = ("volcanoes", "the printing press", "honey bees", "solar panels", "the Roman empire", "tides",
          "vaccines", "chess openings", "rainbows", "the internet", "glaciers", "coffee", "black holes",
          "recycling", "the violin", "earthquakes", "photosynthesis", "bridges", "sleep", "deserts",
          "electric cars", "the moon landing", "mushrooms", "clouds", "the human heart")
REQUESTS = ("Explain {} to a curious teenager.", "Write three short facts about {}.")


def chat_prompts(n: int) -> list[str]:
    """``n`` chat prompts, topics x requests (50 distinct at most)."""
    prompts = [r.format(t) for r in REQUESTS for t in TOPICS]
    if n > len(prompts):
        raise SystemExit(f"at most {len(prompts)} distinct prompts, asked for {n}")
    return prompts[:n]


def run(model: str = "smollm2-135m", rungs: Sequence[str] = ("auto-4",), prompts: int = 50, tokens: int = 64,
        top_k: int | None = None, body: str = "fp32") -> dict[str, Any]:
    import torch

    from bench_rung_energy import open_store
    from tensorslm.rank_store.embedding import TTEmbedding, install
    from tensorslm.rank_store.engine import Engine
    from tensorslm.rank_store.models import load_model
    from tensorslm.rank_store.store import RankStore

    torch.set_num_threads(1)
    store = RankStore.open(open_store(model, ["full", *rungs]))
    loaded = load_model(model)
    embedding = TTEmbedding.from_store(store, active="full")
    install(loaded.model, embedding, head="tied", rescore="full", top_k=top_k)
    head = loaded.model.get_output_embeddings()
    engine = Engine.from_model(loaded.model, body)
    texts = chat_prompts(prompts)
    ids = [loaded.tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
           for t in texts]
    ids = [x if isinstance(x, list) else x["input_ids"] for x in ids]

    def generate_all() -> tuple[list[list[int]], float]:
        started = time.process_time()
        out = [engine.generate(list(p), tokens) for p in ids]  # no EOS stop: every step compared
        return out, time.process_time() - started

    reference, ref_cpu = generate_all()
    result: dict[str, Any] = {"model": model, "prompts": prompts, "tokens": tokens, "top_k": top_k,
                              "body": body, "reference_cpu_s": ref_cpu, "rungs": {}}
    for rung in rungs:
        embedding.set_rung(rung)
        stats = head.prepared(rung).stats
        outputs, cpu = generate_all()
        same = [o == r for o, r in zip(outputs, reference)]
        first = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), None) for o, r in zip(outputs, reference)]
        fractions = sorted(stats.fractions)
        result["rungs"][rung] = {
            "identical": sum(same), "of": len(same),
            "first_difference": [f for f in first if f is not None],
            "rescored_fraction_mean": stats.mean_fraction,
            "rescored_fraction_median": statistics.median(fractions),
            "rescored_fraction_p99": fractions[int(0.99 * (len(fractions) - 1))],
            "rescored_fraction_max": fractions[-1],
            "steps": stats.steps, "cpu_s": cpu,
        }
        embedding.set_rung("full")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rungs", default="auto-4")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--body", default="fp32", choices=("fp32", "int8", "int4"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    command = "python bench/bench_two_stage.py " + " ".join(sys.argv[1:] if argv is None else argv)
    import os

    load = os.getloadavg()[0]
    result = run(args.model, args.rungs.split(","), args.prompts, args.tokens, args.top_k, args.body)
    result["command"], result["load_average"] = command, [load, os.getloadavg()[0]]
    print(f"{args.model}, {args.prompts} chat prompts x {args.tokens} greedy tokens, head tied, rescore full"
          f"{f' (top {args.top_k})' if args.top_k else ' (provable bound)'}, engine body {args.body}; "
          f"reference ({'full'}) {result['reference_cpu_s']:.1f} CPU s")
    for rung, r in result["rungs"].items():
        print(f"  {rung}: identical {r['identical']}/{r['of']}; rescored fraction of the vocabulary per step: "
              f"mean {r['rescored_fraction_mean']:.4%}, median {r['rescored_fraction_median']:.4%}, "
              f"p99 {r['rescored_fraction_p99']:.4%}, max {r['rescored_fraction_max']:.4%} over {r['steps']} steps; "
              f"{r['cpu_s']:.1f} CPU s; first differences at {r['first_difference'][:10]}")
    print(f"command: {command}  (load average {load:.2f} -> {os.getloadavg()[0]:.2f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

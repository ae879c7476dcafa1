"""Decode CPU time, resident memory and perplexity at each embedding rung: is the rung an energy knob?

    python bench/bench_rung_energy.py --quick --json OUT
    python bench/bench_rung_energy.py [--models smollm2-135m,gemma3-270m] [--heads tied,dense]
        [--rungs full,row_mean_norm_int8,...] [--policy deploy/policies/battery.yaml]
        [--tokens 32] [--prompts 2] [--repeats 2] [--ppl-tokens 2048] [--rescore]
        [--out bench/results/rung_energy]

Every (model, rung, head) runs in a fresh child process (``--one``), so its resident set is
that of an agent serving that rung as ``tensorslm serve`` loads it: the model as a skeleton
(body from the engine's packing; the original table only for head ``dense``), only that rung
of the ladder (``full`` memory-mapped, paged in when read), the prepared head of the rung.
The child, with 1 torch thread and greedy decoding:

* decodes ``--tokens`` new tokens after each of ``--prompts`` chat prompts, timing the decode
  steps only (``time.process_time``, prefill excluded): ``decode_cpu_ms_per_token``;
* reads VmRSS (``rss_mb``, with its anonymous and file-backed parts) right after decoding;
* then measures perplexity on the first ``--ppl-tokens`` tokens of WikiText-2 test with the
  same head (1,024-token windows).

Children run interleaved (every configuration in turn, ``--repeats`` rounds) and the medians
are reported with the load average. ``--quick``: SmolLM2 only, head tied, 32 new tokens, the
rungs ``full`` and the lowest point's rung of ``--policy``, one round, 2 prompts.

The ladder is built (once, cached under ~/.cache/tensorslm/bench-ladders) with the recipes of
the rungs asked for; rung names are recipes with ``_`` for ``+`` (``row_mean_norm_int8``).
``--rescore`` installs the two-stage head (``rescore=full``): greedy output of ``full`` from a
compressed rung's head. Energy follows CPU seconds (method ``estimated``: see
bench/bench_operating_points.py); no joules are printed here.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from tensorslm.constants import DEFAULT_BODY_PRECISION
from tensorslm.constants import FULL_RUNG as FULL

if TYPE_CHECKING:
    from tensorslm.rank_store.store import RankStore

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
CACHE = Path.home() / ".cache" / "tensorslm" / "bench-ladders"
MODELS = ("smollm2-135m", "gemma3-270m")
log = logging.getLogger("bench_rung_energy")

# Chat prompts (not the demo's): short questions with long answers, so 32-64 tokens all decode.
PROMPTS: tuple[str, ...] = (
    "Describe how a bicycle gear system works.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of inflation?",
    "Explain the difference between weather and climate.",
)


def policy_rungs(policy: Path) -> list[str]:
    """The rungs of a policy's points, best point first (the YAML, read without the controller)."""
    import yaml

    data = yaml.safe_load(policy.read_text())
    return [str(p["rung"]) for p in data["points"]]


def rss() -> dict[str, float]:
    """VmRSS and its anonymous and file-backed parts, in MiB (2^20 bytes; the JSON fields keep
    the names ``*_mb``), of this process, after glibc's malloc_trim hands freed heap memory
    back (what stays is memory in use, not the allocator's leftovers of loading and packing,
    which otherwise vary by 100s of MiB from run to run)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure includes the allocator's free memory
        pass
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def open_store(model: str, rungs: Sequence[str], body: str = DEFAULT_BODY_PRECISION) -> Path:
    """The cached ladder of ``model`` holding ``rungs`` (built when missing) and, for a
    ``w8a8`` body, the w8a8 body ``tensorslm compress`` stores by default (calibrated on text
    the model writes itself)."""
    from tensorslm.rank_store.errors import RankStoreError
    from tensorslm.rank_store.ladder import build_ladder
    from tensorslm.rank_store.models import load_model
    from tensorslm.rank_store.rung_spec import parse_rung_specs
    from tensorslm.rank_store.store import RankStore

    recipes = [r.replace("_", "+") for r in rungs if r != FULL]
    path = CACHE / f"{model}-rung-energy"
    if (path / "manifest.json").is_file():
        try:
            store = RankStore.open(path, verify=False)
            if all(r in store.rung_names for r in rungs):
                return _with_body(store, model, body)
            recipes = sorted(set(recipes) | {n.replace("_", "+") for n in store.rung_names if n != FULL})
        except RankStoreError as exc:
            log.warning("rebuilding %s: %s", path, exc)
    path.parent.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model)
    store = build_ladder(model, path, parse_rung_specs(recipes=",".join(recipes)), overwrite=True,
                         progress=False, loaded=loaded)
    return _with_body(store, model, body, loaded)


def _with_body(store: RankStore, model: str, body: str, loaded: Any = None) -> Path:
    """``store``'s path once it holds the self-calibrated w8a8 body a ``w8a8`` run serves (other
    bodies are quantised at start-up, as the agent does without a stored one)."""
    from tensorslm.rank_store.body import store_body
    from tensorslm.rank_store.models import load_model
    from tensorslm.rank_store.smoothing import self_calibration_of

    if body != "w8a8" or "w8a8" in store.body_precisions:
        return store.path
    loaded = loaded or load_model(model)
    store_body(store, loaded.model, "w8a8", calibration=self_calibration_of(loaded),
               self_written=True)
    return store.path


# --------------------------------------------------------------------------- one child


def measure_one(model: str, store_path: Path, rung: str, head: str, tokens: int, prompts: int,
                ppl_tokens: int, rescore: bool, top_k: int | None = None,
                body: str = DEFAULT_BODY_PRECISION) -> dict[str, Any]:
    import torch

    from tensorslm.rank_store.embedding import TTEmbedding, install
    from tensorslm.rank_store.evaluate import encode_text, loaded_perplexity
    from tensorslm.rank_store.models import load_model
    from tensorslm.rank_store.store import RankStore

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    two_stage = rescore and rung != FULL and head == "tied"
    engine = None
    if body != "hf":   # what `tensorslm serve` runs: a skeleton load, only this rung loaded
        from tensorslm.agent.wiring import load_serving

        serving = load_serving(model, store_path, head, precision=body, release_model_body=True,
                               rungs=[rung], rescore=FULL if two_stage else None, top_k=top_k)
        loaded, store, embedding = serving.loaded, serving.store, serving.embedding
        embedding.set_rung(rung)
        engine = serving.generator.engine
    else:   # the Hugging Face forward needs the whole model
        loaded = load_model(model)
        store = RankStore.open(store_path, expect_source=loaded.source)
        embedding = TTEmbedding.from_store(store, active=rung)
        install(loaded.model, embedding, head=head, rescore=FULL if two_stage else None, top_k=top_k)
    table_mb = embedding.num_embeddings * embedding.embedding_dim * 4 / 2**20
    tokenizer, net = loaded.tokenizer, loaded.model

    def prompt_ids(prompt: str) -> torch.Tensor:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt")
            return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # a base model (Gemma 3 270m): completion
        return ids if not loaded.needs_bos or ids[0, 0] == tokenizer.bos_token_id else \
            torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)

    def decode(prompt: str, n: int) -> tuple[float, float, int]:
        ids = prompt_ids(prompt)
        if engine is not None:  # the engine: prefill, then n decode steps timed after the first token
            marks: list[float] = []
            c0 = time.process_time()
            engine.generate(ids[0].tolist(), n + 1, on_token=lambda _: marks.append(time.process_time()))
            return (marks[-1] - marks[0]) / (len(marks) - 1), marks[0] - c0, ids.shape[1]
        c0 = time.process_time()
        out = net(ids, use_cache=True, logits_to_keep=1)
        prefill = time.process_time() - c0
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        c0 = time.process_time()
        for _ in range(n):
            out = net(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return (time.process_time() - c0) / n, prefill, ids.shape[1]

    decode(PROMPTS[0], 4)  # warm-up: prepares the head, pages in what the rung reads
    per_token, prefill = [], []
    for prompt in (PROMPTS * prompts)[:prompts]:
        step, pre, _ = decode(prompt, tokens)
        per_token.append(step)
        prefill.append(pre)
    memory = rss()
    lm_head = net.get_output_embeddings()
    row: dict[str, Any] = {
        "model": model, "rung": rung, "head": head + (f"+rescore-full{'-top' + str(top_k) if top_k else ''}" if two_stage else ""),
        "decode_cpu_ms_per_token": 1000 * statistics.median(per_token),
        "decode_cpu_ms_per_token_each": [1000 * t for t in per_token],
        "prefill_cpu_ms": 1000 * statistics.median(prefill),
        "rss_mb": memory["VmRSS"], "rss_anon_mb": memory.get("RssAnon"), "rss_file_mb": memory.get("RssFile"),
        "table_fp32_mb": table_mb, "rung_mb": store.info(rung).nbytes / 2**20,
        "new_tokens": tokens, "prompts": prompts, "threads": 1,
        "body": body if engine is None else f"engine {body} ({', '.join(engine.kernels)})",
    }
    if head == "tied":
        prepared = lm_head.prepared(rung)
        row["head_plan"] = prepared.describe() if hasattr(prepared, "describe") else prepared.coarse.describe()
        row["head_extra_mb"] = lm_head.nbytes / 2**20
        stats = getattr(prepared, "stats", None)
        if stats is not None and stats.steps:
            row["rescored_fraction_mean"] = stats.mean_fraction
            row["rescored_fraction_max"] = max(stats.fractions)
    if ppl_tokens:
        ids = encode_text(tokenizer, TEXT.read_text(encoding="utf-8"), ppl_tokens)
        row["perplexity"] = (loaded_perplexity(loaded, ids, progress=False, desc=rung) if engine is None
                             else engine_perplexity(engine, loaded, ids))
        row["ppl_tokens"] = ppl_tokens
    return row


def engine_perplexity(engine: Any, loaded: Any, ids: Any, window: int = 1024) -> float:
    """Perplexity through the engine's body and the installed head, 1,024-token windows (BOS
    first in each when the model needs it), as tensorslm.rank_store.evaluate does it."""
    import math

    import torch

    from tensorslm.rank_store.evaluate import bos_id_of, windows

    nll, count = 0.0, 0
    for chunk in windows(ids, context_length=window, bos_id=bos_id_of(loaded)):
        logits = engine.score(chunk[None])  # (T, V)
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], chunk[1:], reduction="sum"))
        count += chunk.numel() - 1
    return math.exp(nll / count)


def interleaved_decode(model: str, store_path: Path, rungs: Sequence[str], tokens: int, prompts: int,
                       rounds: int, body: str) -> dict[str, list[float]]:
    """Decode CPU ms/token of every rung in ONE process, head tied, rung switched between
    queries, round after round (every rung in turn): ratios that drift with the machine's load
    less than separate processes. Returns rung -> per-query ms/token."""
    import torch

    from tensorslm.agent.wiring import load_serving

    torch.set_num_threads(1)
    serving = load_serving(model, store_path, "tied", precision=body, release_model_body=True,
                           rungs=list(rungs))
    loaded, embedding, engine = serving.loaded, serving.embedding, serving.generator.engine
    tokenizer = loaded.tokenizer
    texts = (PROMPTS * prompts)[:prompts]
    if getattr(tokenizer, "chat_template", None):
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
               for t in texts]
        ids = [x if isinstance(x, list) else x["input_ids"] for x in ids]
    else:
        ids = [([tokenizer.bos_token_id] if loaded.needs_bos else []) + tokenizer(t)["input_ids"] for t in texts]
    out: dict[str, list[float]] = {rung: [] for rung in rungs}
    for round_ in range(rounds + 1):  # round 0 warms every rung up (prepares its head)
        for rung in rungs:
            embedding.set_rung(rung)
            for prompt in ids:
                marks: list[float] = []
                engine.generate(list(prompt), tokens + 1, on_token=lambda _: marks.append(time.process_time()))
                if round_:
                    out[rung].append(1000 * (marks[-1] - marks[0]) / (len(marks) - 1))
    return out


def head_only(model: str, store_path: Path, rungs: Sequence[str], repeats: int = 21) -> list[dict]:
    """The tied head alone, B = 1: each rung's prepared head timed in turn (interleaved), CPU ms."""
    import torch

    from tensorslm.rank_store.head import CompressedHead
    from tensorslm.rank_store.store import RankStore

    torch.set_num_threads(1)
    store = RankStore.open(store_path)
    heads = {rung: CompressedHead(store.load_rung(rung)) for rung in rungs}
    h = torch.randn(1, store.dim)
    times: dict[str, list[float]] = {rung: [] for rung in rungs}
    for _ in range(repeats):
        for rung, head in heads.items():
            c0 = time.process_time()
            head(h)
            times[rung].append(time.process_time() - c0)
    return [{"model": model, "rung": rung, "head_cpu_ms": 1000 * statistics.median(times[rung][1:]),
             "head_plan": heads[rung].describe(), "head_extra_mb": heads[rung].nbytes / 2**20} for rung in rungs]


# --------------------------------------------------------------------------- the parent


def run_child(args: argparse.Namespace, model: str, store: Path, rung: str, head: str, ppl: int) -> dict:
    cmd = [sys.executable, __file__, "--one", model, str(store), rung, head, "--tokens", str(args.tokens),
           "--prompts", str(args.prompts), "--ppl-tokens", str(ppl)] + (["--rescore"] if args.rescore else []) \
        + (["--top-k", str(args.top_k)] if args.top_k else []) + ["--body", args.body]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"child {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_rows(rows: Sequence[dict]) -> dict:
    first = dict(rows[0])
    for key in ("decode_cpu_ms_per_token", "prefill_cpu_ms", "rss_mb", "rss_anon_mb", "rss_file_mb"):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            first[key] = statistics.median(values)
    first["rounds"] = len(rows)
    first["decode_cpu_ms_per_token_rounds"] = [r["decode_cpu_ms_per_token"] for r in rows]
    return first


def inproc(row: dict, base: dict) -> str:
    ms, base_ms = row.get("decode_cpu_ms_per_token_interleaved"), base.get("decode_cpu_ms_per_token_interleaved")
    return "-" if ms is None or base_ms is None else f"{ms:.1f}, {ms / base_ms:.2f}"


def markdown(rows: Sequence[dict]) -> str:
    lines = ["| model | rung | head | decode CPU ms/token | x full | in one process: ms/token, x full | RSS MiB (anon + file) "
             "| rung MiB | ppl | Δ ppl | head plan |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["rung"] == FULL
                     and b["head"].split("+")[0] == r["head"].split("+")[0]), r)
        ppl, bppl = r.get("perplexity"), base.get("perplexity")
        delta = f"{ppl / bppl - 1:+.1%}" if ppl and bppl else "-"
        lines.append(
            f"| {r['model']} | `{r['rung']}` | {r['head']} | {r['decode_cpu_ms_per_token']:.1f} "
            f"| {r['decode_cpu_ms_per_token'] / base['decode_cpu_ms_per_token']:.2f} "
            f"| {inproc(r, base)} "
            f"| {r['rss_mb']:.0f} ({r.get('rss_anon_mb') or 0:.0f} + {r.get('rss_file_mb') or 0:.0f}) "
            f"| {r['rung_mb']:.1f} | {ppl if ppl is None else format(ppl, '.2f')} | {delta} "
            f"| {r.get('head_plan', 'model head (dense)')[:80]} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, help="write the rows (a JSON list) here")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--heads", default="tied", help="tied and/or dense (dense is run at full only)")
    parser.add_argument("--rungs", default=None, help="default: full and every rung of --policy")
    parser.add_argument("--policy", type=Path, default=ROOT / "deploy" / "policies" / "battery.yaml")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ppl-tokens", type=int, default=2048)
    parser.add_argument("--rescore", action="store_true", help="two-stage head: rescore from full")
    parser.add_argument("--top-k", type=int, default=None, help="with --rescore: rescore the top k, not the bound's set")
    parser.add_argument("--body", default=DEFAULT_BODY_PRECISION,
                        choices=("hf", "fp32", "int8", "w8a8", "int4"),
                        help="the transformer body: the engine at that precision (default: the "
                             "agent's), or hf (the Hugging Face forward)")
    parser.add_argument("--out", type=Path, default=None, help="results path without suffix (.json, .md)")
    parser.add_argument("--head-only", action="store_true", help="time the tied head alone per rung (B=1)")
    parser.add_argument("--interleaved", type=int, default=0, metavar="ROUNDS",
                        help="also time every rung in one process, switched between queries, ROUNDS rounds")
    parser.add_argument("--one", nargs=4, metavar=("MODEL", "STORE", "RUNG", "HEAD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if args.one:
        model, store, rung, head = args.one
        row = measure_one(model, Path(store), rung, head, args.tokens, args.prompts, args.ppl_tokens, args.rescore,
                          args.top_k, args.body)
        print(json.dumps(row))
        return 0
    policy = policy_rungs(args.policy)
    if args.quick:
        models, heads, rungs, repeats = ["smollm2-135m"], ["tied"], [FULL, policy[-1]], 1
    else:
        models, heads, repeats = args.models.split(","), args.heads.split(","), args.repeats
        rungs = args.rungs.split(",") if args.rungs else list(dict.fromkeys([FULL, *policy]))
    command = "python bench/bench_rung_energy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.time()
    load = os.getloadavg()
    results: list[dict] = []
    if args.head_only:
        for model in models:
            for row in head_only(model, open_store(model, rungs), rungs):
                print(f"{model} {row['rung']}: head {row['head_cpu_ms']:.2f} CPU ms at B=1 ({row['head_plan']})")
                results.append(row)
        print(f"command: {command}  (load average {load[0]:.2f} -> {os.getloadavg()[0]:.2f})")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
        return 0
    for model in models:
        store = open_store(model, rungs, args.body)
        # head dense keeps the model's own matrix whatever the rung: measured at full only
        configs = [(rung, head) for head in heads for rung in rungs if head == "tied" or rung == FULL]
        runs: dict[tuple[str, str], list[dict]] = {c: [] for c in configs}
        for round_ in range(repeats):  # interleaved: every configuration once per round
            for rung, head in configs:
                row = run_child(args, model, store, rung, head, args.ppl_tokens if round_ == 0 else 0)
                runs[(rung, head)].append(row)
                print(f"{model} {rung} {head}: {row['decode_cpu_ms_per_token']:.1f} CPU ms/token, "
                      f"RSS {row['rss_mb']:.0f} MiB, ppl {row.get('perplexity', '-')}", flush=True)
        inproc = {}
        if args.interleaved and args.body != "hf":
            inproc = interleaved_decode(model, store, rungs, args.tokens, args.prompts, args.interleaved, args.body)
        for config in configs:
            merged = median_rows(runs[config])
            if config[1] == "tied" and config[0] in inproc:
                merged["decode_cpu_ms_per_token_interleaved"] = statistics.median(inproc[config[0]])
            if "perplexity" not in merged:
                merged.update({k: v for r in runs[config] for k, v in r.items() if k in ("perplexity", "ppl_tokens")})
            results.append(merged)
    meta = {"command": command, "load_average_start": load, "load_average_end": os.getloadavg(),
            "seconds": time.time() - started, "policy": str(args.policy)}
    for row in results:
        row["load_average"] = [round(x, 2) for x in meta["load_average_end"]]
    table = markdown(results)
    print(table)
    print(f"command: {command}  (load average {load[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end, "
          f"{meta['seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(
            f"# Decode cost, memory and perplexity per rung\n\nCommand: `{command}`\n\nLoad average "
            f"{load[0]:.2f} at start, {meta['load_average_end'][0]:.2f} at end (shared 2-core x86, AVX-512 "
            f"BF16; not a Pi). 1 torch thread, greedy, decode CPU time of the decode steps only, medians "
            f"over {repeats} interleaved rounds (one child process per configuration and round). "
            f"Perplexity: first {args.ppl_tokens:,} WikiText-2 test tokens, same head.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

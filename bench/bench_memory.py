"""Where a serving process's memory goes, stage by stage, as ``tensorslm serve`` loads a model.

    python bench/bench_memory.py [--model smollm2-135m] [--store DIR] [--rung row_int8]
        [--precision int8] [--json OUT] [--modeling-first]

Runs the steps of :func:`tensorslm.agent.wiring.load_serving` one at a time in a fresh child
process and prints after each VmRSS (what is resident, after glibc hands freed heap back), the
step's own peak (VmHWM, reset after every step) and the peak so far: python and torch
imported, transformers' classes imported (with ``--modeling-first``: the base every model
class imports, ``transformers.modeling_utils``, which imports torch's ``_dynamo``), the
tokenizer and the skeleton (``load_model(body=False, table=False)``), the rung, the install (checked against the
table's streamed hash), the head prepared (before the body, as ``load_serving`` does), the
body, the first decoded tokens. ``--store`` defaults to bench_engine.py's store for the model
(rungs ``full``, ``row_int8``, ``row_int4``; bodies int8 and int4), built once.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status() -> dict[str, float]:
    with open("/proc/self/status") as handle:
        fields = dict(line.split(":", 1) for line in handle if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def _reset_peak() -> None:
    """Start VmHWM again from the current resident set (Linux 4.0+: ``clear_refs`` 5), so each
    step's own peak is measured; where that is not allowed the peaks stay cumulative."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def stages(model: str, store_path: str, rung: str, precision: str, modeling_first: bool = False
           ) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def mark(stage: str) -> None:
        from tensorslm.rank_store.memory import return_freed_memory

        step_peak = _status()["VmHWM"]   # the peak since the previous mark (reset there)
        return_freed_memory()
        status = _status()
        peak = max([step_peak] + [row["peak"] for row in rows])
        rows.append({"stage": stage, "VmRSS": status["VmRSS"], "step_peak": step_peak,
                     "peak": peak})
        _reset_peak()

    mark("python")
    import torch

    torch.set_num_threads(1)
    mark("torch imported")
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from tensorslm.rank_store.memory import map_large_allocations

    map_large_allocations()
    mark("transformers' classes imported")
    if modeling_first:   # serving imports it with the skeleton, after the tokenizer's parse
        import transformers.modeling_utils  # noqa: F401  (masking_utils -> torch._dynamo)

        mark("modeling_utils (+ torch._dynamo)")
    from tensorslm.agent.wiring import make_generator
    from tensorslm.rank_store.embedding import TTEmbedding, install
    from tensorslm.rank_store.models import load_model
    from tensorslm.rank_store.store import RankStore

    loaded = load_model(model, body=False, table=False)
    mark("tokenizer + skeleton")
    store = RankStore.open(store_path)
    embedding = TTEmbedding.from_store(store, rungs=[rung])
    mark(f"rung {rung}")
    install(loaded.model, embedding, "tied", table_sha256=loaded.table_sha256())
    mark("installed (table hash streamed)")
    loaded.model.get_output_embeddings().prepared()
    mark("head prepared (rows packed)")
    generator = make_generator(loaded, embedding, precision=precision, store=store,
                               release_model_body=True)
    mark(f"{precision} body packed")
    engine = generator.engine
    with torch.inference_mode():
        engine.generate(list(range(100, 140)), 8)
    mark("8 tokens decoded")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--store", default=None)
    parser.add_argument("--rung", default="row_int8")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--modeling-first", action="store_true",
                        help="import transformers.modeling_utils (and with it torch._dynamo) as "
                             "a step of its own before the tokenizer, to show what it costs")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("ROWS " + json.dumps(stages(args.model, args.store, args.rung, args.precision,
                                          args.modeling_first)))
        return
    if args.store is None:
        from bench_engine import engine_store

        args.store = str(engine_store(args.model))
    command = "python bench/bench_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    proc = subprocess.run([sys.executable, __file__, "--one", "--model", args.model, "--store",
                           args.store, "--rung", args.rung, "--precision", args.precision]
                          + ["--modeling-first"] * args.modeling_first,
                          capture_output=True, text=True, check=False)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("ROWS ")), None)
    if line is None:
        raise SystemExit(f"the child failed:\n{proc.stderr[-3000:]}")
    rows = json.loads(line[5:])
    print(f"{args.model}, rung {args.rung}, {args.precision} body, head tied (MB)")
    print(f"{'stage':40} {'resident':>9} {'added':>7} {'step peak':>10} {'peak':>7}")
    previous = 0.0
    for row in rows:
        print(f"{row['stage']:40} {row['VmRSS']:9.0f} {row['VmRSS'] - previous:+7.0f} "
              f"{row['step_peak']:10.0f} {row['peak']:7.0f}")
        previous = row["VmRSS"]
    print(f"command: {command}")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "model": args.model,
                                         "rung": args.rung, "precision": args.precision,
                                         "stages": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

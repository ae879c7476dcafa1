"""Where a serving process's memory goes, stage by stage, as ``tensorslm serve`` loads a model.

    python bench/bench_memory.py [--model smollm2-135m] [--store DIR] [--rung row_int8]
        [--precision int8] [--json OUT] [--with-transformers]
        [--startup N [--tree DIR ...]] [--torch-floor]

Runs the steps of :func:`tensorslm.agent.wiring.load_serving` one at a time in a fresh child
process and prints after each VmRSS (what is resident, after glibc hands freed heap back), the
step's own peak (VmHWM, reset after every step), the peak so far and the wall seconds since
the child started (start-up time: imports and loading): python and torch imported, the
tokenizer and the model's shell (``load_model(body=False, table=False)``, no transformers),
the rung, the install (checked against the table's streamed hash), the head prepared (before
the body, as ``load_serving`` does), the body, the first decoded tokens. The last row lists
whether transformers and torch's ``_dynamo`` were imported. ``--with-transformers`` imports
``transformers.modeling_utils`` (what every transformers model class imports; it imports
``torch._dynamo``) as a step of its own after torch, to show what a serving process that
built transformers' model would carry. ``--store`` defaults to bench_engine.py's store for
the model (rungs ``full``, ``row_int8``, ``row_int4``; bodies int8 and int4), built once.

``--startup N`` times instead a serving process's start-up, N times per variant, interleaved
(medians): a fresh ``python`` that imports the agent's wiring and runs ``load_serving`` as
``tensorslm serve`` does (1 thread), wall and CPU seconds and its peak RSS; variants: this
tree, this tree with ``transformers.modeling_utils`` imported first, and each ``--tree DIR``
(a ``tensorslm`` package put first on ``PYTHONPATH``, e.g. an older commit's tree laid out as
installed) to compare against. ``--torch-floor`` splits what ``import torch`` alone leaves
resident: Python objects (``tracemalloc``), the rest of the anonymous memory (native heap:
operator registrations and the like) and the pages of mapped files (its libraries).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
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


def stages(model: str, store_path: str, rung: str, precision: str,
           with_transformers: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()

    def mark(stage: str) -> None:
        from tensorslm.rank_store.memory import return_freed_memory

        step_peak = _status()["VmHWM"]   # the peak since the previous mark (reset there)
        return_freed_memory()
        status = _status()
        peak = max([step_peak] + [row["peak"] for row in rows])
        rows.append({"stage": stage, "VmRSS": status["VmRSS"], "step_peak": step_peak,
                     "peak": peak, "seconds": time.perf_counter() - started})
        _reset_peak()

    mark("python")
    import torch

    torch.set_num_threads(1)
    from tensorslm.rank_store.memory import map_large_allocations

    map_large_allocations()   # as load_serving(release_model_body=True) does
    mark("torch imported")
    if with_transformers:
        import transformers.modeling_utils  # noqa: F401  (masking_utils -> torch._dynamo)

        mark("transformers.modeling_utils (+ _dynamo)")
    from tensorslm.agent.wiring import make_generator
    from tensorslm.rank_store.embedding import TTEmbedding, install
    from tensorslm.rank_store.models import load_model
    from tensorslm.rank_store.store import RankStore

    loaded = load_model(model, body=False, table=False)
    mark("tokenizer + shell")
    store = RankStore.open(store_path)
    embedding = TTEmbedding.from_store(store, rungs=[rung])
    mark(f"rung {rung}")
    # a w8a8 agent's head runs its int8 rows with int8 activations, as load_serving installs it
    install(loaded.model, embedding, "tied", table_sha256=loaded.table_sha256(),
            int8_activations=precision == "w8a8")
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
    rows[-1]["imported"] = sorted(m for m in ("transformers", "torch._dynamo") if m in sys.modules)
    return rows


FLOOR = """
import collections, json, sys, tracemalloc
if sys.argv[1] == "python":   # tracemalloc's own records inflate the resident set: a run apart
    tracemalloc.start()
before = len(sys.modules)
import torch
python = tracemalloc.get_traced_memory()[0] / 2**20
rss = collections.Counter()
mapping = None
for line in open("/proc/self/smaps"):
    fields = line.split()
    if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
        mapping = "files" if len(fields) > 5 and fields[5].startswith("/") else "anonymous"
    elif fields[0] == "Rss:":
        rss[mapping] += int(fields[1]) / 1024
print("FLOOR " + json.dumps({"modules": len(sys.modules) - before, "python_objects_mb": python,
                             "anonymous_mb": rss["anonymous"], "files_mb": rss["files"]}))
"""


STARTUP = """
import resource, sys
{first}
from tensorslm.agent.wiring import load_serving
load_serving(sys.argv[1], sys.argv[2], "tied", precision=sys.argv[3], release_model_body=True,
             rungs=[sys.argv[4]])
print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def startup(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start-up wall and CPU seconds and peak RSS of each variant, medians of interleaved runs."""
    variants = {"this tree": ("", None),
                "this tree + transformers.modeling_utils": ("import transformers.modeling_utils",
                                                            None)}
    variants.update({f"tree {tree}": ("", tree) for tree in args.tree})
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    for _ in range(args.startup):
        for name, (first, tree) in variants.items():
            env = dict(os.environ, OMP_NUM_THREADS="1")
            if tree is not None:
                env["PYTHONPATH"] = os.pathsep.join([tree, env.get("PYTHONPATH", "")])
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", STARTUP.format(first=first), args.model,
                                   args.store, args.precision, args.rung], env=env, cwd="/",
                                  capture_output=True, text=True, check=False)
            wall = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            peak = next((l for l in proc.stdout.splitlines() if l.startswith("PEAK ")), None)
            if peak is None:
                raise SystemExit(f"{name}: the child failed:\n{proc.stderr[-3000:]}")
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            runs[name].append((wall, cpu, float(peak.split()[1])))
    return [{"variant": name, "runs": len(values),
             "wall_s": statistics.median(v[0] for v in values),
             "cpu_s": statistics.median(v[1] for v in values),
             "peak_mb": statistics.median(v[2] for v in values)} for name, values in runs.items()]


def _floor(part: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", FLOOR, part], capture_output=True, text=True,
                          check=True)
    return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("FLOOR "))[6:])


def torch_version() -> str:
    from importlib.metadata import version

    return version("torch")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--store", default=None)
    parser.add_argument("--rung", default="row_int8")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--with-transformers", action="store_true",
                        help="import transformers.modeling_utils (and with it torch._dynamo) as "
                             "a step of its own after torch, to show what it costs")
    parser.add_argument("--startup", type=int, default=0, metavar="N",
                        help="time the serving start-up N times per variant instead")
    parser.add_argument("--tree", action="append", default=[], metavar="DIR",
                        help="with --startup: also a tensorslm package tree (PYTHONPATH) to time")
    parser.add_argument("--torch-floor", action="store_true",
                        help="split what `import torch` alone leaves resident, instead")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("ROWS " + json.dumps(stages(args.model, args.store, args.rung, args.precision,
                                          args.with_transformers)))
        return
    if args.store is None and not args.torch_floor:
        from bench_engine import engine_store

        args.store = str(engine_store(args.model))
    command = "python bench/bench_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.torch_floor:
        floor, python = (_floor(part) for part in ("resident", "python"))
        floor["python_objects_mb"] = python["python_objects_mb"]
        print(f"import torch {torch_version()}: {floor['modules']} modules imported; resident "
              f"{floor['anonymous_mb'] + floor['files_mb']:.0f} MB = anonymous "
              f"{floor['anonymous_mb']:.0f} (of it Python objects {floor['python_objects_mb']:.0f})"
              f" + mapped files {floor['files_mb']:.0f} (the interpreter's and torch's libraries)")
        print(f"command: {command}")
        return
    if args.startup:
        load = os.getloadavg()
        rows = startup(args)
        print(f"{args.model}, rung {args.rung}, {args.precision} body, head tied: serving "
              f"start-up, medians of {args.startup} interleaved runs")
        print(f"{'variant':60} {'wall s':>7} {'CPU s':>7} {'peak MB':>8}")
        for row in rows:
            print(f"{row['variant']:60} {row['wall_s']:7.2f} {row['cpu_s']:7.2f} "
                  f"{row['peak_mb']:8.0f}")
        print(f"load average before / after: {load[0]:.2f} / {os.getloadavg()[0]:.2f}")
        print(f"command: {command}")
        if args.json:
            args.json.write_text(json.dumps({"command": command, "model": args.model,
                                             "rung": args.rung, "precision": args.precision,
                                             "load": [load[0], os.getloadavg()[0]],
                                             "startup": rows}, indent=1) + "\n")
        return
    proc = subprocess.run([sys.executable, __file__, "--one", "--model", args.model, "--store",
                           args.store, "--rung", args.rung, "--precision", args.precision]
                          + ["--with-transformers"] * args.with_transformers,
                          capture_output=True, text=True, check=False)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("ROWS ")), None)
    if line is None:
        raise SystemExit(f"the child failed:\n{proc.stderr[-3000:]}")
    rows = json.loads(line[5:])
    print(f"{args.model}, rung {args.rung}, {args.precision} body, head tied (MB)")
    print(f"{'stage':40} {'resident':>9} {'added':>7} {'step peak':>10} {'peak':>7} {'s':>6}")
    previous = 0.0
    for row in rows:
        print(f"{row['stage']:40} {row['VmRSS']:9.0f} {row['VmRSS'] - previous:+7.0f} "
              f"{row['step_peak']:10.0f} {row['peak']:7.0f} {row['seconds']:6.2f}")
        previous = row["VmRSS"]
    imported = ", ".join(rows[-1]["imported"]) or "neither transformers nor torch._dynamo"
    print(f"imported: {imported}")
    print(f"command: {command}")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "model": args.model,
                                         "rung": args.rung, "precision": args.precision,
                                         "stages": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

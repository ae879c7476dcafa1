"""The engine's decode step run as one TorchScript call against the same step run from Python.

    python bench/bench_decode_step.py [--models smollm2-135m,gemma3-270m] [--precisions int8,int4]
        [--tokens 32] [--rounds 7] [--out bench/results/decode_step]

Per model and body precision, one process loads what ``tensorslm serve`` serves (the bench
store of ``bench_engine.py``, the tied head at the body's bits) and decodes ``--tokens`` steps
after a 48-token prompt, alternately with the scripted step and with the Python step
(:meth:`Engine._decode_python`), ``--rounds`` rounds. It reports the CPU ms per token of the
body step alone and of the whole step (embedding, body, head, argmax), medians, their ratio,
and whether both produced the same tokens. 1 thread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import ROW_RUNGS, engine_store  # noqa: E402


def measure(model: str, precision: str, tokens: int, rounds: int) -> dict[str, Any]:
    import torch

    from tensorslm.agent.wiring import load_serving

    torch.set_num_threads(1)
    rung = ROW_RUNGS[precision]
    serving = load_serving(model, engine_store(model), "tied", precision=precision,
                           release_model_body=True, rungs=[rung])
    serving.embedding.set_rung(rung)
    engine = serving.generator.engine
    if not engine.scripted:
        raise SystemExit(f"{model} {precision}: the engine did not script its decode step "
                         f"(kernels {engine.kernels})")
    script = engine._step
    prompt = list(range(100, 148))
    times: dict[str, dict[str, list[float]]] = {"body": {"python": [], "scripted": []},
                                                "step": {"python": [], "scripted": []}}
    outputs: dict[str, list[int]] = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for variant in ("python", "scripted"):
                engine._step = script if variant == "scripted" else None
                x = engine.embed(torch.tensor([[prompt[-1]]]))[0]
                token, position = int(torch.argmax(engine.prefill(prompt))), len(prompt)
                out = [token]
                t0 = time.process_time()
                for _ in range(tokens):
                    token = int(torch.argmax(engine.step(token, position)))
                    position += 1
                    out.append(token)
                times["step"][variant].append((time.process_time() - t0) / tokens * 1e3)
                outputs[variant] = out
                t0 = time.process_time()
                for pos in range(len(prompt), len(prompt) + tokens):
                    engine._decode(x, pos)
                times["body"][variant].append((time.process_time() - t0) / tokens * 1e3)
    engine._step = script
    row: dict[str, Any] = {"model": model, "precision": precision, "kernels": engine.kernels,
                           "same_tokens": outputs["python"] == outputs["scripted"]}
    for part, by_variant in times.items():
        python, scripted = (statistics.median(by_variant[v]) for v in ("python", "scripted"))
        row[f"{part}_python_ms"] = round(python, 2)
        row[f"{part}_scripted_ms"] = round(scripted, 2)
        row[f"{part}_ratio"] = round(scripted / python, 3)
    return row


def markdown(rows: list[dict[str, Any]], command: str, load: str) -> str:
    lines = [f"Command: `{command}`", "", f"Load average before / after: {load}", "",
             "CPU ms per token, 1 thread, medians of interleaved rounds; body: the decoder layers "
             "and final norm; step: embedding, body, tied head at the body's bits, argmax.", "",
             "| model | body | kernels | body, Python | body, scripted | ratio | step, Python "
             "| step, scripted | ratio | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {', '.join(r['kernels'])} | "
                     f"{r['body_python_ms']} | {r['body_scripted_ms']} | {r['body_ratio']} | "
                     f"{r['step_python_ms']} | {r['step_scripted_ms']} | {r['step_ratio']} | "
                     f"{'yes' if r['same_tokens'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--precisions", default="int8,int4")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    command = "python bench/bench_decode_step.py " + " ".join(argv or sys.argv[1:])
    before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = []
    for model in args.models.split(","):
        for precision in args.precisions.split(","):
            rows.append(measure(model, precision, args.tokens, args.rounds))
            print(json.dumps(rows[-1]), flush=True)
    load = f"{before} / {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    text = markdown(rows, command.strip(), load)
    print(text)
    if args.out:
        args.out.with_suffix(".md").write_text("# Decode step: TorchScript or Python\n\n" + text)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"command": command.strip(), "load": load, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

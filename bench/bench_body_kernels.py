"""Which int8 kernel serves the body best, measured in the engine rather than kernel by kernel.

    python bench/bench_body_kernels.py [--model smollm2-135m] [--prompt-tokens 48]
        [--new-tokens 64] [--rounds 5] [--out bench/results/body_kernels.md]

One process builds the engine's int8 body three ways (``int8-planes-bf16`` on every weight it
fits, the registry's default; the planes only on weights at least 4x taller than wide, i.e.
gate_up; ``int8pack-bf16`` everywhere) over the same model skeleton, then, round after round
with the variants interleaved, times a prefill of ``--prompt-tokens`` tokens and the body's
decode steps (CPU ms/token, LM head excluded: it is the rung's, see bench_rung_energy.py).
Medians over the rounds after the first. The per-query figure is prefill + (new - 1) decode
steps. 1 thread.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(loaded: Any) -> dict[str, Any]:
    from tensorslm.rank_store import kernels as K
    from tensorslm.rank_store.body import float_body
    from tensorslm.rank_store.engine import Engine

    def kernel_for(choice: str, n: int, k: int) -> str | None:
        if choice == "tall":   # the planes where N >= 4 K, int8pack elsewhere
            return "int8-planes-bf16" if n >= 4 * k else "int8pack-bf16"
        return None if choice == "default" else choice

    engines = {}
    for name, choice in (("planes everywhere (default)", "default"),
                         ("planes on tall weights (N >= 4K)", "tall"),
                         ("int8pack everywhere", "int8pack-bf16")):
        body = {}
        for key, w in float_body(loaded.model, loaded.read_weight):
            forced = kernel_for(choice, *w.shape)
            with K.force_kernel(forced) if forced else nullcontext():
                body[key] = K.pack_linear(w, "int8")
        engines[name] = Engine(loaded.model, body, K.Precision.INT8)
    return engines


def time_bodies(engines: dict[str, Any], prompt_tokens: int, rounds: int
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Body prefill ms of a ``prompt_tokens`` prompt and body decode CPU ms per token (24 steps)
    of each engine, interleaved, ``rounds`` rounds after one warm-up round (dropped)."""
    import torch

    ids = list(range(100, 100 + prompt_tokens))
    steps = 24
    prefill: dict[str, list[float]] = {k: [] for k in engines}
    decode: dict[str, list[float]] = {k: [] for k in engines}
    with torch.inference_mode():
        for _ in range(rounds + 1):
            for name, engine in engines.items():
                c0 = time.process_time()
                hidden = engine.forward(engine.embed(torch.tensor([ids])), 0)
                prefill[name].append((time.process_time() - c0) * 1e3)
                position = len(ids)
                x = engine.embed(torch.tensor([[int(hidden[0, -1].argmax() % 1000)]]))
                c0 = time.process_time()
                for _ in range(steps):
                    engine.forward(x, position)
                    position += 1
                decode[name].append((time.process_time() - c0) / steps * 1e3)
    return {k: v[1:] for k, v in prefill.items()}, {k: v[1:] for k, v in decode.items()}


def main(argv: Sequence[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    command = "python bench/bench_body_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    from tensorslm.rank_store.models import load_model

    load_before = os.getloadavg()
    loaded = load_model(args.model, body=False)
    engines = build(loaded)
    prefill, decode = time_bodies(engines, args.prompt_tokens, args.rounds)
    load = f"{load_before[0]:.2f} / {os.getloadavg()[0]:.2f}"
    lines = [f"Command: `{command}` (load average before / after: {load}; 1 thread; "
             f"medians of {args.rounds} interleaved rounds after a warm-up)", "",
             f"| int8 body kernels ({args.model}) | body prefill ms ({args.prompt_tokens} tokens) "
             f"| body decode CPU ms/token | per query ms ({args.prompt_tokens} in, "
             f"{args.new_tokens} out) |", "|---|---:|---:|---:|"]
    for name in engines:
        p, d = statistics.median(prefill[name]), statistics.median(decode[name])
        lines.append(f"| {name} | {p:.1f} | {d:.2f} | {p + (args.new_tokens - 1) * d:.0f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text("# The int8 body's kernels in the engine\n\n" + table)


if __name__ == "__main__":
    main()

"""What keeping some linears of an int4 body at int8 costs in bytes and decode time.

    python bench/bench_body_mix.py [--model gemma3-270m] [--mixes int4,int4+int8:qkv,int8]
        [--prompt-tokens 48] [--new-tokens 64] [--rounds 5]

One process builds the engine's body once per mix over the same model skeleton: ``int4`` (the
store's int4 body: groups of 32 with zero points), ``int4+int8:<linears>`` (those fused
linears of every layer at int8 rows, :func:`tensorslm.rank_store.body.body_for`'s
``int8_linears``) and ``int8``; then, round after round with the mixes interleaved, times a
prefill of ``--prompt-tokens`` tokens and the body's decode steps (CPU ms/token, LM head
excluded: it is the rung's). Medians over the rounds after the first; 1 thread. Prints the
packed body's bytes with each, then the command and the load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: Sequence[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--mixes", default="int4,int4+int8:qkv,int4+int8:qkv+gate_up,int8",
                        help="comma-separated; linears inside a mix joined by +")
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    command = "python bench/bench_body_mix.py " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    from tensorslm.rank_store.body import body_for, body_nbytes
    from tensorslm.rank_store.engine import Engine
    from tensorslm.rank_store.kernels import Precision
    from tensorslm.rank_store.models import load_model

    load_before = os.getloadavg()
    loaded = load_model(args.model, body=False)
    engines, sizes = {}, {}
    for mix in args.mixes.split(","):
        base, _, linears = mix.partition("+int8:")
        precision = Precision.parse(base)
        body = body_for(loaded.model, precision, read=loaded.read_weight,
                        int8_linears=tuple(linears.split("+")) if linears else ())
        engines[mix], sizes[mix] = Engine(loaded.model, body, precision), body_nbytes(body)
    ids = list(range(100, 100 + args.prompt_tokens))
    steps = 24
    prefill: dict[str, list[float]] = {k: [] for k in engines}
    decode: dict[str, list[float]] = {k: [] for k in engines}
    with torch.inference_mode():
        for _ in range(args.rounds + 1):
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
    print(f"| body ({args.model}) | packed MB | body prefill ms ({args.prompt_tokens} tokens) "
          f"| body decode CPU ms/token | per query ms ({args.prompt_tokens} in, "
          f"{args.new_tokens} out) |\n|---|---:|---:|---:|---:|")
    for name in engines:
        p, d = statistics.median(prefill[name][1:]), statistics.median(decode[name][1:])
        print(f"| {name} | {sizes[name] / 1e6:.1f} | {p:.1f} | {d:.2f} | "
              f"{p + (args.new_tokens - 1) * d:.0f} |")
    print(f"command: {command}; load average before / after {load_before[0]:.2f} / "
          f"{os.getloadavg()[0]:.2f}; 1 thread; medians of {args.rounds} interleaved rounds "
          "after a warm-up")


if __name__ == "__main__":
    main()

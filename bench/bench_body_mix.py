"""What keeping some linears of an int4 body at int8 costs in bytes and decode time.

    python bench/bench_body_mix.py [--model gemma3-270m] [--mixes int4,int4+int8:qkv,int8]
        [--prompt-tokens 48] [--new-tokens 64] [--rounds 5]

One process builds the engine's body once per mix over the same model skeleton: ``int4`` (every
linear int4: groups of 32 with zero points), ``int4+int8:<linears>`` (those fused
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
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_body_kernels import time_bodies  # noqa: E402  (bench/ is the script's directory)


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
    prefill, decode = time_bodies(engines, args.prompt_tokens, args.rounds)
    print(f"| body ({args.model}) | packed MB | body prefill ms ({args.prompt_tokens} tokens) "
          f"| body decode CPU ms/token | per query ms ({args.prompt_tokens} in, "
          f"{args.new_tokens} out) |\n|---|---:|---:|---:|---:|")
    for name in engines:
        p, d = statistics.median(prefill[name]), statistics.median(decode[name])
        print(f"| {name} | {sizes[name] / 1e6:.1f} | {p:.1f} | {d:.2f} | "
              f"{p + (args.new_tokens - 1) * d:.0f} |")
    print(f"command: {command}; load average before / after {load_before[0]:.2f} / "
          f"{os.getloadavg()[0]:.2f}; 1 thread; medians of {args.rounds} interleaved rounds "
          "after a warm-up")


if __name__ == "__main__":
    main()

"""Time compressing the full SmolLM2 vocabulary (49152 x 576, shape 8x8x9) at a ladder of rungs.

Run:  python bench/bench_compress.py [--ranks 6x8,4x6,4x4,2x2] [--threads 2]
Prints the wall time of compress_table (model loading excluded) and each rung's ratio and error.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _smollm2_table import load_table  # noqa: E402

from tensorslm.rank_store.compress import compress_table  # noqa: E402
from tensorslm.rank_store.rung_spec import parse_rung_specs  # noqa: E402
from tensorslm.rank_store.store import relative_error  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="6x8,4x6,4x4,2x2")
    parser.add_argument("--ratios", default=None)
    parser.add_argument("--tolerances", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="report the best of N runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = load_table()
    specs = parse_rung_specs(args.ranks, args.ratios, args.tolerances)
    best = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        rungs = compress_table(table, specs, progress=False)
        best = min(best, time.perf_counter() - start)
    command = f"python bench/bench_compress.py --ranks {args.ranks} --threads {args.threads} --repeat {args.repeat}"
    if args.ratios:
        command += f" --ratios {args.ratios}"
    if args.tolerances:
        command += f" --tolerances {args.tolerances}"
    print(f"compress {table.shape[0]}x{table.shape[1]} at {len(rungs)} rungs: {best:.2f} s "
          f"({args.threads} threads, best of {args.repeat}; target < 15 s)")
    for name, rung in rungs.items():
        print(f"  {name:12s} ratio {rung.ratio:6.2f}x  bytes {rung.nbytes:>11,d}  "
              f"rel error {relative_error(rung, table):.4f}  groups {len(rung.groups)}")
    print(f"command: {command}")


if __name__ == "__main__":
    main()

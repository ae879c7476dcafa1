"""Each kernel of the registry against the fp32 matmul, alone, at batch 1 (or --batch M).

    python bench/bench_kernels.py [--threads 1] [--repeats 200] [--batch 1] [--kernels a,b]

Shapes: SmolLM2's fused body linears (qkv 960x576, gate_up 3072x576, down 576x1536) with 30
distinct weights each (as in a 30-layer decode step, so the cache does not hold them) and its
tied head (49,152 x 576). CPU ms per call (``time.process_time``; kernels interleaved, median of
the repeats), and the speed-up against
``fp32-matmul`` (above 1 is faster). Every kernel is forced with ``force_kernel``, so the
fallbacks are timed too. ``--batch M`` multiplies M rows at a time (a prefill of M tokens);
``--kernels`` times only the named kernels (fp32-matmul is always timed, as the base).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1, help="rows of x per call")
    parser.add_argument("--kernels", default="", help="comma-separated kernel names (default all)")
    args = parser.parse_args()
    import torch

    from tensorslm.rank_store import kernels as K

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = {"qkv 960x576 x30": (960, 576, 30), "gate_up 3072x576 x30": (3072, 576, 30),
              "down 576x1536 x30": (576, 1536, 30), "head 49152x576": (49152, 576, 1)}
    names = [n for n in K.kernel_names()
             if not args.kernels or n == "fp32-matmul" or n in args.kernels.split(",")]
    unknown = set(filter(None, args.kernels.split(","))) - set(K.kernel_names())
    if unknown:
        parser.error(f"unknown kernels {', '.join(sorted(unknown))}; "
                     f"expected some of {', '.join(K.kernel_names())}")
    print(f"cpu {K.cpu_features()}; load average {os.getloadavg()[0]:.2f}; "
          f"{args.threads} thread(s); batch {args.batch}")
    for label, (n, k, copies) in shapes.items():
        weights = [torch.randn(n, k) * 0.02 for _ in range(copies)]
        x = torch.randn(args.batch, k)
        packed = {}
        for name in names:
            kernel = K._KERNELS[name]
            with K.force_kernel(name):
                packed[name] = [K.pack_linear(w, kernel.precision) for w in weights]
            for p in packed[name]:
                p.matmul(x)
        times: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(args.repeats):  # kernels interleaved, in a rotating order
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                t0 = time.process_time()
                for p in packed[name]:
                    p.matmul(x)
                times[name].append(time.process_time() - t0)
        base = statistics.median(times["fp32-matmul"])
        for name in names:
            ms = statistics.median(times[name]) * 1e3
            print(f"{label:22s} {name:16s} {ms:8.3f} ms  {base * 1e3 / ms:5.2f}x fp32  "
                  f"{sum(p.nbytes for p in packed[name]) / 2**20:7.1f} MiB", flush=True)
        del packed
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print("command: python bench/bench_kernels.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()

"""Each kernel of the registry against the fp32 matmul, alone, at batch 1.

    python bench/bench_kernels.py [--threads 1] [--repeats 200]

Shapes: SmolLM2's fused body linears (qkv 960x576, gate_up 3072x576, down 576x1536) with 30
distinct weights each (as in a 30-layer decode step, so the cache does not hold them) and its
tied head (49,152 x 576). CPU ms per call (``time.process_time``), and the speed-up against
``fp32-matmul`` (above 1 is faster). Every kernel is forced with ``force_kernel``, so the
fallbacks are timed too.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    import torch

    from tensorslm.rank_store import kernels as K

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = {"qkv 960x576 x30": (960, 576, 30), "gate_up 3072x576 x30": (3072, 576, 30),
              "down 576x1536 x30": (576, 1536, 30), "head 49152x576": (49152, 576, 1)}
    print(f"cpu {K.cpu_features()}; load average {os.getloadavg()[0]:.2f}; "
          f"{args.threads} thread(s)")
    for label, (n, k, copies) in shapes.items():
        weights = [torch.randn(n, k) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k)
        base = None
        for name in K.kernel_names():
            kernel = K._KERNELS[name]
            with K.force_kernel(name):
                packed = [K.pack_linear(w, kernel.precision) for w in weights]
            for p in packed:
                p.matmul(x)
            t0 = time.process_time()
            for _ in range(args.repeats):
                for p in packed:
                    p.matmul(x)
            ms = (time.process_time() - t0) / args.repeats * 1e3
            base = ms if name == "fp32-matmul" else base
            print(f"{label:22s} {name:14s} {ms:8.3f} ms  {base / ms:5.2f}x fp32  "
                  f"{sum(p.nbytes for p in packed) / 2**20:7.1f} MiB", flush=True)
    print("command: python bench/bench_kernels.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()

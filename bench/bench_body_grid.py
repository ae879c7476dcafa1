"""How much of each model's body already lies on an int4 grid of groups of 32.

    python bench/bench_body_grid.py [--models smollm2-135m,gemma3-270m]

The bundled models are GGUF files dequantised to fp32 (SmolLM2: Q4_1; Gemma-3-270m: Q4_K_M,
whose tensors of 640 columns fall back to 5-bit Q5_0 and some ``down`` tensors are 6-bit
Q6_K). A group of 32 that came from a 4-bit block with a scale and a minimum holds at most 16
distinct values on an even grid, and an asymmetric int4 group reproduces it. Per fused linear
kind this prints the share of groups with at most 16 distinct values and the relative error of
int4 groups of 32 with and without zero points (over all layers), then the command.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    args = parser.parse_args()

    from tensorslm.rank_store.body import LINEARS, float_body
    from tensorslm.rank_store.kernels import (dequantize_int4_groups, quantize_int4_groups,
                                              quantize_int4_groups_asymmetric)
    from tensorslm.rank_store.models import load_model

    for model in args.models.split(","):
        loaded = load_model(model)
        groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # on grid, all
        errors: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # sym, asym, |w|
        for name, w in float_body(loaded.model):
            kind = name.rsplit(".", 1)[1]
            n, k = w.shape
            ordered, _ = w.reshape(n, k // 32, 32).sort(dim=-1)  # (N, G, 32)
            distinct = 1 + (ordered[..., 1:] != ordered[..., :-1]).sum(dim=-1)  # (N, G)
            groups[kind][0] += float((distinct <= 16).sum())
            groups[kind][1] += distinct.numel()
            sym = dequantize_int4_groups(*quantize_int4_groups(w, 32))
            asym = dequantize_int4_groups(*quantize_int4_groups_asymmetric(w, 32))
            errors[kind][0] += float(((sym - w) ** 2).sum())
            errors[kind][1] += float(((asym - w) ** 2).sum())
            errors[kind][2] += float((w ** 2).sum())
        for kind in LINEARS:
            on_grid, total = groups[kind]
            sym, asym, norm = errors[kind]
            print(f"{model} {kind}: {on_grid / total:.1%} of groups hold <= 16 values; "
                  f"relative error int4 symmetric {(sym / norm) ** 0.5:.4f}, "
                  f"with zero points {(asym / norm) ** 0.5:.4f}", flush=True)
    print(f"command: python bench/bench_body_grid.py {' '.join(sys.argv[1:])}; "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

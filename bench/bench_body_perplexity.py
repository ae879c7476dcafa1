"""Perplexity per body precision (dense embedding and head), the engine's forward.

    python bench/bench_body_perplexity.py [--models smollm2-135m,gemma3-270m]
        [--precisions fp32,bf16,int8,int4] [--tokens 8192] [--json OUT]

First ``--tokens`` tokens of WikiText-2 test, 1,024-token windows (Gemma: BOS per window), as
``tensorslm evaluate --body`` computes them (:func:`tensorslm.rank_store.evaluate.body_perplexities`).
Prints one line per (model, precision) with the change against fp32, and the command.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--precisions", default="fp32,bf16,int8,int4")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    from tensorslm.rank_store.evaluate import body_perplexities, encode_text
    from tensorslm.rank_store.models import load_model

    torch.set_num_threads(1)
    text = TEXT.read_text(encoding="utf-8")
    rows = []
    for model in args.models.split(","):
        loaded = load_model(model)
        ids = encode_text(loaded.tokenizer, text, args.tokens)
        ppl = body_perplexities(loaded, ids, args.precisions.split(","), progress=False)
        for name, value in ppl.items():
            delta = (value / ppl["fp32"] - 1) * 100 if "fp32" in ppl else None
            rows.append({"model": model, "precision": name, "perplexity": round(value, 3),
                         "delta_percent": None if delta is None else round(delta, 2),
                         "tokens": args.tokens})
            print(f"{model} body {name}: perplexity {value:.3f}"
                  + ("" if delta is None else f" ({delta:+.2f}% against fp32)"), flush=True)
    print(f"command: python bench/bench_body_perplexity.py {' '.join(sys.argv[1:])}; "
          f"load average {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

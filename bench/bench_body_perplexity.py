"""Perplexity per body precision (dense embedding and head), the engine's forward.

    python bench/bench_body_perplexity.py [--models smollm2-135m,gemma3-270m]
        [--precisions fp32,bf16,int8,int4] [--tokens 8192] [--json OUT]
        [--symmetric] [--all-int4] [--int8-linears qkv,gate_up]
        [--calibrate [--sequences 128 --length 512]]

First ``--tokens`` tokens of WikiText-2 test, 1,024-token windows (Gemma: BOS per window), as
``tensorslm evaluate --body`` computes them (:func:`tensorslm.rank_store.evaluate.body_perplexities`).
``int4`` is the int4 body as the store keeps it by default (a zero point per group of 32, the
model family's :data:`~tensorslm.rank_store.body.INT4_INT8_LINEARS` at int8 rows; the row names
them); ``--symmetric`` adds ``int4-symmetric`` (scales only, no linear at int8), ``--all-int4``
adds ``int4-all`` (zero points, no linear at int8). ``--int8-linears`` adds
``int4+int8:<linears>``: the int4 body with exactly those fused linears of every layer kept at
int8 rows. ``--calibrate`` adds ``int4-gptq`` (with ``--int8-linears``:
``int4-gptq+int8:<linears>``): the int4 body calibrated by GPTQ
(:mod:`tensorslm.rank_store.gptq`) on ``--sequences`` sequences of ``--length`` tokens taken
from the same file *after* the evaluated tokens (disjoint from them). Rows the bench builds
itself also carry the packed body's bytes.
Prints one line per (model, precision) with the change against fp32, and the command.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
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
    parser.add_argument("--symmetric", action="store_true",
                        help="also the int4 body without zero points (int4-symmetric)")
    parser.add_argument("--all-int4", action="store_true",
                        help="also the int4 body with no linear at int8 (int4-all)")
    parser.add_argument("--int8-linears", default="",
                        help="fused linears (qkv,o,gate_up,down) kept at int8 in an int4 body")
    parser.add_argument("--calibrate", action="store_true",
                        help="also the GPTQ-calibrated int4 body (int4-gptq)")
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--length", type=int, default=512)
    args = parser.parse_args()
    import time

    import torch

    from tensorslm.rank_store.body import (LINEARS, body_for, body_nbytes, int8_linears_for,
                                           pack_body, quantize_body)
    from tensorslm.rank_store.engine import Engine
    from tensorslm.rank_store.evaluate import (body_perplexities, bos_id_of, encode_text,
                                               perplexity)
    from tensorslm.rank_store.gptq import calibration_from_text, calibration_label
    from tensorslm.rank_store.kernels import Precision
    from tensorslm.rank_store.models import load_model

    torch.set_num_threads(1)
    text = TEXT.read_text(encoding="utf-8")
    rows = []
    for model in args.models.split(","):
        loaded = load_model(model)
        ids = encode_text(loaded.tokenizer, text, args.tokens)
        ppl = body_perplexities(loaded, ids, [p for p in args.precisions.split(",") if p],
                                progress=False)
        extra: dict[str, dict] = {}

        def score(name: str, body) -> None:
            ppl[name] = perplexity(Engine(loaded.model, body, Precision.INT4), ids,
                                   context_length=loaded.context_length,
                                   bos_id=bos_id_of(loaded), progress=False)
            extra.setdefault(name, {})["body_bytes"] = body_nbytes(body)

        if "int4" in ppl:
            default = int8_linears_for(loaded.model, Precision.INT4)
            extra["int4"] = {"body_bytes": body_nbytes(body_for(loaded.model, Precision.INT4)),
                             "int8_linears": ",".join(lin for lin in LINEARS if lin in default)}
        int8 = tuple(lin for lin in args.int8_linears.split(",") if lin)
        mix = f"+int8:{','.join(int8)}" if int8 else ""
        if args.symmetric:
            score("int4-symmetric", body_for(loaded.model, Precision.INT4, zero_points=False,
                                             int8_linears=()))
        if args.all_int4:
            score("int4-all", body_for(loaded.model, Precision.INT4, int8_linears=()))
        if int8:
            score(f"int4{mix}", body_for(loaded.model, Precision.INT4, int8_linears=int8))
        if args.calibrate:
            calibration = calibration_from_text(loaded, text, skip=args.tokens,
                                                sequences=args.sequences, length=args.length)
            start = time.process_time()
            tensors = quantize_body(loaded.model, Precision.INT4, calibration=calibration,
                                    int8_linears=int8)
            seconds = time.process_time() - start
            score(f"int4-gptq{mix}", pack_body(tensors, Precision.INT4,
                                               loaded.model.config.num_hidden_layers))
            extra[f"int4-gptq{mix}"].update(calibration=calibration_label(calibration),
                                            calibration_cpu_s=round(seconds, 1))
        for name, value in ppl.items():
            delta = (value / ppl["fp32"] - 1) * 100 if "fp32" in ppl else None
            rows.append({"model": model, "precision": name, "perplexity": round(value, 3),
                         "delta_percent": None if delta is None else round(delta, 2),
                         "tokens": args.tokens, **extra.get(name, {})})
            print(f"{model} body {name}: perplexity {value:.3f}"
                  + ("" if delta is None else f" ({delta:+.2f}% against fp32)"), flush=True)
    command = f"python bench/bench_body_perplexity.py {shlex.join(sys.argv[1:])}"
    load = f"load average {os.getloadavg()[0]:.2f}"
    print(f"command: {command}; {load}")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "load": load, "rows": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()

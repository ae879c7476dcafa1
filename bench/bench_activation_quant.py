"""The w8a8 body's choices, measured: which linears take int8 activations, how much smoothing.

    python bench/bench_activation_quant.py [--models smollm2-135m,gemma3-270m] [--tokens 2048]
        [--alphas none,0.5,0.85] [--sequences 16] [--repeats 30] [--json OUT]
        [--variants fp32,int8,every,w8a8[,self][,self-2x128]]

The ``int8`` body multiplies int8 weights by bf16 activations. The ``w8a8`` body runs some
linears through ``quantized.linear_dynamic`` (fbgemm here, qnnpack on a Pi), which quantises
each token's input to 8 bits at run time and multiplies int8 by int8. Two questions:

* **Quality.** Perplexity (first ``--tokens`` WikiText-2 test tokens, the engine, the model's
  dense embedding and head) of bodies built with the real kernels: int8 weights only; int8
  activations on every linear; and on the linears the ``w8a8`` body quantises
  (``body.W8A8_LINEARS``), each with SmoothQuant input scales ``s_j = max|x_j|^a / max|W_j|^(1-a)``
  for every ``a`` of ``--alphas`` (``none``: s = 1). The channel maxima come from ``--sequences``
  sequences of 512 tokens after the first 8,192 (never the evaluated text); ``--variants ...,self``
  adds the ``w8a8`` body as ``tensorslm compress`` stores it without a calibration text (the
  maxima from text the model writes itself, :func:`tensorslm.rank_store.smoothing.self_calibration`);
  ``self-<S>x<L>`` the same from S sequences of L tokens (``self-2x128``: the demo's short
  sample), with the CPU seconds the sample took to write and measure.
* **Speed.** CPU ms of the registry's ``w8a8`` kernel (``quantized.linear_dynamic``, the
  activation quantisation included) against its ``int8`` kernel, batch 1, SmolLM2's body
  shapes, 30 distinct weights per shape
  so the cache does not hold them, the two interleaved, median of ``--repeats``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CALIBRATION_START, WINDOW = 8192, 512
#: the bodies evaluated by default (``--variants``; ``self`` adds the self-calibrated one)
VARIANTS = ("fp32", "int8", "every", "w8a8")
SHAPES = {"qkv 960x576": (960, 576), "o 576x576": (576, 576), "gate_up 3072x576": (3072, 576),
          "down 576x1536": (576, 1536)}


def quality(model_ref: str, tokens: int, alphas: list[float | None], sequences: int,
            variants: Sequence[str] = VARIANTS) -> list[dict[str, Any]]:
    import torch

    from tensorslm.rank_store.body import W8A8_LINEARS, float_body
    from tensorslm.rank_store.engine import Engine
    from tensorslm.rank_store.evaluate import bos_id_of, encode_text, perplexity
    from tensorslm.rank_store.gptq import calibration_from_text
    from tensorslm.rank_store.kernels import Precision, pack_int8_rows, quantize_int8_rows
    from tensorslm.rank_store.models import load_model
    from tensorslm.rank_store.smoothing import (DEFAULT_ALPHA, SELF_CALIBRATION_LENGTH,
                                                SELF_CALIBRATION_SEQUENCES, channel_maxima,
                                                input_scales, self_calibration_of)

    from _ppl_harness import TEXT

    loaded = load_model(model_ref)
    text = TEXT.read_text(encoding="utf-8")
    ids = encode_text(loaded.tokenizer, text, tokens)
    calibration = calibration_from_text(loaded, text, skip=CALIBRATION_START, sequences=sequences,
                                        length=WINDOW)
    maxima = channel_maxima(loaded.model, calibration)
    weights = dict(float_body(loaded.model))

    def body(alpha: float | None, activations: tuple[str, ...],
             maxima: dict[str, Any] = maxima) -> dict[str, Any]:
        out = {}
        for name, w in weights.items():
            if name.rsplit(".", 1)[1] not in activations:
                out[name] = pack_int8_rows(*quantize_int8_rows(w))
                continue
            s = torch.ones(w.shape[1]) if alpha is None else input_scales(maxima[name], w, alpha)
            out[name] = pack_int8_rows(*quantize_int8_rows(w * s), precision=Precision.W8A8,
                                       input_scale=1 / s)
        return out

    every = ("qkv", "o", "gate_up", "down")
    bodies: list[tuple[str, dict[str, Any] | None]] = []
    if "fp32" in variants:
        bodies.append(("fp32", None))
    if "int8" in variants:
        bodies.append(("int8 weights only", body(None, ())))
    for alpha in alphas:
        label = "none" if alpha is None else f"{alpha:g}"
        if "every" in variants:
            bodies.append((f"int8 activations on every linear, smoothing {label}",
                           body(alpha, every)))
        if "w8a8" in variants:
            bodies.append((f"int8 activations on {'+'.join(W8A8_LINEARS)}, smoothing {label}",
                           body(alpha, W8A8_LINEARS)))
    for variant in variants:   # what `tensorslm compress` stores without a calibration text
        if not variant.startswith("self"):
            continue
        sequences, length = self_size(variant) or (SELF_CALIBRATION_SEQUENCES, SELF_CALIBRATION_LENGTH)
        started = time.process_time()
        written = channel_maxima(loaded.model, self_calibration_of(loaded, sequences=sequences,
                                                                   length=length))
        seconds = time.process_time() - started
        bodies.append((f"int8 activations on {'+'.join(W8A8_LINEARS)}, smoothing "
                       f"{DEFAULT_ALPHA:g}, self-written calibration ({sequences} x {length} "
                       f"tokens, {seconds:.0f} CPU s)", body(DEFAULT_ALPHA, W8A8_LINEARS, written)))
    rows = []
    for label, packed in bodies:
        engine = (Engine.from_model(loaded.model, Precision.FP32) if packed is None
                  else Engine(loaded.model, packed, Precision.W8A8))
        value = perplexity(engine, ids, context_length=loaded.context_length,
                           bos_id=bos_id_of(loaded), progress=False)
        rows.append({"model": model_ref, "variant": label, "perplexity": value})
        print(f"{model_ref}: {label}: {value:.3f}", flush=True)
    for row in rows:
        row["delta_pct"] = ((row["perplexity"] / rows[0]["perplexity"] - 1) * 100
                            if "fp32" in variants else None)
    return rows


def speed(repeats: int) -> list[dict[str, Any]]:
    import torch

    from tensorslm.rank_store import kernels as K
    from tensorslm.rank_store.kernels import Precision

    rows = []
    for label, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k) * 0.02 for _ in range(30)]
        x = torch.randn(1, k)
        packed = {}
        for precision in (Precision.INT8, Precision.W8A8):
            linears = [K.pack_linear(w, precision) for w in weights]
            packed[linears[0].kernel] = linears
        times: dict[str, list[float]] = {name: [] for name in packed}
        for linears in packed.values():
            for linear in linears:
                linear.matmul(x)
        for rep in range(repeats):   # interleaved, alternating which goes first
            for name in (list(packed) if rep % 2 else list(packed)[::-1]):
                c = time.process_time()
                for linear in packed[name]:
                    linear.matmul(x)
                times[name].append((time.process_time() - c) * 1e3)
        for name, t in times.items():
            rows.append({"shape": label, "kernel": name, "cpu_ms_30_weights": statistics.median(t)})
        print("  ".join(f"{label}: {name} {statistics.median(t):.2f} ms"
                        for name, t in times.items()),
              flush=True)
    return rows


def self_size(variant: str) -> tuple[int, int] | None:
    """``self-<S>x<L>`` -> (S, L); ``self`` -> None (the compress default)."""
    if variant == "self":
        return None
    sequences, _, length = variant.removeprefix("self-").partition("x")
    return int(sequences), int(length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--alphas", default="none,0.5,0.85")
    parser.add_argument("--sequences", type=int, default=16,
                        help="calibration sequences of 512 tokens for the channel maxima")
    parser.add_argument("--repeats", type=int, default=30, help="0: no kernel timing")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="bodies to evaluate, among fp32, int8 (weights only), every (int8 "
                             "activations on every linear), w8a8 (on the w8a8 body's linears), "
                             "self (the w8a8 body calibrated on text the model writes, as "
                             "tensorslm compress stores it), self-<S>x<L> (the same from S "
                             "sequences of L tokens)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    command = "python bench/bench_activation_quant.py " + " ".join(sys.argv[1:])
    load = f"{os.getloadavg()[0]:.2f}"
    alphas = [None if a == "none" else float(a) for a in args.alphas.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(v for v in set(variants) - {*VARIANTS, "self"}
                     if not re.fullmatch(r"self-[1-9]\d*x[1-9]\d*", v))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; expected among "
                     f"{', '.join([*VARIANTS, 'self'])} or self-<sequences>x<length>")
    speeds = speed(args.repeats) if args.repeats else []
    qualities = [row for m in args.models.split(",") if m
                 for row in quality(m, args.tokens, alphas, args.sequences, variants)]
    print(f"\n{command}\nload average {load} at start, {os.getloadavg()[0]:.2f} at end; 1 thread\n")
    print("| model | body | perplexity | vs fp32 |\n|---|---|---:|---:|")
    for row in qualities:
        delta = "–" if row["delta_pct"] is None else f"{row['delta_pct']:+.2f}%"
        print(f"| {row['model']} | {row['variant']} | {row['perplexity']:.3f} | {delta} |")
    print("\n| shape (30 weights) | kernel | CPU ms |\n|---|---|---:|")
    for row in speeds:
        print(f"| {row['shape']} | {row['kernel']} | {row['cpu_ms_30_weights']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "load": load, "quality": qualities,
                                         "speed": speeds}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""The perplexity-per-byte frontier of the embedding ladder: baselines, plain TT, each technique.

    python bench/bench_frontier.py                      # both models, both head modes
    python bench/bench_frontier.py --models smollm2 --quick

For SmolLM2-135M and Gemma-3-270m, perplexity on the first 8,192 tokens of WikiText-2 test
(1,024-token windows; Gemma: BOS per window) with the input table replaced, head ``dense`` (the
LM head keeps the original matrix) and ``tied`` (the head uses the replaced table too), and the
embedding bytes of each configuration (every stored byte counted, ratios against fp32). Each
configuration is the rung the store writes and the Pi serves: its bytes are ``Rung.nbytes`` and
its table is rebuilt by ``reconstruct_rows``.
Results are cached per (model, configuration, head) in a JSON file, so a rerun only measures
what is new. Writes bench/results/frontier.md and bench/results/frontier.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _ppl_harness import CACHE, Harness  # noqa: E402

from tensorslm.rank_store.frontier import Point, pareto_front  # noqa: E402
from tensorslm.rank_store.recipes import budget_choice, build  # noqa: E402
from tensorslm.rank_store.rung import reconstruct_rows  # noqa: E402
from tensorslm.constants import SCALE_BYTES  # noqa: E402

RESULTS = ROOT / "bench" / "results"
#: where the calibration texts named in the table come from (Debian's license texts: English prose
#: that is not WikiText)
CALIBRATION_HINTS = {"GPL-3": "/usr/share/common-licenses/GPL-3"}
LEGACY_CACHE = CACHE / "frontier_cache.json"


def cache_file(model: str) -> Path:
    """One JSON cache per model, so runs for different models can go in parallel."""
    return CACHE / f"frontier_{model}.json"

BASELINES = ["fp32", "fp16", "int8-row", "int4-row", "mean+int4-row", "int2-row"]
PLAIN = ["tt-max", "tt-8x8", "tt-6x8", "tt-4x6", "tt-2x2"]
ALONE = ["tt-4x6+perm", "tt-4x6+corr", "tt-4x6+mean", "tt-4x6+pca32", "tt-4x6+sparse32",
         "tt-6x8+fp16", "tt-6x8+int8", "tt-max+int8", "tt-max+int4"]
COMBINED = ["tt-6x8+perm+mean+int8", "tt-4x6+perm+mean+sparse32+int8", "tt-8x8+perm+mean+int8",
            "tt-max+perm+mean+int8", "tt-max+perm+mean+int4", "tt-6x8+pca32+int8",
            "budget-4+perm+mean", "budget-8+perm+mean", "budget-16+perm+mean",
            "budget-4+perm+mean+int8", "budget-8+perm+mean+int8", "budget-16+perm+mean+int8"]
#: per-coordinate scaling (``norm``) and budgets that may also store a token as a whole row
NORM = ["tt-4x6+norm", "tt-max+norm+int4", "tt-max+mean+norm+int8", "tt-max+mean+norm+int4",
        "row+mean+norm+int8", "row+mean+norm+int4", "budget-4+mean+norm", "budget-8+mean+norm",
        "budget-16+mean+norm", "budget-4+mean+norm+rows", "budget-8+mean+norm+rows", "budget-16+mean+norm+rows"]
QUICK = ["fp32", "int8-row", "int4-row", "tt-6x8", "tt-4x6", "tt-4x6+perm+mean+sparse32+int8",
         "tt-max+perm+mean+int8", "tt-max+perm+mean+int4", "budget-8+perm+mean"]
#: configurations also measured with the tied head (the frontier candidates and references)
#: (the default auto ladder's recipes among them: tied is the default head)
TIED = ["fp32", "int8-row", "int4-row", "tt-6x8", "tt-max+perm+mean+int8", "budget-8+perm+mean+int8",
        "row+mean+norm+int4", "tt-max+mean+norm+int8", "budget-16+mean+norm+rows", "row+mean+norm+int8",
        "rows-6+mean+norm+g32", "budget-8+mean+norm+rows"]



#: the baselines are rungs too (order 1, per-row scales in fp16), measured as served; the names
#: are the table's
BASELINE_RECIPES = {"fp32": "row", "fp16": "row+fp16", "int8-row": "row+int8", "int4-row": "row+int4",
                    "mean+int4-row": "row+mean+int4"}


def int2_rows(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-row symmetric int2 (codes -1, 0, 1; fp16 scales counted): a reference point below the
    rung format's int4, which no rung can hold (so the Pi cannot serve it)."""
    V, d = weight.shape
    scale = weight.abs().amax(1, keepdim=True).half().float().clamp_min(1e-12)  # (V, 1)
    return (weight / scale).round().clamp(-1, 1) * scale, V * math.ceil(d * 2 / 8) + V * SCALE_BYTES


def load_cache() -> dict:
    cache = json.loads(LEGACY_CACHE.read_text()) if LEGACY_CACHE.exists() else {}
    for path in CACHE.glob("frontier_*.json"):
        model = path.stem.removeprefix("frontier_")
        for config, entry in json.loads(path.read_text()).items():
            cache.setdefault(model, {}).setdefault(config, {}).update(entry)
    return cache


def save_cache(cache: dict, model: str) -> None:
    path = cache_file(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(path.read_text()) if path.exists() else {}  # another run may have added some
    for config, entry in cache.get(model, {}).items():
        merged.setdefault(config, {}).update(entry)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
    os.replace(tmp, path)


def usage(model: str, path: Path, vocab_size: int) -> torch.Tensor:
    """Budget weights (V,) from the token counts of a calibration text (never the evaluated one)."""
    from transformers import AutoTokenizer

    from tensorslm.rank_store.ladder import calibration_usage

    print(f"{model}: budget weighted by the token counts of {path}", flush=True)
    return calibration_usage(AutoTokenizer.from_pretrained(CACHE / model), path, vocab_size)


def config_table(model: str, weight: torch.Tensor, config: str,
                 calibrations: dict[str, Path]) -> tuple[torch.Tensor, int, dict]:
    """The (V, d) table a configuration serves, its bytes, and what a budget chose per token."""
    if config == "int2-row":
        return (*int2_rows(weight), {})
    # exactly the rung the store writes and the Pi serves: its bytes, its rows
    recipe, _, label = config.partition("@")
    rung = build(weight, BASELINE_RECIPES.get(recipe, recipe),
                 weights=usage(model, calibrations[label], weight.shape[0]) if label else None)
    info = {"budget_choice": budget_choice(rung)} if recipe.startswith("budget-") else {}
    return reconstruct_rows(rung, torch.arange(weight.shape[0])), rung.nbytes, info  # (V, d)


def check_calibrations(configs: list[str], calibrations: dict[str, Path]) -> None:
    missing = {c.partition("@")[2] for c in configs} - set(calibrations) - {""}
    if missing:
        raise SystemExit(f"configurations name calibration texts {sorted(missing)}: pass them with --calibration")


def measure(model: str, configs: list[str], heads: dict[str, list[str]], cache: dict,
            calibrations: dict[str, Path] | None = None) -> None:
    """Fill ``cache[model][config]`` with bytes, ratio, rel. error, build seconds and perplexities."""
    todo = [(c, h) for c in configs for h in heads if c in heads[h]
            and f"ppl_{h}" not in cache.get(model, {}).get(c, {})]
    if not todo:
        return
    calibrations = calibrations or {}
    check_calibrations([c for c, _ in todo], calibrations)
    harness = Harness.load(model)
    weight = harness.dense_weight
    norm = weight.norm()
    entries = cache.setdefault(model, {})
    for config in configs:
        wanted = [h for c, h in todo if c == config]
        if not wanted:
            continue
        entry = entries.setdefault(config, {})
        started = time.perf_counter()
        table, nbytes, info = config_table(model, weight, config, calibrations)
        entry.update(nbytes=nbytes, ratio=weight.numel() * 4 / nbytes, seconds=time.perf_counter() - started,
                     rel_error=float((weight - table).norm() / norm), **info)
        for head in wanted:
            entry[f"ppl_{head}"] = harness.perplexity(table, head)
        print(f"{model:8s} {config:34s} {entry['ratio']:6.2f}x ppl " +
              " ".join(f"{h}={entry[f'ppl_{h}']:.2f}" for h in wanted), flush=True)
        save_cache(cache, model)


def window_nll(harness: Harness, table: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of every evaluation window (head dense): (W,) float64."""
    starts = range(0, len(harness.ids) - 1, harness.window)
    return torch.tensor([math.log(dataclasses.replace(harness, ids=harness.ids[s : s + harness.window]).perplexity(table))
                         for s in starts], dtype=torch.float64)


def measure_noise(model: str, configs: list[str], calibrations: dict[str, Path]) -> dict:
    """How far apart two configurations' perplexities must be to differ beyond the evaluation's
    noise: for every pair, the per-window difference of log-perplexity, its mean (the relative
    perplexity difference) and the standard error of that mean over the windows (paired: the same
    text for both)."""
    check_calibrations(configs, calibrations)
    harness = Harness.load(model)
    nll = {}
    for c in configs:
        nll[c] = window_nll(harness, config_table(model, harness.dense_weight, c, calibrations)[0])
        print(f"{model:8s} {c:34s} ppl dense {math.exp(float(nll[c].mean())):.2f} (mean of the window log-perplexities)",
              flush=True)
    pairs = []
    for i, a in enumerate(configs):
        for b in configs[i + 1 :]:
            diff = nll[a] - nll[b]  # (W,)
            pairs.append({"a": a, "b": b, "windows": diff.numel(), "mean": float(diff.mean()),
                          "se": float(diff.std() / math.sqrt(diff.numel()))})
            print(f"{model:8s} {a} vs {b}: log-ppl difference {100 * pairs[-1]['mean']:+.3f}% "
                  f"± {100 * pairs[-1]['se']:.3f}% (one standard error, {diff.numel()} windows)", flush=True)
    return {"tokens": len(harness.ids), "window": harness.window, "pairs": pairs,
            "ppl_dense": {c: math.exp(float(v.mean())) for c, v in nll.items()},
            "cpu_load": os.getloadavg()[0]}


def family(config: str) -> str:
    """dense, per-row quantisation (the baselines and order-1 ``row`` recipes), TT (every token a
    per-token TT), or TT+rows (a budget that stores some tokens as TT, the others as whole rows)."""
    if config in ("fp32", "fp16"):
        return "dense"
    if config.endswith("-row") or config.startswith(("row+", "rows-")):
        return "per-row quantisation"
    if "+rows" in config:
        return "TT+rows"
    return "TT"


def write_table(cache: dict, models: list[str], command: str) -> str:
    lines = ["# Embedding frontier: perplexity against bytes", "",
             f"Reproduce: `{command}`", "",
             "First 8,192 tokens of WikiText-2 test, 1,024-token windows (Gemma: BOS per window). "
             "ratio = fp32 table bytes / bytes stored (cores, scales, indices, perm, offset, basis, "
             "sparse entries: everything; `Rung.nbytes` of the rung the Pi serves, whose rows "
             "`reconstruct_rows` rebuilds for the evaluation). Δ = perplexity change against dense fp32. "
             "**F** = on the frontier (no other configuration of this model is both smaller and better, "
             "head dense). Build s = compression time of that one configuration on 2 shared cores; a budget "
             "rung measured right after another with the same menu (same options before the ratio) reuses "
             "its per-token error table, as the rungs of one ladder do, so only the first of such a run "
             "shows the full cost. Family TT+rows: a budget that may store a token as a whole int8/int4 "
             "row instead of a TT (the list under each table says how many did). `@GPL-3`: budget "
             "weighted by the token counts of Debian's GPL-3 text (`--calibration`) instead of the Zipf "
             "prior over token ids; never the evaluated text.", ""]
    for model in models:
        entries = cache.get(model, {})
        if not entries:
            continue
        dense = entries.get("fp32", {})
        front = {p.name for p in pareto_front([Point(c, e["nbytes"], e["ppl_dense"])
                                               for c, e in entries.items() if "ppl_dense" in e])}
        lines += [f"## {model}", "",
                  "| configuration | family | MB | ratio | rel. error | ppl dense | Δ dense | ppl tied | Δ tied | build s | F |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :-: |"]
        for config, e in sorted(entries.items(), key=lambda kv: -kv[1]["nbytes"]):
            if "ppl_dense" not in e:
                continue

            def cell(head: str) -> tuple[str, str]:
                if f"ppl_{head}" not in e:
                    return "", ""
                base = dense.get(f"ppl_{head}")
                delta = f"{100 * (e[f'ppl_{head}'] / base - 1):+.1f}%" if base else ""
                return f"{e[f'ppl_{head}']:.2f}", delta  # noqa: B023

            (pd, dd), (pt, dt) = cell("dense"), cell("tied")
            lines.append(f"| `{config}` | {family(config)} | {e['nbytes'] / 1e6:.1f} | {e['ratio']:.2f}x | "
                         f"{e['rel_error']:.3f} | {pd} | {dd} | {pt} | {dt} | {e['seconds']:.1f} | "
                         f"{'**F**' if config in front else ''} |")
        lines.append("")
        mixed = [(c, e["budget_choice"]) for c, e in sorted(entries.items()) if "+rows" in c and "budget_choice" in e]
        if mixed:
            lines.append("How the TT+rows budgets stored the vocabulary (tokens per option):")
            lines.append("")
            for config, choice in mixed:
                rows = sum(n for k, n in choice.items() if k.startswith("row/"))
                lines.append(f"- `{config}`: {rows:,} tokens as whole rows, {sum(choice.values()) - rows:,} as TT "
                             f"({', '.join(f'{k} {n:,}' for k, n in choice.items())})")
            lines.append("")
    return "\n".join(lines)


#: the plot's perplexity axis ends at this multiple of dense; worse points sit on the top edge
CLIP_FACTOR = 12


def plot(cache: dict, models: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    colours = {"dense": "black", "per-row quantisation": "tab:orange", "TT": "tab:blue", "TT+rows": "tab:purple"}
    for ax, model in zip(axes[0], models):
        entries = {c: e for c, e in cache.get(model, {}).items() if "ppl_dense" in e}
        if not entries:
            continue
        dense_ppl = entries["fp32"]["ppl_dense"] if "fp32" in entries else None
        top = dense_ppl * CLIP_FACTOR if dense_ppl else math.inf  # beyond: drawn at the top edge
        for c, e in entries.items():
            y, label = e["ppl_dense"], c
            if y > top:
                y, label = top, f"{c} ({e['ppl_dense']:,.0f}, off scale)"
            ax.scatter(e["nbytes"] / 1e6, y, color=colours[family(c)], s=18,
                       marker="^" if label != c else "o")
            ax.annotate(label, (e["nbytes"] / 1e6, y), fontsize=5.5, alpha=0.8)
        for fam in ("TT", "TT+rows", "per-row quantisation"):
            pts = [Point(c, e["nbytes"], e["ppl_dense"]) for c, e in entries.items() if family(c) in (fam, "dense")]
            front = sorted(pareto_front(pts), key=lambda p: p.nbytes)
            ax.step([p.nbytes / 1e6 for p in front], [min(p.quality, top) for p in front], where="post",
                    color=colours[fam], label=f"{fam} frontier")
        best = sorted(pareto_front([Point(c, e["nbytes"], e["ppl_dense"]) for c, e in entries.items()]),
                      key=lambda p: p.nbytes)
        ax.step([p.nbytes / 1e6 for p in best], [min(p.quality, top) for p in best], where="post", color="tab:green",
                linestyle="--", label="overall frontier")
        dense = entries["fp32"]["ppl_dense"] if "fp32" in entries else None
        if dense:
            ax.axhline(dense * 1.05, color="grey", linestyle=":", label="dense +5%")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if dense_ppl:
            ax.set_ylim(dense_ppl * 0.95, top * 1.15)
        ax.set_xlabel("embedding bytes (MB, log)")
        ax.set_ylabel("perplexity, head dense (log)")
        ax.set_title(f"{model}: perplexity vs embedding bytes")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def time_ladder(model: str, budgets: str) -> dict:
    """Seconds to compress the auto ladder (``tensorslm compress --ladder auto``) of ``model``,
    model loading excluded, through the library path the CLI takes."""
    from tensorslm.rank_store.compress import compress_table
    from tensorslm.rank_store.rung_spec import parse_rung_specs

    harness = Harness.load(model)
    specs = parse_rung_specs(recipes=",".join(f"auto-{b}" for b in budgets.split(",")))
    started = time.perf_counter()
    rungs = compress_table(harness.dense_weight, specs, progress=False)
    seconds = time.perf_counter() - started
    out = {"budgets": budgets, "seconds": seconds, "cpu_load": os.getloadavg()[0],
           "rungs": {n: {"recipe": r.meta.get("recipe"), "ratio": r.ratio} for n, r in rungs.items()}}
    print(f"{model}: auto ladder {budgets} compressed in {seconds:.1f} s (load average {out['cpu_load']:.1f})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,gemma", help="comma-separated: smollm2, gemma")
    parser.add_argument("--quick", action="store_true", help="a few configurations only")
    parser.add_argument("--no-tied", action="store_true", help="head dense only")
    parser.add_argument("--configs", default=None, help="comma-separated configurations (overrides the lists)")
    parser.add_argument("--calibration", default="", metavar="FILES",
                        help="comma-separated calibration texts; a configuration 'recipe@<file stem>' "
                             "weights its budget by that text's token counts (e.g. budget-16+mean+norm+rows@GPL-3)")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: write the table and plot from the cache")
    parser.add_argument("--noise", default=None, metavar="CONFIGS",
                        help="only measure the evaluation's noise: per-window perplexity differences of "
                             "these configurations, pairwise (writes bench/results/frontier_noise.json)")
    parser.add_argument("--time-ladder", default=None, metavar="BUDGETS",
                        help="only time compressing the auto ladder for these ratios, e.g. 2,4,8,16")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    configs = (args.configs.split(",") if args.configs else
               QUICK if args.quick else BASELINES + PLAIN + ALONE + COMBINED + NORM)
    heads = {"dense": configs, "tied": [] if args.no_tied else [c for c in configs if c in TIED]}
    calibrations = {Path(p).stem: Path(p) for p in args.calibration.split(",") if p}
    if args.noise:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / "frontier_noise.json"
        noise = json.loads(path.read_text()) if path.exists() else {}
        for model in models:
            noise[model] = measure_noise(model, args.noise.split(","), calibrations)
            noise[model]["command"] = f"python bench/bench_frontier.py --models {model} --noise {args.noise}"
            path.write_text(json.dumps(noise, indent=1, sort_keys=True))
        return
    if args.time_ladder:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / "frontier_ladder_time.json"
        timings = json.loads(path.read_text()) if path.exists() else {}
        for model in models:
            timings[model] = time_ladder(model, args.time_ladder)
            path.write_text(json.dumps(timings, indent=1, sort_keys=True))
        return
    cache = load_cache()
    if not args.report_only:
        for model in models:
            measure(model, configs, heads, cache, calibrations)
    RESULTS.mkdir(parents=True, exist_ok=True)
    shown = [m for m in ("smollm2", "gemma") if m in cache]
    commands = []
    for model in shown:  # the command that measures exactly what the table shows
        dense = [c for c, e in cache[model].items() if "ppl_dense" in e]
        tied = [c for c, e in cache[model].items() if "ppl_tied" in e]
        calib = sorted({c.partition("@")[2] for c in dense} - {""})
        calib_arg = f" --calibration {','.join(CALIBRATION_HINTS.get(c, c) for c in calib)}" if calib else ""
        commands.append(f"python bench/bench_frontier.py --models {model} --no-tied{calib_arg} --configs {','.join(dense)}")
        if tied:
            commands.append(f"python bench/bench_frontier.py --models {model} --configs {','.join(tied)}")
    (RESULTS / "frontier.md").write_text(write_table(cache, shown, "` then `".join(commands)))
    plot(cache, shown, RESULTS / "frontier.png")
    (RESULTS / "frontier.json").write_text(json.dumps({m: cache[m] for m in shown}, indent=1, sort_keys=True))
    print(f"wrote {RESULTS / 'frontier.md'} and {RESULTS / 'frontier.png'}")


if __name__ == "__main__":
    main()

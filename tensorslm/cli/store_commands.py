"""``tensorslm compress / evaluate / inspect``: thin commands over tensorslm.rank_store.ladder.

Each callback builds its arguments, calls one library function and prints the result; torch
and transformers are imported inside the callbacks so the CLI starts fast.
"""
from __future__ import annotations

from pathlib import Path

import click

from tensorslm.constants import AUTO_LADDER_BUDGETS, DEFAULT_BODY_PRECISION, HEAD_DENSE, HEAD_MODES

from .errors import library_errors


def _parse_shape(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(part) for part in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a tensor shape; expected positive integers "
                                 "joined by 'x' whose product is the embedding dimension, "
                                 "e.g. 8x8x9 for d = 576") from None
    if any(n < 1 for n in shape):
        raise click.BadParameter(f"{value!r} has a factor below 1; every factor must be >= 1")
    return shape


def _console():
    from rich.console import Console

    return Console()


@click.command()
@click.argument("model")
@click.option("-o", "--output", "store_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="Store directory to create.")
@click.option("--ranks", help="Explicit TT ranks per rung, e.g. 6x8,4x6,max.")
@click.option("--ratios", help="Target compression ratios against fp32, e.g. 1.25,1.5,2.")
@click.option("--tolerance", help="Relative error per token, e.g. 0.1,0.3.")
@click.option("--recipes", help="Recipes with the ladder techniques, e.g. "
              "tt-max+perm+mean+int8,row+mean+norm+int4,budget-16+mean+norm+rows (see tensorslm.rank_store.recipes).")
@click.option("--ladder", type=click.Choice(["auto"]),
              help="auto: one frontier rung per ratio of --budgets (the measured frontier's recipes).")
@click.option("--budgets", default=",".join(map(str, AUTO_LADDER_BUDGETS)), show_default=True,
              help="Compression ratios for --ladder auto (the default: no rung dominated by another on "
                   "the measured frontier).")
@click.option("--shape", callback=_parse_shape,
              help="Tensorization of the embedding dimension, e.g. 8x8x9 (default: balanced, order 3).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A text whose token counts weight the budget rungs (default: a Zipf prior over "
                   "token ids). Not the text you evaluate on.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.option("--bodies", default=DEFAULT_BODY_PRECISION, show_default=True,
              help="Body precisions to precompute into the store (fp32,bf16,int8,int4,w8a8; '' for "
                   "none); the agent serves model.precision from here, verified by hash.")
@click.option("--body-calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A text to calibrate the int4 body on (GPTQ, 128 sequences of 512 tokens) "
                   "and the w8a8 body's input scales (16 sequences); not the text you evaluate "
                   "on. Without it a w8a8 body is calibrated on text the model writes itself.")
@click.option("--body-int8", metavar="LINEARS",
              help="Fused linears (qkv, o, gate_up, down) the int4 body keeps at int8, "
                   "comma-separated; '' for none. Default: the model family's "
                   "(rank_store.body.INT4_INT8_LINEARS; docs/engine.md).")
@library_errors
def compress(model: str, store_dir: Path, ranks: str | None, ratios: str | None,
             tolerance: str | None, recipes: str | None, ladder: str | None, budgets: str,
             shape: tuple[int, ...] | None, calibration: Path | None, overwrite: bool,
             bodies: str, body_calibration: Path | None, body_int8: str | None) -> None:
    """Compress MODEL's token embedding into a ladder of TT rungs (a store directory).

    MODEL is an alias (smollm2-135m, gemma3-270m), a Hugging Face directory, a .gguf file or
    a hub id. Give exactly one of --ranks, --ratios, --tolerance, or --recipes and/or
    --ladder auto (which may be combined with one of them).
    """
    given = [name for name, value in (("--ranks", ranks), ("--ratios", ratios),
                                      ("--tolerance", tolerance)) if value is not None]
    if ladder == "auto":
        auto = ",".join(f"auto-{item.strip()}" for item in budgets.split(","))
        recipes = f"{recipes},{auto}" if recipes else auto
    if recipes is not None and len(given) > 1 or recipes is None and len(given) != 1:
        raise click.UsageError(
            f"give exactly one of --ranks, --ratios, --tolerance; got "
            f"{' and '.join(given) if given else 'none'}")
    if store_dir.exists() and not overwrite:   # before the model is loaded
        raise click.UsageError(f"{store_dir} already exists; give --overwrite to replace it "
                               "(or another --output)")
    from tensorslm.rank_store.body import check_int8_linears, store_body
    from tensorslm.rank_store.kernels import Precision
    from tensorslm.rank_store.ladder import build_ladder, ladder_table
    from tensorslm.rank_store.models import load_model
    from tensorslm.rank_store.rung_spec import parse_rung_specs

    precisions = [Precision.parse(p.strip()) for p in bodies.split(",") if p.strip()]
    calibrated = {Precision.INT4, Precision.W8A8}
    if body_calibration is not None and not calibrated & set(precisions):
        raise click.UsageError("--body-calibration calibrates the int4 and w8a8 bodies; --bodies "
                               f"{bodies!r} has neither")
    int8_linears = (None if body_int8 is None else
                    tuple(lin.strip() for lin in body_int8.split(",") if lin.strip()))
    if int8_linears:
        if Precision.INT4 not in precisions:
            raise click.UsageError(f"--body-int8 applies to the int4 body; --bodies {bodies!r} "
                                   "has no int4")
        check_int8_linears(Precision.INT4, int8_linears)
    specs = parse_rung_specs(ranks=ranks, ratios=ratios, tolerances=tolerance, recipes=recipes)
    loaded = load_model(model)
    store = build_ladder(model, store_dir, specs, shape=shape, overwrite=overwrite,
                         calibration=calibration, loaded=loaded)
    calibration_ids = None
    if body_calibration is not None:   # tokenized once for every calibrated body
        from tensorslm.rank_store.gptq import calibration_from_text
        from tensorslm.rank_store.smoothing import CALIBRATION_SEQUENCES

        calibration_ids = calibration_from_text(loaded,
                                                body_calibration.read_text(encoding="utf-8"))
    for precision in precisions:
        ids = None
        if calibration_ids is not None and precision in calibrated:
            # the w8a8 scales take the first of GPTQ's consecutive sequences
            ids = (calibration_ids[:CALIBRATION_SEQUENCES] if precision is Precision.W8A8
                   else calibration_ids)
        elif precision is Precision.W8A8:   # no text given: the model writes its own
            from tensorslm.rank_store.smoothing import self_calibration_of

            ids = self_calibration_of(loaded, progress=True)
        store_body(store, loaded.model, precision, calibration=ids,
                   int8_linears=int8_linears if precision is Precision.INT4 else None,
                   self_written=ids is not None and calibration_ids is None)
        click.echo(f"body {precision.value}: {store_dir}/body-{precision.value}.safetensors "
                   f"({_body_summary(store.manifest['bodies'][precision.value])})")
    _console().print(ladder_table(store))
    click.echo(f"wrote {store_dir}")


def _body_summary(entry: dict) -> str:
    """A stored body's bytes and what its meta says beyond the precision."""
    meta = entry["meta"]
    parts = [f"{int(entry['bytes']) / 1e6:.1f} MB"]
    if meta.get("int8_linears"):
        parts.append(f"{meta['int8_linears']} at int8")
    if "calibration" in meta:
        parts.append(meta["calibration"])
    return ", ".join(parts)


@click.command()
@click.argument("store_dir", metavar="STORE", type=click.Path(path_type=Path))
@click.option("--text", "text_path", required=True, type=click.Path(path_type=Path),
              help="Plain text to measure perplexity on (e.g. wikitext-2-raw/wiki.test.raw).")
@click.option("--tokens", type=click.IntRange(min=2), default=4096, show_default=True,
              help="Evaluate the first N tokens of the text.")
@click.option("--head", type=click.Choice(HEAD_MODES), default=HEAD_DENSE, show_default=True,
              help="dense: the LM head keeps the original matrix; tied: it uses the rung.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="PNG of perplexity against bytes (default: beside the store).")
@click.option("--body", "bodies", default="fp32,bf16,int8,w8a8,int4", show_default=True,
              help="Body precisions to measure perplexity at (dense embedding), comma-separated; "
                   "'' for none.")
@library_errors
def evaluate(store_dir: Path, text_path: Path, tokens: int, head: str, json_path: Path | None,
             plot_path: Path | None, bodies: str) -> None:
    """Perplexity, bytes, error and lookup latency of every rung of STORE and of the fp32,
    fp16, int8 and int4 baselines; results are recorded in the store's manifest. Then the
    perplexity with the transformer body at each --body precision (the dense embedding)."""
    from tensorslm.rank_store.evaluate import body_perplexities, encode_text, results_table
    from tensorslm.rank_store.kernels import Precision
    from tensorslm.rank_store.ladder import evaluate_ladder
    from tensorslm.rank_store.models import load_model
    from tensorslm.rank_store.store import RankStore

    precisions = [Precision.parse(p.strip()).value for p in bodies.split(",") if p.strip()]
    store = RankStore.open(store_dir)
    loaded = load_model(store.source.model)
    report = evaluate_ladder(store_dir, text_path, tokens=tokens, head=head,
                             json_path=json_path, plot_path=plot_path, loaded=loaded)
    _console().print(results_table(
        report.results, title=f"{report.model}: {report.tokens} tokens, head {head}"))
    click.echo(f"plot: {report.plot}")
    if report.json_path:
        click.echo(f"json: {report.json_path}")
    if precisions:
        ids = encode_text(loaded.tokenizer, text_path.read_text(encoding="utf-8"), tokens)
        ppl = body_perplexities(loaded, ids, precisions, store=store)
        reference = ppl.get("fp32")
        for name, value in ppl.items():
            delta = f" ({(value / reference - 1) * 100:+.2f}% against fp32)" if reference else ""
            click.echo(f"body {name}: perplexity {value:.3f}{delta}")


@click.command()
@click.argument("store_dir", metavar="STORE", type=click.Path(path_type=Path))
@library_errors
def inspect(store_dir: Path) -> None:
    """Show STORE's ladder: every rung's ranks, bytes, ratio, error and recorded perplexity,
    then the rungs another rung dominates (smaller and no worse), then the stored bodies."""
    from tensorslm.rank_store.frontier import store_domination
    from tensorslm.rank_store.ladder import ladder_table
    from tensorslm.rank_store.store import RankStore

    store = RankStore.open(store_dir)
    store.check_rungs()   # what it prints from the manifest must be what the files hold
    _console().print(ladder_table(store))
    measure, dominated = store_domination(store)
    for name, by in dominated.items():
        if by is not None:
            click.echo(f"dominated: {name} (by {by}, on bytes and {measure})")
    if not any(dominated.values()):
        click.echo(f"no rung is dominated (bytes and {measure})")
    for precision, entry in store.manifest.get("bodies", {}).items():
        click.echo(f"body {precision}: {_body_summary(entry)}")


COMMANDS = [compress, evaluate, inspect]

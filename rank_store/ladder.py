"""A ladder end to end: load a model, compress its embedding into a store, evaluate, render.

These are the functions the CLI (``tensorslm compress / evaluate / inspect``) and the demo
call; each is one step a Python user can take as well.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from tensorslm.constants import FULL_RUNG

from .errors import EvaluationError

if TYPE_CHECKING:
    from rich.table import Table
    from torch import Tensor

    from .evaluate import Result
    from .models import LoadedModel
    from .rung_spec import RungSpec
    from .store import RankStore

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 4096


def build_ladder(model_ref: str | os.PathLike, out_dir: str | os.PathLike,
                 specs: Sequence[RungSpec], *, shape: Sequence[int] | None = None,
                 overwrite: bool = False, progress: bool = True,
                 cache_dir: str | os.PathLike | None = None,
                 loaded: LoadedModel | None = None,
                 calibration: str | os.PathLike | None = None) -> RankStore:
    """Load ``model_ref``, compress its input embedding at ``specs`` and write the store.

    Pass ``loaded`` to reuse a model already in memory (its ``ref`` is recorded).
    ``calibration`` is a text file whose token counts weight the budget rungs (default: the
    Zipf prior over token ids); it must not be the text the ladder is evaluated on.
    """
    from .compress import compress_table
    from .models import load_model
    from .store import RankStore

    RankStore.check_destination(out_dir, overwrite=overwrite)   # before minutes of loading
    if loaded is None:
        loaded = load_model(model_ref, cache_dir=cache_dir)
    weight = loaded.model.get_input_embeddings().weight.detach()  # (V, d)
    usage = None if calibration is None else calibration_usage(loaded.tokenizer, calibration, weight.shape[0])
    started = time.perf_counter()
    rungs = compress_table(weight, list(specs), shape=tuple(shape) if shape else None,
                           progress=progress, usage=usage)
    log.info("compressed %s (%d x %d) into %d rungs in %.1f s", loaded.name, *weight.shape,
             len(rungs), time.perf_counter() - started)
    return RankStore.create(out_dir, loaded.source, weight, rungs, overwrite=overwrite)


def calibration_usage(tokenizer: Any, path: str | os.PathLike, vocab_size: int) -> Tensor:
    """Token usage weights (V,) from a calibration text read with the model's ``tokenizer``, mixed
    with the Zipf prior for tokens the text never uses (:func:`tensorslm.rank_store.budget.calibration_counts`)."""
    from .budget import calibration_counts, frequency_prior

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"calibration text {path}: cannot read it as UTF-8 ({exc})") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise EvaluationError(f"calibration text {path} holds no tokens")
    log.info("calibration: %d tokens from %s", len(ids), path)
    return calibration_counts(ids, vocab_size, prior=frequency_prior(vocab_size))


@dataclass
class LadderReport:
    """What ``tensorslm evaluate`` produced."""

    results: list[Result]
    model: str
    head: str
    tokens: int
    plot: Path | None = None
    json_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "head": self.head, "tokens": self.tokens,
                "results": [r.to_dict() for r in self.results]}


def default_plot_path(store_dir: str | os.PathLike, head: str) -> Path:
    """Beside the store (its directory holds only what the manifest lists)."""
    store_dir = Path(store_dir)
    return store_dir.parent / f"{store_dir.name}-perplexity-{head}.png"


def evaluate_ladder(store_dir: str | os.PathLike, text_path: str | os.PathLike, *,
                    tokens: int | None = DEFAULT_TOKENS, head: str = "dense",
                    json_path: str | os.PathLike | None = None,
                    plot_path: str | os.PathLike | None = None, progress: bool = True,
                    cache_dir: str | os.PathLike | None = None,
                    loaded: LoadedModel | None = None,
                    baselines: Sequence[str] | None = None) -> LadderReport:
    """Evaluate every rung of the store at ``store_dir`` and the baselines on a text file.

    The model is loaded again from the reference the store records (and checked against it).
    Results go into the manifest, to ``json_path`` if given, and into a PNG plot.
    ``baselines``: quantisation baselines to measure too (default: all of them; ``("fp32",)``
    measures only the dense reference).
    """
    from .evaluate import evaluate_store, plot_results, rung_family
    from .models import load_model
    from .quantize import BASELINES
    from .store import RankStore

    text_path = Path(text_path)
    if not text_path.is_file():
        raise EvaluationError(f"text file {text_path} does not exist; expected a plain UTF-8 "
                              "text such as wikitext-2-raw/wiki.test.raw")
    text = text_path.read_text(encoding="utf-8")
    store = RankStore.open(store_dir)
    if loaded is None:
        loaded = load_model(store.source.model, cache_dir=cache_dir)
    store = RankStore.open(store_dir, expect_source=loaded.source)
    results = evaluate_store(store, loaded, text, tokens, head, progress=progress,
                             baselines=tuple(BASELINES if baselines is None else baselines))
    report = LadderReport(results=results, model=loaded.name, head=head,
                          tokens=results[0].tokens if results else 0)
    title = f"{loaded.name}, {report.tokens} tokens of {text_path.name}, head {head}"
    families = {name: rung_family(name, store.info(name).meta.get("recipe"))
                for name in store.rung_names}
    report.plot = plot_results(results, plot_path or default_plot_path(store_dir, head), title=title,
                               families=families)
    if json_path is not None:
        report.json_path = Path(json_path)
        report.json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def ladder_table(store: RankStore) -> Table:
    """The store's ladder as a rich table: every rung's size and error, and the perplexity
    recorded by ``evaluate`` for each head mode, if any; recorded baselines follow the rungs."""
    from rich.table import Table

    source = store.source
    heads = sorted({head for name in store.rung_names for head in _recorded(store, name)})
    columns = ["rung", "ranks", "dtype", "params M", "MB", "ratio", "rel.err"]
    columns += [f"ppl {head}" for head in heads]
    rows = []
    for name in store.rung_names:
        info = store.info(name)
        recorded = _recorded(store, name)
        row = [name, _ranks_text(info.ranks), str(info.dtype), f"{info.num_params / 1e6:.4g}",
               f"{info.nbytes / 1e6:.4g}", f"{info.ratio:.2f}x", f"{info.rel_error:.4f}"]
        rows.append(row + [f"{recorded[h]['perplexity']:.2f}" if h in recorded else "-" for h in heads])
    baselines: dict[str, dict[str, dict[str, Any]]] = {}  # name -> head -> result
    for key, entries in store.info(FULL_RUNG).results.items():
        if key.startswith("baselines-") and isinstance(entries, dict):
            for name, entry in entries.items():
                baselines.setdefault(name, {})[key[len("baselines-"):]] = entry
    for name, by_head in baselines.items():
        first = next(iter(by_head.values()))
        row = [f"({name})", "-", name, "-", f"{first['nbytes'] / 1e6:.4g}", f"{first['ratio']:.2f}x",
               f"{first['rel_error']:.4f}"]
        rows.append(row + [f"{by_head[h]['perplexity']:.2f}" if h in by_head else "-" for h in heads])
    # No cell is ever cut: each column is at least as wide as its widest cell and header word
    # (headers wrap at spaces), and the outer edge is left off so two heads fit 80 columns.
    table = Table(title=f"{source.model} ({source.architecture}, {source.vocab_size} x {source.dim})",
                  show_edge=False)
    for index, column in enumerate(columns):
        width = max([len(row[index]) for row in rows] + [len(word) for word in column.split()])
        table.add_column(column, justify="left" if column in ("rung", "ranks", "dtype") else "right",
                         min_width=width)
    for row in rows:
        table.add_row(*row)
    return table


def _recorded(store: RankStore, name: str) -> dict[str, dict[str, Any]]:
    results = store.info(name).results
    return {head: entry for head, entry in results.items()
            if isinstance(entry, dict) and "perplexity" in entry}


def _ranks_text(ranks: Sequence[int] | None) -> str:
    if not ranks:
        return "-"
    return "x".join(str(r) for r in ranks)

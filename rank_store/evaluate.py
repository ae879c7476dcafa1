"""Perplexity of a causal LM on a text, and the evaluation of a whole ladder against baselines.

Perplexity follows the usual non-overlapping protocol: tokenize the text, keep the first N
tokens, cut them into windows of ``min(context, 1024)`` tokens, and report
``exp(mean NLL over every predicted token)``. Models trained with a BOS token (Gemma) get one
at the start of every window, which then predicts the window's first token; other models
predict tokens 2..L of each window.

:func:`evaluate_store` measures, for every rung of a store (through ``TTEmbedding``) and for
the baselines dense fp32, fp16, int8 and int4 per-row quantization of the same table:
embedding bytes, compression ratio against fp32, relative Frobenius error, perplexity and
lookup latency.
"""
from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch

from tensorslm.constants import FULL_RUNG as DENSE_RUNG
from tensorslm.constants import HEAD_MODES

from .errors import EvaluationError
from .quantize import BASELINES, QuantizedTable, quantize

if TYPE_CHECKING:
    from rich.table import Table

    from .models import LoadedModel
    from .store import RankStore

log = logging.getLogger(__name__)

WINDOW_CAP = 1024
LATENCY_IDS = 1024


@dataclass
class Result:
    """One row of the ladder table."""

    name: str  # rung name, or the baseline name (fp32, fp16, int8, int4)
    kind: str  # "rung" or "baseline"
    nbytes: int  # bytes of the embedding as stored
    ratio: float  # fp32 table bytes / nbytes
    rel_error: float  # ||W - W_hat||_F / ||W||_F
    perplexity: float
    latency_ms: float  # lookup of 1 x 1024 ids, median of repeats
    head: str
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- perplexity


def encode_text(tokenizer: Any, text: str, tokens: int | None = None) -> torch.Tensor:
    """The first ``tokens`` token ids of ``text`` (all of them if None), without special tokens.

    Only a prefix of a long text is tokenized: BPE splits words independently, so a prefix a
    little longer than needed gives the same first ``tokens`` ids as the whole text.
    """
    if tokens is not None and tokens < 2:
        raise EvaluationError(f"--tokens must be at least 2 (one token predicts the next), got {tokens}")
    margin = 64
    chars = len(text) if tokens is None else min(len(text), (tokens + margin) * 8)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if tokens is None or chars >= len(text) or len(ids) >= tokens + margin:
            break
        chars = min(len(text), chars * 2)
    if tokens is not None:
        if len(ids) < tokens:
            raise EvaluationError(f"the text has {len(ids)} tokens, fewer than the {tokens} "
                                  "requested; pass a smaller --tokens or a longer text")
        ids = ids[:tokens]
    if len(ids) < 2:
        raise EvaluationError(f"the text has {len(ids)} tokens; perplexity needs at least 2")
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, *, context_length: int, bos_id: int | None,
            window_cap: int = WINDOW_CAP) -> list[torch.Tensor]:
    """Non-overlapping model inputs of at most ``min(context, cap)`` tokens, BOS prepended
    when ``bos_id`` is given. Without BOS a last window of a single token predicts nothing and
    is dropped."""
    length = min(int(context_length), window_cap)
    if length < 2:
        raise EvaluationError(f"context length must be at least 2, got {context_length}")
    step = length - 1 if bos_id is not None else length
    out = []
    for start in range(0, ids.numel(), step):
        chunk = ids[start:start + step]
        if bos_id is not None:
            chunk = torch.cat([torch.tensor([bos_id], dtype=torch.long), chunk])
        if chunk.numel() >= 2:
            out.append(chunk)
    return out


@torch.inference_mode()
def perplexity(model: Any, ids: torch.Tensor, *, context_length: int, bos_id: int | None = None,
               window_cap: int = WINDOW_CAP, progress: bool = True, desc: str = "perplexity") -> float:
    """exp(mean NLL) of ``model`` over ``ids`` (1-D), in non-overlapping windows."""
    from tqdm.auto import tqdm

    total_nll = 0.0
    predicted = 0
    parts = windows(ids, context_length=context_length, bos_id=bos_id, window_cap=window_cap)
    for window in tqdm(parts, desc=desc, unit="window", disable=not progress, leave=False):
        logits = model(input_ids=window.unsqueeze(0)).logits[0]  # (L, V)
        nll = torch.nn.functional.cross_entropy(logits[:-1].float(), window[1:], reduction="sum")
        total_nll += float(nll)
        predicted += window.numel() - 1
    return math.exp(total_nll / predicted)


def loaded_perplexity(loaded: LoadedModel, ids: torch.Tensor, *, progress: bool = True,
                      desc: str = "perplexity") -> float:
    """:func:`perplexity` with the context length and BOS rule of a loaded model."""
    return perplexity(loaded.model, ids, context_length=loaded.context_length,
                      bos_id=bos_id_of(loaded), progress=progress, desc=desc)


def bos_id_of(loaded: LoadedModel) -> int | None:
    if not loaded.needs_bos:
        return None
    bos = getattr(loaded.tokenizer, "bos_token_id", None)
    if bos is None:
        raise EvaluationError(f"{loaded.name} needs a BOS token per window but its tokenizer has none")
    return int(bos)


# --------------------------------------------------------------------------- measurements


def relative_error(reference: torch.Tensor, rows: Callable[[torch.Tensor], torch.Tensor],
                   block: int = 8192) -> float:
    """||W - W_hat||_F / ||W||_F, with W_hat produced ``block`` rows at a time by ``rows(ids)``."""
    err = 0.0
    for start in range(0, reference.shape[0], block):
        ids = torch.arange(start, min(start + block, reference.shape[0]))
        diff = reference[ids].double() - rows(ids).double()  # (b, d)
        err += float((diff * diff).sum())
    norm = float((reference.double() ** 2).sum())
    return math.sqrt(err / norm) if norm > 0 else math.sqrt(err)


@torch.inference_mode()
def lookup_latency_ms(lookup: Callable[[torch.Tensor], torch.Tensor], vocab: int, *,
                      repeats: int = 30, warmup: int = 3, seed: int = 0) -> float:
    """Median wall time of ``lookup`` on a (1, 1024) batch of random ids, in milliseconds."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, LATENCY_IDS), generator=generator)
    for _ in range(warmup):
        lookup(ids)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        lookup(ids)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def is_tied(model: Any) -> bool:
    """Whether the LM head shares its weight with the input embedding."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def check_head(model: Any, head: str) -> None:
    if head not in HEAD_MODES:
        raise EvaluationError(f"unknown head mode '{head}'; valid modes: {', '.join(HEAD_MODES)}")
    if head == "tied" and not is_tied(model):
        raise EvaluationError(f"head 'tied' needs a model whose LM head is tied to its input "
                              f"embedding; {type(model).__name__} has an untied head, use 'dense'")


@contextlib.contextmanager
def table_swapped(model: Any, table: torch.Tensor, head: str) -> Iterator[None]:
    """Run with the input embedding's table replaced by ``table`` (V, d); with head ``tied``
    the LM head uses it too, with ``dense`` the head keeps the original matrix. The embedding
    module itself stays (Gemma's scaled embedding keeps its scale). Restored on exit."""
    check_head(model, head)
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    if tuple(table.shape) != tuple(embedding.weight.shape):
        raise EvaluationError(f"replacement table has shape {tuple(table.shape)}, the model's "
                              f"embedding {tuple(embedding.weight.shape)}")
    old_in = embedding.weight
    old_out = output.weight if output is not None else None
    new = torch.nn.Parameter(table.to(old_in.dtype), requires_grad=False)
    embedding.weight = new
    if head == "tied":
        output.weight = new
    try:
        yield
    finally:
        embedding.weight = old_in
        if output is not None:
            output.weight = old_out


@contextlib.contextmanager
def model_restored(model: Any) -> Iterator[None]:
    """Put back the input embedding and the LM head (module and weight) on exit."""
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    out_weight = output.weight if output is not None else None
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    ties = [(config, getattr(config, "tie_word_embeddings", None)) for config in configs]
    tied_keys = getattr(model, "all_tied_weights_keys", None)
    try:
        yield
    finally:
        model.set_input_embeddings(embedding)
        if output is not None:
            model.set_output_embeddings(output)
            output.weight = out_weight
        for config, tie in ties:
            if tie is not None:
                config.tie_word_embeddings = tie
        if tied_keys is not None:
            model.all_tied_weights_keys = tied_keys


# --------------------------------------------------------------------------- the ladder


def evaluate_baseline(loaded: LoadedModel, dense: torch.Tensor, name: str, ids: torch.Tensor,
                      head: str, *, progress: bool = True) -> Result:
    """Perplexity and size of the model with its embedding table replaced by baseline ``name``."""
    table_q: QuantizedTable = quantize(dense, name)
    table = table_q.dequantize()  # (V, d) fp32
    with table_swapped(loaded.model, table, head):
        ppl = loaded_perplexity(loaded, ids, progress=progress, desc=name)
    fp32_bytes = dense.numel() * 4
    return Result(name=name, kind="baseline", nbytes=table_q.nbytes,
                  ratio=fp32_bytes / table_q.nbytes,
                  rel_error=relative_error(dense, lambda rows: table[rows]), perplexity=ppl,
                  latency_ms=lookup_latency_ms(table_q.lookup, dense.shape[0]), head=head,
                  tokens=int(ids.numel()))


def evaluate_store(store: RankStore, loaded: LoadedModel, text: str, tokens: int | None,
                   head: str = "dense", *, baselines: Sequence[str] = tuple(BASELINES),
                   rungs: Sequence[str] | None = None, progress: bool = True,
                   record: bool = True) -> list[Result]:
    """Evaluate every rung of ``store`` (all but the dense ``full``, which the fp32 baseline
    measures) and the ``baselines`` on the first ``tokens`` tokens of ``text``.

    With ``record`` the results go into the store's manifest, keyed by head mode.
    """
    from .embedding import TTEmbedding, install

    check_head(loaded.model, head)
    unknown = [name for name in baselines if name not in BASELINES]
    if unknown:
        raise EvaluationError(f"unknown baselines {unknown}; valid: {', '.join(BASELINES)}")
    ids = encode_text(loaded.tokenizer, text, tokens)
    dense = store.load_dense().detach().to(torch.float32)  # (V, d)
    model_weight = loaded.model.get_input_embeddings().weight
    if tuple(dense.shape) != tuple(model_weight.shape):
        raise EvaluationError(f"the store's table is {tuple(dense.shape)} but {loaded.name}'s "
                              f"embedding is {tuple(model_weight.shape)}: not the same model")
    rung_names = [name for name in (rungs or store.rung_names) if name != DENSE_RUNG]
    results = []
    for name in baselines:
        results.append(evaluate_baseline(loaded, dense, name, ids, head, progress=progress))
        _log_result(results[-1])
    if rung_names:
        fp32_bytes = dense.numel() * 4
        with model_restored(loaded.model):
            embedding = TTEmbedding.from_store(store, rungs=rung_names, active=rung_names[0])
            install(loaded.model, embedding, head=head)
            for name in rung_names:
                embedding.set_rung(name)
                info = store.info(name)  # bytes and relative error as the store measured them
                ppl = loaded_perplexity(loaded, ids, progress=progress, desc=name)
                results.append(Result(
                    name=name, kind="rung", nbytes=info.nbytes, ratio=fp32_bytes / info.nbytes,
                    rel_error=info.rel_error, perplexity=ppl,
                    latency_ms=lookup_latency_ms(embedding, dense.shape[0]),
                    head=head, tokens=int(ids.numel())))
                _log_result(results[-1])
    if record:
        record_results(store, results)
    return results


def record_results(store: RankStore, results: Sequence[Result]) -> None:
    """Write results into the manifest, keyed by head mode: a rung's under the rung, the fp32
    baseline under ``full`` (it is that rung), the other baselines (not rungs of the store)
    under ``full`` too, as ``baselines-<head>: {name: result}``."""
    baselines: dict[str, dict[str, Any]] = {}
    for result in results:
        entry = {k: v for k, v in result.to_dict().items() if k not in ("name", "head")}
        if result.kind == "rung" or result.name == "fp32":
            store.record_results(DENSE_RUNG if result.name == "fp32" else result.name,
                                 {result.head: entry})
        else:
            baselines.setdefault(f"baselines-{result.head}", {})[result.name] = entry
    if baselines:
        store.record_results(DENSE_RUNG, baselines)


def _log_result(result: Result) -> None:
    log.info("%s (%s head): %.2fx, rel. error %.4f, perplexity %.2f, lookup %.2f ms",
             result.name, result.head, result.ratio, result.rel_error, result.perplexity,
             result.latency_ms)


# --------------------------------------------------------------------------- rendering


def results_table(results: Sequence[Result], *, title: str | None = None) -> Table:
    """The ladder as a rich table, perplexity also relative to the fp32 baseline."""
    from rich.table import Table

    dense = next((r.perplexity for r in results if r.name == "fp32"), None)
    table = Table(title=title)
    for column in ("embedding", "MB", "ratio", "rel.err", "ppl", "vs fp32", "lookup ms"):
        table.add_column(column, justify="left" if column == "embedding" else "right")
    for r in sorted(results, key=lambda r: -r.nbytes):
        change = f"{100 * (r.perplexity / dense - 1):+.1f}%" if dense else "-"
        name = r.name if r.kind == "rung" else f"({r.name})"  # baselines in parentheses
        table.add_row(name, f"{r.nbytes / 1e6:.4g}", f"{r.ratio:.2f}x", f"{r.rel_error:.4f}",
                      f"{r.perplexity:.2f}", change, f"{r.latency_ms:.2f}")
    return table


def rung_family(name: str, recipe: str | None = None) -> str:
    """The family a plotted point belongs to: the dense reference (fp32, fp16), per-row
    quantisation (the baselines and order-1 ``row`` recipes), TT+rows (a budget storing some
    tokens as whole rows) or TT (every token a per-token tensor train). ``recipe``: the rung's
    resolved recipe from the manifest (``meta.recipe``), when it has one."""
    key = recipe or name
    if key in ("fp32", "fp16", DENSE_RUNG):
        return "dense reference"
    if key in ("int8", "int4") or key.endswith("-row") or key.startswith("row+"):
        return "per-row quantisation"
    if "+rows" in key:
        return "TT+rows"
    return "TT"


#: the perplexity axis spans at least this fraction of the best perplexity
MIN_PPL_SPAN = 0.02

FAMILY_STYLE = {  # family -> (marker, colour)
    "dense reference": ("s", "#444444"),
    "per-row quantisation": ("D", "#1f77b4"),
    "TT": ("o", "#d62728"),
    "TT+rows": ("^", "#2ca02c"),
}


def results_figure(results: Sequence[Result], *, title: str = "",
                   families: Mapping[str, str] | None = None) -> Any:
    """A matplotlib figure of perplexity against embedding MB (log x), one colour and marker
    per family (``families``: name -> family; default :func:`rung_family` of the name), every
    point named by a label placed where it overlaps no other label, plain tick labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    families = dict(families or {})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_family: dict[str, list[Result]] = {}
    for r in results:
        by_family.setdefault(families.get(r.name) or rung_family(r.name), []).append(r)
    for family in sorted(by_family, key=lambda f: list(FAMILY_STYLE).index(f) if f in FAMILY_STYLE else 99):
        points = sorted(by_family[family], key=lambda r: r.nbytes)
        marker, colour = FAMILY_STYLE.get(family, ("x", "#9467bd"))
        ax.plot([p.nbytes / 1e6 for p in points], [p.perplexity for p in points], marker=marker,
                color=colour, linestyle="-" if len(points) > 1 else "none", label=family)
    perplexities = [r.perplexity for r in results]
    if perplexities and max(perplexities) / min(perplexities) > 10:
        ax.set_yscale("log")
    elif perplexities and max(perplexities) - min(perplexities) < MIN_PPL_SPAN * min(perplexities):
        # Differences this small are within a short sample's noise: do not magnify them.
        middle = (max(perplexities) + min(perplexities)) / 2
        half = MIN_PPL_SPAN * min(perplexities) / 2
        ax.set_ylim(middle - half, middle + half)
    ax.set_xscale("log")
    megabytes = [r.nbytes / 1e6 for r in results]
    narrow = bool(megabytes) and max(megabytes) / min(megabytes) < 10   # under one decade
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=tuple(range(1, 10)) if narrow else (1.0, 2.0, 5.0)))
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("embedding MB (log scale)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    ax.legend(title="family", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    _place_labels(fig, ax, [(r.name, r.nbytes / 1e6, r.perplexity) for r in results])
    return fig


def _place_labels(fig: Any, ax: Any, points: Sequence[tuple[str, float, float]]) -> None:
    """Name each point, trying offsets around it until the label overlaps no earlier label,
    no legend and stays inside the axes."""
    renderer = fig.canvas.get_renderer()
    taken = [ax.get_legend().get_window_extent(renderer)] if ax.get_legend() else []
    inside = ax.get_window_extent(renderer)
    offsets = [(5, 5), (5, -12), (-5, 5), (-5, -12), (5, 16), (5, -23), (-5, 16), (-5, -23),
               (5, 27), (5, -34)]
    for name, x, y in sorted(points, key=lambda p: p[1]):
        for dx, dy in offsets:
            text = ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy),
                               fontsize=8, ha="left" if dx > 0 else "right")
            box = text.get_window_extent(renderer)
            fits = (box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0
                    and box.y1 <= inside.y1)
            if fits and not any(box.overlaps(other) for other in taken):
                taken.append(box)
                break
            text.remove()


def plot_results(results: Sequence[Result], path: str | Path, *, title: str = "",
                 families: Mapping[str, str] | None = None) -> Path:
    """PNG of :func:`results_figure` at ``path``."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = results_figure(results, title=title, families=families)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def body_perplexities(loaded: LoadedModel, ids: torch.Tensor, precisions: Sequence[str], *,
                      store: RankStore | None = None, progress: bool = True) -> dict[str, float]:
    """Perplexity of ``loaded`` (its own dense embedding and head) with the transformer body at
    each precision, run by :class:`tensorslm.rank_store.engine.Engine`; a body the store holds
    is read from it (hash verified), others are quantized from the model."""
    from .body import body_for, load_body, stored_body
    from .engine import Engine
    from .kernels import Precision

    out = {}
    for name in precisions:
        precision = Precision.parse(name)
        body = (load_body(store, loaded.model, precision.value)
                if stored_body(store, precision) is not None
                else body_for(loaded.model, precision))
        engine = Engine(loaded.model, body, precision)
        out[precision.value] = perplexity(engine, ids, context_length=loaded.context_length,
                                          bos_id=bos_id_of(loaded), progress=progress,
                                          desc=f"body {precision.value}")
        log.info("body %s: perplexity %.3f", precision.value, out[precision.value])
    return out

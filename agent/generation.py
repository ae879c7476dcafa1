"""Text generation behind one small interface, so the daemon does not care what model runs.

:class:`Generator` is what the daemon calls; :class:`HFGenerator` runs a transformers causal
LM (optionally with a ``rank_store`` embedding installed) with greedy decoding unless the
request asks for sampling, and streams tokens through ``on_token`` as they are produced.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from .errors import AgentError
from .prompting import prompt_ids
from .protocol import Request

if TYPE_CHECKING:                         # torch is imported where a model is loaded
    from collections.abc import Mapping

    from tensorslm.rank_store.embedding import TTEmbedding
    from tensorslm.rank_store.engine import Engine
    from tensorslm.rank_store.kernels import PackedLinear

log = logging.getLogger(__name__)

TokenCallback = Callable[[str], None]


class GenerationError(AgentError, RuntimeError):
    """The model failed on a request (the daemon answers it with an error reply)."""


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None   # seconds from the start of generate() to the first new token
    seconds: float         # wall time of generate()


class Generator(Protocol):
    """Everything the daemon, the actuator and the wiring use of a model that serves."""

    model_ref: str                     # the model's reference, reported in telemetry
    embedding: "TTEmbedding | None"    # the rank-store ladder installed in the model, if any
    max_prompt_tokens: int             # prompt cap; the actuator lowers it per operating point

    @property
    def rung(self) -> str | None:
        """The rung the next query runs on (None: the model's own dense embedding)."""
        ...

    @property
    def precision(self) -> str:
        """The body precision the next query runs on (one of ``BODY_PRECISIONS``)."""
        ...

    @property
    def precisions(self) -> list[str]:
        """The body precisions resident, among which :meth:`set_precision` switches."""
        ...

    def set_precision(self, precision: str) -> None:
        """Serve the next query with the body at ``precision``; raises
        :class:`GenerationError` for a precision that is not resident."""
        ...

    def generate(self, request: Request, *, max_new_tokens: int,
                 on_token: TokenCallback | None = None,
                 stop: threading.Event | None = None) -> GenerationResult:
        """``stop``: checked before each new token; once set, return what is generated so far
        (the daemon sets it at shutdown and then joins the thread that runs this)."""
        ...


class _Streamer:
    """A transformers streamer: skips the prompt, decodes new tokens incrementally (so
    multi-token characters come out whole) and times the first one."""

    def __init__(self, tokenizer: Any, on_token: TokenCallback | None, t0: float) -> None:
        self.tokenizer = tokenizer
        self.on_token = on_token
        self.t0 = t0
        self.ttft_s: float | None = None
        self.ids: list[int] = []
        self._sent = 0
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.t0
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        if self.on_token is None:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):   # an incomplete multi-byte character: wait for more
            return
        new, self._sent = text[self._sent:], len(text)
        if new:
            self.on_token(new)

    def end(self) -> None:
        pass


class _ModelGenerator:
    """What both generators share: the model and its tokenizer, the ladder installed in it, the
    prompt cap, and the one step from a request to token ids (:mod:`tensorslm.agent.prompting`:
    chat template for ``messages``, one BOS when ``needs_bos``, the last ``max_prompt_tokens``
    tokens kept)."""

    def __init__(self, model: Any, tokenizer: Any, embedding: "TTEmbedding | None", *,
                 max_prompt_tokens: int, model_ref: str, needs_bos: bool) -> None:
        if max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be at least 1, got {max_prompt_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.embedding = embedding
        self.max_prompt_tokens = max_prompt_tokens
        self.needs_bos = needs_bos   # tensorslm.rank_store.models.LoadedModel.needs_bos
        self.model_ref = model_ref

    @property
    def rung(self) -> str | None:
        return self.embedding.active_rung if self.embedding is not None else None

    def encode(self, request: Request) -> list[int]:
        """The request's token ids (:func:`tensorslm.agent.prompting.prompt_ids`)."""
        return prompt_ids(self.tokenizer, request, needs_bos=self.needs_bos,
                          max_prompt_tokens=self.max_prompt_tokens, model_ref=self.model_ref)


class HFGenerator(_ModelGenerator):
    """A transformers causal LM as a :class:`Generator`.

    ``embedding`` is the ``rank_store`` TTEmbedding installed in the model, if any (reported
    as the active rung). Requests become token ids through :mod:`tensorslm.agent.prompting`
    (chat template for ``messages``, one BOS when ``needs_bos``, the last
    ``max_prompt_tokens`` tokens kept).
    """

    def __init__(self, model: Any, tokenizer: Any, embedding: Any = None, *,
                 max_prompt_tokens: int = 1024, model_ref: str | None = None,
                 needs_bos: bool = False) -> None:
        super().__init__(model, tokenizer, embedding, max_prompt_tokens=max_prompt_tokens,
                         model_ref=model_ref or getattr(getattr(model, "config", None),
                                                        "name_or_path", None)
                         or type(model).__name__, needs_bos=needs_bos)

    @property
    def precision(self) -> str:
        return "fp32"   # the model's own weights, as loaded

    @property
    def precisions(self) -> list[str]:
        return ["fp32"]

    def set_precision(self, precision: str) -> None:
        if precision != "fp32":
            raise GenerationError(f"the Hugging Face generator serves the fp32 body only, "
                                  f"got precision {precision!r}")

    def generate(self, request: Request, *, max_new_tokens: int,
                 on_token: TokenCallback | None = None,
                 stop: threading.Event | None = None) -> GenerationResult:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        ids = self.encode(request)
        input_ids = torch.tensor([ids], dtype=torch.long)   # (1, T)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens,
                                  "attention_mask": torch.ones_like(input_ids)}
        sampling = request.temperature is not None and request.temperature > 0
        if sampling:
            kwargs.update(do_sample=True, temperature=request.temperature)
            if request.top_p is not None:
                kwargs["top_p"] = request.top_p
            if request.top_k is not None:
                kwargs["top_k"] = request.top_k
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None)
        if pad is not None:
            kwargs["pad_token_id"] = pad
        if stop is not None:
            class _Stop(StoppingCriteria):   # checked after every generated token
                def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> bool:
                    return stop.is_set()

            kwargs["stopping_criteria"] = StoppingCriteriaList([_Stop()])
        t0 = time.perf_counter()
        streamer = _Streamer(self.tokenizer, on_token, t0)
        try:
            with torch.inference_mode():
                if request.seed is not None:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(request.seed)
                        out = self.model.generate(input_ids, streamer=streamer, **kwargs)
                else:
                    out = self.model.generate(input_ids, streamer=streamer, **kwargs)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise GenerationError(f"generation failed: {exc}") from exc
        seconds = time.perf_counter() - t0
        new_ids = out[0, input_ids.shape[1]:].tolist()   # (N,)
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        return GenerationResult(text=text, prompt_tokens=len(ids), output_tokens=len(new_ids),
                                ttft_s=streamer.ttft_s, seconds=seconds)


class EngineGenerator(_ModelGenerator):
    """A model served by :class:`tensorslm.rank_store.engine.Engine`: packed body linears at a
    chosen precision, a static KV cache, no Hugging Face ``generate`` per token.

    ``bodies`` maps each resident body precision to its packed linears
    (:func:`tensorslm.rank_store.body.load_body` or ``body_for``); ``precision`` is the one the
    next query runs on, switched between queries with :meth:`set_precision`. The embedding and
    the LM head are the model's current modules (a rung switch takes effect at the next query).
    """

    def __init__(self, model: Any, tokenizer: Any, embedding: "TTEmbedding | None",
                 bodies: "Mapping[str, Mapping[str, PackedLinear]]", precision: str, *,
                 max_prompt_tokens: int = 1024, model_ref: str | None = None,
                 needs_bos: bool = False) -> None:
        from tensorslm.rank_store.engine import Engine
        from tensorslm.rank_store.kernels import Precision

        super().__init__(model, tokenizer, embedding, max_prompt_tokens=max_prompt_tokens,
                         model_ref=model_ref or type(model).__name__, needs_bos=needs_bos)
        if precision not in bodies:
            raise GenerationError(f"body precision {precision!r} is not resident; resident: "
                                  f"{', '.join(bodies)}")
        self._engines = {name: Engine(model, body, Precision.parse(name))
                         for name, body in bodies.items()}
        self._precision = precision
        eos = model.generation_config.eos_token_id   # where generation stops, as HF's generate
        self.eos = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def precisions(self) -> list[str]:
        """The body precisions resident (a policy point may switch among these)."""
        return list(self._engines)

    def set_precision(self, precision: str) -> None:
        """Serve the next query with the body at ``precision`` (one of :attr:`precisions`)."""
        if precision not in self._engines:
            raise GenerationError(f"body precision {precision!r} is not resident; resident: "
                                  f"{', '.join(self._engines)}")
        if precision != self._precision:
            self._engines[self._precision].release()
            self._precision = precision

    @property
    def engine(self) -> "Engine":
        return self._engines[self._precision]

    def generate(self, request: Request, *, max_new_tokens: int,
                 on_token: TokenCallback | None = None,
                 stop: threading.Event | None = None) -> GenerationResult:
        import torch

        from tensorslm.rank_store.engine import sampler

        ids = self.encode(request)
        sample = None
        if request.temperature is not None and request.temperature > 0:
            rng = torch.Generator()
            if request.seed is not None:
                rng.manual_seed(request.seed)
            else:
                rng.seed()
            sample = sampler(request.temperature, request.top_p, request.top_k, rng)
        t0 = time.perf_counter()
        ttft: list[float] = []
        out: list[int] = []
        sent = 0

        class _Stopped(Exception):
            pass

        def emit(token: int) -> None:
            nonlocal sent
            if not ttft:
                ttft.append(time.perf_counter() - t0)
            out.append(token)
            if on_token is not None:
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                if not text.endswith("\ufffd"):   # an incomplete multi-byte character: wait
                    new, sent = text[sent:], len(text)
                    if new:
                        on_token(new)
            if stop is not None and stop.is_set():
                raise _Stopped

        try:
            self.engine.generate(ids, max_new_tokens, eos=self.eos, sample=sample, on_token=emit)
        except _Stopped:
            pass
        except (RuntimeError, ValueError, IndexError) as exc:
            raise GenerationError(f"generation failed: {exc}") from exc
        seconds = time.perf_counter() - t0
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return GenerationResult(text=text, prompt_tokens=len(ids), output_tokens=len(out),
                                ttft_s=ttft[0] if ttft else None, seconds=seconds)

"""How a request becomes the token ids a model is given: one place for every engine.

* ``messages`` (chat) go through the tokenizer's chat template. A model without one (a base
  model such as Gemma-3-270m) is not a chat model: the request is refused with
  :attr:`~tensorslm.agent.protocol.ErrorCode.NOT_A_CHAT_MODEL`, because a made-up
  ``user: ... assistant:`` transcript only makes a base model repeat the transcript.
* ``prompt`` (completion) is the text as it is.
* Either way a model trained with a BOS token at the start of every sequence
  (``needs_bos``, from :func:`tensorslm.rank_store.models.load_model`) gets exactly one,
  first; a model trained without gets none added.
* A prompt longer than ``max_prompt_tokens`` keeps its last tokens (and its BOS).

::

    ids = prompt_ids(tokenizer, request, needs_bos=loaded.needs_bos, max_prompt_tokens=1024)
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from .errors import AgentError
from .protocol import ErrorCode, Request

log = logging.getLogger(__name__)


class PromptError(AgentError, ValueError):
    """A request this model cannot be given; ``code`` is the error reply's code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def is_chat_model(tokenizer: Any) -> bool:
    """True when the tokenizer carries a chat template (``messages`` can be served)."""
    return bool(tokenizer.chat_template)


def chat_text(tokenizer: Any, messages: Sequence[dict], *, model_ref: str | None = None) -> str:
    """The messages through the model's chat template, ending with the assistant's turn."""
    if not is_chat_model(tokenizer):
        raise PromptError(ErrorCode.NOT_A_CHAT_MODEL,
                          f"the served model{f' {model_ref}' if model_ref else ''} is not a chat "
                          "model (its tokenizer has no chat template); send a plain 'prompt' "
                          "instead of 'messages' (tensorslm ask --raw)")
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError as exc:   # e.g. a role this model's template refuses
        raise PromptError(ErrorCode.BAD_MESSAGES,
                          f"the model's chat template refused the messages: {exc}") from exc


def prompt_ids(tokenizer: Any, request: Request, *, needs_bos: bool, max_prompt_tokens: int,
               model_ref: str | None = None) -> list[int]:
    """Token ids for ``request`` (see the module docstring). Raises :class:`PromptError`."""
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be at least 1, got {max_prompt_tokens}")
    if request.messages is not None:
        text = chat_text(tokenizer, request.messages, model_ref=model_ref)
    else:
        text = request.prompt or ""
    # Special tokens come only from the template text or from needs_bos, never twice.
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    head: list[int] = []
    if ids and bos is not None and ids[0] == bos:
        head, ids = [bos], ids[1:]
    elif needs_bos:
        if bos is None:
            raise PromptError(ErrorCode.GENERATION_FAILED, "the model needs a BOS token but "
                                                           "its tokenizer defines none")
        head = [bos]
    if not ids:
        raise PromptError(ErrorCode.EMPTY_PROMPT,
                          "the prompt encodes to no tokens; expected at least one")
    keep = max_prompt_tokens - len(head)
    if len(ids) > keep:
        log.info("prompt of %d tokens cut to its last %d", len(head) + len(ids),
                 max_prompt_tokens)
        ids = ids[-keep:] if keep > 0 else []
    return head + ids

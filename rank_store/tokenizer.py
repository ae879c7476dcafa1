"""A model's tokenizer read straight from its ``tokenizer.json`` with the ``tokenizers`` library.

transformers' tokenizer classes wrap the same Rust tokenizer but build Python copies of the
vocabulary and the added tokens at load: for Gemma-3's 262,144 tokens the wrapper's load peaks
about 200 MB above the Rust parse alone, which set the serving process's start-up peak
(``bench/bench_memory.py``). :class:`Tokenizer` keeps only the Rust tokenizer, the special
tokens named in ``tokenizer_config.json`` (or ``special_tokens_map.json``) and the chat template
(``chat_template.jinja``, else the config's ``chat_template``), rendered with jinja2 the way
transformers renders it. The ids, decoded text and rendered chat are the same as the class
``AutoTokenizer`` picks (tests/test_models.py checks both shipped models).

:class:`TextTokenizer` is what the rest of the project uses of a tokenizer; transformers'
tokenizers satisfy it too.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from .errors import ModelLoadError, TokenizerError

log = logging.getLogger(__name__)

#: transformers' named special tokens, in its order (what a chat template sees by name)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")


class TextTokenizer(Protocol):
    """Text to ids and back, the special tokens' ids and the chat template."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    chat_template: str | None

    def __call__(self, text: str, add_special_tokens: bool = True,
                 return_tensors: str | None = None) -> Mapping[str, Any]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(self, conversation: list[dict], *, tokenize: bool = True,
                            add_generation_prompt: bool = False,
                            return_tensors: str | None = None) -> Any: ...


class Tokenizer:
    """The Rust tokenizer of ``tokenizer.json`` with the special tokens and chat template of its
    directory. Build one with :meth:`from_directory`."""

    def __init__(self, backend: Any, *, special_tokens: Mapping[str, str],
                 chat_template: str | None = None) -> None:
        self.backend = backend  # tokenizers.Tokenizer
        self.special_tokens = {name: special_tokens[name] for name in SPECIAL_TOKEN_NAMES
                               if special_tokens.get(name) is not None}
        self.chat_template = chat_template
        ids = {name: backend.token_to_id(token) for name, token in self.special_tokens.items()}
        self.bos_token_id: int | None = ids.get("bos_token")
        self.eos_token_id: int | None = ids.get("eos_token")
        self.pad_token_id: int | None = ids.get("pad_token")
        self.unk_token_id: int | None = ids.get("unk_token")
        self._template: Any = None

    @classmethod
    def from_directory(cls, directory: str | Path) -> Tokenizer:
        """The tokenizer of a Hugging Face directory holding ``tokenizer.json``."""
        from tokenizers import Tokenizer as Backend

        path = Path(directory)
        try:
            backend = Backend.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # the Rust parser raises a bare Exception on a damaged file
            raise ModelLoadError(f"{path / 'tokenizer.json'}: cannot read the tokenizer "
                                 f"({type(exc).__name__}: {exc})") from exc
        backend.no_truncation()
        backend.no_padding()
        config = _read_json(path / "tokenizer_config.json")
        special = {name: _token_text(value)
                   for name, value in _read_json(path / "special_tokens_map.json").items()}
        special.update({name: _token_text(config[name]) for name in SPECIAL_TOKEN_NAMES
                        if config.get(name) is not None})
        unknown = [f"{name}={text!r}" for name, text in special.items()
                   if name in SPECIAL_TOKEN_NAMES and text is not None
                   and backend.token_to_id(text) is None]
        if unknown:
            raise ModelLoadError(f"{path}: special tokens {', '.join(unknown)} are not in the "
                                 "vocabulary of tokenizer.json")
        if config.get("clean_up_tokenization_spaces") and \
                type(backend.model).__name__ != "BPE":
            raise ModelLoadError(f"{path / 'tokenizer_config.json'}: "
                                 "clean_up_tokenization_spaces is true; this reader serves "
                                 "tokenizers that decode without it (BPE ones ignore it)")
        template_file = path / "chat_template.jinja"
        template = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                    else _default_template(config.get("chat_template"), path))
        return cls(backend, special_tokens=special, chat_template=template)

    def __len__(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of ``text``; with ``add_special_tokens`` the tokenizer's post-processor adds
        its tokens (Gemma's BOS)."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def __call__(self, text: str, add_special_tokens: bool = True,
                 return_tensors: str | None = None) -> Encoded:
        """``{"input_ids": ids}`` (also ``.input_ids``), as transformers' tokenizers answer;
        ``return_tensors="pt"``: the ids as a (1, n) int64 tensor."""
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return Encoded(input_ids=_as(ids, return_tensors))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, conversation: list[dict], *, tokenize: bool = True,
                            add_generation_prompt: bool = False,
                            return_tensors: str | None = None, **kwargs: Any) -> Any:
        """``conversation`` (messages with ``role`` and ``content``) through the chat template:
        the text, or with ``tokenize`` its ids (no special tokens added beyond the template's;
        a (1, n) tensor with ``return_tensors="pt"``). A template's ``raise_exception`` raises
        :class:`jinja2.TemplateError`."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template (no chat_template.jinja "
                                 "and no chat_template in tokenizer_config.json)")
        if not conversation:
            raise TokenizerError("expected at least one message, got an empty conversation")
        if self._template is None:
            self._template = _compile(self.chat_template)
        messages = [{key: value for key, value in dict(message).items() if value is not None}
                    for message in conversation]
        text = self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt,
                                     **{**self.special_tokens, **kwargs})
        if not tokenize:
            return text
        return _as(self.encode(text, add_special_tokens=False), return_tensors)


class Encoded(dict):
    """``{"input_ids": ...}`` that also reads as ``.input_ids`` (as transformers' encodings do)."""

    @property
    def input_ids(self) -> Any:
        return self["input_ids"]


def _as(ids: list[int], return_tensors: str | None) -> Any:
    """``ids`` as they were asked for: a list, or with ``"pt"`` a (1, n) int64 tensor."""
    if return_tensors is None:
        return ids
    if return_tensors != "pt":
        raise TokenizerError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
    import torch

    return torch.tensor([ids], dtype=torch.long)  # (1, n)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as the config writes it: a string, or an AddedToken dict's content."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None   # lists (additional special tokens) have no single text


def _default_template(value: Any, path: Path) -> str | None:
    """The config's ``chat_template``: a string, or the entry named ``default`` of a list of
    named templates (transformers picks it when no tools are given)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value
                 if isinstance(entry, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ModelLoadError(f"{path / 'tokenizer_config.json'}: chat_template is neither a string "
                         "nor a list of named templates with one named 'default'")


def _compile(source: str) -> Any:
    """The template compiled as transformers compiles chat templates: a sandboxed immutable
    environment with trimmed blocks, loop controls, a ``tojson`` that keeps non-ASCII text,
    ``raise_exception`` and ``strftime_now``."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)

"""The request/reply protocol of the agent: what a request may contain, how it is validated,
and every message the agent sends back, in one place.

A request is a JSON object (UTF-8)::

    {"prompt": "hello world", "max_new_tokens": 16, "stream": true}
    {"messages": [{"role": "user", "content": "hello"}], "temperature": 0.7, "seed": 1}
    {"prompt": "hi", "reply_to": "tensorslm/clients/cli-1/reply/q1", "id": "q1"}  # MQTT 3.1.1

With MQTT 5 the reply address travels as the Response Topic and Correlation Data properties;
with MQTT 3.1.1 as ``reply_to`` and ``id`` in the payload. Every message back is a JSON object
with a ``type`` (:class:`MessageType`) and the request ``id``::

    {"type": "token", "id": "q1", "index": 0, "text": "the"}
    {"type": "reply", "id": "q1", "text": "...", "prompt_tokens": 3, "output_tokens": 16, ...}
    {"type": "error", "id": "q1", "code": "unknown_field", "message": "..."}
    {"type": "busy", "id": "q1", "code": "busy", "message": "..."}
    {"type": "expired", "id": "q1", "code": "expired", "message": "..."}
"""
from __future__ import annotations

import enum
import hashlib
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import AgentError
from .topics import Topics

MAX_NEW_TOKENS_LIMIT = 4096
ROLES = ("system", "user", "assistant")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ErrorCode(str, enum.Enum):
    """Why a request was not served. Travels in error replies and in the query log."""

    BAD_UTF8 = "bad_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNKNOWN_FIELD = "unknown_field"
    WRONG_TYPE = "wrong_type"
    OUT_OF_RANGE = "out_of_range"
    MISSING_PROMPT = "missing_prompt"
    PROMPT_AND_MESSAGES = "prompt_and_messages"
    EMPTY_PROMPT = "empty_prompt"
    PROMPT_TOO_LONG = "prompt_too_long"
    BAD_MESSAGES = "bad_messages"
    BAD_ID = "bad_id"
    BAD_REPLY_TO = "bad_reply_to"
    BUSY = "busy"
    EXPIRED = "expired"
    SHUTTING_DOWN = "shutting_down"
    INTERRUPTED = "interrupted"
    GENERATION_FAILED = "generation_failed"
    NOT_A_CHAT_MODEL = "not_a_chat_model"   # 'messages' sent to a model without a chat template
    BAD_COMMAND = "bad_command"             # a command the agent refused (answer on the command topic)
    DUPLICATE = "duplicate"                 # this requester already sent this id; it was answered
    LOG_UNAVAILABLE = "log_unavailable"     # the query log cannot be written (disk full): not accepted
    BATTERY_EMPTY = "battery_empty"         # the device's battery is empty: it takes no work

    def __str__(self) -> str:
        return self.value


class Outcome(str, enum.Enum):
    """The ``outcome`` column of the query log."""

    ACCEPTED = "accepted"   # committed before work starts; replaced when the query ends
    OK = "ok"
    ERROR = "error"
    BUSY = "busy"
    EXPIRED = "expired"
    FAILED = "failed"       # accepted but never finished (killed, shut down)

    def __str__(self) -> str:
        return self.value


class MessageType(str, enum.Enum):
    REPLY = "reply"
    TOKEN = "token"
    ERROR = "error"
    BUSY = "busy"
    EXPIRED = "expired"

    def __str__(self) -> str:
        return self.value


FINAL_TYPES = frozenset({MessageType.REPLY, MessageType.ERROR, MessageType.BUSY,
                         MessageType.EXPIRED})

REQUEST_FIELDS = ("prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k",
                  "seed", "deadline", "stream", "reply_to", "id")


@dataclass(frozen=True)
class ReplyAddress:
    """Where replies to one request go: a topic, and (MQTT 5) the correlation data to echo."""

    topic: str
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class Request:
    """A validated request. ``request_id`` is the requester's id, unique per requester only
    (MQTT 5 correlation data is opaque): the query log keys it together with
    :attr:`requester`."""

    request_id: str
    received_at: float
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    deadline: float | None = None
    stream: bool | None = None
    reply: ReplyAddress | None = None

    @property
    def requester(self) -> str | None:
        """Who asked: the client level of the reply topic, None without a reply address."""
        return requester_of(self.reply)

    @property
    def prompt_chars(self) -> int:
        if self.prompt is not None:
            return len(self.prompt)
        return sum(len(m["content"]) for m in self.messages or ())

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


def requester_of(reply: ReplyAddress | None) -> str | None:
    """The ``<client>`` of a reply topic ``{prefix}/clients/<client>/reply[/...]``."""
    if reply is None:
        return None
    parts = reply.topic.split("/")
    for i in range(len(parts) - 3, -1, -1):
        if parts[i] == "clients" and parts[i + 2] == "reply":
            return parts[i + 1]
    return None


class BadRequest(AgentError, ValueError):
    """A request that cannot be served. Carries the code, and whatever of the request id and
    reply address could be read, so that the error can still be answered."""

    def __init__(self, code: ErrorCode, message: str, *, request_id: str,
                 reply: ReplyAddress | None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.reply = reply


def request_id_from_correlation(data: bytes | None) -> str | None:
    """A log key from MQTT 5 correlation data: the text itself when it is a plain id, else a
    hex digest (correlation data may be any bytes)."""
    if not data:
        return None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if _ID.match(text):
        return text
    return "c" + hashlib.sha256(data).hexdigest()[:32]


def new_request_id() -> str:
    return uuid.uuid4().hex


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def parse_request(payload: bytes, *, received_at: float, max_prompt_chars: int,
                  reply: ReplyAddress | None = None, topics: Topics = Topics()) -> Request:
    """Validate one request payload. ``reply`` is the MQTT 5 address from the properties.

    A reply address (``reply`` or ``reply_to``) must be a topic of the clients' reply tree of
    ``topics`` (``{prefix}/clients/{client}/reply[/...]``); any other is refused with
    ``bad_reply_to`` and no reply, so that a request cannot make a device publish on its own
    or another device's topics. Raises :class:`BadRequest` naming the problem; never anything
    else for any input.
    """
    request_id = request_id_from_correlation(reply.correlation_data if reply else None)
    if reply is not None and not _valid_reply_topic(reply.topic, topics):
        raise BadRequest(ErrorCode.BAD_REPLY_TO, "expected the response topic to be under "
                         f"{topics.prefix}/clients/<client>/reply, got {_preview(reply.topic)}",
                         request_id=request_id or new_request_id(), reply=None)
    try:
        return _parse(payload, received_at, max_prompt_chars, reply, topics, request_id)
    except RecursionError:   # a value nested too deeply to walk (JSON of thousands of levels)
        raise BadRequest(ErrorCode.NOT_JSON, "expected JSON nested less deeply than Python's "
                         "recursion limit (about 1,000 levels), got deeper nesting",
                         request_id=request_id or new_request_id(), reply=reply) from None


def _parse(payload: bytes, received_at: float, max_prompt_chars: int,
           reply: ReplyAddress | None, topics: Topics, request_id: str | None) -> Request:
    def bad(code: ErrorCode, message: str) -> BadRequest:
        return BadRequest(code, message, request_id=request_id or new_request_id(), reply=reply)

    max_bytes = 4 * max_prompt_chars + 65536
    if len(payload) > max_bytes:
        raise bad(ErrorCode.PAYLOAD_TOO_LARGE,
                  f"expected a payload of at most {max_bytes} bytes, got {len(payload)}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(ErrorCode.BAD_UTF8, f"expected UTF-8 JSON, got {exc.reason} at byte "
                                      f"{exc.start}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad(ErrorCode.NOT_JSON, f"expected a JSON object, got invalid JSON ({exc.msg} at "
                                      f"line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:   # an integer longer than Python's digit limit
        raise bad(ErrorCode.NOT_JSON, f"expected a JSON object, got a value Python cannot read "
                                      f"({exc})") from None
    if not isinstance(data, dict):
        raise bad(ErrorCode.NOT_OBJECT, f"expected a JSON object, got a JSON {_type_name(data)}")

    # The reply address first, so every later error can be answered.
    raw_id, raw_reply_to = data.get("id"), data.get("reply_to")
    if isinstance(raw_id, str) and _ID.fullmatch(raw_id):
        request_id = raw_id
    if reply is None and isinstance(raw_reply_to, str) and _valid_reply_topic(raw_reply_to,
                                                                              topics):
        reply = ReplyAddress(raw_reply_to, None)
    if raw_id is not None and not (isinstance(raw_id, str) and _ID.fullmatch(raw_id)):
        raise bad(ErrorCode.BAD_ID, f"expected 'id' to be 1-64 letters, digits, '-' or '_', got "
                                    f"{_preview(raw_id)}")
    if raw_reply_to is not None and not (isinstance(raw_reply_to, str)
                                         and _valid_reply_topic(raw_reply_to, topics)):
        raise bad(ErrorCode.BAD_REPLY_TO, "expected 'reply_to' to be a topic without wildcards "
                                          f"under {topics.prefix}/clients/<client>/reply, got "
                                          f"{_preview(raw_reply_to)}")

    unknown = sorted(set(data) - set(REQUEST_FIELDS))
    if unknown:
        raise bad(ErrorCode.UNKNOWN_FIELD, f"unknown field {unknown[0]!r}; valid fields: "
                                           f"{', '.join(REQUEST_FIELDS)}")

    def typed(name: str, kinds: tuple[type, ...], label: str) -> Any:
        value = data.get(name)
        if value is None:
            return None
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(value, kinds)
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise bad(ErrorCode.WRONG_TYPE, f"expected '{name}' to be {label}, got "
                                            f"{_type_name(value)} {_preview(value)}")
        return value

    def ranged(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
        if value is None:
            return
        if value < low or value > high or (low_open and value == low):
            lo = "(" if low_open else "["
            raise bad(ErrorCode.OUT_OF_RANGE, f"expected '{name}' in {lo}{low}, {high}], got "
                                              f"{value}")

    prompt = typed("prompt", (str,), "a string")
    messages = typed("messages", (list,), "an array of {role, content} objects")
    max_new_tokens = typed("max_new_tokens", (int,), "an integer")
    temperature = typed("temperature", (int, float), "a number")
    top_p = typed("top_p", (int, float), "a number")
    top_k = typed("top_k", (int,), "an integer")
    seed = typed("seed", (int,), "an integer")
    deadline = typed("deadline", (int, float), "a number (unix time in seconds)")
    stream = typed("stream", (bool,), "true or false")
    ranged("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS_LIMIT)
    ranged("temperature", temperature, 0, 10)
    ranged("top_p", top_p, 0, 1, low_open=True)
    ranged("top_k", top_k, 0, 1_000_000)
    ranged("seed", seed, 0, 2**32 - 1)

    if prompt is not None and messages is not None:
        raise bad(ErrorCode.PROMPT_AND_MESSAGES, "expected either 'prompt' or 'messages', got both")
    if prompt is None and messages is None:
        raise bad(ErrorCode.MISSING_PROMPT, "expected a 'prompt' string or a 'messages' array")
    if prompt is not None:
        _check_text("prompt", prompt, bad)
        if not prompt.strip():
            raise bad(ErrorCode.EMPTY_PROMPT, "expected a non-empty 'prompt', got only whitespace"
                      if prompt else "expected a non-empty 'prompt', got an empty string")
        chars = len(prompt)
        checked_messages = None
    else:
        checked_messages = _check_messages(messages, bad)
        chars = sum(len(m["content"]) for m in checked_messages)
    if chars > max_prompt_chars:
        raise bad(ErrorCode.PROMPT_TOO_LONG, f"expected at most {max_prompt_chars} prompt "
                                             f"characters, got {chars}")
    return Request(request_id=request_id or new_request_id(), received_at=received_at,
                   prompt=prompt, messages=checked_messages, max_new_tokens=max_new_tokens,
                   temperature=None if temperature is None else float(temperature),
                   top_p=None if top_p is None else float(top_p), top_k=top_k, seed=seed,
                   deadline=None if deadline is None else float(deadline), stream=stream,
                   reply=reply)


def _preview(value: Any, width: int = 40) -> str:
    """A short repr for an error message; containers by their size (a repr of a deeply nested
    value would itself recurse too deep)."""
    if isinstance(value, (list, dict)):
        return f"({len(value)} items)"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"an integer of {len(str(abs(value)))} digits"
    return repr(value)[:width]


def _check_text(name: str, text: str, bad) -> None:
    """Text the model and the log can take: JSON's \\ud800 escapes give lone surrogates, which
    no UTF-8 encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad(ErrorCode.BAD_UTF8, f"expected '{name}' to be Unicode text, got a lone "
                                      f"surrogate {text[exc.start]!r} at character "
                                      f"{exc.start}") from None


def _check_messages(messages: list, bad) -> tuple[dict, ...]:
    if not messages:
        raise bad(ErrorCode.EMPTY_PROMPT, "expected at least one message in 'messages', got []")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise bad(ErrorCode.BAD_MESSAGES, f"expected messages[{i}] to be an object with "
                                              f"exactly 'role' and 'content', got "
                                              f"{_preview(message, 60)}")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or role not in ROLES:
            raise bad(ErrorCode.BAD_MESSAGES, f"expected messages[{i}].role to be one of "
                                              f"{', '.join(ROLES)}, got {_preview(role)}")
        if not isinstance(content, str):
            raise bad(ErrorCode.BAD_MESSAGES, f"expected messages[{i}].content to be a string, "
                                              f"got {_type_name(content)}")
        _check_text(f"messages[{i}].content", content, bad)
        out.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in out):
        raise bad(ErrorCode.EMPTY_PROMPT, "expected some non-empty message content, got only "
                                          "empty messages")
    return tuple(out)


def _valid_topic(topic: str) -> bool:
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:   # a lone surrogate
        return False
    return 0 < size <= 65535 and not any(c in topic for c in "+#\0") and not topic.startswith("$")


def _valid_reply_topic(topic: Any, topics: Topics) -> bool:
    return isinstance(topic, str) and _valid_topic(topic) and topics.is_reply(topic)


# -- messages back ---------------------------------------------------------------------------

def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def token_message(request_id: str, index: int, text: str) -> bytes:
    return encode({"type": MessageType.TOKEN.value, "id": request_id, "index": index,
                   "text": text})


def reply_message(request_id: str, *, text: str, prompt_tokens: int, output_tokens: int,
                  latency_s: float, ttft_s: float | None, energy_j: float | None,
                  energy_method: str | None, energy_uncertainty_j: float | None,
                  mean_watts: float | None, operating_point: str | None, rung: str | None,
                  device: str, max_new_tokens: int | None = None,
                  clipped_from: int | None = None, precision: str | None = None) -> bytes:
    """``max_new_tokens``: the cap generation ran with; ``clipped_from``: what the request asked
    for when the device's hard limit (``serving.max_new_tokens_limit``) lowered it, else None."""
    return encode({
        "type": MessageType.REPLY.value, "id": request_id, "device": device, "text": text,
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "latency_s": latency_s, "ttft_s": ttft_s,
        "energy": {"joules": energy_j, "method": energy_method,
                   "uncertainty_j": energy_uncertainty_j, "mean_watts": mean_watts},
        "operating_point": operating_point, "rung": rung, "precision": precision,
        "max_new_tokens": max_new_tokens, "clipped_from": clipped_from,
    })


def command_reply_message(command_id: str, text: str, *, device: str) -> bytes:
    """The answer to a command carried out: ``text`` says what was done."""
    return encode({"type": MessageType.REPLY.value, "id": command_id, "device": device,
                   "text": text})


def error_message(request_id: str, code: ErrorCode, message: str, *, device: str) -> bytes:
    kind = {ErrorCode.BUSY: MessageType.BUSY,
            ErrorCode.EXPIRED: MessageType.EXPIRED}.get(code, MessageType.ERROR)
    return encode({"type": kind.value, "id": request_id, "device": device, "code": code.value,
                   "message": message})


class BadMessage(AgentError, ValueError):
    """A message from the agent that a client cannot read."""


@dataclass
class Message:
    """A message from the agent, as a client reads it."""

    type: MessageType
    id: str
    body: dict = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.type in FINAL_TYPES


def parse_message(payload: bytes) -> Message:
    try:
        data = json.loads(payload.decode("utf-8"))
        kind = MessageType(data["type"])
        return Message(kind, str(data.get("id")), data)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BadMessage(f"expected an agent message (JSON with a 'type' of "
                         f"{', '.join(t.value for t in MessageType)}), got {payload[:80]!r}: "
                         f"{exc}") from None

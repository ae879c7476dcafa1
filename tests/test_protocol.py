"""Request validation and the message formats, without a broker."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from tensorslm.agent.protocol import (BadMessage, BadRequest, ErrorCode, MessageType, ReplyAddress,
                            error_message, parse_message, parse_request, reply_message,
                            request_id_from_correlation, token_message)
from tensorslm.agent.topics import Topics

R = "tensorslm/clients/c1/reply"   # a reply topic in the clients' reply tree


def parse(payload, **kwargs):
    kwargs.setdefault("max_prompt_chars", 50)
    return parse_request(payload if isinstance(payload, bytes) else json.dumps(payload).encode(),
                         received_at=1000.0, **kwargs)


def test_full_request_is_parsed_into_typed_fields():
    req = parse({"prompt": "hi", "max_new_tokens": 9, "temperature": 1, "top_p": 0.9,
                 "top_k": 5, "seed": 7, "deadline": 1001, "stream": True,
                 "reply_to": f"{R}/q-1", "id": "q-1"})
    assert (req.request_id, req.prompt, req.max_new_tokens, req.temperature, req.top_p,
            req.top_k, req.seed, req.deadline, req.stream) == ("q-1", "hi", 9, 1.0, 0.9, 5, 7,
                                                                1001.0, True)
    assert req.reply == ReplyAddress(f"{R}/q-1", None)
    assert not req.expired(1000.5) and req.expired(1001.0)


def test_mqtt5_address_wins_and_correlation_names_the_request():
    address = ReplyAddress(f"{R}/x", b"abc-1")
    req = parse({"prompt": "hi", "reply_to": f"{R}/other"}, reply=address)
    assert req.reply == address and req.request_id == "abc-1"


@pytest.mark.parametrize("data, expected", [
    (b"abc_1", "abc_1"),
    (b"\x00\xff", "c" + __import__("hashlib").sha256(b"\x00\xff").hexdigest()[:32]),
    (b"a/b", "c" + __import__("hashlib").sha256(b"a/b").hexdigest()[:32]),
    (None, None),
])
def test_request_id_from_correlation(data, expected):
    assert request_id_from_correlation(data) == expected


def test_messages_are_checked_and_counted():
    req = parse({"messages": [{"role": "system", "content": "be brief"},
                              {"role": "user", "content": "hello"}]})
    assert req.prompt is None and req.prompt_chars == len("be brief") + len("hello")


@pytest.mark.parametrize("payload, code, message", [
    (b"\xc3\x28", ErrorCode.BAD_UTF8, "expected UTF-8 JSON, got invalid continuation byte"),
    (b"", ErrorCode.NOT_JSON, "got invalid JSON"),
    (b'"hi"', ErrorCode.NOT_OBJECT, "got a JSON string"),
    (b"x" * 70000, ErrorCode.PAYLOAD_TOO_LARGE, "expected a payload of at most 65736 bytes"),
    ({"prompt": "hi", "id": "a/b"}, ErrorCode.BAD_ID, "expected 'id' to be 1-64 letters"),
    ({"prompt": "hi", "reply_to": f"{R}/#"}, ErrorCode.BAD_REPLY_TO, "without wildcards"),
    ({"prompt": "hi", "reply_to": "\ud800"}, ErrorCode.BAD_REPLY_TO, "got '\\ud800'"),
    ({"prompt": "h\ud800i"}, ErrorCode.BAD_UTF8,
     "expected 'prompt' to be Unicode text, got a lone surrogate '\\ud800' at character 1"),
    ({"messages": [{"role": "user", "content": "\udfff"}]}, ErrorCode.BAD_UTF8,
     "expected 'messages[0].content' to be Unicode text"),
    (b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}", ErrorCode.NOT_JSON,
     "got a value Python cannot read (Exceeds the limit (4300 digits)"),
    (b"[" * 5000 + b"]" * 5000, ErrorCode.NOT_JSON, "expected JSON nested less deeply"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, ErrorCode.NOT_JSON, "expected JSON nested less deeply"),
    (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", ErrorCode.NOT_JSON,
     "expected JSON nested less deeply"),
    ({"prompt": [[[[1]]]]}, ErrorCode.WRONG_TYPE, "expected 'prompt' to be a string, got array "
     "(1 items)"),
    ({"prompt": "hi", "id": "abc\n"}, ErrorCode.BAD_ID, "expected 'id' to be 1-64 letters"),
    ({"prompt": "hi", "max_new_tokens": True}, ErrorCode.WRONG_TYPE,
     "expected 'max_new_tokens' to be an integer, got boolean"),
    ({"prompt": "hi", "temperature": "hot"}, ErrorCode.WRONG_TYPE,
     "expected 'temperature' to be a number"),
    ({"prompt": "hi", "temperature": 11}, ErrorCode.OUT_OF_RANGE,
     "expected 'temperature' in [0, 10], got 11"),
    ({"prompt": "hi", "seed": -1}, ErrorCode.OUT_OF_RANGE, "expected 'seed' in [0, "),
    ({"prompt": "x" * 51}, ErrorCode.PROMPT_TOO_LONG,
     "expected at most 50 prompt characters, got 51"),
    ({"messages": [{"role": "user", "content": "x" * 51}]}, ErrorCode.PROMPT_TOO_LONG,
     "got 51"),
    ({"messages": [{"role": "user"}]}, ErrorCode.BAD_MESSAGES,
     "exactly 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": 3}]}, ErrorCode.BAD_MESSAGES,
     "content to be a string, got integer"),
    ({"messages": [{"role": "user", "content": " "}]}, ErrorCode.EMPTY_PROMPT,
     "only empty messages"),
    ({"messages": "hello"}, ErrorCode.WRONG_TYPE, "expected 'messages' to be an array"),
    ({"prompt": "hi", "extra": 1, "another": 2}, ErrorCode.UNKNOWN_FIELD,
     "unknown field 'another'; valid fields: prompt, messages"),
])
def test_bad_requests_name_the_problem(payload, code, message):
    with pytest.raises(BadRequest) as info:
        parse(payload)
    assert info.value.code is code
    assert message in info.value.message


def test_bad_request_keeps_the_reply_address_when_it_can():
    with pytest.raises(BadRequest) as info:
        parse({"prompt": "", "id": "q9", "reply_to": f"{R}/q9"})
    assert (info.value.request_id, info.value.reply) == ("q9", ReplyAddress(f"{R}/q9"))


@pytest.mark.parametrize("topic", [
    "tensorslm/devices/pi-01/records", "tensorslm/devices/pi-01/status",
    "tensorslm/devices/pi-01/telemetry", "tensorslm/devices/pi-02/request",
    "tensorslm/clients/c1", "tensorslm/clients/c1/replies/x", "tensorslm/clients//reply",
    "tensorslm/clients/a+b/reply", "tensorslm/clients/c1/reply//x", "other/clients/c1/reply",
    "homeassistant/sensor/x/config",
])
def test_a_reply_address_outside_the_client_reply_tree_is_refused_without_a_reply(topic):
    for payload, reply in (({"prompt": "hi", "reply_to": topic, "id": "q1"}, None),
                           ({"prompt": "hi"}, ReplyAddress(topic, b"q1"))):
        with pytest.raises(BadRequest) as info:
            parse(payload, reply=reply)
        assert info.value.code is ErrorCode.BAD_REPLY_TO and info.value.reply is None
        assert "under tensorslm/clients/<client>/reply" in info.value.message
        assert info.value.request_id == "q1"


def test_the_reply_tree_follows_the_topic_prefix():
    req = parse({"prompt": "hi", "reply_to": "lab/x/clients/c1/reply/q1"},
                topics=Topics("lab/x"))
    assert req.reply == ReplyAddress("lab/x/clients/c1/reply/q1")
    with pytest.raises(BadRequest, match="under lab/x/clients/<client>/reply"):
        parse({"prompt": "hi", "reply_to": f"{R}/q1"}, topics=Topics("lab/x"))


# Any text, including lone surrogates (JSON's \ud800 escapes), and the payloads that once
# escaped the parser: integers past Python's digit limit and nesting past its recursion limit.
ANY_TEXT = st.text(st.characters(blacklist_categories=()), max_size=30)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["prompt", "messages", "max_new_tokens", "seed", "top_p",
                                       "temperature", "top_k", "deadline", "stream", "id",
                                       "reply_to", "role", "content"]) | ANY_TEXT, inner,
                      max_size=6), max_leaves=16)


def _deep(opener: bytes, closer: bytes, depth: int, inner: bytes = b"1") -> bytes:
    return opener * depth + inner + closer * depth


HOSTILE = st.one_of(
    st.builds(lambda d: b'{"prompt": "hi", "seed": ' + b"9" * d + b"}",
              st.integers(4000, 6000)),
    st.builds(lambda d, o: _deep(*o, d), st.integers(900, 6000),
              st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b'{"prompt":[', b"]}"),
                               (b'{"messages":[', b"]}")])),
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=2000), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                 JSON_VALUES.map(lambda v: json.dumps(v, ensure_ascii=False)
                                 .encode("utf-8", "surrogatepass")), HOSTILE),
       st.one_of(st.none(), st.builds(ReplyAddress, ANY_TEXT | st.just(f"{R}/q"),
                                      st.none() | st.binary(max_size=20))))
def test_arbitrary_bytes_and_json_give_a_request_or_a_bad_request_only(payload, reply):
    try:
        req = parse(payload, reply=reply)
    except BadRequest as exc:
        assert isinstance(exc.code, ErrorCode) and exc.request_id
        assert exc.reply is None or Topics().is_reply(exc.reply.topic)
        error_message(exc.request_id, exc.code, exc.message, device="d")   # encodable
    else:
        assert req.prompt_chars <= 50 and (req.prompt or req.messages)
        (req.prompt or "").encode("utf-8")
        assert req.reply is None or Topics().is_reply(req.reply.topic)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                              | st.text(max_size=20),
                              lambda inner: st.lists(inner, max_size=4)
                              | st.dictionaries(st.sampled_from(
                                  ["prompt", "messages", "max_new_tokens", "seed", "top_p",
                                   "stream", "id", "reply_to", "role", "content", "x"]), inner,
                                  max_size=5), max_leaves=12)
                 .map(lambda v: json.dumps(v).encode())))
def test_any_input_is_either_a_request_or_a_bad_request(payload):
    try:
        req = parse(payload)
    except BadRequest as exc:
        assert isinstance(exc.code, ErrorCode) and exc.request_id
    else:
        assert req.prompt_chars <= 50 and (req.prompt or req.messages)


def test_message_formats_round_trip():
    token = parse_message(token_message("q1", 3, "the"))
    assert (token.type, token.id, token.body["index"], token.final) == (MessageType.TOKEN, "q1", 3,
                                                                         False)
    reply = parse_message(reply_message(
        "q1", text="a b", prompt_tokens=2, output_tokens=2, latency_s=0.5, ttft_s=0.1,
        energy_j=1.5, energy_method="ina219", energy_uncertainty_j=0.1, mean_watts=3.0,
        operating_point="eco", rung="r16", device="pi-01"))
    assert reply.final and reply.body["energy"] == {"joules": 1.5, "method": "ina219",
                                                    "uncertainty_j": 0.1, "mean_watts": 3.0}
    for code, kind in [(ErrorCode.BUSY, MessageType.BUSY), (ErrorCode.EXPIRED, MessageType.EXPIRED),
                       (ErrorCode.NOT_JSON, MessageType.ERROR)]:
        msg = parse_message(error_message("q2", code, "why", device="pi-01"))
        assert (msg.type, msg.body["code"], msg.final) == (kind, code.value, True)


@pytest.mark.parametrize("payload", [b"nope", b'{"type": "shout"}', b"[]"])
def test_unreadable_agent_messages(payload):
    with pytest.raises(BadMessage, match="expected an agent message"):
        parse_message(payload)

"""Request validation and the message formats, without a broker."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from tensorslm.agent.protocol import (BadMessage, BadRequest, ErrorCode, MessageType, ReplyAddress,
                            error_message, parse_message, parse_request, reply_message,
                            request_id_from_correlation, token_message)


def parse(payload, **kwargs):
    kwargs.setdefault("max_prompt_chars", 50)
    return parse_request(payload if isinstance(payload, bytes) else json.dumps(payload).encode(),
                         received_at=1000.0, **kwargs)


def test_full_request_is_parsed_into_typed_fields():
    req = parse({"prompt": "hi", "max_new_tokens": 9, "temperature": 1, "top_p": 0.9,
                 "top_k": 5, "seed": 7, "deadline": 1001, "stream": True,
                 "reply_to": "a/b", "id": "q-1"})
    assert (req.request_id, req.prompt, req.max_new_tokens, req.temperature, req.top_p,
            req.top_k, req.seed, req.deadline, req.stream) == ("q-1", "hi", 9, 1.0, 0.9, 5, 7,
                                                                1001.0, True)
    assert req.reply == ReplyAddress("a/b", None)
    assert not req.expired(1000.5) and req.expired(1001.0)


def test_mqtt5_address_wins_and_correlation_names_the_request():
    address = ReplyAddress("resp/x", b"abc-1")
    req = parse({"prompt": "hi", "reply_to": "other"}, reply=address)
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
    ({"prompt": "hi", "reply_to": "a/#"}, ErrorCode.BAD_REPLY_TO, "without wildcards"),
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
        parse({"prompt": "", "id": "q9", "reply_to": "c/r/q9"})
    assert (info.value.request_id, info.value.reply) == ("q9", ReplyAddress("c/r/q9"))


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

"""sse.py's relay, aggregator and upstream errors, and chat.py's request rules, spoken in bytes."""

from __future__ import annotations

import json
import re

import pytest

import sse
from reasoning import ChunkSplit
from chat import RequestError, api_payload, env_type, new_fingerprint, parse_chat_request, samba_payload
import chat
from aggregate import CompletionAggregator
from sse import DONE, StreamRelay, UpstreamStreamError, encode
from test_sse_decoder import decode_all


def chunk(**fields) -> bytes:
    """A compact chat.completion.chunk as upstream bytes."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1732700000,
            "model": "DeepSeek-R1"}
    return json.dumps({**base, **fields}, separators=(",", ":")).encode()


def delta(index: int = 0, finish_reason=None, **fields) -> dict:
    return {"index": index, "delta": fields, "finish_reason": finish_reason, "logprobs": None}


# --- relay (stream: true) -----------------------------------------------------------


def sent(frame: bytes) -> dict:
    """The JSON object a client receives in one frame."""
    [(event, data)] = decode_all(frame)
    assert event == "message"
    return json.loads(data)


def test_relay_forwards_unchanged_chunk_as_original_bytes(monkeypatch):
    # Spaces, key order and \u escapes would all change if the chunk were re-encoded.
    data = (b'{"object": "chat.completion.chunk", "id": "chatcmpl-x", "created": 1732700000, '
            b'"choices": [{"delta": {"content": "caf\\u00e9 \xe2\x9c\x93"}, "index": 0}]}')
    monkeypatch.setattr(sse, "dumps", lambda obj: pytest.fail("re-encoded an unchanged chunk"))
    frame = StreamRelay(include_usage=False).relay("message", data)
    assert frame == b"data: " + data + b"\n\n"
    assert frame[6:-2] == data


def test_relay_float_created_becomes_int():
    data = chunk(created=1732700000.987, choices=[delta(content="hi")])
    out = sent(StreamRelay(False).relay("message", data))
    assert out["created"] == 1732700000 and type(out["created"]) is int
    assert out == {**json.loads(data), "created": 1732700000}


PLAIN = b'{"id":"chatcmpl-c1","object":"chat.completion.chunk","created":%s,"model":"m","choices":[%s]}'
TEXT_CHOICE = b'{"index":0,"delta":{"content":"say \\"created\\":2.5, \\"error\\""}}'


@pytest.mark.parametrize("data, created", [
    (PLAIN % (b"1732700000.987", TEXT_CHOICE), 1732700000),    # SambaNova's float, cut in place
    (PLAIN % (b"1732700000", TEXT_CHOICE), 1732700000),        # already an int
    (PLAIN % (b"1.7327e9", b""), 1732700000),                  # exponent: full parse
    (PLAIN.replace(b'"created":%s', b'"created": %s') % (b"5.5", b""), 5),  # spaced: full parse
    (PLAIN % (b"7.25", b'{"index":0,"delta":{},"x":{"created":3.5}}'), 7),  # nested key: full parse
])
def test_relay_judges_plain_chunks_from_their_bytes_like_the_full_parse(data, created):
    relay = StreamRelay(False)
    relay.relay("message", PLAIN % (b"1", b""))  # the first chunk is parsed: its id and model are learned
    out = sent(relay.relay("message", data))
    assert out == {**json.loads(data), "created": created} and type(out["created"]) is int


def test_relay_error_beside_a_choices_list_still_raises():
    data = b'{"id":"c1","created":1.5,"choices":[],"error":{"message":"boom","code":"overloaded"}}'
    with pytest.raises(UpstreamStreamError) as info:
        StreamRelay(True).relay("message", data)
    assert info.value.error["message"] == "boom" and info.value.error["code"] == "overloaded"


@pytest.mark.parametrize("usage", [b"", b',"usage":null'])
def test_relay_forwards_sambanova_chunks_without_parsing_them(monkeypatch, usage):
    data = (PLAIN % (b"1732700000.5", TEXT_CHOICE))[:-1] + usage + b"}"
    relay = StreamRelay(False)
    relay.relay("message", data)
    monkeypatch.setattr(sse.json, "loads", lambda raw: pytest.fail("parsed a plain chunk"))
    frame = relay.relay("message", data)
    assert frame == b"data: " + data.replace(b"1732700000.5", b"1732700000") + b"\n\n"


HEAD = b'{"id":"c1","object":"chat.completion.chunk","created":1732700000.5,"model":"m","system_fingerprint":"f",'
AFTER_HEAD = [  # what may follow a stream's repeated head: each must leave as the full parse makes it
    b'"choices":[{"index":0,"delta":{"content":"w"},"finish_reason":null,"logprobs":null}]}',
    b'"choices":[{"index":0,"delta":{"content":"say \\"created\\":2.5, \\"error\\""}}],"usage":null}',
    b'"choices":[{"index":0,"delta":{"content":"w"}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}',
    b'"choices":[{"index":0,"delta":{},"x":{"created":3.5}}]}',
    b'"choices":[{"index":1,"delta":{"content":"other choice"}}]}',
    b'"choices":[{"index":0,"delta":{"reasoning":"upstream thinking"}}]}',
    b'"choices":[\n{"index":0,"delta":{"content":"w"}}]}',
    b'"choices":[{"index":0,"delta":{"content":"w"}}]} ',
    b'"choices":[{"index":0,"delta":{"content":"w"}}],"created":7}',
    b'"choices":[{"index":0,"delta":{"content":"<think>late tag"}}]}',
    b'"choices":[{"index":0,"delta":{"content":"w"}}],"error":{"message":"boom"}}',
]


def relay_outcomes(events: list[bytes], format: str | None) -> list:
    """Each event's frame as the client's object (or the error it raises), by one relay."""
    relay = StreamRelay(False, model="alias", split=ChunkSplit(format) if format else None)
    outcomes = []
    for data in events:
        try:
            frame = relay.relay("message", data)
            outcomes.append(frame and [(event, json.loads(d)) for event, d in decode_all(frame)])
        except UpstreamStreamError as exc:
            outcomes.append(exc.error)
    return outcomes


@pytest.mark.parametrize("format", [None, "parsed", "raw", "hidden"])
@pytest.mark.parametrize("after", AFTER_HEAD)
def test_relay_head_path_matches_the_byte_path_and_the_full_parse(monkeypatch, format, after):
    plain = HEAD + AFTER_HEAD[0]
    events = [HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"}}]}', plain, plain,
              HEAD + after, plain, HEAD.replace(b'"c1"', b'"c2"') + AFTER_HEAD[0], plain]
    relay = StreamRelay(False, model="alias", split=ChunkSplit(format) if format else None)
    for data in events[:3]:
        relay.relay("message", data)
    assert relay._head == HEAD  # learned: the later events take the head path where they can
    with_head = relay_outcomes(events, format)
    monkeypatch.setattr(StreamRelay, "_learn_head", lambda self, data, frame: None)
    byte_path = relay_outcomes(events, format)
    monkeypatch.setattr(sse, "_plain_chunk_frame", lambda data: None)
    monkeypatch.setattr(sse, "_thinking_chunk", lambda data, format: None)
    assert with_head == byte_path == relay_outcomes(events, format)


@pytest.mark.parametrize("fields", [{}, {"choices": None}, {"choices": {"index": 0}}],
                         ids=["missing", "null", "object"])
def test_relay_adds_choices_list(fields):
    out = sent(StreamRelay(False).relay("message", chunk(**fields)))
    assert out["choices"] == []


USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8, "is_last_response": True}


@pytest.mark.parametrize("include_usage, fields, expected", [
    (True, {"choices": [], "usage": USAGE}, {"choices": [], "usage": USAGE}),
    (True, {"usage": USAGE}, {"choices": [], "usage": USAGE}),
    (False, {"choices": [], "usage": USAGE}, None),
    (False, {"usage": USAGE}, None),
    (True, {"choices": [delta(content="x")], "usage": USAGE},
     {"choices": [delta(content="x")], "usage": USAGE}),
    (False, {"choices": [delta(content="x")], "usage": USAGE}, {"choices": [delta(content="x")]}),
    (False, {"choices": [delta(content="x")], "usage": None},
     {"choices": [delta(content="x")], "usage": None}),
], ids=["usage-only sent", "usage-only without choices sent", "usage-only dropped",
        "usage-only without choices dropped", "usage on content kept", "usage on content removed",
        "null usage left alone"])
def test_relay_usage_rules(include_usage, fields, expected):
    frame = StreamRelay(include_usage).relay("message", chunk(**fields))
    if expected is None:
        assert frame is None
    else:
        out = sent(frame)
        assert {k: out[k] for k in out if k in ("choices", "usage")} == expected


@pytest.mark.parametrize("data", [b"[DONE]", b" [DONE] "])
def test_relay_done(data):
    relay = StreamRelay(True)
    assert relay.relay("message", chunk(choices=[delta(content="x")])) is not None
    assert not relay.done
    assert relay.relay("message", data) is None
    assert relay.done
    assert relay.relay("message", chunk(choices=[delta(content="late")])) is None
    assert relay.finish() == DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize("data", [b"", b"   ", b"not json", b"[1, 2]", b'"text"', b"\xff\xfe",
                                  b"{\"a\": "])
def test_relay_skips_what_is_no_json_object(data):
    relay = StreamRelay(True)
    assert relay.relay("message", data) is None
    assert relay.skipped == 1 and not relay.done


def test_relay_multi_line_data_stays_one_event():
    # JSON spread over two data: lines must not be forwarded as a broken frame.
    stream = b'data: {"choices": [],\ndata:  "created": 5}\n\n'
    [(event, data)] = decode_all(stream)
    frame = StreamRelay(False).relay(event, data)
    out = sent(frame)
    assert out["choices"] == [] and out["created"] == 5


ERROR_CASES = [
    ("error", b'{"error": {"message": "overloaded", "type": "server_error", "code": 503}}',
     {"message": "overloaded", "type": "server_error", "param": None, "code": "503"}),
    ("error", b"model crashed", {"message": "model crashed", "type": "upstream_error",
                                 "param": None, "code": None}),
    ("error", b'{"message": "queue full", "code": "queue_full"}',
     {"message": "queue full", "type": "upstream_error", "param": None, "code": "queue_full"}),
    ("error", b"", {"message": "upstream stream error", "type": "upstream_error",
                    "param": None, "code": None}),
    ("message", b'{"error": {"message": "context too long", "type": "invalid_request_error", '
                b'"param": "messages", "code": "context_length_exceeded"}}',
     {"message": "context too long", "type": "invalid_request_error", "param": "messages",
      "code": "context_length_exceeded"}),
    ("message", b'{"error": {"message": "bad"}}',
     {"message": "bad", "type": "upstream_error", "param": None, "code": None}),
    ("message", b'{"error": "Unknown error when running prediction service"}',
     {"message": "Unknown error when running prediction service", "type": "upstream_error",
      "param": None, "code": None}),
    ("message", b'{"error": "access_denied", "error_description": "Wrong token."}',
     {"message": "Wrong token.", "type": "upstream_error", "param": None, "code": "access_denied"}),
]
ERROR_IDS = ["event json", "event text", "event bare object", "event empty", "data dict",
             "data dict defaults", "data string", "data string with description"]


@pytest.mark.parametrize("event, data, error", ERROR_CASES, ids=ERROR_IDS)
def test_relay_error_events_raise(event, data, error):
    with pytest.raises(UpstreamStreamError) as info:
        StreamRelay(True).relay(event, data)
    assert info.value.error == error
    assert str(info.value) == error["message"]


@pytest.mark.parametrize("event, data, error", ERROR_CASES, ids=ERROR_IDS)
def test_aggregator_error_events_raise(event, data, error):
    aggregator = CompletionAggregator()
    aggregator.add("message", chunk(choices=[delta(content="partial")]))
    with pytest.raises(UpstreamStreamError) as info:
        aggregator.add(event, data)
    assert info.value.error == error


def test_null_error_key_is_no_error():
    assert sent(StreamRelay(False).relay("message", chunk(choices=[], error=None)))["choices"] == []


def test_error_frame():
    frame = sse.error_frame(sse.openai_error("lost", code="upstream_disconnected"))
    assert sent(frame) == {"error": {"message": "lost", "type": "upstream_error", "param": None,
                                     "code": "upstream_disconnected"}}


SAMBA_STREAM = (
    b": ping\n\n"
    + encode(chunk(created=1732700000.123, system_fingerprint="fastcoe",
                   choices=[delta(role="assistant", content="Hel")]))
    + encode(chunk(created=1732700000.123, choices=[delta(content="lo", finish_reason="stop")]))
    + encode(chunk(created=1732700000.123, choices=[], usage=USAGE))
    + DONE)


@pytest.mark.parametrize("include_usage", [True, False])
def test_relay_whole_upstream_stream(include_usage):
    relay = StreamRelay(include_usage)
    frames = [f for e, d in decode_all(SAMBA_STREAM) if (f := relay.relay(e, d)) is not None]
    frames.append(relay.finish())
    events = decode_all(b"".join(frames))
    assert [d for _, d in events].count(b"[DONE]") == 1 and events[-1] == ("message", b"[DONE]")
    objects = [json.loads(d) for _, d in events[:-1]]
    assert all(isinstance(o["choices"], list) and type(o["created"]) is int for o in objects)
    assert "".join(c["delta"].get("content", "") for o in objects for c in o["choices"]) == "Hello"
    assert [o["usage"] for o in objects if "usage" in o] == ([USAGE] if include_usage else [])
    assert b"ping" not in b"".join(frames)


# --- aggregator (stream: false) -----------------------------------------------------


def aggregate(*chunks: bytes) -> dict:
    aggregator = CompletionAggregator()
    for data in chunks:
        aggregator.add("message", data)
    aggregator.add("message", b"[DONE]")
    assert aggregator.done
    return aggregator.result()


def test_aggregates_text():
    events = decode_all(SAMBA_STREAM)
    aggregator = CompletionAggregator()
    for event in events:
        aggregator.add(*event)
    assert aggregator.done
    assert aggregator.result() == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1732700000,
        "model": "DeepSeek-R1", "system_fingerprint": "fastcoe",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": USAGE}


@pytest.mark.parametrize("key", ["reasoning", "reasoning_content"])
def test_aggregates_reasoning_under_its_key(key):
    result = aggregate(chunk(choices=[delta(role="assistant", **{key: "Think"})]),
                       chunk(choices=[delta(**{key: "ing.", "content": None})]),
                       chunk(choices=[delta(content="Answer", finish_reason="stop")]))
    message = result["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Answer", key: "Thinking."}


def test_aggregates_tool_calls_by_index():
    first = {"index": 0, "id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}
    second = {"index": 1, "id": "call_b", "type": "function",
              "function": {"name": "get_time", "arguments": "{\"tz\":"}}
    result = aggregate(
        chunk(choices=[delta(role="assistant", content=None, tool_calls=[first])]),
        chunk(choices=[delta(tool_calls=[{"index": 0, "function": {"arguments": "{\"city\":"}}])]),
        chunk(choices=[delta(tool_calls=[second])]),
        chunk(choices=[delta(tool_calls=[{"index": 0, "function": {"arguments": "\"Rome\"}"}},
                                         {"index": 1, "function": {"arguments": "\"UTC\"}"}}])]),
        chunk(choices=[delta(finish_reason="tool_calls")]))
    [choice] = result["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}},
        {"id": "call_b", "type": "function",
         "function": {"name": "get_time", "arguments": "{\"tz\":\"UTC\"}"}}]}


def test_tool_call_name_repeated_in_every_delta_is_not_doubled():
    call = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f"}}
    result = aggregate(chunk(choices=[delta(tool_calls=[{**call, "function": {"name": "f",
                                                                               "arguments": "{}"}}])]),
                       chunk(choices=[delta(tool_calls=[call])]))
    assert result["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "f",
                                                                            "arguments": "{}"}


def test_finish_reason_from_last_chunk_that_has_one():
    result = aggregate(chunk(choices=[delta(content="a", finish_reason="stop")]),
                       chunk(choices=[delta(content="b", finish_reason="length")]),
                       chunk(choices=[delta(content="c")]))
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["choices"][0]["message"]["content"] == "abc"


def test_aggregates_choices_by_index():
    result = aggregate(chunk(choices=[delta(1, content="B"), delta(0, content="A")]),
                       chunk(choices=[delta(1, content="b", finish_reason="stop"),
                                      delta(0, content="a", finish_reason="length")]))
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in result["choices"]] \
        == [(0, "Aa", "length"), (1, "Bb", "stop")]


def test_result_defaults_without_usage_or_metadata():
    result = aggregate(b'{"choices": [{"index": 0, "delta": {"content": "x"}}], "created": 5.9}')
    assert result["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert result["created"] == 5 and type(result["created"]) is int
    assert "system_fingerprint" not in result
    assert result["id"].startswith("chatcmpl-") and result["object"] == "chat.completion"
    assert result["choices"][0]["finish_reason"] == "stop"


def test_aggregates_logprobs():
    first = {"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": []}
    second = {"token": "b", "logprob": -0.2, "bytes": [98], "top_logprobs": []}
    result = aggregate(chunk(choices=[{**delta(content="a"), "logprobs": {"content": [first]}}]),
                       chunk(choices=[{**delta(content="b"), "logprobs": {"content": [second]}}]))
    assert result["choices"][0]["logprobs"] == {"content": [first, second]}


def test_outputs_fit_the_openai_sdk_types():
    # The official SDK's own models: what a client will parse our output with.
    types = pytest.importorskip("openai.types.chat")
    for include_usage in (True, False):
        relay = StreamRelay(include_usage)
        for event, data in decode_all(SAMBA_STREAM):
            frame = relay.relay(event, data)
            if frame is not None:
                parsed = types.ChatCompletionChunk.model_validate(sent(frame), strict=True)
                assert parsed.object == "chat.completion.chunk"
    tool = {"index": 0, "id": "call_a", "type": "function",
            "function": {"name": "f", "arguments": "{}"}}
    for chunks in ([data for _, data in decode_all(SAMBA_STREAM)[:-1]],
                   [chunk(choices=[delta(tool_calls=[tool], finish_reason="tool_calls")])]):
        completion = types.ChatCompletion.model_validate(aggregate(*chunks), strict=True)
        assert completion.object == "chat.completion" and completion.usage is not None


def test_aggregator_uses_requested_model_when_upstream_names_none():
    aggregator = CompletionAggregator(model="Meta-Llama-3.3-70B-Instruct")
    aggregator.add("message", b'{"choices": []}')
    assert aggregator.result()["model"] == "Meta-Llama-3.3-70B-Instruct"


def test_aggregator_skips_noise_and_ignores_events_after_done():
    aggregator = CompletionAggregator()
    aggregator.add("message", b"keep-alive")
    aggregator.add("message", chunk(choices=[delta(content="x")]))
    aggregator.add("message", b"[DONE]")
    aggregator.add("message", chunk(choices=[delta(content="late")]))
    assert aggregator.skipped == 1
    assert aggregator.result()["choices"][0]["message"]["content"] == "x"


# --- requests -----------------------------------------------------------------------


def body_with(**fields) -> bytes:
    return json.dumps({"model": "DeepSeek-R1", "messages": [{"role": "user", "content": "hi"}],
                       **fields}).encode()


@pytest.mark.parametrize("raw, param, message", [
    (b"", None, "parse the JSON"),
    (b"not json", None, "parse the JSON"),
    (b"\xff\xfe{", None, "parse the JSON"),
    (b"[1, 2]", None, "JSON object"),
    (b'"hello"', None, "JSON object"),
    (b"{}", "messages", "Missing required parameter: 'messages'"),
    (body_with(messages="hi"), "messages", "non-empty array"),
    (body_with(messages=[]), "messages", "non-empty array"),
    (body_with(messages=None), "messages", "non-empty array"),
    (body_with(messages=["hi"]), "messages[0]", "expected an object"),
    (body_with(messages=[{"content": "hi"}]), "messages[0].role", "Missing"),
    (body_with(messages=[{"role": 1, "content": "hi"}]), "messages[0].role", "Invalid type"),
    (body_with(messages=[{"role": "user", "content": "a"}, {"role": None, "content": "b"}]),
     "messages[1].role", "Invalid type"),
    (body_with(messages=[{"role": "user", "content": 5}]), "messages[0].content", "string"),
    (body_with(messages=[{"role": "user"}]), "messages[0].content", "Missing"),
    (body_with(messages=[{"role": "user", "content": ["hi"]}]), "messages[0].content[0]", "object"),
    (body_with(messages=[{"role": "assistant", "tool_calls": {}}]), "messages[0].tool_calls",
     "array"),
    (body_with(model=5), "model", "string"),
    (body_with(stream="yes"), "stream", "boolean"),
    (body_with(stream_options=[]), "stream_options", "object"),
])
def test_parse_chat_request_refuses(raw, param, message):
    with pytest.raises(RequestError) as info:
        parse_chat_request(raw)
    assert info.value.param == param
    assert message in info.value.message and str(info.value) == info.value.message


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                  {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}],
    [{"role": "user", "content": None}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather?"},
     {"role": "assistant", "tool_calls": [{"id": "call_a", "type": "function",
                                           "function": {"name": "w", "arguments": "{}"}}]},
     {"role": "tool", "tool_call_id": "call_a", "content": "sunny"}],
], ids=["string", "parts", "null", "tool round trip"])
def test_parse_chat_request_accepts(messages):
    raw = json.dumps({"messages": messages, "stream": False, "stream_options": None}).encode()
    assert parse_chat_request(raw) == {"messages": messages, "stream": False, "stream_options": None}


@pytest.mark.parametrize("body, stream, usage", [
    ({}, False, False),
    ({"stream": True}, True, False),
    ({"stream": True, "stream_options": {"include_usage": True}}, True, True),
    ({"stream": True, "stream_options": {"include_usage": False}}, True, False),
    ({"stream": True, "stream_options": None}, True, False),
])
def test_wants_stream_and_usage(body, stream, usage):
    assert chat.wants_stream(body) is stream and chat.wants_usage(body) is usage


CLIENT_BODY = {
    "model": "Meta-Llama-3.3-70B-Instruct",
    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    "temperature": 0.2, "top_p": 0.9, "max_tokens": 77, "stop": ["\n\n", "END"], "seed": 42, "n": 2,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto", "response_format": {"type": "json_object"}, "presence_penalty": 0.1,
    "frequency_penalty": 0.2, "logprobs": True, "top_logprobs": 3, "user": "u-1", "top_k": 5,
    "stream": False, "stream_options": {"include_usage": False, "continuous_usage_stats": True},
}


def test_samba_payload_keeps_every_parameter():
    body = json.loads(json.dumps(CLIENT_BODY))
    payload = samba_payload(body, default_model="DeepSeek-R1", fingerprint="anon_" + "ab" * 16)
    assert payload == {
        "body": {**CLIENT_BODY, "stream": True,
                 "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
        "env_type": "text", "fingerprint": "anon_" + "ab" * 16}
    assert body == CLIENT_BODY  # the client's body itself is left as it was


@pytest.mark.parametrize("model", [None, "", "absent"])
def test_payloads_default_the_model(model):
    body = {"messages": [{"role": "user", "content": "hi"}]}
    if model != "absent":
        body["model"] = model
    inner = samba_payload(body, default_model="DeepSeek-R1", fingerprint="f")["body"]
    assert inner["model"] == "DeepSeek-R1"
    assert inner["stream"] is True and inner["stream_options"] == {"include_usage": True}
    assert api_payload(body, default_model="DeepSeek-R1") == inner


def test_api_payload_keeps_every_parameter():
    assert api_payload(CLIENT_BODY, default_model="DeepSeek-R1") == {
        **CLIENT_BODY, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}


@pytest.mark.parametrize("model, expected", [
    ("DeepSeek-R1", "text"), ("Meta-Llama-3.3-70B-Instruct", "text"), ("gpt-oss-120b", "text"),
    ("Llama-3.2-11B-Vision-Instruct", "vision"), ("Llama-4-Maverick-17B-128E-Instruct", "text"),
    ("Qwen2-Audio-7B-Instruct", "audio"), ("Whisper-Large-v3", "audio"),
])
def test_env_type(model, expected):
    assert env_type(model) == expected
    assert samba_payload({"model": model, "messages": []}, default_model="x",
                         fingerprint="f")["env_type"] == expected


@pytest.mark.parametrize("value", ["parsed", "raw", "hidden", None])
def test_reasoning_format_is_accepted_and_never_sent_upstream(value):
    body = parse_chat_request(body_with(reasoning_format=value))
    assert chat.reasoning_format(body, "raw") == (value or "raw")
    assert "reasoning_format" not in api_payload(body, default_model="m")
    assert "reasoning_format" not in samba_payload(body, default_model="m", fingerprint="f")["body"]
    assert body["reasoning_format"] == value  # the client's body itself is left as it was


@pytest.mark.parametrize("value", ["Parsed", "", 0, True, {"format": "raw"}])
def test_reasoning_format_other_values_are_refused_naming_it(value):
    with pytest.raises(RequestError) as info:
        parse_chat_request(body_with(reasoning_format=value))
    assert info.value.param == "reasoning_format" and "parsed, raw, hidden" in info.value.message


def test_new_fingerprint():
    first, second = new_fingerprint("anon_"), new_fingerprint("anon_")
    assert re.fullmatch(r"anon_[0-9a-f]{32}", first) and first != second


def test_events_of_other_types_are_no_chunks():
    """An `event: ping` holding a JSON object is not part of the answer: never sent as a chunk."""
    relay = StreamRelay(False)
    assert relay.relay("ping", b'{"type":"ping"}') is None
    assert relay.skipped == 1 and not relay.complete


def test_usage_that_says_it_is_not_the_last_does_not_complete_the_answer():
    reader = sse.ChunkReader()
    early = {"choices": [{"index": 0, "delta": {"content": "a"}}], "usage": {"is_last_response": False}}
    assert reader.chunk("message", json.dumps(early).encode()) is not None and not reader.complete
    last = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    reader.chunk("message", json.dumps(last).encode())
    assert reader.complete

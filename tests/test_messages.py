"""messages.py with plain dicts and bytes: request translation, the event stream, the errors."""

from __future__ import annotations

import json

import pydantic
import pytest
from anthropic.types import Message, RawMessageStreamEvent

from chat import RequestError
from messages import (PING, MessageStream, anthropic_error_body, chat_body, encode_event, error_type,
                      estimate_tokens, parse_messages_request, show_thinking)

STREAM_EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)
TOOL = {"name": "lookup", "description": "Look a word up",
        "input_schema": {"type": "object", "properties": {"word": {"type": "string"}}}}


def parse(body: dict) -> dict:
    return parse_messages_request(json.dumps({"model": "M", "max_tokens": 50, **body}).encode())


def translate(body: dict) -> dict:
    return chat_body(parse(body), "M")


def user(content) -> dict:
    return {"role": "user", "content": content}


def chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if delta is None and finish is None else [
        {"index": 0, "delta": delta or {}, "finish_reason": finish}]
    return {"id": "c1", "object": "chat.completion.chunk", "choices": choices,
            **({"usage": usage} if usage else {})}


def run(chunks: list[dict], thinking: bool = False) -> tuple[list[tuple[str, dict]], MessageStream]:
    stream = MessageStream("M", thinking)
    events = stream.start()
    for c in chunks:
        events += stream.add(c)
    events += stream.finish()
    return events, stream


def validate(events: list[tuple[str, dict]]) -> None:
    for name, payload in events:
        if name != "ping":
            STREAM_EVENT.validate_python(payload)


# --- request -> chat body -------------------------------------------------------------

@pytest.mark.parametrize("system", ["Be brief.", [{"type": "text", "text": "Be brief.", "cache_control": {}}]])
def test_system_string_or_blocks_lead(system):
    chat = translate({"system": system, "messages": [user("hi")]})
    assert chat["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert chat["model"] == "M" and chat["stream"] is True and chat["max_tokens"] == 50


def test_text_and_image_blocks_base64_and_url():
    chat = translate({"messages": [user([
        {"type": "text", "text": "Compare "},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}}])]})
    assert chat["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "Compare "},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]}]
    only_text = translate({"messages": [user([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])]})
    assert only_text["messages"] == [{"role": "user", "content": "ab"}]


def test_tool_use_and_tool_result_blocks():
    chat = translate({"messages": [
        user("Define x"),
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hm", "signature": "s"},
            {"type": "text", "text": "Looking up."},
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"word": "x"}}]},
        user([{"type": "text", "text": "Go on"},
              {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a letter"}]},
              {"type": "tool_result", "tool_use_id": "toolu_2", "content": "boom", "is_error": True}])]})
    assert chat["messages"][1] == {"role": "assistant", "content": "Looking up.", "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": '{"word":"x"}'}}]}
    assert chat["messages"][2:] == [{"role": "tool", "tool_call_id": "toolu_1", "content": "a letter"},
                                    {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: boom"},
                                    {"role": "user", "content": "Go on"}]


def test_tool_result_images_follow_as_a_user_message():
    png = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    chat = translate({"messages": [user([
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "shot:"}, png]}])]})
    assert chat["messages"] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "shot:\n[image 1 follows in the next user message]"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]


def test_tools_and_parameters():
    chat = translate({"messages": [user("x")], "tools": [TOOL], "stop_sequences": ["END"], "temperature": 0.3,
                      "top_p": 0.9, "top_k": 5, "metadata": {"user_id": "u"}})
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "lookup", "parameters": TOOL["input_schema"], "description": "Look a word up"}}]
    assert (chat["stop"], chat["temperature"], chat["top_p"], chat["top_k"]) == (["END"], 0.3, 0.9, 5)
    assert "metadata" not in chat and "tool_choice" not in chat


def test_output_config_format_is_a_json_schema_response_format():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    chat = translate({"messages": [user("x")], "output_config": {"effort": "low",
                                                                  "format": {"type": "json_schema", "schema": schema}}})
    assert chat["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": schema, "strict": True}}


@pytest.mark.parametrize("choice, expected", [
    ({"type": "auto"}, "auto"),
    ({"type": "any"}, "required"),
    ({"type": "none"}, "none"),
    ({"type": "tool", "name": "lookup"}, {"type": "function", "function": {"name": "lookup"}}),
])
def test_tool_choice(choice, expected):
    chat = translate({"messages": [user("x")], "tools": [TOOL], "tool_choice": choice})
    assert chat["tool_choice"] == expected and "parallel_tool_calls" not in chat


def test_disable_parallel_tool_use():
    chat = translate({"messages": [user("x")], "tools": [TOOL],
                      "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}})
    assert chat["parallel_tool_calls"] is False


@pytest.mark.parametrize("thinking, shown", [
    (None, False), ({"type": "enabled", "budget_tokens": 1024}, True), ({"type": "adaptive"}, True),
    ({"type": "disabled"}, False)])
def test_thinking_is_shown_only_when_enabled(thinking, shown):
    assert show_thinking(parse({"messages": [user("x")], "thinking": thinking})) is shown


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [user("x")], "max_tokens": "5"}, "max_tokens"),
    ({"messages": [user("x")], "stream": 1}, "stream"),
    ({"messages": [user("x")], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
    ({"messages": [user("x")], "tools": [{"name": "f"}]}, "tools.0.type"),
    ({"messages": [user("x")], "tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ({"messages": [user([{"type": "document", "source": {}}])]}, "messages.0.content.0.type"),
    ({"messages": [user([{"type": "tool_use", "id": "t", "name": "f", "input": {}}])]}, "messages.0.content.0.type"),
    ({"messages": [user([{"type": "image", "source": {"type": "file", "file_id": "f"}}])]},
     "messages.0.content.0.source"),
    ({"messages": [user([{"type": "tool_result", "tool_use_id": "t",
                          "content": [{"type": "document", "source": {}}]}])]}, "messages.0.content.0.content.0.type"),
    ({"messages": [user("x")], "system": 5}, "system"),
    ({"messages": [user("x")], "mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "mcp_servers"),
    ({"messages": [user("x")], "container": "cntr_1"}, "container"),
    ({"messages": [user("x")], "output_config": {"format": {"type": "regex"}}}, "output_config.format"),
])
def test_refusals_name_the_field(body, param):
    with pytest.raises(RequestError) as refused:
        chat_body(parse(body), "M")
    assert refused.value.param == param and refused.value.message


@pytest.mark.parametrize("raw", [b"{nope", b"[]"])
def test_body_must_be_a_json_object(raw):
    with pytest.raises(RequestError):
        parse_messages_request(raw)


def test_count_tokens_is_an_estimate_that_grows_with_the_request():
    small = estimate_tokens(parse({"messages": [user("hi")]}))
    large = estimate_tokens(parse({"messages": [user("hi " * 1000)], "system": "rules", "tools": [TOOL]}))
    assert 0 < small < large and 700 < large < 1500


# --- chat chunks -> events ------------------------------------------------------------

def test_text_answer_event_sequence_and_message():
    usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    events, stream = run([chunk({"role": "assistant", "content": "Hel"}), chunk({"content": "lo"}),
                          chunk({}, "stop"), chunk(usage=usage)])
    assert [name for name, _ in events] == ["message_start", "ping", "content_block_start",
                                            "content_block_delta", "content_block_delta",
                                            "content_block_stop", "message_delta", "message_stop"]
    validate(events)
    assert events[0][1]["message"]["content"] == [] and events[2][1]["content_block"] == {"type": "text", "text": ""}
    assert [p["delta"] for n, p in events if n == "content_block_delta"] == [
        {"type": "text_delta", "text": "Hel"}, {"type": "text_delta", "text": "lo"}]
    assert events[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                             "usage": {"input_tokens": 9, "output_tokens": 2}}
    message = Message.model_validate(stream.result())
    assert message.content[0].text == "Hello" and message.usage.input_tokens == 9


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_reasoning_becomes_a_thinking_block_when_enabled(key):
    events, stream = run([chunk({key: "Let me "}), chunk({key: "think."}), chunk({"content": "42"}),
                          chunk({}, "stop")], thinking=True)
    validate(events)
    starts = [p["content_block"]["type"] for n, p in events if n == "content_block_start"]
    assert starts == ["thinking", "text"]
    deltas = [p["delta"] for n, p in events if n == "content_block_delta"]
    assert deltas[:2] == [{"type": "thinking_delta", "thinking": "Let me "},
                          {"type": "thinking_delta", "thinking": "think."}]
    assert [p["index"] for n, p in events if n == "content_block_stop"] == [0, 1]
    message = Message.model_validate(stream.result())
    assert message.content[0].thinking == "Let me think." and message.content[1].text == "42"


def test_reasoning_is_left_out_unless_thinking_was_enabled():
    events, stream = run([chunk({"reasoning_content": "secret"}), chunk({"content": "42"}), chunk({}, "stop")])
    assert [block["type"] for block in stream.result()["content"]] == ["text"]
    assert "secret" not in json.dumps(events)


def test_tool_calls_become_tool_use_blocks_with_input_json_deltas():
    events, stream = run([
        chunk({"content": "Checking."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "lookup", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"word":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"name": "lookup", "arguments": "not json"}}]}),
        chunk({}, "tool_calls")])
    validate(events)
    starts = [(p["index"], p["content_block"]) for n, p in events if n == "content_block_start"]
    assert starts[1] == (1, {"type": "tool_use", "id": "call_a", "name": "lookup", "input": {}})
    partial = [p["delta"]["partial_json"] for n, p in events
               if n == "content_block_delta" and p["index"] == 1]
    assert partial == ['{"word":', '"x"}']
    message = Message.model_validate(stream.result())
    assert message.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "input", None)) for b in message.content] == [
        ("text", None), ("tool_use", {"word": "x"}), ("tool_use", {"_raw_arguments": "not json"})]
    assert message.content[2].id.startswith("toolu_")


@pytest.mark.parametrize("finish, reason", [("stop", "end_turn"), ("length", "max_tokens"),
                                            ("tool_calls", "tool_use"), ("content_filter", "refusal"),
                                            ("weird", "end_turn")])
def test_stop_reason_mapping(finish, reason):
    _, stream = run([chunk({"content": "x"}), chunk({}, finish)])
    assert stream.result()["stop_reason"] == reason


def test_failure_after_the_start_is_an_error_event():
    stream = MessageStream("M", False)
    stream.start()
    assert stream.fail(502, "lost") == [("error", {"type": "error",
                                                   "error": {"type": "api_error", "message": "lost"}})]
    assert stream.fail(429, "slow")[0][1]["error"]["type"] == "rate_limit_error"


# --- errors and framing ---------------------------------------------------------------

@pytest.mark.parametrize("status, kind", [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (405, "invalid_request_error"), (413, "request_too_large"),
    (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"), (503, "overloaded_error"),
    (504, "timeout_error")])
def test_error_types_by_status(status, kind):
    assert error_type(status) == kind


def test_error_body_and_event_framing():
    assert anthropic_error_body(429, "slow") == (
        b'{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}')
    assert encode_event("message_stop", {"type": "message_stop"}) == (
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert PING == b'event: ping\ndata: {"type":"ping"}\n\n'

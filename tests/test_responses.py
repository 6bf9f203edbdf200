"""responses.py with plain dicts and bytes: request translation, the event stream, the store."""

from __future__ import annotations

import json

import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from chat import RequestError
from responses import (ResponseStore, ResponseStream, chat_body, encode_event, input_messages,
                       output_messages, parse_responses_request, responses_usage)

STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
TOOL = {"type": "function", "name": "lookup", "description": "Look a word up",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}, "strict": True}


def parse(body: dict) -> dict:
    return parse_responses_request(json.dumps(body).encode())


def translate(body: dict, history: list | None = None) -> dict:
    body = parse(body)
    return chat_body(body, history or [], input_messages(body), body.get("model") or "M")


def chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if delta is None and finish is None else [
        {"index": 0, "delta": delta or {}, "finish_reason": finish}]
    return {"id": "c1", "object": "chat.completion.chunk", "choices": choices,
            **({"usage": usage} if usage else {})}


def run(chunks: list[dict], body: dict | None = None) -> tuple[list[tuple[str, dict]], ResponseStream]:
    stream = ResponseStream(body or {"input": "x"}, "M")
    events = stream.start()
    for c in chunks:
        events += stream.add(c)
    events += stream.finish()
    return events, stream


# --- request -> chat body -------------------------------------------------------------

def test_string_input_and_instructions():
    chat = translate({"model": "DeepSeek-R1", "input": "hi", "instructions": "Be brief."})
    assert chat == {"model": "DeepSeek-R1", "stream": True,
                    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}


def test_message_items_with_text_and_image_parts():
    chat = translate({"input": [
        {"role": "developer", "content": "Rules."},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What is "}, {"type": "input_text", "text": "this?"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Sure?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []}]})
    assert chat["messages"] == [
        {"role": "system", "content": "Rules."},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "this?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                                         "detail": "low"}}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"}]


def test_function_call_and_output_items_become_tool_calls_and_tool_messages():
    chat = translate({"input": [
        {"role": "user", "content": "Define two words"},
        {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": '{"word":"a"}'},
        {"type": "function_call", "call_id": "call_2", "name": "lookup", "arguments": '{"word":"b"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "first"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "sec"}, {"type": "input_text", "text": "ond"}]}]})
    assert chat["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"word":"a"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "lookup", "arguments": '{"word":"b"}'}}]}
    assert chat["messages"][2:] == [{"role": "tool", "tool_call_id": "call_1", "content": "first"},
                                    {"role": "tool", "tool_call_id": "call_2", "content": "second"}]


def test_function_output_images_follow_the_tool_messages_as_a_user_message():
    image = {"type": "input_image", "image_url": "https://example.com/shot.png"}
    chat = translate({"input": [
        {"type": "function_call", "call_id": "call_1", "name": "shot", "arguments": "{}"},
        {"type": "function_call", "call_id": "call_2", "name": "shot", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": [image]},
        {"type": "function_call_output", "call_id": "call_2", "output": "none"},
        {"role": "user", "content": "Compare"}]})
    assert [m["role"] for m in chat["messages"]] == ["assistant", "tool", "tool", "user", "user"]
    assert chat["messages"][1]["content"] == "[image 1 follows in the next user message]"
    assert chat["messages"][3] == {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/shot.png"}}]}


def test_parameters_tools_tool_choice_and_format():
    chat = translate({"input": "x", "temperature": 0.4, "top_p": 0.8, "max_output_tokens": 99,
                      "parallel_tool_calls": False, "metadata": {"k": "v"}, "tools": [TOOL],
                      "tool_choice": {"type": "function", "name": "lookup"},
                      "text": {"format": {"type": "json_schema", "name": "word", "strict": True,
                                          "schema": {"type": "object"}}}})
    assert chat["temperature"] == 0.4 and chat["top_p"] == 0.8 and chat["max_tokens"] == 99
    assert chat["parallel_tool_calls"] is False and "metadata" not in chat
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "lookup", "description": "Look a word up", "parameters": TOOL["parameters"], "strict": True}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "word", "schema": {"type": "object"}, "strict": True}}


@pytest.mark.parametrize("fmt, expected", [
    ({"type": "json_object"}, {"type": "json_object"}),
    ({"type": "text"}, None),
])
def test_text_format_json_object_and_text(fmt, expected):
    assert translate({"input": "x", "text": {"format": fmt}}).get("response_format") == expected


@pytest.mark.parametrize("choice", ["auto", "none", "required"])
def test_string_tool_choices_pass_unchanged(choice):
    assert translate({"input": "x", "tools": [TOOL], "tool_choice": choice})["tool_choice"] == choice


def test_history_comes_before_the_turn_and_instructions_lead():
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"}]
    chat = translate({"input": "two", "instructions": "New rules."}, history)
    assert chat["messages"] == [{"role": "system", "content": "New rules."}, *history,
                                {"role": "user", "content": "two"}]


@pytest.mark.parametrize("raw, param", [
    (b"{nope", None),
    (b"[]", None),
    (b'{"model": "M"}', "input"),
    (b'{"input": 5}', "input"),
    (b'{"input": "x", "background": true}', "background"),
    (b'{"input": "x", "conversation": "conv_1"}', "conversation"),
    (b'{"input": "x", "prompt": {"id": "pmpt_1"}}', "prompt"),
    (b'{"input": "x", "tools": [{"type": "web_search"}]}', "tools[0].type"),
    (b'{"input": "x", "tools": [{"type": "function"}]}', "tools[0].name"),
    (b'{"input": "x", "tool_choice": {"type": "file_search"}}', "tool_choice"),
    (b'{"input": "x", "max_output_tokens": "9"}', "max_output_tokens"),
    (b'{"input": "x", "temperature": true}', "temperature"),
    (b'{"input": "x", "stream": "yes"}', "stream"),
    (b'{"input": [{"type": "item_reference", "id": "msg_1"}]}', "input[0].type"),
    (b'{"input": [{"role": "robot", "content": "x"}]}', "input[0].role"),
    (b'{"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}',
     "input[0].content[0].type"),
    (b'{"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}',
     "input[0].content[0].image_url"),
    (b'{"input": [{"type": "function_call_output", "output": "x"}]}', "input[0].call_id"),
    (b'{"input": "x", "text": {"format": {"type": "grammar"}}}', "text.format.type"),
])
def test_refusals_name_the_field(raw, param):
    with pytest.raises(RequestError) as refused:
        body = parse_responses_request(raw)
        chat_body(body, [], input_messages(body), "M")
    assert refused.value.param == param and refused.value.message


# --- chat chunks -> events ------------------------------------------------------------

def test_text_answer_event_sequence_and_final_object():
    usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9,
             "completion_tokens_details": {"reasoning_tokens": 0}}
    events, stream = run([chunk({"role": "assistant", "content": "Hel"}), chunk({"content": "lo"}),
                          chunk({}, "stop"), chunk(usage=usage)])
    assert [name for name, _ in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert [payload["sequence_number"] for _, payload in events] == list(range(len(events)))
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["output"] == []
    assert events[2][1]["item"]["content"] == [] and events[3][1]["part"]["text"] == ""
    assert events[6][1]["text"] == "Hello"
    for _, payload in events:
        STREAM_EVENT.validate_python(payload)
    final = Response.model_validate(stream.result())
    assert final.status == "completed" and final.output_text == "Hello"
    assert final.usage.input_tokens == 7 and final.usage.output_tokens == 2 and final.usage.total_tokens == 9


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_reasoning_deltas_make_a_reasoning_item_before_the_message(key):
    events, stream = run([chunk({key: "Let me "}), chunk({key: "think."}), chunk({"content": "42"}),
                          chunk({}, "stop")])
    names = [name for name, _ in events]
    assert names.index("response.reasoning_text.done") < names.index("response.output_text.delta")
    deltas = [p["delta"] for n, p in events if n == "response.reasoning_text.delta"]
    assert deltas == ["Let me ", "think."]
    final = Response.model_validate(stream.result())
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "Let me think." and final.output[1].content[0].text == "42"
    assert [p["output_index"] for n, p in events if n == "response.output_item.added"] == [0, 1]


def test_tool_call_chunks_make_function_call_items():
    events, stream = run([
        chunk({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"word":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "lookup", "arguments": "{}"}}]}),
        chunk({}, "tool_calls")])
    for _, payload in events:
        STREAM_EVENT.validate_python(payload)
    deltas = [p["delta"] for n, p in events if n == "response.function_call_arguments.delta"]
    assert deltas == ['{"word":', '"x"}', "{}"]
    done = [p for n, p in events if n == "response.function_call_arguments.done"]
    assert [(p["output_index"], p["arguments"]) for p in done] == [(0, '{"word":"x"}'), (1, "{}")]
    final = Response.model_validate(stream.result())
    assert [(i.type, i.call_id, i.name, i.status) for i in final.output] == [
        ("function_call", "call_a", "lookup", "completed"), ("function_call", "call_b", "lookup", "completed")]
    assert output_messages(stream.result()) == [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": '{"word":"x"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}]


def test_length_finish_is_an_incomplete_response():
    events, stream = run([chunk({"content": "cut"}), chunk({}, "length")])
    assert events[-1][0] == "response.incomplete"
    final = Response.model_validate(stream.result())
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"


def test_failure_after_the_start_is_response_failed():
    stream = ResponseStream({"input": "x"}, "M")
    events = stream.start() + stream.add(chunk({"content": "par"})) + stream.fail(502, "lost")
    name, payload = events[-1]
    assert name == "response.failed" and payload["sequence_number"] == len(events) - 1
    STREAM_EVENT.validate_python(payload)
    assert payload["response"]["error"] == {"code": "server_error", "message": "lost"}
    assert stream.fail(429, "slow")[0][1]["response"]["error"]["code"] == "rate_limit_exceeded"


def test_request_echo_in_the_response_object():
    body = parse({"input": "x", "instructions": "I", "metadata": {"k": "v"}, "tools": [TOOL],
                  "tool_choice": "required", "temperature": 0.1, "previous_response_id": "resp_0"})
    final = Response.model_validate(run([chunk({}, "stop")], body)[1].result())
    assert (final.instructions, final.metadata, final.tool_choice, final.temperature) == ("I", {"k": "v"},
                                                                                          "required", 0.1)
    assert final.tools[0].name == "lookup" and final.previous_response_id == "resp_0"


def test_usage_shape_defaults_to_zeros():
    assert responses_usage(None) == {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0,
                                                                                 "cache_write_tokens": 0},
                                     "output_tokens": 0, "output_tokens_details": {"reasoning_tokens": 0},
                                     "total_tokens": 0}
    usage = responses_usage({"prompt_tokens": 3, "completion_tokens": 5,
                             "prompt_tokens_details": {"cached_tokens": 2},
                             "completion_tokens_details": {"reasoning_tokens": 4}})
    assert usage["total_tokens"] == 8 and usage["input_tokens_details"]["cached_tokens"] == 2
    assert usage["output_tokens_details"]["reasoning_tokens"] == 4


def test_encode_event_names_the_event():
    assert encode_event("response.created", {"type": "response.created", "sequence_number": 0}) == (
        b'event: response.created\ndata: {"type":"response.created","sequence_number":0}\n\n')


# --- the store ------------------------------------------------------------------------

def stored(response_id: str, text: str = "x") -> dict:
    return {"id": response_id, "output": [], "note": text}


def test_store_keeps_and_forgets_least_recently_used_first():
    store = ResponseStore(2)
    store.put(stored("a"), [{"role": "user", "content": "A"}])
    store.put(stored("b"), [])
    assert store.conversation("a") == [{"role": "user", "content": "A"}]  # a is now the most recent
    store.put(stored("c"), [])
    assert store.response("b") is None and json.loads(store.response("a"))["id"] == "a"
    assert store.delete("a") and not store.delete("a") and len(store) == 1


def test_store_is_bounded_in_bytes_and_refuses_a_too_large_entry():
    store = ResponseStore(100, max_bytes=300)
    for name in "abcd":
        assert store.put(stored(name, "y" * 60), [])
    assert store.bytes <= 300 and store.response("a") is None and store.response("d") is not None
    assert not store.put(stored("huge", "z" * 400), [])
    assert store.response("huge") is None and store.bytes <= 300


def test_store_of_size_zero_keeps_nothing():
    store = ResponseStore(0)
    assert not store.put(stored("a"), []) and store.response("a") is None

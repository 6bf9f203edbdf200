"""End to end: the official openai (Responses) and anthropic (Messages) SDKs -> the proxy -> the fake."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from conftest import AUTH, CLIENT_KEY
from fake_samba import Reply

MODEL = "Meta-Llama-3.3-70B-Instruct"
R1 = "DeepSeek-R1"
STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL = [{"id": "call_w1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]


def openai_sdk(app):
    return openai.AsyncOpenAI(base_url=f"{app.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=10)


def anthropic_sdk(app, **auth):
    auth = auth or {"api_key": CLIENT_KEY}
    return anthropic.AsyncAnthropic(base_url=app.url, max_retries=0, timeout=10, **auth)


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event name, payload) of every event of an SSE body."""
    events = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in lines:
            events.append((lines.get("event"), json.loads(lines["data"])))
    return events


def upstream_messages(fake) -> list[dict]:
    return fake.completions[-1]["json"]["body"]["messages"]


# --- Responses API --------------------------------------------------------------------

async def test_responses_create_is_a_strict_response_object(proxy, fake):
    response = await openai_sdk(proxy).responses.create(model=MODEL, input="hello",
                                                         instructions="Be brief.", temperature=0.2)
    assert response.output_text == "Echo: hello" and response.status == "completed"
    assert response.usage.input_tokens > 0 and response.usage.total_tokens > response.usage.input_tokens
    sent = fake.completions[-1]["json"]["body"]
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert sent["temperature"] == 0.2
    async with httpx.AsyncClient(timeout=10) as client:
        raw = await client.post(f"{proxy.url}/v1/responses", headers=AUTH, json={"model": MODEL, "input": "hi"})
    strict = Response.model_validate(raw.json())
    assert strict.model == MODEL and strict.output[0].type == "message"
    assert strict.output[0].content[0].text == "Echo: hi"


async def test_responses_stream_is_the_event_sequence_with_sequence_numbers(proxy, fake):
    fake.script.append(Reply(reasoning="Think first.", text="Then answer."))
    stream = await openai_sdk(proxy).responses.create(model=R1, input="q", stream=True)
    events = [event async for event in stream]
    for event in events:
        STREAM_EVENT.validate_python(event.model_dump(mode="json", exclude_unset=True))
    names = [event.type for event in events]
    assert names[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert names[-1] == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert (reasoning, text) == ("Think first.", "Then answer.")
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "Think first." and final.output_text == "Then answer."


async def test_responses_stream_wire_names_each_event(proxy):
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{proxy.url}/v1/responses", headers=AUTH,
                              json={"model": MODEL, "input": "x", "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert all(name == payload["type"] for name, payload in events)
    assert [name for name, _ in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]


async def test_responses_function_call_round_trip(proxy, fake):
    client = openai_sdk(proxy)
    fake.script.append(Reply(tool_calls=CALL))
    first = await client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER])
    call = first.output[0]
    assert call.type == "function_call" and call.call_id == "call_w1" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert fake.completions[-1]["json"]["body"]["tools"][0]["function"]["name"] == "get_weather"
    fake.script.append(Reply(text="It is sunny."))
    second = await client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"}])
    assert second.output_text == "It is sunny." and second.previous_response_id == first.id
    messages = upstream_messages(fake)
    assert messages[0] == {"role": "user", "content": "Weather in Paris?"}
    assert messages[1]["role"] == "assistant" and messages[1]["tool_calls"][0]["id"] == "call_w1"
    assert messages[2] == {"role": "tool", "tool_call_id": "call_w1", "content": "sunny, 21C"}


async def test_responses_function_call_stream_events(proxy, fake):
    fake.script.append(Reply(tool_calls=CALL))
    stream = await openai_sdk(proxy).responses.create(model=MODEL, input="w?", tools=[WEATHER], stream=True)
    events = [event async for event in stream]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(deltas) == {"city": "Paris"} and done[0].arguments == deltas
    assert events[-1].response.output[0].call_id == "call_w1"


async def test_responses_chain_by_previous_response_id_then_get_and_delete(proxy, fake):
    client = openai_sdk(proxy)
    first = await client.responses.create(model=MODEL, input="one", instructions="Old rules.")
    second = await client.responses.create(model=MODEL, input="two", previous_response_id=first.id)
    assert upstream_messages(fake) == [{"role": "user", "content": "one"},
                                       {"role": "assistant", "content": "Echo: one"},
                                       {"role": "user", "content": "two"}]
    third = await client.responses.create(model=MODEL, input="three", previous_response_id=second.id)
    assert [m["content"] for m in upstream_messages(fake)] == ["one", "Echo: one", "two", "Echo: two", "three"]
    fetched = await client.responses.retrieve(third.id)
    assert fetched.id == third.id and fetched.output_text == "Echo: three"
    await client.responses.delete(third.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(third.id)
    with pytest.raises(openai.NotFoundError) as missing:
        await client.responses.create(model=MODEL, input="x", previous_response_id=third.id)
    assert missing.value.body["param"] == "previous_response_id"


async def test_responses_store_false_keeps_nothing(proxy):
    client = openai_sdk(proxy)
    response = await client.responses.create(model=MODEL, input="secret", store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)


async def test_responses_store_is_bounded_by_its_setting(fake, start_proxy):
    app = await start_proxy(fake, RESPONSES_STORE_SIZE="2")
    client = openai_sdk(app)
    ids = [(await client.responses.create(model=MODEL, input=f"n{i}")).id for i in range(3)]
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(ids[0])
    assert (await client.responses.retrieve(ids[2])).id == ids[2]


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"background": True}, "background"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
])
async def test_responses_unsupported_features_are_400_naming_the_field(proxy, fake, extra, param):
    with pytest.raises(openai.BadRequestError) as refused:
        await openai_sdk(proxy).responses.create(**{"model": MODEL, "input": "x", **extra})
    assert refused.value.body["param"] == param and refused.value.body["type"] == "invalid_request_error"
    assert not fake.completions


async def test_responses_upstream_failure_mid_stream_is_response_failed(proxy, fake):
    fake.script.append(Reply(text="one two three four", error_event_after=2))
    stream = await openai_sdk(proxy).responses.create(model=MODEL, input="x", stream=True)
    events = [event async for event in stream]
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed" and events[-1].response.error.code == "server_error"
    for event in events:
        STREAM_EVENT.validate_python(event.model_dump(mode="json", exclude_unset=True))


async def test_responses_upstream_errors_before_the_answer_are_plain_http_errors(proxy, fake):
    fake.script.extend([Reply(status=429), Reply(status=429), Reply(status=429)])
    with pytest.raises(openai.RateLimitError):
        await openai_sdk(proxy).responses.create(model=MODEL, input="x", stream=True)
    fake.script.append(Reply(text="a b c", error_event_after=1))
    with pytest.raises(openai.InternalServerError) as failed:
        await openai_sdk(proxy).responses.create(model=MODEL, input="x")
    assert failed.value.status_code == 502


# --- Messages API ---------------------------------------------------------------------

async def test_messages_create_and_stream(proxy, fake):
    client = anthropic_sdk(proxy)
    message = await client.messages.create(model=MODEL, max_tokens=64, system="Be brief.",
                                           messages=[{"role": "user", "content": "hello"}],
                                           stop_sequences=["END"], extra_body={"temperature": 0.5})
    assert message.content[0].text == "Echo: hello" and message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    sent = fake.completions[-1]["json"]["body"]
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["max_tokens"] == 64 and sent["stop"] == ["END"] and sent["temperature"] == 0.5
    async with client.messages.stream(model=MODEL, max_tokens=64,
                                      messages=[{"role": "user", "content": "again"}]) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Echo: again" == final.content[0].text and final.usage.output_tokens > 0


async def test_messages_stream_wire_sequence(proxy):
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{proxy.url}/v1/messages", headers={"x-api-key": CLIENT_KEY,
                                                                   "anthropic-version": "2023-06-01"},
                              json={"model": MODEL, "max_tokens": 10, "stream": True,
                                    "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    assert [name for name, _ in sse_events(r.text)] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]


async def test_messages_tool_use_round_trip(proxy, fake):
    client = anthropic_sdk(proxy)
    tools = [{"name": "get_weather", "description": "Weather of a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    question = {"role": "user", "content": "Weather in Paris?"}
    fake.script.append(Reply(tool_calls=CALL))
    async with client.messages.stream(model=MODEL, max_tokens=64, tools=tools, messages=[question],
                                      tool_choice={"type": "any"}) as stream:
        first = await stream.get_final_message()
    use = first.content[0]
    assert first.stop_reason == "tool_use" and use.type == "tool_use"
    assert (use.id, use.name, use.input) == ("call_w1", "get_weather", {"city": "Paris"})
    assert fake.completions[-1]["json"]["body"]["tool_choice"] == "required"
    fake.script.append(Reply(text="Sunny."))
    answer = await client.messages.create(model=MODEL, max_tokens=64, tools=tools, messages=[
        question, {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21C"},
                                     {"type": "text", "text": "Thanks"}]}])
    assert answer.content[0].text == "Sunny."
    messages = upstream_messages(fake)
    assert messages[1]["tool_calls"][0]["id"] == "call_w1"
    assert json.loads(messages[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert messages[2:] == [{"role": "tool", "tool_call_id": "call_w1", "content": "21C"},
                            {"role": "user", "content": "Thanks"}]


async def test_messages_thinking_blocks_from_a_deepseek_r1_answer(proxy, fake):
    client = anthropic_sdk(proxy)
    ask = {"model": R1, "max_tokens": 200, "thinking": {"type": "enabled", "budget_tokens": 100},
           "messages": [{"role": "user", "content": "2+2?"}]}
    fake.script.append(Reply(reasoning="Two and two make four.", text="4"))
    async with client.messages.stream(**ask) as stream:
        thinking = "".join([e.thinking async for e in stream if e.type == "thinking"])
        final = await stream.get_final_message()
    assert thinking == "Two and two make four."
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == thinking and final.content[1].text == "4"
    fake.script.append(Reply(reasoning="Quietly.", text="4"))
    whole = await client.messages.create(**ask)
    assert [(b.type, getattr(b, "thinking", None)) for b in whole.content] == [("thinking", "Quietly."),
                                                                               ("text", None)]
    fake.script.append(Reply(reasoning="Not asked for.", text="4"))
    plain = await client.messages.create(**{**ask, "thinking": {"type": "disabled"}})
    assert [block.type for block in plain.content] == ["text"]


async def test_messages_upstream_429_is_anthropic_rate_limit_error(proxy, fake):
    fake.script.extend([Reply(status=429, headers={"retry-after": "0"})] * 3)
    with pytest.raises(anthropic.RateLimitError) as limited:
        await anthropic_sdk(proxy).messages.create(model=MODEL, max_tokens=5,
                                                   messages=[{"role": "user", "content": "x"}])
    assert limited.value.body == {"type": "error", "error": {
        "type": "rate_limit_error", "message": limited.value.body["error"]["message"]}}
    assert "rate limit" in limited.value.body["error"]["message"].lower()


async def test_messages_auth_by_x_api_key_or_bearer_with_anthropic_errors(proxy, fake):
    ask = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    assert (await anthropic_sdk(proxy, auth_token=CLIENT_KEY).messages.create(**ask)).content
    with pytest.raises(anthropic.AuthenticationError) as refused:
        await anthropic_sdk(proxy, api_key="sk-wrong-4e1b").messages.create(**ask)
    assert refused.value.body["error"]["type"] == "authentication_error"
    assert "sk-wrong-4e1b" not in json.dumps(refused.value.body)
    async with httpx.AsyncClient(timeout=10) as client:
        chat = await client.post(f"{proxy.url}/v1/chat/completions", headers={"x-api-key": CLIENT_KEY},
                                 json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        missing = await client.post(f"{proxy.url}/v1/messages/batches", headers={"x-api-key": CLIENT_KEY},
                                    json=ask)
        bad = await client.post(f"{proxy.url}/v1/messages", headers={"x-api-key": CLIENT_KEY},
                                content=b"{not json")
    assert chat.status_code == 401 and chat.json()["error"]["code"] == "invalid_api_key"
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert bad.status_code == 400 and bad.json()["type"] == "error"
    assert bad.json()["error"]["type"] == "invalid_request_error"


async def test_messages_count_tokens_is_an_estimate_made_locally(proxy, fake):
    client = anthropic_sdk(proxy)
    short = await client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    long = await client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi " * 400}])
    assert 0 < short.input_tokens < long.input_tokens
    assert not fake.completions


async def test_messages_upstream_failure_mid_stream_is_an_error_event(proxy, fake):
    fake.script.append(Reply(text="one two three four", error_event_after=2))
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{proxy.url}/v1/messages", headers=AUTH,
                              json={"model": MODEL, "max_tokens": 10, "stream": True,
                                    "messages": [{"role": "user", "content": "x"}]})
    name, payload = sse_events(r.text)[-1]
    assert name == "error" and payload["type"] == "error" and payload["error"]["type"] == "api_error"
    with pytest.raises(anthropic.APIStatusError):
        fake.script.append(Reply(text="one two three four", error_event_after=2))
        async with anthropic_sdk(proxy).messages.stream(model=MODEL, max_tokens=10,
                                                        messages=[{"role": "user", "content": "x"}]) as s:
            await s.get_final_message()


@pytest.mark.parametrize("path, body", [
    ("/v1/messages", {"model": MODEL, "max_tokens": 10, "stream": True,
                      "messages": [{"role": "user", "content": "x"}]}),
    ("/v1/responses", {"model": MODEL, "input": "x", "stream": True}),
])
async def test_client_departure_closes_the_upstream_answer(proxy, fake, path, body):
    fake.script.append(Reply(text="one two three", stall_after=2))
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream("POST", f"{proxy.url}{path}", headers=AUTH, json=body) as r:
            async for _ in r.aiter_bytes():
                break
    await fake.wait_for(lambda f: f.disconnects == 1 and f.open_streams == 0)


# --- both: keep-alives and failures after the 200 -------------------------------------

MESSAGES_BODY = {"model": MODEL, "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "x"}]}
RESPONSES_BODY = {"model": MODEL, "input": "x", "stream": True}


@pytest.mark.parametrize("path, body, ping", [
    ("/v1/messages", MESSAGES_BODY, "event: ping\ndata: {\"type\":\"ping\"}\n\n"),
    ("/v1/responses", RESPONSES_BODY, ": keep-alive\n\n"),
])
async def test_keepalive_during_upstream_silence(fake, start_proxy, path, body, ping):
    app = await start_proxy(fake, SSE_KEEPALIVE="0.1")
    fake.script.append(Reply(text="slow answer", delay=0.5))
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{app.url}{path}", headers=AUTH, json=body)
    start = r.text.index("slow")
    assert ping in r.text[start:]  # sent while upstream paused between its chunks
    assert r.text.count(ping) >= 1 + (path == "/v1/messages")


@pytest.mark.parametrize("reply", [Reply(drop_after=0), Reply(text="a b", done=False, usage=False)],
                         ids=["dropped-before-any-chunk", "ended-without-done"])
@pytest.mark.parametrize("path, body, last", [
    ("/v1/messages", MESSAGES_BODY, "error"),
    ("/v1/responses", RESPONSES_BODY, "response.failed"),
])
async def test_failure_after_the_200_ends_the_stream_with_the_api_failure_event(proxy, fake, reply, path,
                                                                                 body, last):
    fake.script.append(reply)
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{proxy.url}{path}", headers=AUTH, json=body)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1][0] == last and events[0][0] in ("message_start", "response.created")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("path, body", [("/v1/messages", MESSAGES_BODY), ("/v1/responses", RESPONSES_BODY)])
@pytest.mark.parametrize("reply", [Reply(text="a b", done=False),
                                   Reply(text="a b", after_events="linger")],
                         ids=["usage-then-eof", "done-then-linger"])
async def test_the_usage_chunk_or_done_completes_these_answers_too(fake, start_proxy, path, body, stream, reply):
    """As for chat completions: once usage (or [DONE]) has arrived, what upstream does next changes nothing."""
    app = await start_proxy(fake, UPSTREAM_READ_TIMEOUT="60")
    fake.script.append(reply)
    async with httpx.AsyncClient(timeout=20) as client:
        r = await client.post(f"{app.url}{path}", headers=AUTH, json={**body, "stream": stream})
    assert r.status_code == 200
    if stream:
        names = [name for name, _ in sse_events(r.text)]
        assert names[-1] in ("message_stop", "response.completed") and "error" not in names
        assert "response.failed" not in names
    else:
        answer = r.json()
        assert answer.get("stop_reason") == "end_turn" or answer.get("status") == "completed"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/messages", {**MESSAGES_BODY, "system": [{"type": "text", "text": 5}]}, "system[0].text"),
    ("/v1/responses", {"model": MODEL, "input": [{"type": "message", "role": ["user"], "content": "x"}]},
     "input[0].role"),
])
async def test_malformed_fields_of_these_apis_are_400_naming_them(proxy, path, body, param):
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{proxy.url}{path}", headers=AUTH, json=body)
    assert r.status_code == 400
    assert param in r.text

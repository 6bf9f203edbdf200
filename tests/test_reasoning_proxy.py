"""End to end: thinking in `reasoning_content`, as content, or hidden, per REASONING_FORMAT and request."""

from __future__ import annotations

import json

import httpx
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from conftest import AUTH
from fake_samba import Reply
from test_proxy import sdk, sse_data

HI = [{"role": "user", "content": "hi"}]
THOUGHT = "The user wrote: hi. I will echo it.\n"
R1_TEXT = f"<think>\n{THOUGHT}</think>\n\nEcho: hi"     # what the fake's DeepSeek-R1 says
R1_0528_TEXT = f"{THOUGHT}</think>\n\nEcho: hi"          # only the closing tag


async def ask(app, stream: bool, **body) -> tuple[dict, list[dict]]:
    """POST a chat completion; (the completion, or the chunks), each checked against the SDK's types."""
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{app.url}/v1/chat/completions", headers=AUTH,
                              json={"messages": HI, "stream": stream, **body})
    assert r.status_code == 200, r.text
    if not stream:
        ChatCompletion.model_validate(r.json(), strict=True)
        return r.json(), []
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk, strict=True)
    return {}, chunks


def parts(completion: dict, chunks: list[dict]) -> tuple[str | None, str]:
    """(reasoning_content or None, content) of a completion or of a stream's chunks joined."""
    if completion:
        message = completion["choices"][0]["message"]
        return message.get("reasoning_content"), message["content"]
    deltas = [c["delta"] for chunk in chunks for c in chunk["choices"]]
    reasoning = [d["reasoning_content"] for d in deltas if d.get("reasoning_content") is not None]
    return ("".join(reasoning) if reasoning else None), "".join(d.get("content") or "" for d in deltas)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model, settings", [
    ("DeepSeek-R1", {}), ("DeepSeek-R1-0528", {"REASONING_MODELS": "DeepSeek-R1*"}),
], ids=["both tags", "close only"])
@pytest.mark.parametrize("format, expected", [
    ("parsed", ("\n" + THOUGHT, "Echo: hi")),
    ("hidden", (None, "Echo: hi")),
    ("raw", (None, None)),
])
async def test_thinking_per_format(fake, start_proxy, model, settings, format, expected, stream):
    app = await start_proxy(fake, REASONING_FORMAT=format, **settings)
    reasoning, content = expected
    if format == "raw":
        content = R1_TEXT if model == "DeepSeek-R1" else R1_0528_TEXT
    if reasoning is not None and model == "DeepSeek-R1-0528":
        reasoning = THOUGHT  # no opening tag, so no newline after one
    assert parts(*await ask(app, stream, model=model)) == (reasoning, content)


async def test_sdk_reads_reasoning_content_stream_and_whole(proxy):
    client = sdk(proxy)
    whole = await client.chat.completions.create(model="DeepSeek-R1", messages=HI)
    assert whole.choices[0].message.content == "Echo: hi"
    assert whole.choices[0].message.reasoning_content == "\n" + THOUGHT
    stream = await client.chat.completions.create(model="DeepSeek-R1", messages=HI, stream=True)
    chunks = [c async for c in stream]
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                   for c in chunks if c.choices) == "\n" + THOUGHT
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: hi"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_close_tag_alone_is_content_without_reasoning_models(proxy, stream):
    assert parts(*await ask(proxy, stream, model="DeepSeek-R1-0528")) == (None, R1_0528_TEXT)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_plain_answer_is_unchanged(proxy, fake, stream):
    completion, chunks = await ask(proxy, stream, model="Meta-Llama-3.3-70B-Instruct")
    assert parts(completion, chunks) == (None, "Echo: hi")
    assert "reasoning_content" not in json.dumps([completion, chunks])


async def test_per_request_format_overrides_the_setting(fake, start_proxy):
    app = await start_proxy(fake, REASONING_FORMAT="raw")
    client = sdk(app)
    raw = await client.chat.completions.create(model="DeepSeek-R1", messages=HI)
    hidden = await client.chat.completions.create(model="DeepSeek-R1", messages=HI,
                                                  extra_body={"reasoning_format": "hidden"})
    stream = await client.chat.completions.create(model="DeepSeek-R1", messages=HI, stream=True,
                                                  extra_body={"reasoning_format": "parsed"})
    chunks = [c async for c in stream]
    assert raw.choices[0].message.content == R1_TEXT
    assert hidden.choices[0].message.content == "Echo: hi"
    assert getattr(hidden.choices[0].message, "reasoning_content", None) is None
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: hi"
    assert all("reasoning_format" not in c["json"]["body"] for c in fake.completions)


@pytest.mark.parametrize("value", ["verbose", 1, ["parsed"]])
async def test_invalid_reasoning_format_is_400_naming_it(proxy, fake, value):
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{proxy.url}/v1/chat/completions", headers=AUTH,
                              json={"messages": HI, "reasoning_format": value})
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_format"
    assert not fake.completions


def _chunk(delta: dict, finish: str | None = None) -> dict:
    return {"id": "5c3e9a", "object": "chat.completion.chunk", "created": 1732700000.25,
            "model": "DeepSeek-R1", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


SPLIT_TAGS = ["<th", "ink>Wei", "ghing.</thi", "nk>", "\n", "\nYes", ".", "</think>"]
USAGE = {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_tags_split_across_chunks(proxy, fake, stream):
    chunks = [_chunk({"content": piece}, "stop" if i == len(SPLIT_TAGS) - 1 else None)
              for i, piece in enumerate(SPLIT_TAGS)]
    fake.script.append(Reply(chunks=[*chunks, {**_chunk({}), "choices": [], "usage": USAGE}]))
    completion, out = await ask(proxy, stream, model="DeepSeek-R1",
                                stream_options={"include_usage": True} if stream else None)
    assert parts(completion, out) == ("Weighing.", "Yes.</think>")
    usage = completion["usage"] if completion else out[-1]["usage"]
    assert usage == USAGE


@pytest.mark.parametrize("format, expected", [
    ("parsed", ("Hmm.", "Yes.")),
    ("raw", (None, "<think>Hmm.</think>\n\nYes.")),
    ("hidden", (None, "Yes.")),
])
@pytest.mark.parametrize("key", ["reasoning", "reasoning_content"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_upstream_reasoning_fields(proxy, fake, key, format, expected, stream):
    fake.script.append(Reply(chunks=[_chunk({"role": "assistant", key: "Hm"}), _chunk({key: "m."}),
                                     _chunk({"content": "Yes."}, "stop")]))
    completion, chunks = await ask(proxy, stream, model="DeepSeek-V3-0324", reasoning_format=format)
    assert parts(completion, chunks) == expected
    assert '"reasoning"' not in json.dumps([completion, chunks])


async def test_reasoning_model_without_close_tag(fake, start_proxy):
    # Streamed, the text is reasoning as it comes; whole, with no </think> at all it is the answer.
    app = await start_proxy(fake, REASONING_MODELS="deepseek-r1-0528")
    fake.script.extend([Reply(text="Just an answer."), Reply(text="Just an answer.")])
    assert parts(*await ask(app, False, model="DeepSeek-R1-0528")) == (None, "Just an answer.")
    assert parts(*await ask(app, True, model="DeepSeek-R1-0528")) == ("Just an answer.", "")


async def test_responses_and_messages_get_the_split_too(fake, start_proxy):
    anthropic = pytest.importorskip("anthropic")
    app = await start_proxy(fake, MODEL_ALIASES="claude-sonnet-4-0=deepseek-r1")
    answer = await sdk(app).responses.create(model="deepseek-r1", input="hi")
    assert [item.type for item in answer.output] == ["reasoning", "message"]
    assert answer.output[0].content[0].text == "\n" + THOUGHT and answer.output_text == "Echo: hi"
    client = anthropic.AsyncAnthropic(base_url=app.url, api_key="x", max_retries=0, timeout=10,
                                      default_headers=AUTH)
    message = await client.messages.create(model="claude-sonnet-4-0", max_tokens=100, messages=HI,
                                           thinking={"type": "enabled", "budget_tokens": 50})
    assert [(b.type, getattr(b, "thinking", None)) for b in message.content] == [
        ("thinking", "\n" + THOUGHT), ("text", None)]
    assert message.content[1].text == "Echo: hi" and message.model == "claude-sonnet-4-0"
    assert fake.completions[-1]["json"]["body"]["model"] == "DeepSeek-R1"

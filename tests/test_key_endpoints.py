"""The official API's other endpoints, forwarded with SAMBANOVA_API_KEY (passthrough.py), end to end."""

from __future__ import annotations

import json
import os

import httpx
import openai
import pytest
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.audio import Transcription, Translation

from conftest import AUTH
from fake_samba import Reply, parse_form
from test_proxy import sdk, sse_data

KEY_ONLY = {"SAMBA_EMAIL": "", "SAMBA_PASSWORD": "", "SAMBANOVA_API_KEY": "fake-api-key"}
PATHS = ["/v1/embeddings", "/v1/completions", "/v1/audio/transcriptions", "/v1/audio/translations"]
BOUNDARY = "sambaproxy-test-8f2c41d7e9a04b6b"


def form(fields: dict[str, bytes], audio: bytes) -> bytes:
    """A multipart/form-data body with the given fields, then the audio file."""
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
             for name, value in fields.items()]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                 'Content-Type: audio/wav\r\n\r\n'.encode() + audio + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


async def known_models(app) -> None:
    """Have the proxy fetch the model list (as front ends do first): names then match in any case."""
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(f"{app.url}/v1/models", headers=AUTH)).status_code == 200


def upload_kwargs(path: str) -> dict:
    """What one request to `path` sends, as httpx keyword arguments."""
    if path.startswith("/v1/audio/"):
        return {"content": form({"model": b"Whisper-Large-v3"}, b"RIFF" + bytes(100)),
                "headers": {**AUTH, "content-type": f"multipart/form-data; boundary={BOUNDARY}"}}
    body = {"model": "E5-Mistral-7B-Instruct", "input": "hi"} if path == "/v1/embeddings" else \
        {"model": "Meta-Llama-3.1-8B-Instruct", "prompt": "hi"}
    return {"json": body, "headers": AUTH}


async def test_embeddings_through_the_sdk(fake, start_proxy):
    app = await start_proxy(fake, **KEY_ONLY, MODEL_ALIASES="text-embedding-3-small=E5-Mistral-7B-Instruct")
    await known_models(app)
    answer = await sdk(app).embeddings.create(model="text-embedding-3-small", input=["one", "two words"],
                                              encoding_format="float")
    assert answer.model == "text-embedding-3-small" and [d.index for d in answer.data] == [0, 1]
    assert len(answer.data[1].embedding) == 8 and answer.usage.total_tokens == 3
    sent = fake.completions[-1]
    assert sent["path"] == "/v1/embeddings" and sent["json"]["model"] == "E5-Mistral-7B-Instruct"
    assert sent["headers"]["authorization"] == "Bearer fake-api-key"
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{app.url}/v1/embeddings", headers=AUTH,
                              json={"model": "e5-mistral-7b-instruct", "input": "hi"})
    CreateEmbeddingResponse.model_validate(r.json(), strict=True)
    assert r.json()["model"] == "e5-mistral-7b-instruct"
    assert fake.completions[-1]["json"]["model"] == "E5-Mistral-7B-Instruct"


async def test_legacy_completions_stream_and_not(fake, start_proxy):
    app = await start_proxy(fake, **KEY_ONLY)
    client = sdk(app)
    whole = await client.completions.create(model="meta-llama-3.1-8b-instruct", prompt="say hi")
    assert whole.choices[0].text == "Completion of: say hi" and whole.model == "meta-llama-3.1-8b-instruct"
    assert fake.completions[-1]["json"]["model"] == "Meta-Llama-3.1-8B-Instruct"
    stream = await client.completions.create(model="Meta-Llama-3.1-8B-Instruct", prompt="say hi", stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Completion of: say hi"
    assert all(c.usage is None for c in chunks)  # not asked for: upstream's usage chunk is dropped
    async with httpx.AsyncClient(timeout=10) as raw:
        r = await raw.post(f"{app.url}/v1/completions", headers=AUTH,
                           json={"model": "Meta-Llama-3.1-8B-Instruct", "prompt": "x", "stream": True,
                                 "stream_options": {"include_usage": True}})
        w = await raw.post(f"{app.url}/v1/completions", headers=AUTH,
                           json={"model": "Meta-Llama-3.1-8B-Instruct", "prompt": "x"})
    data = sse_data(r.text)
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    events = [json.loads(event) for event in data[:-1]]
    # OpenAI's own legacy stream chunks carry finish_reason null, which its Completion type
    # refuses: those are checked field by field, the others against the type.
    for event in events:
        if all(choice["finish_reason"] is not None for choice in event["choices"]):
            Completion.model_validate(event, strict=True)
        else:
            assert type(event["created"]) is int and event["object"] == "text_completion"
            assert event["model"] == "Meta-Llama-3.1-8B-Instruct" and event["id"] == events[0]["id"]
    assert json.loads(data[-2])["usage"]["total_tokens"] > 0
    Completion.model_validate(w.json(), strict=True)


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks translations so
@pytest.mark.parametrize("kind", ["transcriptions", "translations"])
async def test_audio_through_the_sdk(fake, start_proxy, kind):
    app = await start_proxy(fake, **KEY_ONLY)
    await known_models(app)
    audio = os.urandom(2000)
    endpoint = getattr(sdk(app).audio, kind)
    answer = await endpoint.create(model="whisper-large-v3", file=("a.wav", audio, "audio/wav"))
    assert answer.text.startswith(f"{kind[:-1]} of 2000 bytes") and answer.text.endswith("by Whisper-Large-v3")
    text = await endpoint.create(model="Whisper-Large-v3", file=("a.wav", audio), response_format="text")
    assert text.startswith(f"{kind[:-1]} of 2000 bytes")
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{app.url}/v1/audio/{kind}", **upload_kwargs(f"/v1/audio/{kind}"))
    (Transcription if kind == "transcriptions" else Translation).model_validate(r.json(), strict=True)


@pytest.mark.parametrize("model, upstream_model", [
    (b"Whisper-Large-v3", b"Whisper-Large-v3"), (b"whisper", b"Whisper-Large-v3")])
async def test_five_megabyte_upload_goes_through_byte_for_byte(fake, start_proxy, model, upstream_model):
    app = await start_proxy(fake, **KEY_ONLY, MODEL_ALIASES="whisper=Whisper-Large-v3")
    audio = os.urandom(5 * 1024 * 1024)
    body = form({"language": b"en", "model": model, "response_format": b"json"}, audio)
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{app.url}/v1/audio/transcriptions", content=body,
                              headers={**AUTH, "content-type": content_type})
    assert r.status_code == 200, r.text
    received = fake.uploads[-1]
    assert received["content_type"] == content_type
    expected = body.replace(b'"model"\r\n\r\n' + model + b"\r\n", b'"model"\r\n\r\n' + upstream_model + b"\r\n")
    assert received["body"] == expected
    assert parse_form(received["body"], content_type)["file"][1] == audio


@pytest.mark.parametrize("path", PATHS)
async def test_rate_limit_with_retry_after_is_retried(fake, start_proxy, path):
    app = await start_proxy(fake, **KEY_ONLY)
    fake.script.append(Reply(status=429, headers={"retry-after": "1"}))
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{app.url}{path}", **upload_kwargs(path))
    assert r.status_code == 200, r.text
    assert [c["path"] for c in fake.completions] == [path, path]


async def test_rate_limit_after_retries_is_429_with_retry_after(fake, start_proxy):
    app = await start_proxy(fake, **KEY_ONLY)
    fake.script.extend(Reply(status=429, headers={"retry-after": "9"}) for _ in range(3))
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{app.url}/v1/embeddings", **upload_kwargs("/v1/embeddings"))
    assert r.status_code == 429 and r.headers["retry-after"] == "9"
    assert r.json()["error"]["type"] == "rate_limit_error" and len(fake.completions) == 3


@pytest.mark.parametrize("status, expected", [(500, 502), (400, 400)])
async def test_upstream_errors_are_mapped_as_for_chat(fake, start_proxy, status, expected):
    app = await start_proxy(fake, **KEY_ONLY)
    fake.script.append(Reply(status=status))
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{app.url}/v1/completions", **upload_kwargs("/v1/completions"))
    assert r.status_code == expected and set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("path", PATHS)
async def test_without_an_api_key_each_endpoint_is_404_saying_so(proxy, fake, path):
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{proxy.url}{path}", **upload_kwargs(path))
        anonymous = await client.post(f"{proxy.url}{path}", json={})
    assert r.status_code == 404 and "SAMBANOVA_API_KEY" in r.json()["error"]["message"]
    assert anonymous.status_code == 401
    assert not fake.completions


async def test_account_and_key_together_send_these_to_the_key_route(fake, start_proxy):
    app = await start_proxy(fake, SAMBANOVA_API_KEY="fake-api-key")
    with pytest.raises(openai.BadRequestError):
        await sdk(app).embeddings.create(model="E5-Mistral-7B-Instruct", input=[])
    assert fake.completions[-1]["path"] == "/v1/embeddings" and fake.logins == 0


@pytest.mark.parametrize("path, kwargs, param", [
    ("/v1/embeddings", {"content": b"[1]"}, None),
    ("/v1/completions", {"json": {"model": 5, "prompt": "x"}}, "model"),
    ("/v1/audio/transcriptions", {"json": {"model": "Whisper-Large-v3"}}, "file"),
])
async def test_malformed_requests_are_400(fake, start_proxy, path, kwargs, param):
    app = await start_proxy(fake, **KEY_ONLY)
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{app.url}{path}", headers=AUTH, **kwargs)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert not fake.completions

"""End to end: OpenAI clients -> the real proxy -> the real fake SambaNova, over sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import openai
import pytest

from conftest import AUTH, CLIENT_KEY, EMAIL, PASSWORD
from fake_samba import FakeSamba, Reply
from sambaproxy import NOISY_LOGGERS, configure_logging
from tokens import jwt_expiry

MODEL = "Meta-Llama-3.3-70B-Instruct"
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}


def sdk(app, cls=openai.AsyncOpenAI):
    return cls(base_url=f"{app.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=10)


def sse_data(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


async def test_sdk_non_stream_answer_is_one_completion_with_usage(proxy):
    completion = await sdk(proxy).chat.completions.create(**HELLO)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "Echo: hello"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens > 0
    assert isinstance(completion.created, int)


async def test_sdk_stream_arrives_as_chunks_without_usage_unless_asked(proxy):
    client = sdk(proxy)
    chunks = [c async for c in await client.chat.completions.create(**HELLO, stream=True)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: hello"
    assert all(c.usage is None for c in chunks)
    asked = [c async for c in await client.chat.completions.create(
        **HELLO, stream=True, stream_options={"include_usage": True})]
    assert asked[-1].choices == [] and asked[-1].usage.total_tokens > 0


async def test_sync_sdk_stream_and_non_stream(proxy):
    def run():
        client = sdk(proxy, openai.OpenAI)
        whole = client.chat.completions.create(**HELLO).choices[0].message.content
        parts = [c.choices[0].delta.content or "" for c in
                 client.chat.completions.create(**HELLO, stream=True) if c.choices]
        return whole, "".join(parts)

    assert await asyncio.wait_for(asyncio.to_thread(run), 30) == ("Echo: hello", "Echo: hello")


async def test_stream_wire_format_ends_with_exactly_one_done(proxy, fake):
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{proxy.url}/v1/chat/completions", headers=AUTH,
                              json={**HELLO, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    data = sse_data(r.text)
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    assert all("choices" in json.loads(d) for d in data[:-1])
    assert "ping" not in r.text and "data: \n" not in r.text


async def test_client_parameters_reach_upstream_unchanged(proxy, fake):
    params = {"temperature": 0.3, "top_p": 0.9, "max_tokens": 77, "stop": ["END"], "seed": 42,
              "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
              "tool_choice": "auto", "response_format": {"type": "json_object"}}
    image = [{"type": "text", "text": "what?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    body = {"model": "Llama-4-Maverick-17B-128E-Instruct",
            "messages": [{"role": "user", "content": image}], **params}
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(2):
            r = await client.post(f"{proxy.url}/v1/chat/completions", headers=AUTH, json=body)
            assert r.status_code == 200
    first, second = (c["json"] for c in fake.completions[-2:])
    for key, value in params.items():
        assert first["body"][key] == value
    assert first["body"]["messages"][0]["content"] == image
    assert first["body"]["stream"] is True
    assert first["body"]["stream_options"] == {"include_usage": True}
    assert first["env_type"] == "text"
    assert first["fingerprint"].startswith("anon_") and first["fingerprint"] != second["fingerprint"]


async def test_default_model_used_when_request_names_none(fake, start_proxy):
    app = await start_proxy(fake, DEFAULT_MODEL="DeepSeek-V3-0324")
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{app.url}/v1/chat/completions", headers=AUTH,
                              json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    assert fake.completions[-1]["json"]["body"]["model"] == "DeepSeek-V3-0324"


async def test_http2_prior_knowledge_info_and_concurrent_streams(proxy):
    async with httpx.AsyncClient(http1=False, http2=True, timeout=20) as client:
        info = await client.get(f"{proxy.url}/info")
        assert info.http_version == "HTTP/2" and info.json()["status"] == "running"

        async def one(i):
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"n{i}"}], "stream": True}
            r = await client.post(f"{proxy.url}/v1/chat/completions", headers=AUTH, json=body)
            return r.http_version, "".join(json.loads(d)["choices"][0]["delta"].get("content", "")
                                           for d in sse_data(r.text)[:-1] if json.loads(d)["choices"])

        results = await asyncio.gather(*(one(i) for i in range(20)))
    assert results == [("HTTP/2", f"Echo: n{i}") for i in range(20)]


async def test_expired_token_causes_one_login_for_thirty_concurrent_requests(proxy, fake):
    async with httpx.AsyncClient(timeout=20) as client:
        assert (await client.post(f"{proxy.url}/v1/chat/completions", headers=AUTH, json=HELLO)).status_code == 200
        logins = fake.logins
        fake.revoke_tokens()
        results = await asyncio.gather(*(client.post(f"{proxy.url}/v1/chat/completions", headers=AUTH,
                                                     json=HELLO) for _ in range(30)))
    assert [r.status_code for r in results] == [200] * 30
    assert fake.logins == logins + 1


async def test_ready_access_token_is_used_without_login(fake, start_proxy):
    token = fake.issue_token()
    app = await start_proxy(fake, SAMBA_EMAIL="", SAMBA_PASSWORD="", SAMBA_ACCESS_TOKEN=token)
    async with httpx.AsyncClient(timeout=10) as client:
        ok = await client.post(f"{app.url}/v1/chat/completions", headers=AUTH, json=HELLO)
        fake.revoke_tokens()
        refused = await client.post(f"{app.url}/v1/chat/completions", headers=AUTH, json=HELLO)
    assert ok.status_code == 200 and fake.login_attempts == 0
    assert refused.status_code == 503 and token not in refused.text


# --- the error table of SPEC.md ---------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer sk-wrong-3c9a"},
                                     {"authorization": f"Basic {CLIENT_KEY}"}])
async def test_missing_or_wrong_key_is_401_with_www_authenticate(proxy, headers):
    async with httpx.AsyncClient(timeout=10) as client:
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                             ("GET", "/debug/token")):
            r = await client.request(method, f"{proxy.url}{path}", headers=headers, json=HELLO)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert "sk-wrong-3c9a" not in r.text


async def test_several_client_keys_are_accepted(fake, start_proxy):
    app = await start_proxy(fake, LOCAL_API_KEY="first-key , second-key")
    async with httpx.AsyncClient(timeout=10) as client:
        for key in ("first-key", "second-key"):
            r = await client.get(f"{app.url}/v1/models", headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"model": "x"}', "messages"),
    (b'{"messages": "hi"}', "messages"),
    (b'{"messages": [{"content": "no role"}]}', "messages[0].role"),
])
async def test_malformed_body_is_400_naming_the_field(proxy, body, param):
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{proxy.url}/v1/chat/completions", headers=AUTH, content=body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]


async def test_body_over_limit_is_413(fake, start_proxy, caplog):
    """An answer the server makes itself carries what the app's do: a request id, CORS fields for
    an allowed origin (none without one), and an access line."""
    app = await start_proxy(fake, MAX_BODY_BYTES="1000")
    big = {**HELLO, "messages": [{"role": "user", "content": "x" * 2000}]}
    caplog.set_level(logging.INFO, logger="sambaproxy.access")
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{app.url}/v1/chat/completions", headers={**AUTH, "x-request-id": "big-1"},
                              json=big)
        browser = await client.post(f"{app.url}/v1/chat/completions",
                                    headers={**AUTH, "origin": "https://app.example"}, json=big)
    assert r.status_code == 413 and "error" in r.json()
    assert r.headers["x-request-id"] == "big-1" and "access-control-allow-origin" not in r.headers
    assert browser.status_code == 413 and browser.headers["access-control-allow-origin"] == "*"
    assert browser.headers["x-request-id"]
    assert any("big-1" in record.getMessage() and " 413 " in record.getMessage() for record in caplog.records)
    assert not fake.completions


async def test_unknown_path_404_and_wrong_method_405(proxy):
    async with httpx.AsyncClient(timeout=10) as client:
        missing = await client.get(f"{proxy.url}/v2/nothing", headers=AUTH)
        wrong = await client.get(f"{proxy.url}/v1/chat/completions", headers=AUTH)
        put = await client.put(f"{proxy.url}/info")
        head = await client.head(f"{proxy.url}/info")
    assert head.status_code == 200 and head.content == b""
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405 and put.status_code == 405


async def test_no_credentials_gives_503_but_info_and_models_work(start_proxy, closed_port):
    app = await start_proxy(None, SAMBA_MODELS_URL=f"http://127.0.0.1:{closed_port}/v1/models")
    async with httpx.AsyncClient(timeout=10) as client:
        chat = await client.post(f"{app.url}/v1/chat/completions", json=HELLO)
        info = await client.get(f"{app.url}/info")
        models = await client.get(f"{app.url}/v1/models")
    assert chat.status_code == 503 and "credentials" in chat.json()["error"]["message"]
    assert info.json()["token_status"] == "not_available" and info.json()["token_expires_in"] == 0
    assert models.status_code == 200 and models.json()["data"]


async def test_refused_login_gives_503_with_reason_and_no_password(fake, start_proxy):
    app = await start_proxy(fake, SAMBA_PASSWORD="wrong-pw-0a7d33")
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{app.url}/v1/chat/completions", headers=AUTH, json=HELLO)
        info = (await client.get(f"{app.url}/info")).json()
    assert r.status_code == 503 and "Wrong email or password" in r.json()["error"]["message"]
    assert "wrong-pw-0a7d33" not in r.text and "wrong-pw-0a7d33" not in json.dumps(info)
    assert info["token_status"] == "error"


async def test_rate_limit_retried_then_429_with_retry_after(proxy, fake):
    fake.script.extend(Reply(status=429, headers={"retry-after": "7"}) for _ in range(3))
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{proxy.url}/v1/chat/completions", headers=AUTH,
                              json={**HELLO, "stream": True})
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert len(fake.completions) == 3


async def test_transient_5xx_is_retried_before_the_first_byte(proxy, fake):
    fake.script.extend([Reply(status=503), Reply(status=502)])
    completion = await sdk(proxy).chat.completions.create(**HELLO)
    assert completion.choices[0].message.content == "Echo: hello"
    assert len(fake.completions) == 3


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_5xx_is_502_even_for_streams(proxy, fake, stream):
    fake.script.append(Reply(status=500))
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{proxy.url}/v1/chat/completions", headers=AUTH,
                              json={**HELLO, "stream": stream})
    assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error"


async def test_unreachable_upstream_is_502(fake, start_proxy, closed_port):
    app = await start_proxy(fake, SAMBA_COMPLETION_URL=f"http://127.0.0.1:{closed_port}/api/completion")
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{app.url}/v1/chat/completions", headers=AUTH, json=HELLO)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"


async def test_silent_upstream_is_504_or_a_timeout_event(fake, start_proxy):
    app = await start_proxy(fake, UPSTREAM_READ_TIMEOUT="0.3")
    fake.script.extend([Reply(stall_after=0), Reply(stall_after=1)])
    async with httpx.AsyncClient(timeout=10) as client:
        whole = await client.post(f"{app.url}/v1/chat/completions", headers=AUTH, json=HELLO)
        streamed = await client.post(f"{app.url}/v1/chat/completions", headers=AUTH,
                                     json={**HELLO, "stream": True})
    assert whole.status_code == 504
    assert streamed.status_code == 200
    last = json.loads(sse_data(streamed.text)[-1])
    assert last["error"]["code"] == "upstream_timeout" and "[DONE]" not in streamed.text


async def test_upstream_silent_before_answering_is_504_without_a_retry(fake, start_proxy):
    app = await start_proxy(fake, UPSTREAM_READ_TIMEOUT="0.3")
    fake.script.append(Reply(hang=True))
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{app.url}/v1/chat/completions", headers=AUTH, json=HELLO)
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    assert len(fake.completions) == 1


async def test_full_upstream_pool_is_503_naming_the_setting(fake, start_proxy):
    app = await start_proxy(fake, UPSTREAM_MAX_CONNECTIONS="1", UPSTREAM_CONNECT_TIMEOUT="0.3")
    fake.script.append(Reply(stall_after=1))
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream("POST", f"{app.url}/v1/chat/completions", headers=AUTH,
                                 json={**HELLO, "stream": True}) as held:
            lines = held.aiter_lines()  # kept referenced: a collected iterator closes the stream
            await lines.__anext__()
            r = await client.post(f"{app.url}/v1/chat/completions", headers=AUTH, json=HELLO)
    assert r.status_code == 503 and "UPSTREAM_MAX_CONNECTIONS" in r.json()["error"]["message"]


async def test_upstream_dropping_mid_stream_ends_with_an_error_event(proxy, fake):
    fake.script.append(Reply(text="one two three four five", drop_after=2))
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{proxy.url}/v1/chat/completions", headers=AUTH,
                              json={**HELLO, "stream": True})
    data = sse_data(r.text)
    assert r.status_code == 200 and len(data) == 3
    assert json.loads(data[-1])["error"]["code"] == "upstream_disconnected"


async def test_events_before_an_error_in_the_same_read_still_reach_the_client(proxy, fake):
    first = {"id": "c", "object": "chat.completion.chunk", "created": 1.5, "model": MODEL,
             "choices": [{"index": 0, "delta": {"content": "partial"}, "finish_reason": None}]}
    raw = f"data: {json.dumps(first)}\n\ndata: {json.dumps({'error': {'message': 'boom'}})}\n\n"
    fake.script.append(Reply(chunks=[raw], done=False))
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{proxy.url}/v1/chat/completions", headers=AUTH,
                              json={**HELLO, "stream": True})
    data = [json.loads(d) for d in sse_data(r.text)]
    assert data[0]["choices"][0]["delta"]["content"] == "partial"
    assert data[-1]["error"]["message"] == "boom" and len(data) == 2


async def test_upstream_error_event_is_forwarded_and_sdk_raises(proxy, fake):
    fake.script.append(Reply(error_event_after=1))
    received = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in await sdk(proxy).chat.completions.create(**HELLO, stream=True):
            received.append(chunk)
    # The SDK raised on the error event itself, not on a dropped connection.
    assert caught.value.message == "Model overloaded: the stream was interrupted"
    assert caught.value.body["type"] == "server_error" and caught.value.body["code"] == "stream_error"
    assert len(received) == 1 and received[0].choices[0].delta.content


async def test_sse_keepalive_comment_during_upstream_silence(fake, start_proxy):
    app = await start_proxy(fake, SSE_KEEPALIVE="0.1")
    fake.script.append(Reply(text="slow answer", delay=0.5))
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{app.url}/v1/chat/completions", headers=AUTH,
                              json={**HELLO, "stream": True})
    assert ": keep-alive\n\n" in r.text
    assert "".join(json.loads(d)["choices"][0]["delta"].get("content", "")
                   for d in sse_data(r.text)[:-1] if json.loads(d)["choices"]) == "slow answer"


async def test_client_leaving_mid_stream_closes_the_upstream_request(fake, start_proxy):
    # The read timeout is far above the waits below: only the departure can end the upstream read.
    # (HTTP/2: one stream reset on a connection that stays open, in test_departure.py.)
    proxy = await start_proxy(fake, UPSTREAM_READ_TIMEOUT="60")
    fake.script.append(Reply(stall_after=1))
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream("POST", f"{proxy.url}/v1/chat/completions", headers=AUTH,
                                 json={**HELLO, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break
            await fake.wait_for(lambda f: f.open_streams == 1)
    await fake.wait_for(lambda f: f.disconnects == 1 and f.open_streams == 0)
    await asyncio.wait_for(_until(lambda: proxy.counters.active == 0), 5)


async def _until(predicate):
    while not predicate():
        await asyncio.sleep(0.01)


# --- models, status, debug, CORS ---------------------------------------------------------

async def test_model_list_and_one_model(proxy):
    client = sdk(proxy)
    models = [m.id async for m in client.models.list()]
    assert MODEL in models
    one = await client.models.retrieve(MODEL)
    assert one.id == MODEL and isinstance(one.created, int)
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")


async def test_info_and_status_page_need_no_key_and_hold_no_secret(proxy, fake):
    async with httpx.AsyncClient(timeout=10) as client:
        await client.post(f"{proxy.url}/v1/chat/completions", headers=AUTH, json=HELLO)
        info = await client.get(f"{proxy.url}/info")
        page = await client.get(f"{proxy.url}/")
    data = info.json()
    assert data["status"] == "running" and data["api_key_configured"] is True
    assert data["samba_credentials_configured"] is True
    assert data["token_status"] == "active" and data["token_expires_in"] > 0
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for secret in [PASSWORD, CLIENT_KEY, *fake.tokens]:
        assert secret not in info.text and secret not in page.text


async def test_debug_token_shows_a_prefix_only_and_can_be_disabled(proxy, fake, start_proxy):
    async with httpx.AsyncClient(timeout=10) as client:
        await client.post(f"{proxy.url}/v1/chat/completions", headers=AUTH, json=HELLO)
        debug = (await client.get(f"{proxy.url}/debug/token", headers=AUTH)).json()
        off = await start_proxy(fake, DEBUG_ENDPOINTS="0")
        hidden = await client.get(f"{off.url}/debug/token", headers=AUTH)
    token = next(iter(fake.tokens))
    assert debug["token_exists"] and debug["token_valid"] and debug["source"] == "login"
    assert debug["token_prefix"].endswith("...") and len(debug["token_prefix"]) <= 11
    assert token not in json.dumps(debug) and hidden.status_code == 404


async def test_cors_preflight_and_allow_origin_on_every_browser_answer(proxy):
    origin = {"origin": "https://chat.example"}
    async with httpx.AsyncClient(timeout=10) as client:
        pre = await client.options(f"{proxy.url}/v1/chat/completions", headers={
            **origin, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
        denied = await client.get(f"{proxy.url}/v1/models", headers=origin)
        ok = await client.get(f"{proxy.url}/v1/models", headers={**AUTH, **origin})
        sdk_call = await client.get(f"{proxy.url}/v1/models", headers=AUTH)
    assert pre.status_code in (200, 204)
    allowed = pre.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert all(r.headers["access-control-allow-origin"] == "*" for r in (pre, denied, ok))
    assert denied.status_code == 401 and ok.status_code == 200 and sdk_call.status_code == 200


@pytest.fixture
def debug_logging(caplog):
    """The logging set-up of main() at LOG_LEVEL=debug, undone afterwards."""
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    caplog.set_level(logging.DEBUG)
    configure_logging("debug")
    yield caplog
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


async def test_no_secret_reaches_logs_or_answers_at_debug_level(fake, start_proxy, debug_logging):
    caplog = debug_logging
    app = await start_proxy(fake, LOG_LEVEL="debug")
    bodies = []
    async with httpx.AsyncClient(timeout=10) as client:
        for body in (HELLO, {**HELLO, "stream": True}):
            bodies.append((await client.post(f"{app.url}/v1/chat/completions", headers=AUTH, json=body)).text)
        fake.revoke_tokens()
        bodies.append((await client.post(f"{app.url}/v1/chat/completions", headers=AUTH, json=HELLO)).text)
        bodies.append((await client.get(f"{app.url}/debug/token", headers=AUTH)).text)
        bodies.append((await client.get(f"{app.url}/info")).text)
        bodies.append((await client.get(f"{app.url}/v1/models", headers={"authorization": "Bearer x"})).text)
    seen = caplog.text + "".join(bodies) + repr(app.config)
    assert fake.logins == 2
    for secret in [PASSWORD, CLIENT_KEY, *fake.issued]:
        assert secret not in seen


# --- token lifecycle and routes (issue 3) ------------------------------------------------

async def test_refresh_before_expiry_loses_no_request_while_streams_run(start_proxy):
    # The refresh comes 2 s before expiry, so a slow machine cannot make the old
    # token expire between the proxy reading it and the fake checking it.
    fake = FakeSamba(email=EMAIL, password=PASSWORD, token_ttl=4.0)
    await fake.start()
    try:
        app = await start_proxy(fake, TOKEN_REFRESH_MARGIN="2")
        await fake.wait_for(lambda f: f.logins == 1)
        fake.default_reply = Reply(text=" ".join(["tok"] * 25), delay=0.1)
        body = {**HELLO, "stream": True}
        async with httpx.AsyncClient(timeout=20) as client:
            post = lambda: client.post(f"{app.url}/v1/chat/completions", headers=AUTH, json=body)
            first = [asyncio.ensure_future(post()) for _ in range(20)]
            await fake.wait_for(lambda f: f.logins == 2, timeout=10)
            # Before the first token expired (it had 2 s left), not when it did.
            assert time.time() < jwt_expiry(fake.issued[0]), "the refresh came at expiry, not before"
            later = [asyncio.ensure_future(post()) for _ in range(5)]
            results = await asyncio.gather(*first, *later)
        assert all(r.status_code == 200 and sse_data(r.text)[-1] == "[DONE]" for r in results)
        assert len(fake.completions) == 25, "a request was retried: the old token was refused"
        assert fake.completions[-1]["headers"]["cookie"] != fake.completions[0]["headers"]["cookie"]
    finally:
        await fake.stop()


async def test_restart_with_a_cached_token_needs_no_login(fake, start_proxy, tmp_path):
    cache = str(tmp_path / "cache" / "token.json")
    first = await start_proxy(fake, TOKEN_CACHE_FILE=cache)
    await asyncio.wait_for(first.tokens.get_token(), 5)
    await first.aclose(grace=1.0)
    attempts = fake.login_attempts
    second = await start_proxy(fake, TOKEN_CACHE_FILE=cache)
    completion = await sdk(second).chat.completions.create(**HELLO)
    assert completion.choices[0].message.content == "Echo: hello"
    assert fake.login_attempts == attempts and second.tokens.info()["token_source"] == "cache_file"


async def test_official_api_mode_end_to_end(fake, start_proxy):
    app = await start_proxy(fake, SAMBA_EMAIL="", SAMBA_PASSWORD="", SAMBANOVA_API_KEY="fake-api-key")
    client = sdk(app)
    whole = await client.chat.completions.create(**HELLO)
    chunks = [c async for c in await client.chat.completions.create(**HELLO, stream=True)]
    assert whole.choices[0].message.content == "Echo: hello" and whole.usage.total_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: hello"
    assert all(c.usage is None for c in chunks)
    sent = fake.completions[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["json"]["stream"] is True
    assert fake.login_attempts == 0
    info = (await httpx.AsyncClient().get(f"{app.url}/info")).json()
    assert info["routes"]["api_key"] == {"configured": True, "healthy": True}
    assert info["routes"]["account"]["configured"] is False


async def test_wrong_official_api_key_is_502_without_the_key(fake, start_proxy):
    app = await start_proxy(fake, SAMBA_EMAIL="", SAMBA_PASSWORD="", SAMBANOVA_API_KEY="bad-key-77e1")
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{app.url}/v1/chat/completions", headers=AUTH, json=HELLO)
    assert r.status_code == 502 and "bad-key-77e1" not in r.text


async def test_rate_limited_account_falls_back_to_the_key_route(fake, start_proxy):
    app = await start_proxy(fake, SAMBANOVA_API_KEY="fake-api-key")
    fake.script.append(Reply(status=429, headers={"retry-after": "30"}))
    completion = await sdk(app).chat.completions.create(**HELLO)
    assert completion.choices[0].message.content == "Echo: hello"
    assert [c["path"] for c in fake.completions] == ["/api/completion", "/v1/chat/completions"]
    assert "cookie" not in fake.completions[-1]["headers"], "the login's cookie leaked to the key route"
    info = (await httpx.AsyncClient().get(f"{app.url}/info")).json()
    assert info["routes"]["account"]["healthy"] is False and info["routes"]["api_key"]["healthy"] is True


async def test_model_list_is_cached_and_survives_an_upstream_outage(fake, proxy, start_proxy):
    async with httpx.AsyncClient(timeout=10, headers=AUTH) as client:
        first = (await client.get(f"{proxy.url}/v1/models")).json()
        again = (await client.get(f"{proxy.url}/v1/models")).json()
        assert first == again and fake.models_requests == 1
        fake.models_status = 503
        proxy.catalog.ttl = 0
        during = (await client.get(f"{proxy.url}/v1/models")).json()
        assert during == first and fake.models_requests == 2
        cold = await start_proxy(fake)
        builtin = (await client.get(f"{cold.url}/v1/models")).json()
    assert {m["id"] for m in builtin["data"]} >= {"DeepSeek-R1", "Meta-Llama-3.3-70B-Instruct"}
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in builtin["data"])


async def test_burst_during_a_login_outage_gets_503_at_once_and_no_extra_logins(fake, start_proxy):
    fake.login_status = 500
    app = await start_proxy(fake)
    await fake.wait_for(lambda f: f.login_attempts == 1)
    async with httpx.AsyncClient(timeout=10) as client:
        results = await asyncio.gather(*(client.post(f"{app.url}/v1/chat/completions", headers=AUTH,
                                                     json=HELLO) for _ in range(100)))
        info = (await client.get(f"{app.url}/info")).json()
    assert {r.status_code for r in results} == {503}
    assert "500" in results[0].json()["error"]["message"]
    assert fake.login_attempts == 1 and not fake.completions
    assert info["token_status"] == "error" and info["last_error"] and info["next_attempt_in"] > 0

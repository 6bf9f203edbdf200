"""Quick checks of the fake SambaNova itself, so the suite's ground truth cannot drift."""
import asyncio
import base64
import json
import time

import h11
import httpx
import pytest

from fake_samba import FakeSamba, Reply, REALM, GRANT


@pytest.fixture
async def fake():
    fake = FakeSamba(email="me@example.com", password="s3cret")
    await fake.start()
    yield fake
    await asyncio.wait_for(fake.stop(), 5)


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=5, follow_redirects=False) as client:
        yield client


def parse_sse(raw: bytes) -> tuple[list, list[bytes]]:
    """Data payloads (JSON or the literal [DONE]) and comment lines of a whole SSE body."""
    events, comments = [], []
    for block in raw.split(b"\n\n"):
        for line in block.splitlines():
            if line.startswith(b":"):
                comments.append(line)
            elif line.startswith(b"data: "):
                data = line[6:]
                events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return events, comments


def payload(text="hello there", model="Meta-Llama-3.1-8B-Instruct", stream=True):
    return {"body": {"model": model, "messages": [{"role": "user", "content": text}],
                     "stream": stream, "stream_options": {"include_usage": True}},
            "env_type": "text", "fingerprint": "anon_" + "0" * 32}


def completion(fake, client, token, **kw):
    return client.stream("POST", f"{fake.url}/api/completion", json=payload(**kw),
                         headers={"cookie": f"access_token={token}",
                                  "accept": "text/event-stream"})


async def authenticate(fake, client, issuer, password):
    return await client.post(f"{issuer}/co/authenticate", json={
        "client_id": "fake-client-id", "username": "me@example.com", "password": password,
        "realm": REALM, "credential_type": GRANT})


async def test_login_flow_by_hand(fake, client):
    config = (await client.get(f"{fake.url}/api/config")).json()
    assert config["issuerBaseUrl"] == f"{fake.url}/auth"
    r = await authenticate(fake, client, config["issuerBaseUrl"], "s3cret")
    assert r.status_code == 200
    ticket = r.json()["login_ticket"]
    query = {"client_id": config["clientId"], "response_type": "code",
             "redirect_uri": config["redirectURL"], "scope": "openid profile email",
             "nonce": "n-123", "state": "s-456", "login_ticket": ticket, "realm": REALM,
             "auth0Client": "eyJuYW1lIjoiYXV0aDAuanMifQ=="}
    r = await client.get(f"{config['issuerBaseUrl']}/authorize", params=query)
    assert r.status_code == 302
    location = httpx.URL(r.headers["location"])
    assert str(location.copy_with(query=None)) == config["redirectURL"]
    assert location.params["state"] == "s-456"
    code = location.params["code"]

    r = await client.get(config["redirectURL"], params={"code": code, "state": "s-456"},
                         headers={"cookie": "nonce=n-123"})
    assert r.status_code == 302 and r.headers["location"] == f"{fake.url}/"
    cookies = [c for c in r.headers.get_list("set-cookie") if c.startswith("access_token=")]
    assert len(cookies) == 1 and "domain" not in cookies[0].lower()
    token = cookies[0].split(";")[0].split("=", 1)[1]
    assert token in fake.tokens and fake.logins == 1 and fake.login_attempts == 1
    assert (await client.get(f"{fake.url}/")).status_code == 200

    # Codes and tickets are single use.
    r = await client.get(config["redirectURL"], params={"code": code, "state": "s-456"},
                         headers={"cookie": "nonce=n-123"})
    assert r.status_code == 400
    r = await client.get(f"{config['issuerBaseUrl']}/authorize", params=query)
    assert "error=access_denied" in r.headers["location"] and "code=" not in r.headers["location"]


async def test_callback_needs_the_nonce_cookie(fake, client):
    issuer = f"{fake.url}/auth"
    ticket = (await authenticate(fake, client, issuer, "s3cret")).json()["login_ticket"]
    r = await client.get(f"{issuer}/authorize", params={
        "client_id": "fake-client-id", "response_type": "code", "redirect_uri": fake.redirect_url,
        "scope": "openid", "nonce": "right", "state": "st", "login_ticket": ticket,
        "realm": REALM, "auth0Client": "x"})
    code = httpx.URL(r.headers["location"]).params["code"]
    r = await client.get(fake.redirect_url, params={"code": code, "state": "st"},
                         headers={"cookie": "nonce=wrong"})
    assert r.status_code == 400 and fake.logins == 0 and not fake.tokens


async def test_wrong_password_and_forced_status(fake, client):
    r = await authenticate(fake, client, f"{fake.url}/auth", "nope")
    assert r.status_code == 403
    assert r.json() == {"error": "access_denied", "error_description": "Wrong email or password."}
    fake.login_status = 429
    r = await authenticate(fake, client, f"{fake.url}/auth", "s3cret")
    assert r.status_code == 429 and r.json()["error"] == "too_many_attempts"
    assert fake.login_attempts == 2 and fake.logins == 0


async def test_default_streamed_completion(fake, client):
    token = fake.issue_token()
    async with completion(fake, client, token) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events, comments = parse_sse(await r.aread())
    assert events[-1] == "[DONE]" and comments == [b": ping"]
    usage_chunk, chunks = events[-2], events[:-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["is_last_response"] is True
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "Echo: hello there"
    assert all(c["object"] == "chat.completion.chunk" and isinstance(c["created"], float)
               and c["model"] == "Meta-Llama-3.1-8B-Instruct" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "stop"]
    assert fake.completions[0]["json"]["fingerprint"].startswith("anon_")
    assert fake.chunks_sent == len(events)


async def test_bad_or_revoked_token_is_401_and_keeps_the_script(fake, client):
    fake.script.append(Reply(text="later"))
    async with completion(fake, client, "not-a-token") as r:
        assert r.status_code == 401 and "error" in json.loads(await r.aread())
    token = fake.issue_token()
    fake.revoke_tokens()
    async with completion(fake, client, token) as r:
        assert r.status_code == 401
    assert len(fake.script) == 1 and len(fake.completions) == 2


async def test_scripted_error_status_and_error_event(fake, client):
    token = fake.issue_token()
    fake.script.extend([Reply(status=429, headers={"retry-after": "3"}),
                        Reply(text="a b c", error_event_after=1)])
    async with completion(fake, client, token) as r:
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        assert json.loads(await r.aread())["error"]["code"] == "rate_limit_exceeded"
    async with completion(fake, client, token) as r:
        events, _ = parse_sse(await r.aread())
    assert len(events) == 2 and events[1]["error"]["type"] == "server_error"


async def test_drop_after_truncates_the_body(fake, client):
    token = fake.issue_token()
    fake.script.append(Reply(text="one two three", drop_after=1))
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        async with completion(fake, client, token) as r:
            async for data in r.aiter_bytes():
                received += data
    assert len(parse_sse(received)[0]) == 1
    await fake.wait_for(lambda f: f.open_streams == 0)
    assert fake.disconnects == 0


async def test_stall_after_goes_silent_until_the_client_leaves(fake, client):
    token = fake.issue_token()
    fake.script.append(Reply(text="one two three", stall_after=1))
    async with completion(fake, client, token) as r:
        chunks, received = r.aiter_raw(), b""
        while b": ping\n\n" not in received:  # the comment follows the first chunk
            received += await anext(chunks)
        assert len(parse_sse(received)[0]) == 1 and fake.chunks_sent == 1
        with pytest.raises(TimeoutError):  # bounded check that nothing else comes
            await asyncio.wait_for(anext(chunks), 0.2)
        assert fake.open_streams == 1 and fake.disconnects == 0
    await fake.wait_for(lambda f: f.disconnects == 1 and f.open_streams == 0)


async def test_client_leaving_during_a_delay_counts_as_disconnect(fake, client):
    token = fake.issue_token()
    fake.script.append(Reply(text="one two three", delay=30))
    async with completion(fake, client, token) as r:
        assert b"data: " in await anext(r.aiter_raw())
    await fake.wait_for(lambda f: f.disconnects == 1 and f.open_streams == 0)


async def test_stop_closes_stalled_streams(client):
    fake = FakeSamba()
    await fake.start()
    fake.script.append(Reply(hang=True))
    request = asyncio.create_task(client.post(
        f"{fake.url}/api/completion", json=payload(),
        headers={"cookie": f"access_token={fake.issue_token()}"}))
    await fake.wait_for(lambda f: f.open_streams == 1)
    await asyncio.wait_for(fake.stop(), 3)
    with pytest.raises(httpx.TransportError):
        await request


async def test_keep_alive_serves_two_requests_on_one_connection(fake):
    host, port = fake.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    h = h11.Connection(h11.CLIENT)
    try:
        for _ in range(2):
            writer.write(h.send(h11.Request(method="GET", target="/v1/models",
                                            headers=[("host", host)])))
            writer.write(h.send(h11.EndOfMessage()))
            statuses = []
            while not isinstance(event := h.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    h.receive_data(await asyncio.wait_for(reader.read(65536), 5))
                elif isinstance(event, h11.Response):
                    statuses.append(event.status_code)
            assert statuses == [200]
            h.start_next_cycle()
    finally:
        writer.close()
    assert fake.models_requests == 2


async def test_models_and_official_api(fake, client):
    models = (await client.get(f"{fake.url}/v1/models")).json()
    ids = [m["id"] for m in models["data"]]
    assert "DeepSeek-R1" in ids and all("created" not in m for m in models["data"])
    fake.models_status = 503
    assert (await client.get(f"{fake.url}/v1/models")).status_code == 503

    body = {"model": "DeepSeek-R1", "messages": [{"role": "user", "content": "hi"}]}
    r = await client.post(f"{fake.url}/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_authentication"
    fake.script.append(Reply(tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}]))
    r = await client.post(f"{fake.url}/v1/chat/completions", json=body,
                          headers={"authorization": "Bearer fake-api-key"})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


async def test_streamed_tool_calls_come_in_pieces(fake, client):
    call = {"name": "lookup", "arguments": {"query": "a long one"}}
    fake.script.append(Reply(tool_calls=[call]))
    async with completion(fake, client, fake.issue_token()) as r:
        events, _ = parse_sse(await r.aread())
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in events[:-2]
             if c["choices"][0]["delta"].get("tool_calls")]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "lookup"
    assert len(calls) > 2 and all(c["index"] == 0 for c in calls)
    arguments = "".join(c["function"]["arguments"] for c in calls)
    assert json.loads(arguments) == {"query": "a long one"}
    assert events[-3]["choices"][0]["finish_reason"] == "tool_calls"


async def test_jwt_tokens_carry_exp_and_expire(client):
    fake = FakeSamba(token_ttl=-1)
    await fake.start()
    try:
        token = fake.issue_token()
        claims = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
        assert claims["exp"] <= time.time()
        async with completion(fake, client, token) as r:
            assert r.status_code == 401
        assert token not in fake.tokens
    finally:
        await fake.stop()


async def test_wait_for_times_out_with_an_assertion(fake):
    with pytest.raises(AssertionError, match="timed out"):
        await fake.wait_for(lambda f: f.logins == 1, timeout=0.05)

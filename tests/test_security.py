"""Issue 6, the app side: admission at the request head, CORS, departures before upstream, [DONE]."""

from __future__ import annotations

import asyncio
import json

import h2.events
import httpx
import pytest

from conftest import AUTH, CLIENT_KEY
from server_helpers import RawH2, read_response

HELLO = {"model": "Meta-Llama-3.3-70B-Instruct", "messages": [{"role": "user", "content": "hello"}]}
CHAT = "/v1/chat/completions"
UPLOAD = 30 * 1024 * 1024  # declared, never sent: the answer must come from the head alone
WAIT = 5.0


async def _open(app):
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", app.port), WAIT)


# --- item 1: the client key, route and method are judged at the request head ---------------

async def test_wrong_key_on_a_30mb_http1_upload_is_401_before_any_body_byte(proxy, fake):
    reader, writer = await _open(proxy)
    try:
        writer.write(f"POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-wrong-41c7\r\n"
                     f"content-type: application/json\r\ncontent-length: {UPLOAD}\r\n\r\n".encode())
        writer.write(b"{" + b" " * 65536)  # a first piece of the body; the rest never comes
        _, status, headers, body = await read_response(reader)
    finally:
        writer.close()
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert json.loads(body)["error"]["code"] == "invalid_api_key" and b"sk-wrong-41c7" not in body
    assert not fake.completions


async def test_wrong_key_on_a_30mb_http2_upload_is_401_before_any_body_byte(proxy, fake):
    reader, writer = await _open(proxy)
    try:
        client = RawH2(reader, writer)
        stream_id = client.request("POST", CHAT, end_stream=False, extra=[
            ("authorization", "Bearer sk-wrong-41c7"), ("content-length", str(UPLOAD))])
        client.conn.send_data(stream_id, b"{" + b" " * 16000)
        client.flush()
        seen = await client.until(lambda e: isinstance(e, h2.events.StreamEnded) or
                                  isinstance(e, h2.events.StreamReset))
    finally:
        writer.close()
    response = next(e for e in seen if isinstance(e, h2.events.ResponseReceived))
    assert dict(response.headers)[b":status"] == b"401"
    body = b"".join(e.data for e in seen if isinstance(e, h2.events.DataReceived))
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert not fake.completions


async def test_unknown_path_is_404_before_the_key_and_405_lists_allow(proxy):
    async with httpx.AsyncClient(timeout=WAIT) as client:
        missing = await client.get(f"{proxy.url}/v2/nothing")
        wrong = await client.get(f"{proxy.url}{CHAT}")
        put = await client.put(f"{proxy.url}/info")
        model_post = await client.post(f"{proxy.url}/v1/models/x", headers=AUTH)
        head = await client.head(f"{proxy.url}/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405 and wrong.headers["allow"] == "OPTIONS, POST"
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    assert put.status_code == 405 and put.headers["allow"] == "GET, HEAD, OPTIONS"
    assert model_post.status_code == 405 and model_post.headers["allow"] == "GET, HEAD, OPTIONS"
    assert head.status_code == 404 and head.content == b""


async def test_disabled_debug_endpoint_is_an_unknown_path(fake, start_proxy):
    app = await start_proxy(fake, DEBUG_ENDPOINTS="0")
    async with httpx.AsyncClient(timeout=WAIT) as client:
        r = await client.get(f"{app.url}/debug/token")
    assert r.status_code == 404


# --- item 8: CORS that cannot be abused ----------------------------------------------------

def _simple_post(app, client, origin):
    """What a foreign page can make a browser send without a preflight: a text/plain POST."""
    return client.post(f"{app.url}{CHAT}", content=json.dumps(HELLO),
                       headers={"origin": origin, "content-type": "text/plain"})


@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost.evil.example",
                                    "http://127.0.0.1.nip.io:8666", "null", "https://localhost"])
async def test_without_a_key_a_foreign_origin_gets_403_and_reaches_nothing(fake, start_proxy, origin):
    app = await start_proxy(fake, LOCAL_API_KEY="")
    async with httpx.AsyncClient(timeout=WAIT) as client:
        post = await _simple_post(app, client, origin)
        info = await client.get(f"{app.url}/info", headers={"origin": origin})
        preflight = await client.options(f"{app.url}{CHAT}", headers={
            "origin": origin, "access-control-request-method": "POST"})
    for r in (post, info, preflight):
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in r.headers
    assert not fake.completions


@pytest.mark.parametrize("origin", ["http://localhost", "http://localhost:3000", "http://127.0.0.1:8080",
                                    "http://[::1]:5173"])
async def test_without_a_key_loopback_origins_work(fake, start_proxy, origin):
    app = await start_proxy(fake, LOCAL_API_KEY="")
    async with httpx.AsyncClient(timeout=WAIT) as client:
        post = await _simple_post(app, client, origin)
        stream = await client.post(f"{app.url}{CHAT}", json={**HELLO, "stream": True},
                                   headers={"origin": origin})
        preflight = await client.options(f"{app.url}{CHAT}", headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": "content-type"})
        plain = await client.post(f"{app.url}{CHAT}", json=HELLO)
    assert post.status_code == 200 and post.json()["choices"][0]["message"]["content"] == "Echo: hello"
    assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
    for r in (post, stream, preflight):
        assert r.headers["access-control-allow-origin"] == origin and r.headers["vary"] == "origin"
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-methods"] == "OPTIONS, POST"
    assert preflight.headers["access-control-allow-headers"] == "content-type"
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


async def test_with_a_key_every_origin_is_allowed_and_the_key_still_needed(proxy, fake):
    origin = {"origin": "https://chat.example"}
    async with httpx.AsyncClient(timeout=WAIT) as client:
        refused = await _simple_post(proxy, client, "https://chat.example")
        ok = await client.post(f"{proxy.url}{CHAT}", json=HELLO, headers={**AUTH, **origin})
        preflight = await client.options(f"{proxy.url}/v1/models", headers={
            **origin, "access-control-request-method": "GET"})
        wrong_method = await client.get(f"{proxy.url}{CHAT}", headers={**AUTH, **origin})
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert ok.status_code == 200
    assert preflight.headers["access-control-allow-methods"] == "GET, HEAD, OPTIONS"
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "OPTIONS, POST"
    for r in (refused, ok, preflight, wrong_method):
        assert r.headers["access-control-allow-origin"] == "*"
    assert len(fake.completions) == 1


async def test_configured_origins_replace_the_default(fake, start_proxy):
    app = await start_proxy(fake, CORS_ORIGINS="https://app.example, http://localhost:3000")
    async with httpx.AsyncClient(timeout=WAIT) as client:
        listed = await client.get(f"{app.url}/v1/models", headers={**AUTH, "origin": "https://APP.example"})
        other = await client.get(f"{app.url}/v1/models", headers={**AUTH, "origin": "https://b.example"})
        loopback = await client.get(f"{app.url}/v1/models", headers={**AUTH, "origin": "http://localhost:4000"})
    assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == "https://APP.example"
    assert other.status_code == 403 and loopback.status_code == 403


async def test_options_without_origin_lists_allow(proxy):
    async with httpx.AsyncClient(timeout=WAIT) as client:
        known = await client.options(f"{proxy.url}{CHAT}")
        anywhere = await client.options(f"{proxy.url}/v2/else")
    assert known.status_code == 204 and known.headers["allow"] == "OPTIONS, POST"
    assert "access-control-allow-methods" not in known.headers
    assert set(anywhere.headers["allow"].split(", ")) >= {"GET", "POST", "OPTIONS"}


async def test_client_key_never_appears_in_rejections(proxy):
    async with httpx.AsyncClient(timeout=WAIT) as client:
        bodies = [(await client.request(method, f"{proxy.url}{path}", headers={
            "authorization": f"Bearer {CLIENT_KEY}x", "origin": origin})).text
            for method, path, origin in (("POST", CHAT, "https://e.example"), ("PUT", "/info", "https://e.example"),
                                         ("GET", "/nothing", "https://e.example"))]
    assert all(CLIENT_KEY not in body for body in bodies)

"""HTTPS on both sides: the proxy serving TLS with ALPN, and an HTTPS/HTTP/2 upstream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl

import httpx
import openai
import pytest

from config import Config
from upstream import make_client
from server import ClientGone, Server
from departure import cancel_http2_stream

WAIT = 5.0


def chunk(text: str) -> bytes:
    event = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


class H2Upstream:
    """A minimal completion endpoint over TLS with ALPN h2, built on the project's own server."""

    def __init__(self) -> None:
        self.resets = 0
        self.reset_seen = asyncio.Event()

    async def __call__(self, request, responder) -> None:
        gone = asyncio.Event()
        responder.on_gone(gone.set)
        prompt = json.loads(request.body)["body"]["messages"][-1]["content"]
        await responder.start(200, [("content-type", "text/event-stream")])
        await responder.write(chunk("first "))
        if prompt == "stall":
            await gone.wait()
        if prompt == "endless":
            with contextlib.suppress(ClientGone):
                while not responder.gone:
                    await responder.write(chunk("more "))
                    await asyncio.sleep(0.02)  # the pace of generation, not synchronisation
        if prompt in ("stall", "endless"):
            self.resets += 1
            self.reset_seen.set()
            return
        await responder.write(chunk("second") + b"data: [DONE]\n\n")
        await responder.end()


async def start_upstream(certificate):
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    upstream = H2Upstream()
    server = Server(upstream, max_body_bytes=1 << 20, ssl_context=context)
    await server.start("127.0.0.1", 0)
    return upstream, server


@pytest.mark.parametrize("prompt", ["stall", "endless"])
async def test_departed_client_resets_its_http2_stream_and_the_connection_survives(
        start_proxy, certificate, monkeypatch, prompt):
    monkeypatch.setenv("SSL_CERT_FILE", certificate[0])
    upstream, server = await start_upstream(certificate)
    try:
        app = await start_proxy(None, SAMBA_ACCESS_TOKEN="tok-h2-test",
                                SAMBA_COMPLETION_URL=f"https://127.0.0.1:{server.port}/api/completion")

        def body(prompt):
            return {"stream": True, "messages": [{"role": "user", "content": prompt}]}

        async with httpx.AsyncClient(timeout=WAIT) as client:
            url = f"{app.url}/v1/chat/completions"
            async with client.stream("POST", url, json=body(prompt)) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break
            await asyncio.wait_for(upstream.reset_seen.wait(), WAIT)
            results = await asyncio.gather(*(client.post(url, json=body("go")) for _ in range(10)))
        assert all(r.status_code == 200 and r.text.endswith("data: [DONE]\n\n") for r in results)
        assert upstream.resets == 1 and server.connections_accepted == 1
        assert "HTTP/2" in app.client._transport._pool.connections[0].info()
    finally:
        await server.shutdown(1.0)


async def test_proxy_serves_https_with_h2_and_http11_by_alpn(fake, start_proxy, certificate):
    cert, key = certificate
    app = await start_proxy(fake, TLS_CERT_FILE=cert, TLS_KEY_FILE=key, LOCAL_API_KEY="")
    url = f"https://127.0.0.1:{app.port}"
    for http2 in (True, False):
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=cert), http2=http2,
                                     timeout=WAIT) as client:
            info = await client.get(f"{url}/info")
            assert info.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            assert info.json()["status"] == "running"
    sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                             http_client=httpx.AsyncClient(verify=ssl.create_default_context(cafile=cert)))
    stream = await sdk.chat.completions.create(model="DeepSeek-R1", stream=True,
                                               messages=[{"role": "user", "content": "tls"}])
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "Echo: tls"


async def test_reset_reaches_upstream_even_after_httpx_closed_the_response(certificate, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", certificate[0])
    upstream, server = await start_upstream(certificate)
    client = make_client(Config())
    try:
        payload = {"body": {"messages": [{"role": "user", "content": "endless"}]}}
        request = client.build_request("POST", f"https://127.0.0.1:{server.port}/", json=payload)
        response = await client.send(request, stream=True)
        assert response.http_version == "HTTP/2"
        await response.aclose()  # httpcore forgets the stream without telling upstream
        assert await cancel_http2_stream(response)
        await asyncio.wait_for(upstream.reset_seen.wait(), WAIT)
    finally:
        await client.aclose()
        await server.shutdown(1.0)

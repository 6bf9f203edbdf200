"""A client that leaves: on_gone, no more upstream attempts, the upstream request stopped, one HTTP/2 stream reset."""

from __future__ import annotations

import asyncio
import json

import h2.events
import httpx
from h2.errors import ErrorCodes

from conftest import AUTH, EMAIL, PASSWORD
from fake_samba import FakeSamba, Reply
from raw_h2 import WAIT, H2Client, data_of, ended, status_of
from server import Server
from test_tls import start_upstream

HELLO = {"model": "Meta-Llama-3.3-70B-Instruct", "messages": [{"role": "user", "content": "hello"}]}
CHAT_HEADERS = [("authorization", AUTH["authorization"]), ("content-type", "application/json")]


async def until(predicate) -> None:
    """Wait (bounded) for a state only observable by looking at it."""
    async def poll():
        while not predicate():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), WAIT)


async def post_on_h2(client: H2Client, body: dict) -> int:
    """Send a chat request on a new stream of `client`; return its stream id."""
    stream_id = client.request("POST", "/v1/chat/completions", headers=CHAT_HEADERS, end_stream=False)
    await client.send_body(stream_id, json.dumps(body).encode())
    return stream_id


# --- the server's on_gone --------------------------------------------------------------


class LateListener:
    """Registers its on_gone callback only after the test says so."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.fired = asyncio.Event()
        self.calls = 0

    def _gone(self) -> None:
        self.calls += 1
        self.fired.set()

    async def __call__(self, request, responder) -> None:
        self.entered.set()
        await asyncio.wait_for(self.release.wait(), WAIT)
        responder.on_gone(self._gone)


async def test_on_gone_fires_for_a_client_that_left_before_it_was_registered():
    handler = LateListener()
    server = Server(handler, max_body_bytes=1000)
    await server.start("127.0.0.1", 0)
    client = await H2Client.open(server.port)
    try:
        stream_id = client.request("GET", "/late")
        await asyncio.wait_for(handler.entered.wait(), WAIT)
        client.reset(stream_id, ErrorCodes.CANCEL)
        await client.round_trip()  # the server has read the RST_STREAM
        handler.release.set()
        await asyncio.wait_for(handler.fired.wait(), WAIT)
        assert handler.calls == 1
    finally:
        client.close()
        await server.shutdown(grace=1.0)


# --- the proxy: no retry for a client that left ------------------------------------


class GatedSamba(FakeSamba):
    """The fake, holding every error answer until the test opens the gate."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gate = asyncio.Event()

    async def _play(self, conn, reply, *args) -> None:
        if reply.status != 200:
            await asyncio.wait_for(self.gate.wait(), WAIT)
        await super()._play(conn, reply, *args)


async def test_no_retry_once_the_client_has_left(start_proxy):
    fake = GatedSamba(email=EMAIL, password=PASSWORD)
    await fake.start()
    client = None
    try:
        app = await start_proxy(fake)
        fake.script.extend(Reply(status=503) for _ in range(3))  # retryable, each one
        client = await H2Client.open(app.port)
        stream_id = await post_on_h2(client, HELLO)
        await fake.wait_for(lambda f: len(f.completions) == 1)
        client.reset(stream_id, ErrorCodes.CANCEL)  # the client leaves while the first attempt runs
        await client.round_trip()
        fake.gate.set()  # the first attempt fails now, after the client has left
        await until(lambda: app.counters.active == 0)
        assert len(fake.completions) == 1 and app.upstream.retries == 0
    finally:
        if client is not None:
            client.close()
        await fake.stop()


# --- the proxy: the upstream request stops when the client leaves ---------------------


async def test_h2_stream_reset_stops_its_upstream_request_and_the_connection_carries_on(fake, start_proxy):
    # The read timeout is far above every wait here: only the departure can stop the upstream read.
    app = await start_proxy(fake, UPSTREAM_READ_TIMEOUT="60")
    fake.script.append(Reply(stall_after=1))
    client = await H2Client.open(app.port)
    try:
        stream_id = await post_on_h2(client, {**HELLO, "stream": True})
        await client.until(lambda e: isinstance(e, h2.events.DataReceived) and b"data: " in e.data)
        await fake.wait_for(lambda f: f.open_streams == 1)
        client.reset(stream_id, ErrorCodes.CANCEL)  # one stream; the connection stays open
        await fake.wait_for(lambda f: f.disconnects == 1 and f.open_streams == 0)
        await until(lambda: app.counters.active == 0)
        other = client.conn.get_next_available_stream_id()
        client.conn.send_headers(other, [(":method", "GET"), (":path", "/info"), (":scheme", "http"),
                                         (":authority", "127.0.0.1")], end_stream=True)
        client.flush()
        await client.until(ended(other))
        assert status_of(client.events, other) == 200
        assert json.loads(data_of(client.events, other))["status"] == "running"
        assert app.server.connections_accepted == 1
    finally:
        client.close()


async def test_departed_client_wakes_the_http2_upstream_reader_at_once(start_proxy, certificate, monkeypatch):
    # Without the StreamReset event and the PING of cancel_http2_stream, the handler would read
    # on until UPSTREAM_READ_TIMEOUT (60 s here), far past every wait of this test.
    monkeypatch.setenv("SSL_CERT_FILE", certificate[0])
    upstream, server = await start_upstream(certificate)
    try:
        app = await start_proxy(None, SAMBA_ACCESS_TOKEN="tok-h2-wake", UPSTREAM_READ_TIMEOUT="60",
                                SAMBA_COMPLETION_URL=f"https://127.0.0.1:{server.port}/api/completion")
        body = {"stream": True, "messages": [{"role": "user", "content": "stall"}]}
        async with httpx.AsyncClient(timeout=WAIT) as client:
            async with client.stream("POST", f"{app.url}/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break
        await asyncio.wait_for(upstream.reset_seen.wait(), WAIT)
        await until(lambda: app.counters.active == 0)  # the handler has ended
    finally:
        await server.shutdown(1.0)


async def test_a_client_leaving_during_a_retry_back_off_ends_it_at_once(fake):
    """The back-off between attempts (up to Retry-After's cap) ends when the client leaves:
    no later attempt, and the handler does not wait the back-off out."""
    from config import Config
    from conftest import fake_settings
    from sambaproxy import App
    app = App(Config.from_mapping(fake_settings(fake, UPSTREAM_READ_TIMEOUT="60")),
              retry_delays=(60.0,), retry_after_cap=60.0)
    await app.start()
    client = None
    try:
        fake.script.append(Reply(status=503, headers={"retry-after": "60"}))
        client = await H2Client.open(app.port)
        stream_id = await post_on_h2(client, HELLO)
        await until(lambda: app.upstream.retries == 1)  # the first attempt failed: backing off
        client.reset(stream_id, ErrorCodes.CANCEL)
        await client.round_trip()
        await until(lambda: app.counters.active == 0)  # long before the 60 s back-off
        assert len(fake.completions) == 1
    finally:
        if client is not None:
            client.close()
        await app.aclose(grace=1.0)

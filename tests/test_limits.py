"""The server's limits over real sockets, HTTP/1.1 and both protocols (issue 6); HTTP/2 abuse: test_limits_h2.py."""

import asyncio
import json
import logging
import socket

import httpx
import pytest
from server_helpers import (  # noqa: F401 (fixtures)
    SECRET, WAIT, App, app, eventually, make_server, open_raw, read_response, read_to_eof, require_key,
)

BIG = 30 * 1024 * 1024  # a declared upload of 30 MB


def error_of(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]


# Authentication at the head

async def test_h1_unauthenticated_upload_gets_401_before_the_body(make_server):
    srv = await make_server(admit=require_key, max_body_bytes=64 * 1024 * 1024)
    reader, writer = await open_raw(srv)
    try:
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % BIG + b"a" * 65536)
        _, status, headers, body = await read_response(reader)
        assert (status, headers["www-authenticate"]) == (401, "Bearer")
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
        assert srv.budget.peak == 0  # not one body byte was kept
    finally:
        writer.close()


# Request heads: size and time

async def test_h1_header_line_over_16k_in_one_read_gets_431(make_server):
    srv = await make_server()
    reader, writer = await open_raw(srv)
    try:
        # A whole head in one read: h11 checks its own limit only while a head is incomplete.
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\n\r\n" % (b"a" * 20000))
        data = await read_to_eof(reader)
        assert data.startswith(b"HTTP/1.1 431 ")
        assert error_of(data)["code"] == "request_header_fields_too_large"
    finally:
        writer.close()


async def test_h1_100kb_header_gets_431(make_server, app):
    srv = await make_server()
    reader, writer = await open_raw(srv)
    try:
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\n\r\n" % (b"a" * 100_000))
        assert (await read_to_eof(reader)).startswith(b"HTTP/1.1 431 ")
        assert not app.calls
    finally:
        writer.close()


async def test_h1_slowloris_is_closed_by_header_timeout(make_server, app):
    srv = await make_server(header_timeout=0.5)
    reader, writer = await open_raw(srv)
    head = b"GET /echo HTTP/1.1\r\nHost: x\r\n" + b"X-Drip: %s\r\n" % (b"d" * 200) + b"\r\n"
    try:
        answer = asyncio.create_task(read_to_eof(reader))
        sent = 0
        for byte in head:  # one byte every 50 ms: the whole head would take 12 s
            if answer.done():
                break
            writer.write(bytes([byte]))
            sent += 1
            await asyncio.sleep(0.05)
        data = await answer
        assert sent < len(head)  # closed while the head was still dripping in
        assert data.startswith(b"HTTP/1.1 408 ") and error_of(data)["code"] == "request_timeout"
        assert not app.calls
    finally:
        writer.close()


async def test_h1_connection_sending_nothing_is_closed_by_header_timeout(make_server):
    srv = await make_server(header_timeout=0.3)
    reader, writer = await open_raw(srv)
    try:
        assert await read_to_eof(reader) == b""  # no 408 for a client that never began a request
    finally:
        writer.close()


async def test_h1_keep_alive_idle_is_bounded_by_idle_timeout_not_header_timeout(make_server):
    srv = await make_server(header_timeout=0.2, idle_timeout=WAIT)
    reader, writer = await open_raw(srv)
    try:
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[1] == 200
        await asyncio.sleep(0.5)  # idle between requests for longer than the head limit
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[1] == 200
        assert srv.connections_accepted == 1
    finally:
        writer.close()


# Departures

async def test_h1_pipelined_bytes_do_not_hide_a_departure(make_server, app):
    srv = await make_server()
    reader, writer = await open_raw(srv)
    writer.write(b"GET /give-up HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(app.entered.wait(), WAIT)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")  # pipelined while the first one runs
    await writer.drain()
    writer.close()  # the client leaves (EOF): the running handler must learn it
    await asyncio.wait_for(app.gone.wait(), WAIT)
    await asyncio.wait_for(app.finished.wait(), WAIT)
    assert app.calls["/echo"] == 0


async def test_h1_pipelined_head_is_answered_after_the_running_one(make_server, app):
    srv = await make_server()
    reader, writer = await open_raw(srv)
    try:
        writer.write(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(app.entered.wait(), WAIT)
        writer.write(b"GET /echo?second HTTP/1.1\r\nHost: x\r\n\r\n")
        app.release.set()
        assert (await read_response(reader))[3] == b"done"
        assert (await read_response(reader))[2]["x-query"] == "second"
    finally:
        writer.close()


async def test_h1_pipelined_bytes_past_one_head_stop_reading(make_server, app):
    srv = await make_server()
    reader, writer = await open_raw(srv)
    try:
        writer.write(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(app.entered.wait(), WAIT)
        (conn,) = srv.connections
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 40000)  # more than one head
        await eventually(lambda: not conn.transport.is_reading())
        app.release.set()
        assert (await read_response(reader))[3] == b"done"
        assert (await read_to_eof(reader)).startswith(b"HTTP/1.1 431 ")  # then read again, and refused
    finally:
        writer.close()


# Connections, handlers, buffered bytes

async def test_max_connections_closes_further_accepts(make_server, caplog):
    srv = await make_server(max_connections=2)
    kept = [await open_raw(srv) for _ in range(2)]
    try:
        for reader, writer in kept:  # both are served
            writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(reader))[1] == 200
        for _ in range(2):
            reader, writer = await open_raw(srv)
            try:
                assert await read_to_eof(reader) == b""
            except ConnectionResetError:
                pass  # closed at once, with a reset
            finally:
                writer.close()
        assert srv.connections_refused == 2
        notes = [r for r in caplog.records if "MAX_CONNECTIONS" in r.getMessage()]
        assert len(notes) == 1  # logged once a minute at most
        kept.pop()[1].close()
        await eventually(lambda: len(srv.connections) < 2)
        reader, writer = await open_raw(srv)
        kept.append((reader, writer))
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[1] == 200
    finally:
        for _, writer in kept:
            writer.close()


@pytest.mark.parametrize("http2", [False, True])
async def test_max_concurrent_requests_gives_503_with_retry_after(make_server, app, http2):
    srv = await make_server(max_concurrent_requests=1)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.port}", timeout=WAIT,
                                 http1=not http2, http2=http2) as client:
        first = asyncio.create_task(client.get("/wait"))
        await asyncio.wait_for(app.entered.wait(), WAIT)
        busy = await client.get("/echo")
        assert (busy.status_code, busy.headers["retry-after"]) == (503, "1")
        assert busy.json()["error"]["code"] == "server_busy"
        assert app.calls["/echo"] == 0
        app.release.set()
        assert (await first).content == b"done"
        assert (await client.get("/echo")).status_code == 200
        assert srv.active == 0


async def test_h1_max_buffered_bytes_gives_503_with_retry_after(make_server):
    srv = await make_server(max_buffered_bytes=500)
    for head in (b"Transfer-Encoding: chunked", b"Content-Length: 800"):
        reader, writer = await open_raw(srv)
        try:
            body = b"320\r\n" + b"a" * 800 + b"\r\n0\r\n\r\n" if b"chunked" in head else b"a" * 800
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n\r\n" + body)
            data = await read_to_eof(reader)
            assert data.startswith(b"HTTP/1.1 503 ") and b"\r\nretry-after: 1\r\n" in data.lower()
            assert error_of(data)["code"] == "server_busy"
        finally:
            writer.close()
    assert srv.budget.peak <= 500
    await eventually(lambda: not srv.connections)
    assert srv.budget.used == 0


async def test_h1_budget_is_released_when_the_client_leaves_mid_body(make_server):
    srv = await make_server()
    reader, writer = await open_raw(srv)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n" + b"a" * 400)
    await eventually(lambda: srv.budget.used == 400)
    writer.close()
    await eventually(lambda: not srv.connections)
    assert srv.budget.used == 0


async def test_h1_budget_is_released_when_the_body_reaches_the_handler(make_server):
    srv = await make_server()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.port}", timeout=WAIT) as client:
        assert (await client.post("/echo", content=b"a" * 900)).content == b"a" * 900
    assert (srv.budget.peak, srv.budget.used) == (900, 0)


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
async def test_a_body_counts_against_the_budget_until_its_handler_is_done(make_server, app, http2):
    """The handler holds the body while it runs: bodies in flight stay within MAX_BUFFERED_BYTES."""
    srv = await make_server(max_buffered_bytes=1500)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.port}", timeout=WAIT,
                                 http1=not http2, http2=http2) as client:
        first = asyncio.ensure_future(client.post("/wait", content=b"a" * 900))
        await asyncio.wait_for(app.entered.wait(), WAIT)
        assert srv.budget.used == 900  # held while the handler runs
        second = await client.post("/echo", content=b"b" * 900)
        assert second.status_code == 503 and second.headers["retry-after"]
        app.release.set()
        assert (await first).status_code == 200
    assert srv.budget.used == 0


async def test_server_default_limits():
    # The defaults of SPEC.md's settings (MAX_CONNECTIONS, MAX_CONCURRENT_REQUESTS, ...).
    from server import Server
    srv = Server(App(), max_body_bytes=1)
    assert (srv.max_connections, srv.max_concurrent_requests, srv.budget.limit, srv.header_timeout) == (
        1024, 256, 64 * 1024 * 1024, 10.0)


async def test_unexpected_driver_error_costs_one_connection_without_fatal_error(make_server, caplog, monkeypatch):
    srv = await make_server()
    import http1

    def broken(self, event):
        raise ValueError(SECRET)

    monkeypatch.setattr(http1.H11Driver, "_request_started", broken)
    reader, writer = await open_raw(srv)
    try:
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            assert await read_to_eof(reader) == b""
        except ConnectionResetError:
            pass  # aborted: EOF or reset, never an answer
    finally:
        writer.close()
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(messages) == 1 and "dropping a connection after an unexpected error: ValueError" in messages[0]
    assert SECRET not in caplog.text and "Fatal error" not in caplog.text


# The counters and the responder's state, without I/O

def test_budget_takes_within_its_limit_and_keeps_its_peak():
    from http_common import Budget
    budget = Budget(100)
    assert budget.take(60) and not budget.take(41) and budget.take(40)
    assert (budget.used, budget.room(), budget.peak) == (100, 0, 100)
    budget.give(100)
    assert (budget.used, budget.room(), budget.peak) == (0, 100, 100)


def test_rate_limit_allows_a_burst_then_its_rate():
    from http_common import RateLimit
    limit = RateLimit(rate=10.0, burst=3, now=0.0)
    assert [limit.hit(0.0) for _ in range(4)] == [True, True, True, False]
    assert limit.hit(0.2) and not limit.hit(0.2)  # 0.2 s at 10/s: two more, one of them spent above
    assert [limit.hit(10.0) for _ in range(4)] == [True, True, True, False]  # refilled to the burst, no more


def test_responder_state_waiting_started_ended_and_gone():
    from http_common import ClientGone, Responder, State
    left = []
    responder = Responder(head=False)
    responder.on_gone(lambda: left.append(1))
    assert (responder.state, responder.started, responder.gone, responder.ended) == (State.WAITING, False, False, False)
    assert responder._begin(200) and responder.state is State.STARTED and responder.started
    with pytest.raises(RuntimeError):
        responder._begin(200)
    responder.client_left()
    responder.client_left()
    assert (responder.state, responder.gone, responder.started, left) == (State.GONE, True, False, [1])
    with pytest.raises(ClientGone):
        responder._refuse_write()
    assert not responder._begin(200)
    responder.on_gone(lambda: left.append(2))  # registered after the departure: runs at once
    assert left == [1, 2]


def test_responder_that_ended_does_not_become_gone():
    from http_common import Responder, State
    responder = Responder(head=False)
    responder.on_gone(lambda: pytest.fail("the response had ended"))
    responder._begin(200)
    responder.state = State.ENDED  # as a driver's end() does
    responder.client_left()
    assert (responder.state, responder.ended, responder.gone) == (State.ENDED, True, False)


async def test_a_closing_connection_whose_client_never_reads_is_aborted(make_server):
    """close() waits for the write buffer to drain: a client that never reads (below the
    high-water mark) must still lose its connection, or it holds a MAX_CONNECTIONS slot for good."""
    srv = await make_server(idle_timeout=0.3, max_body_bytes=100_000)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", srv.port)), WAIT)
        await eventually(lambda: len(srv.connections) == 1)
        conn = next(iter(srv.connections))
        # Small kernel buffers on both sides, so answers stay in the transport's own buffer.
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent = 0
        while conn.transport.get_write_buffer_size() == 0 and sent < 200:
            await loop.sock_sendall(sock, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n"
                                    + b"a" * 4000)
            sent += 1
            await asyncio.sleep(0.002)
        assert conn.transport.get_write_buffer_size() > 0 and not conn.paused
        await eventually(lambda: conn.closed)  # idle close, then abort once it cannot drain
        assert conn not in srv.connections
    finally:
        sock.close()

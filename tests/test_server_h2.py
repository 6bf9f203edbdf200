"""server.py over real sockets: HTTP/2 (httpx and a raw h2 client) and TLS+ALPN."""

import asyncio
import logging
import ssl

import h2.events
import httpx
from h2.errors import ErrorCodes
from server_helpers import (  # noqa: F401 (fixtures)
    LIMIT, SECRET, WAIT, RawH2, Server, app, connect, error_body, h2c, quick, read_to_eof, server,
)


# HTTP/2 by prior knowledge with httpx

async def test_h2_get_and_post(server, h2c):
    got = await h2c.get("/echo", params={"q": "1"})
    posted = await h2c.post("/echo", content=b"payload")
    assert got.http_version == "HTTP/2" and got.headers["x-version"] == "2"
    assert (got.headers["x-query"], got.headers["x-host"]) == ("q=1", f"127.0.0.1:{server.port}")
    assert (posted.content, posted.headers["x-method"], posted.headers["content-length"]) == (b"payload", "POST", "7")


async def test_h2_strips_connection_specific_headers(h2c):
    response = await h2c.get("/h2-headers")
    assert response.status_code == 200 and response.headers["x-upper"] == "Value"
    assert not {"connection", "keep-alive", "transfer-encoding", "upgrade"} & set(response.headers)


async def test_h2_streaming(h2c, app):
    async with h2c.stream("GET", "/stream?4") as response:
        body = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert body == b": ka\n" + b"".join(b"chunk %d\n" % i for i in range(4))


async def test_h2_fifty_concurrent_streams_on_one_connection(server, h2c):
    responses = await asyncio.gather(*(h2c.post("/echo", content=b"%d" % i) for i in range(50)))
    assert [r.content for r in responses] == [b"%d" % i for i in range(50)]
    assert server.connections_accepted == 1


async def test_h2_large_responses_arrive_whole(h2c):
    # httpx (httpcore) opens a 16 MiB window, so these answers never wait for window space:
    # this checks big bodies arrive whole and in order. Waiting for window is tested with a
    # raw client granting it step by step, in test_flow_control.py.
    size = 4 * 1024 * 1024
    async with h2c.stream("GET", f"/big?{size}") as response:
        body = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert body == (bytes(range(256)) * 256) * (size // 65536)
    sent = await h2c.get(f"/big-send?{1024 * 1024}")
    assert sent.content == b"x" * (1024 * 1024)


async def test_h2_413_from_content_length(h2c):
    response = await h2c.post("/echo", content=b"a" * (LIMIT + 1))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


# HTTP/2 with a raw h2 client


async def test_h2_stream_reset_fires_on_gone_once(connect, server, app):
    client = RawH2(*await connect())
    stream_id = client.request("GET", "/slow")
    await client.until(lambda e: isinstance(e, h2.events.DataReceived) and e.data == b"first\n")
    client.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
    client.flush()
    await asyncio.wait_for(app.gone.wait(), WAIT)
    app.release.set()
    await asyncio.wait_for(app.write_raised.wait(), WAIT)
    assert app.gone_count == 1
    # The other streams of the connection carry on.
    other = client.request("GET", "/echo")
    events = await client.until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == other)
    assert any(isinstance(e, h2.events.ResponseReceived) and (b":status", b"200") in e.headers for e in events)


async def test_h2_connection_lost_fires_on_gone(connect, server, app):
    client = RawH2(*await connect())
    client.request("GET", "/slow")
    await client.until(lambda e: isinstance(e, h2.events.DataReceived))
    client.writer.close()
    await asyncio.wait_for(app.gone.wait(), WAIT)
    app.release.set()
    await asyncio.wait_for(app.write_raised.wait(), WAIT)
    assert app.gone_count == 1


async def test_h2_client_granting_no_window_is_dropped(quick, app):
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", quick.port), WAIT)
    try:
        client = RawH2(reader, writer)
        client.request("GET", "/flood")
        # Read and drop everything, never sending WINDOW_UPDATE: the windows (64 KiB) run out.
        while await asyncio.wait_for(reader.read(65536), WAIT):
            pass
        await asyncio.wait_for(app.gone.wait(), WAIT)
        await asyncio.wait_for(app.write_raised.wait(), WAIT)
        assert app.gone_count == 1
    finally:
        writer.close()


async def test_h2_stream_granting_no_window_is_reset(quick, app):
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", quick.port), WAIT)
    try:
        client = RawH2(reader, writer)
        client.conn.increment_flow_control_window(1 << 30)  # the connection has room, the stream none
        stream_id = client.request("GET", "/flood")
        events = await client.until(lambda e: isinstance(e, h2.events.StreamReset), ack=False)
        assert (events[-1].stream_id, events[-1].error_code) == (stream_id, ErrorCodes.CANCEL)
        await asyncio.wait_for(app.write_raised.wait(), WAIT)
        assert app.gone_count == 1
        # The connection carries on.
        other = client.request("GET", "/echo")
        events = await client.until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == other)
        assert any(isinstance(e, h2.events.ResponseReceived) and e.stream_id == other for e in events)
    finally:
        writer.close()


async def test_h2_upload_stopped_half_way_does_not_keep_the_connection(quick):
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", quick.port), WAIT)
    try:
        client = RawH2(reader, writer)
        stream_id = client.request("POST", "/echo", end_stream=False)
        client.conn.send_data(stream_id, b"half")
        client.flush()
        events = await client.until(lambda e: isinstance(e, h2.events.ConnectionTerminated))
        assert events[-1].error_code == ErrorCodes.NO_ERROR
        assert await read_to_eof(reader) == b""
    finally:
        writer.close()


async def test_h2_413_from_body_then_reset(connect, server):
    client = RawH2(*await connect())
    stream_id = client.request("POST", "/echo", end_stream=False)
    client.conn.send_data(stream_id, b"a" * 600)
    client.conn.send_data(stream_id, b"a" * 600)
    client.flush()
    events = await client.until(lambda e: isinstance(e, h2.events.StreamReset))
    status = [e.headers for e in events if isinstance(e, h2.events.ResponseReceived)][0]
    assert (b":status", b"413") in status
    assert b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived)).startswith(b'{"error"')
    assert events[-1].error_code == ErrorCodes.NO_ERROR


# Secrets in log lines

async def test_h2_protocol_error_does_not_log_the_header_value(connect, server, caplog):
    caplog.set_level(logging.WARNING, logger="hpack")  # as the app configures it: hpack logs every header
    caplog.set_level(logging.DEBUG)
    # h2 refuses a value surrounded by whitespace and quotes it in its ProtocolError.
    client = RawH2(*await connect(), validate_outbound_headers=False, normalize_outbound_headers=False)
    client.request("GET", "/echo", extra=[("authorization", f"Bearer {SECRET} ")])
    await read_to_eof(client.reader)  # GOAWAY, then the server closes
    assert SECRET not in caplog.text
    assert "HTTP/2 protocol error from client: ProtocolError" in caplog.text


# TLS with ALPN

async def test_tls_alpn_negotiates_h2_and_http11(app, certificate):
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    srv = Server(app, max_body_bytes=LIMIT, ssl_context=context, error_body=error_body)
    await srv.start("127.0.0.1", 0)
    try:
        versions = []
        for http2 in (True, False):
            verify = ssl.create_default_context(cafile=str(cert))
            async with httpx.AsyncClient(verify=verify, http2=http2, timeout=WAIT) as client:
                response = await client.post(f"https://127.0.0.1:{srv.port}/echo", content=b"tls")
            assert response.content == b"tls"
            versions.append((response.http_version, response.headers["x-version"]))
        assert versions == [("HTTP/2", "2"), ("HTTP/1.1", "1.1")]
    finally:
        await srv.shutdown(grace=1.0)


async def test_tls_413_reaches_a_client_still_uploading(app, certificate):
    # TLS cannot half-close: the server must still read and discard the upload before closing.
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    srv = Server(app, max_body_bytes=LIMIT, ssl_context=context, error_body=error_body)
    await srv.start("127.0.0.1", 0)
    try:
        verify = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(verify=verify, timeout=WAIT) as client:
            response = await client.post(f"https://127.0.0.1:{srv.port}/echo", content=b"a" * (8 << 20))
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
    finally:
        await srv.shutdown(grace=1.0)


# Shutdown

async def test_shutdown_h2_in_flight_stream_finishes(server, app, h2c):
    in_flight = asyncio.create_task(h2c.get("/wait"))
    await asyncio.wait_for(app.entered.wait(), WAIT)
    stopping = asyncio.create_task(server.shutdown(grace=WAIT))
    app.release.set()
    response = await asyncio.wait_for(in_flight, WAIT)
    assert (response.status_code, response.content) == (200, b"done")
    await asyncio.wait_for(stopping, WAIT)


async def test_shutdown_h2_refuses_new_streams_then_goaway(connect, server, app):
    client = RawH2(*await connect())
    first = client.request("GET", "/wait")
    await asyncio.wait_for(app.entered.wait(), WAIT)
    stopping = asyncio.create_task(server.shutdown(grace=WAIT))
    late = client.request("GET", "/echo")
    events = await client.until(lambda e: isinstance(e, h2.events.StreamReset))
    assert (events[-1].stream_id, events[-1].error_code) == (late, ErrorCodes.REFUSED_STREAM)
    app.release.set()
    events = await client.until(lambda e: isinstance(e, h2.events.ConnectionTerminated))
    assert [e.data for e in events if isinstance(e, h2.events.DataReceived)] == [b"done"]
    assert any(isinstance(e, h2.events.StreamEnded) and e.stream_id == first for e in events)
    await asyncio.wait_for(stopping, WAIT)


async def test_shutdown_cancels_a_handler_that_started_during_grace(connect, server, app):
    client = RawH2(*await connect())
    upload = client.request("POST", "/hold", end_stream=False)  # headers in, body not yet
    client.request("GET", "/wait")
    await asyncio.wait_for(app.entered.wait(), WAIT)  # so the /hold stream is open too
    stopping = asyncio.create_task(server.shutdown(grace=1.0))
    late = client.request("GET", "/echo")
    events = await client.until(lambda e: isinstance(e, h2.events.StreamReset))
    assert (events[-1].stream_id, events[-1].error_code) == (late, ErrorCodes.REFUSED_STREAM)  # shutting down
    client.conn.end_stream(upload)  # the upload completes during the grace period: its handler starts
    client.flush()
    await asyncio.wait_for(app.held.wait(), WAIT)
    await asyncio.wait_for(stopping, WAIT)
    assert app.cancelled and app.hold_cancelled and not server.tasks

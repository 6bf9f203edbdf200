"""server.py over real sockets: general behaviour and HTTP/1.1 (httpx and raw bytes); HTTP/2 and TLS are in test_server_h2.py."""

import asyncio
import json
import logging
import socket

import h2.events
import httpx
import pytest
from server_helpers import (  # noqa: F401 (fixtures)
    LIMIT, SECRET, WAIT, RawH2, Server, app, client, connect, error_body, h1, h2c, quick, read_response,
    read_to_eof, server,
)


# HTTP/1.1 with httpx

async def test_h1_keep_alive_reuses_one_connection(server, h1):
    first = await h1.get("/echo", params={"a": "1"})
    second = await h1.post("/echo", content=b"hello")
    assert (first.status_code, first.headers["x-query"], first.headers["x-version"]) == (200, "a=1", "1.1")
    assert (second.content, second.headers["x-method"]) == (b"hello", "POST")
    assert second.headers["content-length"] == "5" and "date" in second.headers
    assert server.connections_accepted == 1


async def test_handler_exception_gives_500(client):
    for path in ("/raise", "/noreply"):
        response = await client.get(path)
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "server_error"


async def test_exception_after_start_aborts_the_response(client):
    # h11 closes the connection before the last chunk; h2 resets the stream.
    with pytest.raises(httpx.TransportError):
        await client.get("/raise-after-start")
    assert (await client.get("/echo")).status_code == 200


@pytest.mark.parametrize("path", ["/big-send?5", "/stream?3"])
async def test_h1_head_gets_headers_only(connect, server, caplog, path):
    # Raw bytes: httpx reads no body after HEAD, so a body sent anyway would go unseen.
    # A body on the wire would come before the next answer's status line.
    reader, writer = await connect()
    writer.write(b"HEAD %s HTTP/1.1\r\nHost: x\r\n\r\nGET /echo?next HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 200 ")
    if path.startswith("/big-send"):
        assert b"content-length: 5\r\n" in head  # the length a GET would get (RFC 9110 §9.3.2)
    _, status, headers, body = await read_response(reader)
    assert (status, headers["x-query"], body) == (200, "next", b"")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # the handler's writes were no-ops


@pytest.mark.parametrize("path", ["/big-send?5", "/stream?3"])
async def test_h2_head_gets_headers_only(connect, server, caplog, path):
    client = RawH2(*await connect())
    stream_id = client.request("HEAD", path)
    events = await client.until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id)
    response = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert len(response) == 1 and (b":status", b"200") in response[0].headers
    assert not [e for e in events if isinstance(e, h2.events.DataReceived) and e.data]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # the handler's writes were no-ops


async def test_write_waits_for_the_transport_to_drain(client, app):
    async with client.stream("GET", "/buffered") as response:
        size = sum([len(chunk) async for chunk in response.aiter_bytes()])
    assert size == 256 * 65536
    assert 0 < app.max_buffered <= 512 * 1024  # 16 MiB written, never more than a little queued


async def test_idle_keep_alive_connection_is_closed(app):
    srv = Server(app, max_body_bytes=LIMIT, error_body=error_body, idle_timeout=0.2)
    await srv.start("127.0.0.1", 0)
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", srv.port), WAIT)
    try:
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        _, status, _, _ = await read_response(reader)
        assert status == 200
        assert await read_to_eof(reader) == b""  # the server closed the idle connection
    finally:
        writer.close()
        await srv.shutdown(grace=1.0)


async def test_h1_client_that_stops_reading_is_dropped(quick, app):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills after a few KiB
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", quick.port)), WAIT)
    _, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
        await asyncio.wait_for(app.gone.wait(), WAIT)
        await asyncio.wait_for(app.write_raised.wait(), WAIT)
        assert app.gone_count == 1 and not quick.connections
    finally:
        writer.close()


@pytest.mark.parametrize("version", ["1.1", "2"])
async def test_client_leaving_before_the_answer_is_not_an_error(connect, server, app, caplog, version):
    reader, writer = await connect()
    if version == "2":
        RawH2(reader, writer).request("GET", "/give-up")
    else:
        writer.write(b"GET /give-up HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(app.entered.wait(), WAIT)
    writer.close()
    await asyncio.wait_for(app.finished.wait(), WAIT)  # set in the step that ends the handler...
    assert app.gone_count == 1  # ...and in which the server then decides what to log
    assert not [r for r in caplog.records if r.name.startswith("sambaproxy") and r.levelno >= logging.WARNING]


# HTTP/1.1 with raw bytes

async def test_h1_chunked_stream_exact_bytes(connect, server, app):
    reader, writer = await connect()
    writer.write(b"GET /stream?3 HTTP/1.1\r\nHost: x\r\n\r\n")
    raw, _, _, _ = await read_response(reader)
    assert raw == (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\n: ka\n\r\n8\r\nchunk 0\n\r\n8\r\nchunk 1\n\r\n8\r\nchunk 2\n\r\n0\r\n\r\n")
    assert app.idle_writes == [False, True]


async def test_h1_0_client_gets_a_close_delimited_stream(connect, server, app):
    reader, writer = await connect()
    writer.write(b"GET /stream?2 HTTP/1.0\r\n\r\n")
    raw = await read_to_eof(reader)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"chunked" not in head.lower()
    assert body == b": ka\nchunk 0\nchunk 1\n"


async def test_h1_0_close_delimited_despite_a_header_value_naming_chunked(connect, server):
    reader, writer = await connect()
    writer.write(b"GET /note-stream HTTP/1.0\r\n\r\n")
    head, _, body = (await read_to_eof(reader)).partition(b"\r\n\r\n")
    assert b"x-note: transfer-encoding: chunked\r\n" in head and b"\r\ntransfer-encoding" not in head.lower()
    assert body == b"one\ntwo\n"


async def test_h1_expect_100_continue(connect, server):
    reader, writer = await connect()
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    _, status, _, body = await read_response(reader)
    assert (status, body) == (200, b"hello")


async def test_h1_413_from_content_length_before_the_body(connect, server):
    reader, writer = await connect()
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                 b"Expect: 100-continue\r\n\r\n" % (LIMIT + 1))
    data = await read_to_eof(reader)
    assert data.startswith(b"HTTP/1.1 413 ") and b"connection: close\r\n" in data
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"


async def test_h1_413_from_chunked_body(connect, server):
    reader, writer = await connect()
    chunk = b"%x\r\n%s\r\n" % (600, b"a" * 600)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk + chunk)
    data = await read_to_eof(reader)
    assert data.startswith(b"HTTP/1.1 413 ")


async def test_h1_garbage_gets_400_and_close(connect, server):
    reader, writer = await connect()
    writer.write(b"GARBAGE\r\n\r\n")
    data = await read_to_eof(reader)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "invalid_request_error"


async def test_h1_pipelined_requests_answered_in_order(connect, server):
    reader, writer = await connect()
    writer.write(b"GET /echo?first HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"POST /echo?second HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    _, _, h_first, b_first = await read_response(reader)
    _, _, h_second, b_second = await read_response(reader)
    assert (h_first["x-query"], b_first, h_second["x-query"], b_second) == ("first", b"", "second", b"abc")
    assert server.connections_accepted == 1


async def test_h1_client_close_mid_stream_fires_on_gone_once(connect, server, app):
    reader, writer = await connect()
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"first\n"), WAIT)
    writer.close()
    await asyncio.wait_for(app.gone.wait(), WAIT)
    app.release.set()
    await asyncio.wait_for(app.write_raised.wait(), WAIT)
    assert app.gone_count == 1


# Secrets in log lines

async def test_malformed_h1_header_line_does_not_log_its_bytes(connect, server, caplog):
    caplog.set_level(logging.DEBUG)
    reader, writer = await connect()
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nAuthorization Bearer %s\r\n\r\n" % SECRET.encode())
    assert (await read_to_eof(reader)).startswith(b"HTTP/1.1 400 ")
    assert SECRET not in caplog.text
    assert "malformed HTTP/1.1 request: RemoteProtocolError" in caplog.text


async def test_handler_exception_is_logged_without_its_message(connect, server, caplog):
    caplog.set_level(logging.DEBUG)
    reader, writer = await connect()
    writer.write(b"GET /bad-header HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_to_eof(reader)  # the response had started: the connection is closed
    assert SECRET not in caplog.text
    errors = [r for r in caplog.records if r.name.startswith("sambaproxy") and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "handler failed on GET /bad-header: LocalProtocolError" in errors[0].getMessage()
    assert "do_bad_header" in errors[0].getMessage()  # the stack is kept


# Shutdown

async def test_shutdown_lets_in_flight_request_finish(connect, server, app, h1):
    idle_reader, idle_writer = await connect()
    idle_writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(idle_reader)
    in_flight = asyncio.create_task(h1.get("/wait"))
    await asyncio.wait_for(app.entered.wait(), WAIT)
    stopping = asyncio.create_task(server.shutdown(grace=WAIT))
    assert await read_to_eof(idle_reader) == b""  # idle keep-alive connections close at once
    app.release.set()
    response = await asyncio.wait_for(in_flight, WAIT)
    assert (response.status_code, response.content, response.headers["connection"]) == (200, b"done", "close")
    await asyncio.wait_for(stopping, WAIT)
    with pytest.raises(OSError):
        await connect()


async def test_shutdown_cancels_handlers_after_grace(server, app, h1):
    in_flight = asyncio.create_task(h1.get("/wait"))
    await asyncio.wait_for(app.entered.wait(), WAIT)
    await asyncio.wait_for(server.shutdown(grace=0.1), WAIT)
    assert app.cancelled
    with pytest.raises(httpx.TransportError):
        await asyncio.wait_for(in_flight, WAIT)


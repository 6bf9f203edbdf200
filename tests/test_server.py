"""server.py over real sockets: HTTP/1.1 (httpx and raw bytes), HTTP/2 (httpx and a raw h2 client), TLS+ALPN."""

import asyncio
import json
import logging
import re
import socket
import ssl
import sys
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from h2.errors import ErrorCodes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import ClientGone, Server  # noqa: E402

LIMIT = 1000  # max_body_bytes of the test server
WAIT = 5.0  # bound on every wait
SECRET = "sk-SECRET-3f9a1c"  # an API key that must never reach a log line


def error_body(status, message, type_, code):
    """OpenAI-shaped error body, as the app builds it."""
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


class App:
    """Test handler: one behaviour per path, with events the tests wait on."""

    def __init__(self):
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.gone = asyncio.Event()
        self.gone_count = 0
        self.write_raised = asyncio.Event()
        self.finished = asyncio.Event()
        self.cancelled = False
        self.held = asyncio.Event()
        self.hold_cancelled = False
        self.idle_writes = []
        self.max_buffered = 0

    def _left(self):
        self.gone_count += 1
        self.gone.set()

    async def __call__(self, request, responder):
        route = getattr(self, "do_" + request.path.strip("/").replace("-", "_"), None)
        if route is None:
            await responder.send(404, [("content-type", "text/plain")], b"not found")
        else:
            await route(request, responder)

    async def do_echo(self, request, responder):
        headers = [("content-type", "application/octet-stream"), ("x-query", request.query),
                   ("x-method", request.method), ("x-version", request.http_version),
                   ("x-host", request.headers.get("host", ""))]
        await responder.send(200, headers, request.body)

    async def do_h2_headers(self, request, responder):
        # Connection-specific fields and upper-case names must not break HTTP/2.
        headers = [("Connection", "keep-alive"), ("Transfer-Encoding", "chunked"),
                   ("Keep-Alive", "timeout=5"), ("Upgrade", "h2c"), ("X-Upper", "Value")]
        await responder.send(200, headers, b"ok")

    async def do_stream(self, request, responder):
        self.idle_writes.append(responder.write_if_idle(b": ka\n"))  # before start: False
        await responder.start(200, [("content-type", "text/plain")])
        self.idle_writes.append(responder.write_if_idle(b": ka\n"))  # idle: True
        for i in range(int(request.query or 3)):
            await responder.write(b"chunk %d\n" % i)
        await responder.end()

    async def do_note_stream(self, request, responder):
        await responder.start(200, [("x-note", "transfer-encoding: chunked")])
        await responder.write(b"one\n")
        await responder.write(b"two\n")
        await responder.end()

    async def do_big(self, request, responder):
        size = int(request.query)
        await responder.start(200, [("content-type", "application/octet-stream")])
        piece = bytes(range(256)) * 256  # 64 KiB
        for _ in range(size // len(piece)):
            await responder.write(piece)
        await responder.end()

    async def do_buffered(self, request, responder):
        # Reports the most bytes ever waiting in the transport: write() must wait for drain.
        transport = responder._driver.transport
        await responder.start(200, [])
        for _ in range(256):
            await responder.write(b"b" * 65536)
            self.max_buffered = max(self.max_buffered, transport.get_write_buffer_size())
        await responder.end()

    async def do_flood(self, request, responder):
        # Writes until a write blocks for good: only the server can end this.
        responder.on_gone(self._left)
        await responder.start(200, [("content-type", "application/octet-stream")])
        try:
            while True:
                await responder.write(b"f" * 65536)
        except ClientGone:
            self.write_raised.set()
            raise

    async def do_big_send(self, request, responder):
        await responder.send(200, [], b"x" * int(request.query))

    async def do_slow(self, request, responder):
        responder.on_gone(self._left)
        await responder.start(200, [("content-type", "text/plain")])
        await responder.write(b"first\n")
        await asyncio.wait_for(self.release.wait(), WAIT)
        try:
            await responder.write(b"second\n")
        except ClientGone:
            self.write_raised.set()
            raise
        await responder.end()

    async def do_wait(self, request, responder):
        self.entered.set()
        try:
            await asyncio.wait_for(self.release.wait(), WAIT)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        await responder.send(200, [], b"done")

    async def do_hold(self, request, responder):
        # Holds until cancelled (bounded).
        self.held.set()
        try:
            await asyncio.wait_for(asyncio.Event().wait(), WAIT)
        except asyncio.CancelledError:
            self.hold_cancelled = True
            raise

    async def do_raise(self, request, responder):
        raise RuntimeError("boom")

    async def do_raise_after_start(self, request, responder):
        await responder.start(200, [])
        await responder.write(b"partial")
        raise RuntimeError("boom")

    async def do_noreply(self, request, responder):
        return None

    async def do_give_up(self, request, responder):
        # Returns without an answer once the client has left, as the app does.
        responder.on_gone(self._left)
        self.entered.set()
        try:
            await asyncio.wait_for(self.gone.wait(), WAIT)
        finally:
            self.finished.set()

    async def do_bad_header(self, request, responder):
        # h11 refuses the value and quotes it in its exception message.
        await responder.send(200, [("x-key", SECRET + "\r\n")], b"")


@pytest.fixture
def app():
    return App()


@pytest.fixture
async def server(app):
    srv = Server(app, max_body_bytes=LIMIT, error_body=error_body)
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.shutdown(grace=1.0)


@pytest.fixture
async def quick(app):
    """A server with a short idle_timeout (also its limit on a client that takes no data)."""
    srv = Server(app, max_body_bytes=LIMIT, error_body=error_body, idle_timeout=0.3)
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.shutdown(grace=1.0)


@pytest.fixture
async def h1(server):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=WAIT) as client:
        yield client


@pytest.fixture
async def h2c(server):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=WAIT,
                                 http1=False, http2=True) as client:
        yield client


@pytest.fixture(params=["h1", "h2c"])
def client(request, h1, h2c):
    return h1 if request.param == "h1" else h2c


@pytest.fixture
async def connect(server):
    """Open raw connections to the server; all are closed at teardown."""
    writers = []

    async def open_connection():
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), WAIT)
        writers.append(writer)
        return reader, writer

    yield open_connection
    for writer in writers:
        writer.close()


async def read_response(reader):
    """Read one HTTP/1.1 response; return (raw bytes with Date removed, status, headers, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}
    raw, body = head, b""
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), WAIT)
        raw += body
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), WAIT)
            chunk = await asyncio.wait_for(reader.readexactly(int(size_line, 16) + 2), WAIT)
            raw += size_line + chunk
            body += chunk[:-2]
            if size_line == b"0\r\n":
                break
    return re.sub(rb"date: [^\r]*\r\n", b"", raw), status, headers, body


async def read_to_eof(reader):
    return await asyncio.wait_for(reader.read(), WAIT)


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


async def test_head_gets_headers_only(client):
    response = await client.head("/echo")
    assert response.status_code == 200 and response.content == b""


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


async def test_h2_large_responses_respect_flow_control(h2c):
    size = 4 * 1024 * 1024  # far past the default 65535-byte window
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

class RawH2:
    """A minimal h2 client over an asyncio socket."""

    def __init__(self, reader, writer, **settings):
        self.reader, self.writer = reader, writer
        config = h2.config.H2Configuration(client_side=True, header_encoding=None, **settings)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.flush()

    def flush(self):
        self.writer.write(self.conn.data_to_send())

    def request(self, method, path, end_stream=True, extra=()):
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "x"), *extra]
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        self.flush()
        return stream_id

    async def until(self, predicate, ack=True):
        """Read events until one matches `predicate`; return all events read (ack: grant window)."""
        seen = []
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), WAIT)
            assert data, "server closed the connection"
            for event in self.conn.receive_data(data):
                seen.append(event)
                if ack and isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if predicate(event):
                    self.flush()
                    return seen
            self.flush()


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


async def test_shutdown_h2_in_flight_stream_finishes(server, app, h2c):
    in_flight = asyncio.create_task(h2c.get("/wait"))
    await asyncio.wait_for(app.entered.wait(), WAIT)
    stopping = asyncio.create_task(server.shutdown(grace=WAIT))
    app.release.set()
    response = await asyncio.wait_for(in_flight, WAIT)
    assert (response.status_code, response.content) == (200, b"done")
    await asyncio.wait_for(stopping, WAIT)


async def test_shutdown_cancels_handlers_after_grace(server, app, h1):
    in_flight = asyncio.create_task(h1.get("/wait"))
    await asyncio.wait_for(app.entered.wait(), WAIT)
    await asyncio.wait_for(server.shutdown(grace=0.1), WAIT)
    assert app.cancelled
    with pytest.raises(httpx.TransportError):
        await asyncio.wait_for(in_flight, WAIT)


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

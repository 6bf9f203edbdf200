"""Shared by test_server.py and test_server_h2.py: the test App handler, its servers and clients, raw-socket helpers."""

import asyncio
import collections
import json
import re
import sys
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import ClientGone, Rejection, Server  # noqa: E402

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
        self.calls = collections.Counter()  # handler calls by path
        self._called = asyncio.Event()

    def _left(self):
        self.gone_count += 1
        self.gone.set()

    async def calls_reach(self, path, count):
        """Wait (bounded) until the handler has been called `count` times for `path`."""
        while self.calls[path] < count:
            self._called.clear()
            await asyncio.wait_for(self._called.wait(), WAIT)

    async def __call__(self, request, responder):
        self.calls[request.path] += 1
        self._called.set()
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


def require_key(request):
    """An admission hook as the app's: 401 at the head unless the request carries the key."""
    if request.headers.get("authorization") == f"Bearer {SECRET}":
        return None
    return Rejection(401, [("content-type", "application/json"), ("www-authenticate", "Bearer")],
                     error_body(401, "missing or invalid API key", "invalid_request_error", "invalid_api_key"))


async def eventually(predicate):
    """Wait (bounded) until `predicate()` holds: for state the server changes after the client's last byte."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
def app():
    return App()


@pytest.fixture
async def make_server(app):
    """Factory: make_server(**Server options) -> a started Server for `app`; all are shut down at teardown."""
    servers = []

    async def make(**options):
        options.setdefault("max_body_bytes", LIMIT)
        srv = Server(app, error_body=error_body, **options)
        await srv.start("127.0.0.1", 0)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        await srv.shutdown(grace=1.0)


async def open_raw(srv):
    """A raw connection to `srv` (the caller closes the writer)."""
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", srv.port), WAIT)


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


class RawH2:
    """A minimal h2 client over an asyncio socket."""

    def __init__(self, reader, writer, **settings):
        self.reader, self.writer = reader, writer
        config = h2.config.H2Configuration(client_side=True, header_encoding=None, **settings)
        self.conn = h2.connection.H2Connection(config=config)
        self.backlog = []  # events read but not yet returned by until()
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
        """Read events until one matches `predicate`; return all events read (ack: grant window).

        Events read past the match wait for the next call.
        """
        seen = []
        while True:
            if not self.backlog:
                data = await asyncio.wait_for(self.reader.read(65536), WAIT)
                assert data, "server closed the connection"
                self.backlog.extend(self.conn.receive_data(data))
            while self.backlog:
                event = self.backlog.pop(0)
                seen.append(event)
                if ack and isinstance(event, h2.events.DataReceived) and event.stream_id in self.conn.streams:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if predicate(event):
                    self.flush()
                    return seen
            self.flush()

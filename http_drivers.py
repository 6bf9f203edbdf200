"""HTTP/1.1 (h11) and HTTP/2 (h2) drivers that turn bytes into one Request/Responder vocabulary.

server.py owns the sockets; a driver gets a connection object with `transport`, `loop`,
`server`, `paused`, `closed`, `drain()`, `touch()` and `close_later()`, and calls back
`server.run(request, responder)` for each request.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Awaitable, Callable

import h11
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError

log = logging.getLogger("sambaproxy.server")

LINGER_TIMEOUT = 2.0  # seconds a rejected HTTP/1.1 client may keep sending before we close
# The server's own error answers (400, 413, 500) are readable by browser clients too.
JSON = [("content-type", "application/json"), ("access-control-allow-origin", "*")]
# Fields the drivers own: they frame the body themselves and add Date.
_DRIVER_FIELDS = frozenset({"content-length", "transfer-encoding", "date"})
# RFC 9113 §8.2.2: connection-specific fields make an HTTP/2 message malformed.
_H2_DROP = _DRIVER_FIELDS | {"connection", "keep-alive", "proxy-connection", "upgrade", "te"}
_BODILESS = (204, 304)  # RFC 9110 §6.4.1: these responses never carry content
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


@dataclass(slots=True)
class Request:
    """One HTTP request, the same for HTTP/1.1 and HTTP/2 (repr shows no headers, query or body)."""

    method: str
    path: str  # without the query string
    query: str = field(default="", repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # lower-case names
    body: bytes = field(default=b"", repr=False)
    http_version: str = "1.1"  # "1.0", "1.1" or "2"


class ClientGone(Exception):
    """The client left (EOF, connection lost or RST_STREAM) before the response ended."""


def _header_dict(pairs) -> dict[str, str]:
    """Decode header pairs into lower-case names, joining repeats (RFC 9110 §5.3, RFC 9113 §8.2.3)."""
    headers: dict[str, str] = {}
    for name, value in pairs:
        name = name.decode("latin-1")
        value = value.decode("latin-1")
        if name in headers:
            headers[name] += ("; " if name == "cookie" else ", ") + value
        else:
            headers[name] = value
    return headers


def _clean(headers: list[tuple[str, str]], drop: frozenset) -> list[tuple[str, str]]:
    """Lower-case the handler's header names and drop the fields listed in `drop`."""
    return [(name, value) for name, value in ((n.lower(), v) for n, v in headers) if name not in drop]


class Responder:
    """Sends one response; subclassed by the HTTP/1.1 and the HTTP/2 driver."""

    __slots__ = ("started", "gone", "ended", "_callbacks", "_pending", "_head", "_no_body")

    def __init__(self, head: bool) -> None:
        self.started = self.gone = self.ended = self._pending = False
        self._callbacks: list[Callable[[], None]] | None = None
        self._head = head
        self._no_body = head

    def on_gone(self, callback: Callable[[], None]) -> None:
        """Run `callback` once if the client leaves before the response ends (at once if it has)."""
        if self.gone:
            if not self.ended:
                callback()
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def _client_left(self) -> None:
        """Mark the client gone and fire the on_gone callbacks, at most once."""
        if self.gone:
            return
        self.gone = True
        callbacks, self._callbacks = self._callbacks, None
        if self.ended or not callbacks:
            return
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("on_gone callback failed")

    def _begin(self, status: int) -> bool:
        """Note that a response starts; False when the client has already left."""
        if self.started:
            raise RuntimeError("response already started")
        if self.gone:
            return False
        self.started = True
        self._no_body = self._head or status in _BODILESS
        return True

    def _check_open(self) -> None:
        """Refuse body writes outside a started, unfinished response."""
        if self.gone:
            raise ClientGone()
        if not self.started or self.ended:
            raise RuntimeError("write() needs start() and no end() yet")

    async def send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """Send a whole response; the driver adds content-length."""
        raise NotImplementedError

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Send the status and headers of a streamed response."""
        raise NotImplementedError

    async def write(self, data: bytes) -> None:
        """Send part of a streamed body, waiting for backpressure; raises ClientGone."""
        raise NotImplementedError

    def write_if_idle(self, data: bytes) -> bool:
        """Send `data` only if that needs no waiting (SSE keep-alive comments); True if sent."""
        raise NotImplementedError

    async def end(self) -> None:
        """Finish a streamed response."""
        raise NotImplementedError


Handler = Callable[[Request, Responder], Awaitable[None]]


class H11Responder(Responder):
    """HTTP/1.1 response: Content-Length for send(), framing chosen by h11 for start()."""

    __slots__ = ("_driver", "_chunked")

    def __init__(self, driver: H11Driver, head: bool) -> None:
        super().__init__(head)
        self._driver = driver
        self._chunked = False

    async def send(self, status, headers, body):
        if not self._begin(status):
            return
        d = self._driver
        length = None if status in _BODILESS else len(body)
        out = d.h11.send(h11.Response(status_code=status, headers=d.fields(headers, length),
                                       reason=_REASONS.get(status, b"")))
        if body and not self._no_body:
            out += d.h11.send(h11.Data(data=body))
        out += d.h11.send(h11.EndOfMessage())
        self.ended = True
        d.transport.write(out)
        if d.conn.paused:
            await d.conn.drain()

    async def start(self, status, headers):
        if self._begin(status):
            d = self._driver
            response = h11.Response(status_code=status, headers=d.fields(headers, None),
                                    reason=_REASONS.get(status, b""))
            head = d.h11.send(response)
            self._chunked = b"transfer-encoding: chunked\r\n" in head.lower()
            d.transport.write(head)

    def _frame(self, data: bytes) -> bytes:
        """Body bytes on the wire, in the framing h11 chose for this response."""
        # h11's chunked writer keeps no state between chunks, so once h11 has chosen
        # chunked framing (RFC 9112 §7.1) a chunk can be framed here at a fraction of
        # the cost of h11.send(Data) on this per-event path; h11 still writes the last chunk.
        if self._chunked:
            return b"%x\r\n%b\r\n" % (len(data), data)
        return self._driver.h11.send(h11.Data(data=data))

    async def write(self, data):
        self._check_open()
        if data and not self._no_body:
            d = self._driver
            d.transport.write(self._frame(data))
            if d.conn.paused:
                self._pending = True
                try:
                    await d.conn.drain()
                finally:
                    self._pending = False
                if self.gone:
                    raise ClientGone()

    def write_if_idle(self, data):
        d = self._driver
        if self._pending or not self.started or self.ended or self.gone or d.conn.paused:
            return False
        if data and not self._no_body:
            d.transport.write(self._frame(data))
        return True

    async def end(self):
        if not self.ended and not self.gone:
            self.ended = True
            self._driver.transport.write(self._driver.h11.send(h11.EndOfMessage()))

    def _abort(self):
        # RFC 9112 §8: closing before the last chunk tells the client the message is incomplete.
        self.ended = True
        self._driver.transport.close()

    def _finished(self):
        self._driver.cycle_done()


class H11Driver:
    """Moves bytes between one connection and h11, one request at a time."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.server = conn.server
        self.transport = conn.transport
        self.h11 = h11.Connection(h11.SERVER)
        self.task: asyncio.Task | None = None
        self.responder: H11Responder | None = None
        self.lingering = False
        self._event: h11.Request | None = None
        self._headers: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._size = 0

    def idle(self) -> bool:
        """True when no handler runs."""
        return self.task is None

    def tasks(self) -> list[asyncio.Task]:
        """The running handler task, if any."""
        return [self.task] if self.task else []

    def data_received(self, data: bytes) -> None:
        """Feed h11; parse now unless a handler runs (RFC 9112 §9.3.2: pipelined requests wait their turn)."""
        if self.lingering:
            return
        self.h11.receive_data(data)
        if self.task is None:
            self.process()
        else:
            self.transport.pause_reading()  # resumed when this request's cycle is done

    def connection_lost(self) -> None:
        """A client that leaves while its request is handled is gone."""
        if self.responder is not None:
            self.responder._client_left()

    def process(self) -> None:
        """Read h11 events until a whole request is in, then start its handler."""
        try:
            while not self.lingering:
                event = self.h11.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    return
                if isinstance(event, h11.Request):
                    self._request_started(event)
                elif isinstance(event, h11.Data):
                    self._body_received(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    self._dispatch()
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    self.transport.close()
                    return
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            reason = "Request header fields too large" if status == 431 else "Malformed HTTP request"
            self.reject(status, reason, "bad_request")

    def _request_started(self, event: h11.Request) -> None:
        """Check the declared size and answer Expect: 100-continue (RFC 9110 §10.1.1)."""
        self._event = event
        self._headers = _header_dict(event.headers)
        self._chunks = []
        self._size = 0
        length = self._headers.get("content-length")
        if length is not None and int(length) > self.server.max_body_bytes:
            self.reject(413, "Request body too large", "request_too_large")
        elif self.h11.they_are_waiting_for_100_continue:
            interim = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            self.transport.write(self.h11.send(interim))

    def _body_received(self, data: bytes) -> None:
        """Collect body bytes, refusing a body that grows past the limit."""
        self._size += len(data)
        if self._size > self.server.max_body_bytes:
            self.reject(413, "Request body too large", "request_too_large")
        else:
            self._chunks.append(data)

    def _dispatch(self) -> None:
        """Start the handler task for the request just read."""
        event = self._event
        method = event.method.decode("ascii")
        path, _, query = event.target.decode("latin-1").partition("?")
        body = b"".join(self._chunks)
        request = Request(method, path, query, self._headers, body, event.http_version.decode("ascii"))
        self._event, self._chunks = None, []
        self.responder = H11Responder(self, method == "HEAD")
        self.task = self.server.loop.create_task(self.server.run(request, self.responder))

    def cycle_done(self) -> None:
        """Let h11's state decide between keep-alive and close (RFC 9112 §9.3)."""
        self.task = self.responder = None
        self.conn.touch()
        h = self.h11
        if self.transport.is_closing():
            return
        if self.server.closing or h.our_state is not h11.DONE or h.their_state is not h11.DONE:
            self.transport.close()  # MUST_CLOSE, ERROR, or shutting down
            return
        h.start_next_cycle()
        self.transport.resume_reading()
        if h.trailing_data[0]:  # a pipelined request is already buffered
            self.process()

    def fields(self, headers: list[tuple[str, str]], length: int | None) -> list[tuple[str, str]]:
        """Response header fields: the handler's, then Date, Content-Length, Connection."""
        out = _clean(headers, _DRIVER_FIELDS)
        out.append(("date", self.server.date()))
        if length is not None:
            out.append(("content-length", str(length)))
        if self.server.closing:
            out.append(("connection", "close"))  # RFC 9112 §9.6: tell the client we will close
        return out

    def reject(self, status: int, message: str, code: str) -> None:
        """Answer an error while a response can still start, then close in stages."""
        h = self.h11
        if h.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = self.server.error_body(status, message, "invalid_request_error", code)
            fields = [*JSON, ("content-length", str(len(body))), ("connection", "close")]
            try:
                out = h.send(h11.Response(status_code=status, headers=fields, reason=_REASONS[status]))
                out += h.send(h11.Data(data=body)) + h.send(h11.EndOfMessage())
                self.transport.write(out)
            except h11.LocalProtocolError:
                log.debug("could not send %d", status)
        self._linger()

    def _linger(self) -> None:
        """Half-close and discard input for a while, so the client reads our answer (RFC 9112 §9.6)."""
        self.lingering = True
        t = self.transport
        if t.can_write_eof():
            t.write_eof()
            t.resume_reading()
            self.conn.close_later(LINGER_TIMEOUT)
        else:
            t.close()

    def shutdown(self) -> None:
        """Close now if idle; a running request closes the connection when it ends."""
        if self.task is None:
            self.transport.close()

    def close(self) -> None:
        """Close the connection."""
        self.transport.close()


class H2Responder(Responder):
    """One HTTP/2 stream: its request while it arrives, then its response."""

    __slots__ = ("_driver", "stream_id", "request", "_chunks", "_size", "task", "_window",
                 "complete", "rejected")

    def __init__(self, driver: H2Driver, stream_id: int, request: Request) -> None:
        super().__init__(request.method == "HEAD")
        self._driver = driver
        self.stream_id = stream_id
        self.request = request
        self._chunks: list[bytes] = []
        self._size = 0
        self.task: asyncio.Task | None = None
        self._window: asyncio.Future | None = None
        self.complete = False  # the client ended its side of the stream
        self.rejected = False

    async def send(self, status, headers, body):
        if not self._begin(status):
            return
        d = self._driver
        length = None if status in _BODILESS else len(body)
        if self._no_body:
            body = b""
        d.h2.send_headers(self.stream_id, d.fields(status, headers, length), end_stream=not body)
        if not body:
            self.ended = True
            d.flush_soon()
            return
        try:
            await self._send_data(body, end=True)
        except ClientGone:
            log.debug("client left during a response")

    async def start(self, status, headers):
        if self._begin(status):
            d = self._driver
            self.ended = self._no_body
            d.h2.send_headers(self.stream_id, d.fields(status, headers, None), end_stream=self._no_body)
            d.flush_soon()

    async def write(self, data):
        if self._no_body and self.started:
            return  # HEAD, 204, 304: the body is never sent
        self._check_open()
        if data:
            await self._send_data(data, end=False)

    def write_if_idle(self, data):
        if self._pending or not self.started or self.ended or self.gone:
            return False
        d = self._driver
        h = d.h2
        room = min(h.local_flow_control_window(self.stream_id), h.max_outbound_frame_size)
        if d.conn.paused or len(data) > room:
            return False
        if data:
            h.send_data(self.stream_id, data)
            d.flush_soon()
        return True

    async def end(self):
        if not self.ended and not self.gone:
            self.ended = True
            self._driver.h2.end_stream(self.stream_id)
            self._driver.flush_soon()

    async def _send_data(self, data: bytes, end: bool) -> None:
        """Send at most the flow-control window at a time and wait for WINDOW_UPDATE (RFC 9113 §6.9)."""
        d = self._driver
        h = d.h2
        total, pos = len(data), 0
        self._pending = True
        try:
            while pos < total:
                if self.gone:
                    raise ClientGone()
                size = min(h.local_flow_control_window(self.stream_id), h.max_outbound_frame_size,
                           total - pos)
                if size <= 0:
                    await self._wait_window()
                    continue
                pos += size
                last = end and pos == total
                if last:
                    self.ended = True
                h.send_data(self.stream_id, data[pos - size:pos], end_stream=last)
                if pos < total:
                    d.flush()  # more to come: keep the transport's backpressure signal accurate
                else:
                    d.flush_soon()
                if d.conn.paused:
                    await d.conn.drain()
            if self.gone and not self.ended:
                raise ClientGone()
        finally:
            self._pending = False

    async def _wait_window(self) -> None:
        """Wait for a WINDOW_UPDATE, a settings change or the stream's end."""
        self._window = self._driver.conn.loop.create_future()
        try:
            await self._window
        finally:
            self._window = None

    def wake(self) -> None:
        """Let a write waiting for window space look again."""
        if self._window is not None and not self._window.done():
            self._window.set_result(None)

    def _abort(self):
        # RFC 9113 §8.1: a server that cannot finish a response resets the stream.
        if not self.ended and not self.gone:
            self.ended = True
            self._driver.reset(self.stream_id, ErrorCodes.INTERNAL_ERROR)

    def _finished(self):
        self._driver.stream_done(self)


class H2Driver:
    """Moves bytes between one connection and h2; each stream runs as its own task."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.server = conn.server
        self.transport = conn.transport
        self.h2 = H2Connection(config=H2Configuration(client_side=False, header_encoding=None))
        self.streams: dict[int, H2Responder] = {}
        self.closing = False
        self._flush_pending = False
        self.h2.initiate_connection()
        self.flush()

    def idle(self) -> bool:
        """True when no stream is open."""
        return not self.streams

    def tasks(self) -> list[asyncio.Task]:
        """The running handler tasks."""
        return [s.task for s in self.streams.values() if s.task is not None]

    def flush(self) -> None:
        """Write whatever h2 has queued."""
        self._flush_pending = False
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def flush_soon(self) -> None:
        """Flush once the streams running now have queued their frames: one write, not one per stream."""
        if not self._flush_pending:
            self._flush_pending = True
            self.conn.loop.call_soon(self.flush)

    def data_received(self, data: bytes) -> None:
        """Feed h2 and dispatch its events with one flat ladder."""
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            log.debug("HTTP/2 protocol error from client: %s", exc)
            self.flush()  # h2 queued a GOAWAY
            self.transport.close()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self._request_received(event)
            elif isinstance(event, DataReceived):
                self._data_received(event)
            elif isinstance(event, StreamEnded):
                self._stream_ended(event.stream_id)
            elif isinstance(event, WindowUpdated):
                self._window_updated(event.stream_id)
            elif isinstance(event, RemoteSettingsChanged):
                self._window_updated(0)  # INITIAL_WINDOW_SIZE may have grown every window
            elif isinstance(event, StreamReset):
                self._stream_reset(event.stream_id)
            elif isinstance(event, ConnectionTerminated):
                self._terminated()
        self.flush()

    def _request_received(self, event: RequestReceived) -> None:
        """Map pseudo-headers to a Request (RFC 9113 §8.3.1) and check the declared size."""
        if self.closing:
            self.reset(event.stream_id, ErrorCodes.REFUSED_STREAM)  # RFC 9113 §8.7: safe to retry
            return
        pseudo = {n: v for n, v in event.headers if n[:1] == b":"}
        headers = _header_dict((n, v) for n, v in event.headers if n[:1] != b":")
        authority = pseudo.get(b":authority")
        if authority and "host" not in headers:
            headers["host"] = authority.decode("latin-1")
        path, _, query = pseudo.get(b":path", b"").decode("latin-1").partition("?")
        request = Request(pseudo.get(b":method", b"").decode("ascii"), path, query, headers, b"", "2")
        stream = self.streams[event.stream_id] = H2Responder(self, event.stream_id, request)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.server.max_body_bytes:
            self._reject(stream, 413, "Request body too large", "request_too_large")

    def _data_received(self, event: DataReceived) -> None:
        """Acknowledge the data at once so the client may keep sending, and collect it."""
        self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.rejected:
            return
        stream._size += len(event.data)
        if stream._size > self.server.max_body_bytes:
            self._reject(stream, 413, "Request body too large", "request_too_large")
        else:
            stream._chunks.append(event.data)

    def _stream_ended(self, stream_id: int) -> None:
        """Start the handler once the whole request is in."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.complete = True
        if not stream.rejected:
            stream.request.body = b"".join(stream._chunks)
            stream._chunks = []
            stream.task = self.server.loop.create_task(self.server.run(stream.request, stream))

    def _window_updated(self, stream_id: int) -> None:
        """Wake the writers the new window concerns (stream 0: all of them)."""
        if stream_id == 0:
            for stream in self.streams.values():
                stream.wake()
        elif (stream := self.streams.get(stream_id)) is not None:
            stream.wake()

    def _stream_reset(self, stream_id: int) -> None:
        """RST_STREAM from the client: that stream's client is gone."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream._client_left()
            stream.wake()
            if stream.task is None:
                del self.streams[stream_id]

    def _terminated(self) -> None:
        """GOAWAY from the client: h2 sends nothing more, so every stream is gone."""
        self.connection_lost()
        self.flush()
        self.transport.close()

    def connection_lost(self) -> None:
        """Every open stream's client is gone."""
        for stream in list(self.streams.values()):
            stream._client_left()
            stream.wake()

    def _reject(self, stream: H2Responder, status: int, message: str, code: str) -> None:
        """Answer an error on one stream without running the handler."""
        stream.rejected = True
        stream._chunks = []
        body = self.server.error_body(status, message, "invalid_request_error", code)
        stream.task = self.server.loop.create_task(self._send_error(stream, status, body))

    async def _send_error(self, stream: H2Responder, status: int, body: bytes) -> None:
        """Send a driver-made error response on `stream`."""
        try:
            await stream.send(status, JSON, body)
        finally:
            stream._finished()

    def stream_done(self, stream: H2Responder) -> None:
        """Forget a finished stream; stop an unread upload; close when shutting down and idle."""
        self.streams.pop(stream.stream_id, None)
        if not stream.complete and not stream.gone and not self.conn.closed:
            # RFC 9113 §8.1: after a complete response, RST_STREAM(NO_ERROR) stops the upload.
            self.reset(stream.stream_id, ErrorCodes.NO_ERROR)
        self.conn.touch()
        if self.closing and not self.streams:
            self.close()

    def reset(self, stream_id: int, code: ErrorCodes) -> None:
        """Reset a stream, ignoring one that is already closed."""
        try:
            self.h2.reset_stream(stream_id, code)
        except ProtocolError:
            return
        self.flush_soon()

    def fields(self, status: int, headers: list[tuple[str, str]], length: int | None) -> list:
        """Response fields: :status, the handler's (lower-case, minus connection-specific), Date, length."""
        out = [(":status", str(status))]
        out += _clean(headers, _H2_DROP)
        out.append(("date", self.server.date()))
        if length is not None:
            out.append(("content-length", str(length)))
        return out

    def shutdown(self) -> None:
        """Refuse new streams, and close with GOAWAY once the running ones end."""
        # No GOAWAY yet: python-h2 peers (httpx) treat a received GOAWAY as the end of every
        # stream (python-hyper/h2#1181), so running streams would be lost. REFUSED_STREAM
        # tells clients a new request was not processed and is safe to retry (RFC 9113 §8.7).
        self.closing = True
        if not self.streams:
            self.close()

    def close(self) -> None:
        """Send the final GOAWAY and close the connection."""
        if self.conn.closed:
            return
        try:
            self.h2.close_connection()
        except ProtocolError:
            pass  # the connection is already closed at the HTTP/2 level
        self.flush()
        self.transport.close()

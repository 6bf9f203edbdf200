"""The HTTP/2 driver: moves bytes between one connection and h2; each stream runs as its own task.

server.py owns the socket; the driver gets a connection object with `transport`, `loop`,
`server`, `paused`, `closed`, `drain()` and `touch()`, and calls back
`server.run(request, responder)` for each stream.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

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

from http_common import (BODILESS, DRIVER_FIELDS, JSON, ClientGone, Rejection, Request, Responder,
                         clean_headers, header_dict)

if TYPE_CHECKING:
    from server import Connection

log = logging.getLogger("sambaproxy.server")

# RFC 9113 §8.2.2: connection-specific fields make an HTTP/2 message malformed.
_H2_DROP = DRIVER_FIELDS | {"connection", "keep-alive", "proxy-connection", "upgrade", "te"}


class H2Responder(Responder):
    """One HTTP/2 stream: its request while it arrives, then its response."""

    __slots__ = ("_driver", "stream_id", "request", "_chunks", "_size", "task", "_window",
                 "starved_at", "complete", "rejected")

    def __init__(self, driver: H2Driver, stream_id: int, request: Request) -> None:
        super().__init__(request.method == "HEAD")
        self._driver = driver
        self.stream_id = stream_id
        self.request = request
        self._chunks: list[bytes] = []
        self._size = 0
        self.task: asyncio.Task | None = None
        self._window: asyncio.Future | None = None
        self.starved_at: float | None = None  # since when a write waits for window space
        self.complete = False  # the client ended its side of the stream
        self.rejected = False

    async def send(self, status, headers, body):
        if not self._begin(status):
            return
        d = self._driver
        length = None if status in BODILESS else len(body)
        if self._no_body:
            body = b""
        d.h2.send_headers(self.stream_id, d.fields(status, headers, length, self.request_id), end_stream=not body)
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
            d.h2.send_headers(self.stream_id, d.fields(status, headers, None, self.request_id),
                              end_stream=self._no_body)
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
            self.sent += len(data)
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
                self.sent += size
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
        loop = self._driver.conn.loop
        self._window = loop.create_future()
        if self.starved_at is None:
            self.starved_at = loop.time()
        try:
            await self._window
        finally:
            self._window = None
        if self.gone or self._driver.h2.local_flow_control_window(self.stream_id) > 0:
            self.starved_at = None

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
        """True when no handler runs: a stream whose upload stopped half-way does not keep us open."""
        return not any(stream.task is not None for stream in self.streams.values())

    def check_starved(self, cutoff: float) -> float | None:
        """Give up on writes starved of flow-control window since before `cutoff`.

        A stream whose own window is spent is reset (CANCEL); when the connection's window is
        spent, the connection is closed. Returns when the oldest remaining starvation began.
        """
        oldest = None
        for stream in list(self.streams.values()):
            since = stream.starved_at
            if since is None or stream.gone:
                continue
            if since > cutoff:
                oldest = since if oldest is None else min(oldest, since)
            elif self.h2.outbound_flow_control_window <= 0:
                log.debug("closing an HTTP/2 connection whose client grants no window")
                self.connection_lost()
                self.close()
                return None
            else:
                log.debug("resetting an HTTP/2 stream whose client grants no window")
                self.reset(stream.stream_id, ErrorCodes.CANCEL)
                stream._client_left()
                stream.wake()
        return oldest

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
            # Only the type: h2's message quotes the offending header, e.g. an API key.
            log.debug("HTTP/2 protocol error from client: %s", type(exc).__name__)
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
        headers = header_dict((n, v) for n, v in event.headers if n[:1] != b":")
        authority = pseudo.get(b":authority")
        if authority and "host" not in headers:
            headers["host"] = authority.decode("latin-1")
        path, _, query = pseudo.get(b":path", b"").decode("latin-1").partition("?")
        request = Request(pseudo.get(b":method", b"").decode("ascii"), path, query, headers, b"", "2",
                          self.conn.client)
        stream = self.streams[event.stream_id] = H2Responder(self, event.stream_id, request)
        length = headers.get("content-length", "")
        if (rejection := self.server.admit(request)) is not None:
            self._answer(stream, rejection)
        elif length.isdigit() and int(length) > self.server.max_body_bytes:
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
            stream.task = self.server.spawn(self.server.run(stream.request, stream))

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
        """Answer a driver-made error on one stream without running the handler."""
        body = self.server.error_body(status, message, "invalid_request_error", code)
        self._answer(stream, Rejection(status, list(JSON), body))

    def _answer(self, stream: H2Responder, rejection: Rejection) -> None:
        """Answer one stream without running the handler; the rest of its upload is refused."""
        stream.rejected = True
        stream._chunks = []
        stream.task = self.server.spawn(self._send_rejection(stream, rejection))

    async def _send_rejection(self, stream: H2Responder, rejection: Rejection) -> None:
        """Send a response decided without the handler on `stream`."""
        try:
            await stream.send(rejection.status, rejection.headers, rejection.body)
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

    def fields(self, status: int, headers: list[tuple[str, str]], length: int | None,
               request_id: str | None = None) -> list:
        """Response fields: :status, the handler's (lower-case, minus connection-specific), X-Request-ID, Date, length."""
        out = [(":status", str(status))]
        out += clean_headers(headers, _H2_DROP)
        if request_id:
            out.append(("x-request-id", request_id))
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

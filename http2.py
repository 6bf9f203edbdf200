"""The HTTP/2 driver: moves bytes between one connection and h2; each stream runs as its own task.

server.py owns the socket; the driver gets a connection as http_common.Link describes it, and
calls back `server.run(request, responder)` for each stream.

What a client can make us hold is bounded here (RFC 9113 §10.5): request bodies by flow control
(window is granted only for bytes buffered within MAX_BODY_BYTES and the server's budget), streams
by SETTINGS_MAX_CONCURRENT_STREAMS and by the handlers still running, heads by
SETTINGS_MAX_HEADER_LIST_SIZE, resets and frames that do no work by rate limits answered with
GOAWAY(ENHANCE_YOUR_CALM), as nginx, Go and h2o answer CVE-2023-44487 and the 2019 floods.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    SettingsAcknowledged,
    StreamEnded,
    StreamReset,
    UnknownFrameReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings

from http_common import (ABORTED, BODIES_BUSY, BODILESS, DRIVER_FIELDS, ENDED, GONE, MAX_HEAD_BYTES, STARTED, WAITING,
                         ClientGone, RateLimit, Rejection, Request, Responder, clean_headers, header_dict)

if TYPE_CHECKING:
    from http_common import Link

log = logging.getLogger("sambaproxy.server")

# RFC 9113 §8.2.2: connection-specific fields make an HTTP/2 message malformed.
_H2_DROP = DRIVER_FIELDS | {"connection", "keep-alive", "proxy-connection", "upgrade", "te"}
MAX_STREAMS = 100  # SETTINGS_MAX_CONCURRENT_STREAMS, and handlers (running or reset) a connection may hold
STREAM_WINDOW = 65535  # SETTINGS_INITIAL_WINDOW_SIZE: body bytes a stream may send before we grant more
CONNECTION_WINDOW = 1 << 20  # the connection's window: streams share it, each within its own
RESET_BURST, RESET_RATE = 100, 10.0  # client resets a connection may make at once, then per second
IDLE_FRAME_BURST, IDLE_FRAME_RATE = 1000, 100.0  # the same for frames that do no work (PING, SETTINGS...)
LOCAL_SETTINGS = {
    SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
    SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEAD_BYTES,
    SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
}
# RFC 9110 §5.6.2 and §9.1: a method is a token; RFC 9113 §8.3.1: a path is visible ASCII.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PATH = re.compile(rb"[\x21-\x7e]+")


class H2Responder(Responder):
    """One HTTP/2 stream: its request while it arrives, then its response."""

    __slots__ = ("_driver", "stream_id", "request", "_chunks", "_size", "task", "_window",
                 "starved_at", "complete", "rejected", "held", "granted", "unacked")

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
        self.held = 0  # body bytes taken from the server's budget
        self.granted = STREAM_WINDOW  # window granted in all, the initial window included
        self.unacked = 0  # body bytes received since the last WINDOW_UPDATE

    async def send(self, status, headers, body):
        if not self._begin(status):
            return
        d = self._driver
        length = None if status in BODILESS else len(body)
        if self._no_body:
            body = b""
        d.h2.send_headers(self.stream_id, d.fields(status, headers, length, self.request_id), end_stream=not body)
        if not body:
            self.state = ENDED
            d.flush_soon()
            return
        try:
            await self._send_data(body, end=True)
        except ClientGone:
            log.debug("client left during a response")

    async def start(self, status, headers):
        if self._begin(status):
            d = self._driver
            if self._no_body:
                self.state = ENDED
            d.h2.send_headers(self.stream_id, d.fields(status, headers, None, self.request_id),
                              end_stream=self._no_body)
            d.flush_soon()

    async def write(self, data):
        if self._no_body and self.started:
            return  # HEAD, 204, 304: the body is never sent
        if self.state is not STARTED:
            self._refuse_write()
        if data:
            await self._send_data(data, end=False)

    def write_if_idle(self, data):
        if self._pending or self.state is not STARTED:
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
        if self.state is STARTED:
            self.state = ENDED
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
                if self.state is GONE:
                    raise ClientGone()
                size = min(h.local_flow_control_window(self.stream_id), h.max_outbound_frame_size,
                           total - pos)
                if size <= 0:
                    await self._wait_window()
                    continue
                pos += size
                last = end and pos == total
                if last:
                    self.state = ENDED
                h.send_data(self.stream_id, data[pos - size:pos], end_stream=last)
                self.sent += size
                if pos < total:
                    d.flush()  # more to come: keep the transport's backpressure signal accurate
                else:
                    d.flush_soon()
                if d.conn.paused:
                    await d.conn.drain()
            if self.state is GONE:
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
        if self.state is GONE or self._driver.h2.local_flow_control_window(self.stream_id) > 0:
            self.starved_at = None

    def wake(self) -> None:
        """Let a write waiting for window space look again."""
        if self._window is not None and not self._window.done():
            self._window.set_result(None)

    def abort(self):
        # RFC 9113 §8.1: a server that cannot finish a response resets the stream.
        if self.state is WAITING or self.state is STARTED:
            self.state = ABORTED
            self._driver.reset(self.stream_id, ErrorCodes.INTERNAL_ERROR)

    def finish(self):
        self._driver.stream_done(self)


class H2Driver:
    """Moves bytes between one connection and h2; each stream runs as its own task."""

    def __init__(self, conn: Link) -> None:
        self.conn = conn
        self.server = conn.server
        self.transport = conn.transport
        self.h2 = H2Connection(config=H2Configuration(client_side=False, header_encoding=None))
        self.h2.local_settings = Settings(client=False, initial_values=LOCAL_SETTINGS)
        # h2 applies MAX_HEADER_LIST_SIZE once the client acknowledges it; the limit holds at once.
        self.h2.decoder.max_header_list_size = MAX_HEAD_BYTES
        self.streams: dict[int, H2Responder] = {}
        self.running = 0  # streams with a task (handler or driver-made answer)
        # Body bytes kept for this connection's streams: one connection keeps at most one
        # MAX_BODY_BYTES at once, so no single client takes the whole MAX_BUFFERED_BYTES.
        self.held = 0
        self.closing = False
        self.settled = False  # the client's first SETTINGS has arrived
        self._block_clock = False  # HEADER_TIMEOUT runs for a header block still arriving
        self._flush_pending = False
        self._request_priority: PriorityUpdated | None = None  # that of the last HEADERS frame
        self._unacked = 0  # connection-level bytes received since the last WINDOW_UPDATE
        now = conn.loop.time()
        self._resets = RateLimit(RESET_RATE, RESET_BURST, now)
        self._idle_frames = RateLimit(IDLE_FRAME_RATE, IDLE_FRAME_BURST, now)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)  # RFC 9113 §6.9.2: 65535 to start
        self.flush()

    def idle(self) -> bool:
        """True when no handler runs: a stream whose upload stopped half-way does not keep us open."""
        return not self.running

    def check_starved(self, cutoff: float) -> float | None:
        """Reset each stream whose write has been starved of flow-control window since before `cutoff`.

        Only that stream: the others on the connection go on. Returns when the oldest remaining
        starvation began.
        """
        oldest = None
        for stream in list(self.streams.values()):
            since = stream.starved_at
            if since is None or stream.gone:
                continue
            if since > cutoff:
                oldest = since if oldest is None else min(oldest, since)
            else:
                log.debug("resetting an HTTP/2 stream whose client grants no window")
                self.reset(stream.stream_id, ErrorCodes.CANCEL)
                stream.client_left()
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
        """Feed h2 and dispatch its events with one flat ladder.

        Handlers started here run only after this batch of frames is handled, so a stream reset
        in the same read (rapid reset) is gone before its handler could start.
        """
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            # Only the type: h2's message quotes the offending header, e.g. an API key.
            log.debug("HTTP/2 protocol error from client: %s", type(exc).__name__)
            self.flush()  # h2 queued a GOAWAY
            self.transport.close()
            return
        if self._header_block_pending():
            return
        for event in events:
            if isinstance(event, DataReceived):
                self._data_received(event)
            elif isinstance(event, RequestReceived):
                self._request_received(event)
            elif isinstance(event, StreamEnded):
                self._stream_ended(event.stream_id)
            elif isinstance(event, WindowUpdated):
                self._window_updated(event.stream_id)
            elif isinstance(event, StreamReset):
                self._stream_reset(event.stream_id)
            elif isinstance(event, RemoteSettingsChanged):
                self._settings_changed()
            elif isinstance(event, PriorityUpdated):
                if event is not self._request_priority:  # not the priority a HEADERS frame carried
                    self._idle_frame()
            elif isinstance(event, (PingReceived, PingAckReceived, SettingsAcknowledged, UnknownFrameReceived)):
                self._idle_frame()
            elif isinstance(event, ConnectionTerminated):
                self._terminated()
            if self.transport.is_closing():  # calm() or the client's GOAWAY ended the connection
                return
        self.flush()

    def _header_block_pending(self) -> bool:
        """Bound a header block still arriving (HEADERS, then CONTINUATION frames) like any head.

        h2 keeps up to 64 frames of one block (1 MiB) before it decodes, and so checks
        MAX_HEADER_LIST_SIZE, anything: a block over MAX_HEAD_BYTES ends the connection, and
        one left unfinished runs the HEADER_TIMEOUT clock. True when the connection ended.
        """
        pending = getattr(self.h2.incoming_buffer, "_headers_buffer", None)  # h2's private state
        if not pending:
            if self._block_clock:
                self._block_clock = False
                self.conn.head_done()
            return False
        if sum(len(frame.data) for frame in pending) > MAX_HEAD_BYTES:
            log.warning("closing an HTTP/2 connection whose header block passes %d bytes", MAX_HEAD_BYTES)
            self.calm()
            return True
        if self.settled and not self._block_clock:
            self._block_clock = True
            self.conn.expect_head()
        return False

    def _request_received(self, event: RequestReceived) -> None:
        """Map pseudo-headers to a Request (RFC 9113 §8.3.1) and check it before any body byte."""
        self.conn.touch()
        self._request_priority = event.priority_updated
        stream_id = event.stream_id
        if self.closing:
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)  # RFC 9113 §8.7: safe to retry
            return
        if len(self.streams) >= MAX_STREAMS:
            # Streams reset by the client still count until their handlers return (as Go does).
            log.debug("refusing an HTTP/2 stream: %d streams held on this connection", MAX_STREAMS)
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        pseudo = {n: v for n, v in event.headers if n[:1] == b":"}
        method, target = pseudo.get(b":method", b""), pseudo.get(b":path", b"")
        if not (_TOKEN.fullmatch(method) and _PATH.fullmatch(target)):
            log.debug("malformed HTTP/2 request: bad :method or :path")  # RFC 9113 §8.1.1
            self.reset(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        headers = header_dict((n, v) for n, v in event.headers if n[:1] != b":")
        authority = pseudo.get(b":authority")
        if authority and "host" not in headers:
            headers["host"] = authority.decode("latin-1")
        path, _, query = target.decode("ascii").partition("?")
        request = Request(method.decode("ascii"), path, query, headers, b"", "2", self.conn.client)
        stream = self.streams[stream_id] = H2Responder(self, stream_id, request)
        length = headers.get("content-length", "")
        if (rejection := self.server.admit(request)) is not None:
            self._answer(stream, rejection)
        elif length.isdigit() and int(length) > self.server.max_body_bytes:
            self._reject(stream, 413, "Request body too large", "request_too_large")
        elif length.isdigit() and int(length) > self._room():
            self._answer(stream, self.server.busy(stream.request, BODIES_BUSY))

    def _data_received(self, event: DataReceived) -> None:
        """Keep body bytes within the limits, and grant window only for bytes kept (RFC 9113 §5.2)."""
        self.conn.touch()
        size = event.flow_controlled_length
        self._unacked += size
        if self._unacked >= CONNECTION_WINDOW // 2:
            # The connection's window comes back for every byte: each stream is bounded by its own.
            self.h2.increment_flow_control_window(self._unacked)
            self._unacked = 0
        data = event.data
        if not data and event.stream_ended is None:
            self._idle_frame()  # an empty DATA frame does no work
            return
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.rejected or stream.gone:
            return
        stream._size += len(data)
        if stream._size > self.server.max_body_bytes:
            self._reject(stream, 413, "Request body too large", "request_too_large")
            return
        if len(data) > self._room() or not self.server.budget.take(len(data)):
            self._answer(stream, self.server.busy(stream.request, BODIES_BUSY))
            return
        self.held += len(data)
        stream.held += len(data)
        stream._chunks.append(data)
        if event.stream_ended is None:
            self._grant(stream, size)

    def _grant(self, stream: H2Responder, size: int) -> None:
        """Give a stream back the window its kept bytes used, never past MAX_BODY_BYTES (+1 to see a 413)."""
        stream.unacked += size
        if stream.unacked < STREAM_WINDOW // 2:
            return  # one WINDOW_UPDATE per half window, as h2's own window manager does
        grant = min(stream.unacked, self.server.max_body_bytes + 1 - stream.granted)
        stream.unacked = 0
        if grant > 0:
            stream.granted += grant
            self.h2.increment_flow_control_window(grant, stream.stream_id)

    def _room(self) -> int:
        """Body bytes this connection may still keep: its share (one MAX_BODY_BYTES) within the budget."""
        return min(self.server.max_body_bytes - self.held, self.server.budget.room())

    def _release(self, stream: H2Responder) -> None:
        """Give a stream's body bytes back to the budget: its handler is done, or there is none."""
        if stream.held:
            self.server.budget.give(stream.held)
            self.held -= stream.held
            stream.held = 0

    def _stream_ended(self, stream_id: int) -> None:
        """Start the handler once the whole request is in."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.complete = True
        if not stream.rejected:
            stream.request.body = b"".join(stream._chunks)  # on the budget until the stream is done
            stream._chunks = []
            self.running += 1
            stream.task = self.server.spawn(self.server.run(stream.request, stream))

    def _window_updated(self, stream_id: int) -> None:
        """WINDOW_UPDATE: wake the writers it concerns; while nothing is sent it does no work."""
        if not self.running:
            self._idle_frame()
        self._wake(stream_id)

    def _wake(self, stream_id: int) -> None:
        """Wake the writers a new window concerns (stream 0: all of them)."""
        if stream_id == 0:
            for stream in self.streams.values():
                stream.wake()
        elif (stream := self.streams.get(stream_id)) is not None:
            stream.wake()

    def _settings_changed(self) -> None:
        """The client's SETTINGS: the first ends the connection's head; any may grow every window."""
        if not self.settled:
            self.settled = True
            self.conn.head_done()
        else:
            self._idle_frame()
        self._wake(0)  # INITIAL_WINDOW_SIZE may have grown every window

    def _idle_frame(self) -> None:
        """Count a frame that does no work (PING, SETTINGS, PRIORITY, empty DATA...); a flood ends the connection."""
        if not self._idle_frames.hit(self.conn.loop.time()):
            log.warning("closing an HTTP/2 connection that floods frames doing no work")
            self.calm()

    def _stream_reset(self, stream_id: int) -> None:
        """RST_STREAM from the client: that stream's client is gone; too many resets end the connection."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.client_left()
            stream.wake()
            self._release(stream)
            stream._chunks = []
            if stream.task is None:
                del self.streams[stream_id]
        if not self._resets.hit(self.conn.loop.time()):
            log.warning("closing an HTTP/2 connection that resets too many streams")
            self.calm()

    def calm(self) -> None:
        """GOAWAY(ENHANCE_YOUR_CALM) and close: the client is abusing the connection (RFC 9113 §5.4.1)."""
        if self.conn.closed:
            return
        self.h2.clear_outbound_data_buffer()  # e.g. the ACKs of a PING flood: none is owed now
        try:
            self.h2.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM)
        except ProtocolError:
            pass
        self.flush()
        self.connection_lost()
        self.transport.close()

    def _terminated(self) -> None:
        """GOAWAY from the client: h2 sends nothing more, so every stream is gone."""
        self.connection_lost()
        self.flush()
        self.transport.close()

    def connection_lost(self) -> None:
        """Every open stream's client is gone, and its body is dropped."""
        for stream in list(self.streams.values()):
            self._release(stream)
            stream._chunks = []
            stream.client_left()
            stream.wake()

    def head_timeout(self) -> None:
        """The preface and SETTINGS did not arrive within HEADER_TIMEOUT: GOAWAY and close."""
        self.close()

    def _reject(self, stream: H2Responder, status: int, message: str, code: str) -> None:
        """Answer a driver-made error on one stream without running the handler."""
        self._answer(stream, self.server.refusal(stream.request, status, message, code))

    def _answer(self, stream: H2Responder, rejection: Rejection) -> None:
        """Answer one stream without running the handler; the rest of its upload is refused."""
        stream.rejected = True
        stream._chunks = []
        self._release(stream)
        self.running += 1
        stream.task = self.server.spawn(self._send_rejection(stream, rejection))

    async def _send_rejection(self, stream: H2Responder, rejection: Rejection) -> None:
        """Send a response decided without the handler on `stream`."""
        try:
            await stream.send(rejection.status, rejection.headers, rejection.body)
        finally:
            stream.finish()

    def stream_done(self, stream: H2Responder) -> None:
        """Forget a finished stream; stop an unread upload; close when shutting down and idle."""
        self.streams.pop(stream.stream_id, None)
        self.running -= 1
        self._release(stream)
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

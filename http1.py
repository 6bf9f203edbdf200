"""The HTTP/1.1 driver: moves bytes between one connection and h11, one request at a time.

server.py owns the socket; the driver gets a connection as http_common.Link describes it, and
calls back `server.run(request, responder)` for each request.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING

import h11

from http_common import (ABORTED, BODIES_BUSY, BODILESS, DRIVER_FIELDS, ENDED, GONE, HOLD_PIPELINE, MAX_HEAD_BYTES,
                         STARTED, ClientGone, Rejection, Request, Responder, clean_headers, header_dict)

if TYPE_CHECKING:
    from http_common import Link

log = logging.getLogger("sambaproxy.server")

LINGER_TIMEOUT = 2.0  # seconds a rejected HTTP/1.1 client may keep sending before we close
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def head_size(event: h11.Request) -> int:
    """Bytes of a request head as sent: request line and field lines (RFC 9112 §2.1)."""
    size = len(event.method) + len(event.target) + 12
    for name, value in event.headers:
        size += len(name) + len(value) + 4
    return size


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
        length = None if status in BODILESS else len(body)
        out = d.h11.send(h11.Response(status_code=status, headers=d.fields(headers, length, self.request_id),
                                       reason=_REASONS.get(status, b"")))
        if body and not self._no_body:
            out += d.h11.send(h11.Data(data=body))
            self.sent += len(body)
        out += d.h11.send(h11.EndOfMessage())
        self.state = ENDED
        d.transport.write(out)
        if d.conn.paused:
            await d.conn.drain()

    async def start(self, status, headers):
        if self._begin(status):
            d = self._driver
            response = h11.Response(status_code=status, headers=d.fields(headers, None, self.request_id),
                                    reason=_REASONS.get(status, b""))
            head = d.h11.send(response)
            # Anchored at a line start: a header value may contain the same text, never a CRLF.
            self._chunked = b"\r\ntransfer-encoding: chunked\r\n" in head.lower()
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
        if self.state is not STARTED:
            self._refuse_write()
        if data and not self._no_body:
            d = self._driver
            d.transport.write(self._frame(data))
            self.sent += len(data)
            if d.conn.paused:
                self._pending = True
                try:
                    await d.conn.drain()
                finally:
                    self._pending = False
                if self.state is GONE:
                    raise ClientGone()

    def write_if_idle(self, data):
        d = self._driver
        if self._pending or self.state is not STARTED or d.conn.paused:
            return False
        if data and not self._no_body:
            d.transport.write(self._frame(data))
            self.sent += len(data)
        return True

    async def end(self):
        if self.state is STARTED:
            self.state = ENDED
            self._driver.transport.write(self._driver.h11.send(h11.EndOfMessage()))

    def abort(self):
        # RFC 9112 §8: closing before the last chunk tells the client the message is incomplete.
        if self.state is not GONE:
            self.state = ABORTED
        self._driver.transport.close()

    def finish(self):
        self._driver.cycle_done()


class H11Driver:
    """Moves bytes between one connection and h11, one request at a time."""

    def __init__(self, conn: Link) -> None:
        self.conn = conn
        self.server = conn.server
        self.transport = conn.transport
        # h11 refuses an incomplete head past this size; a complete one is measured in _request_started.
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.task: asyncio.Task | None = None
        self.responder: H11Responder | None = None
        self.lingering = False
        self._request: Request | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._held = 0  # body bytes taken from the server's budget
        self._pipelined = 0  # bytes read while a handler runs

    def idle(self) -> bool:
        """True when no handler runs."""
        return self.task is None

    def check_starved(self, cutoff: float) -> None:
        """HTTP/1.1 has no flow control of its own: a stalled client shows as a paused transport."""
        return None

    def data_received(self, data: bytes) -> None:
        """Feed h11; parse now unless a handler runs (RFC 9112 §9.3.2: pipelined requests wait their turn)."""
        if self.lingering:
            return
        self.conn.touch()
        self.h11.receive_data(data)
        if self.task is None:
            self.process()
        else:
            # Go on reading, so that the client's departure (EOF, reset) is seen while its
            # request runs, but hold no more than one pipelined head's worth of bytes.
            self._pipelined += len(data)
            if self._pipelined > MAX_HEAD_BYTES:
                self.conn.hold_reading(HOLD_PIPELINE)

    def connection_lost(self) -> None:
        """A client that leaves while its request is handled is gone."""
        self._release()
        if self.responder is not None:
            self.responder.client_left()

    def head_timeout(self) -> None:
        """No whole request head within HEADER_TIMEOUT: 408 if part of one came, else close."""
        if self.task is None and self.h11.their_state is h11.IDLE and self.h11.trailing_data[0]:
            self.reject(408, "The request head took too long to arrive", "request_timeout")
        else:
            self.transport.close()

    def process(self) -> None:
        """Read h11 events until a whole request is in, then start its handler."""
        try:
            while not self.lingering:
                event = self.h11.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    if self.h11.their_state is h11.IDLE:
                        self.conn.expect_head()  # part of a head is in: HEADER_TIMEOUT runs
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
            # Only the type: h11's message may quote the request's bytes, e.g. an API key.
            log.debug("malformed HTTP/1.1 request: %s", type(exc).__name__)
            if exc.error_status_hint == 431:
                self.reject(431, "Request header fields too large", "request_header_fields_too_large")
            else:
                self.reject(exc.error_status_hint, "Malformed HTTP request", "bad_request")

    def _request_started(self, event: h11.Request) -> None:
        """Check the head's size, admit it, check the declared body size, answer Expect: 100-continue."""
        self.conn.head_done()
        path, _, query = event.target.decode("latin-1").partition("?")
        request = Request(event.method.decode("ascii"), path, query, header_dict(event.headers), b"",
                          event.http_version.decode("ascii"), self.conn.client)
        self._request = request
        self._chunks = []
        self._size = 0
        length = request.headers.get("content-length")
        if head_size(event) > MAX_HEAD_BYTES:
            # h11 checks its limit only while a head is incomplete: one that came whole in a large
            # read is measured here.
            self.reject(431, "Request header fields too large", "request_header_fields_too_large")
        elif (rejection := self.server.admit(request)) is not None:
            self.answer_and_close(rejection)
        elif length is not None and int(length) > self.server.max_body_bytes:
            self.reject(413, "Request body too large", "request_too_large")
        elif length is not None and int(length) > self.server.budget.room():
            self.answer_and_close(self.server.busy(self._request, BODIES_BUSY))
        elif self.h11.they_are_waiting_for_100_continue:
            interim = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            self.transport.write(self.h11.send(interim))

    def _body_received(self, data: bytes) -> None:
        """Collect body bytes within MAX_BODY_BYTES and the server's budget (MAX_BUFFERED_BYTES)."""
        self._size += len(data)
        if self._size > self.server.max_body_bytes:
            self.reject(413, "Request body too large", "request_too_large")
        elif not self.server.budget.take(len(data)):
            self.answer_and_close(self.server.busy(self._request, BODIES_BUSY))
        else:
            self._held += len(data)
            self._chunks.append(data)

    def _release(self) -> None:
        """Give the body's bytes back to the budget: its handler is done, or there is none."""
        if self._held:
            self.server.budget.give(self._held)
            self._held = 0

    def _dispatch(self) -> None:
        """Start the handler task for the request just read."""
        request = self._request
        request.body = b"".join(self._chunks)
        self._request, self._chunks = None, []
        self._pipelined = 0  # the body stays on the budget until the handler is done with it
        self.responder = H11Responder(self, request.method == "HEAD")
        self.task = self.server.spawn(self.server.run(request, self.responder))

    def cycle_done(self) -> None:
        """Let h11's state decide between keep-alive and close (RFC 9112 §9.3)."""
        self._release()
        self.task = self.responder = None
        self.conn.touch()
        h = self.h11
        if self.transport.is_closing():
            return
        if self.server.closing or h.our_state is not h11.DONE or h.their_state is not h11.DONE:
            self.transport.close()  # MUST_CLOSE, ERROR, or shutting down
            return
        h.start_next_cycle()
        self._pipelined = 0
        self.conn.release_reading(HOLD_PIPELINE)
        if h.trailing_data[0]:  # a pipelined request is already buffered
            self.process()

    def fields(self, headers: list[tuple[str, str]], length: int | None,
               request_id: str | None = None) -> list[tuple[str, str]]:
        """Response header fields: the handler's, then X-Request-ID, Date, Content-Length, Connection."""
        out = clean_headers(headers, DRIVER_FIELDS)
        if request_id:
            out.append(("x-request-id", request_id))
        out.append(("date", self.server.date()))
        if length is not None:
            out.append(("content-length", str(length)))
        if self.server.closing:
            out.append(("connection", "close"))  # RFC 9112 §9.6: tell the client we will close
        return out

    def reject(self, status: int, message: str, code: str) -> None:
        """Answer a driver-made error while a response can still start, then close in stages."""
        self.answer_and_close(self.server.refusal(self._request, status, message, code))

    def answer_and_close(self, rejection: Rejection) -> None:
        """Answer without reading the request body, then close in stages."""
        self._chunks = []
        self._release()
        h = self.h11
        if h.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status, body = rejection.status, rejection.body
            fields = [*clean_headers(rejection.headers, DRIVER_FIELDS), ("date", self.server.date()),
                      ("content-length", str(len(body))), ("connection", "close")]
            try:
                out = h.send(h11.Response(status_code=status, headers=fields,
                                          reason=_REASONS.get(status, b"")))
                out += h.send(h11.Data(data=body)) + h.send(h11.EndOfMessage())
                self.transport.write(out)
            except h11.LocalProtocolError:
                log.debug("could not send %d", status)
        self._linger()

    def _linger(self) -> None:
        """Half-close and discard input for a while, so the client reads our answer (RFC 9112 §9.6)."""
        self.lingering = True
        self.conn.head_done()
        t = self.transport
        if t.can_write_eof():  # never over TLS: there the answer is followed by lingering alone
            t.write_eof()
        # Closing with unread input would reset the connection and could lose the answer.
        self.conn.release_reading(HOLD_PIPELINE)
        self.conn.close_later(LINGER_TIMEOUT)

    def shutdown(self) -> None:
        """Close now if idle; a running request closes the connection when it ends."""
        if self.task is None:
            self.transport.close()

    def close(self) -> None:
        """Close the connection."""
        self.transport.close()

"""Inbound HTTP server: accepts sockets, picks HTTP/1.1 or HTTP/2, runs one task per request.

The protocol work lives in http1.py (h11) and http2.py (h2); this module owns sockets, limits,
timeouts and shutdown, and re-exports the Request/Responder vocabulary of http_common.py the app
codes against.

Limits, each checked before a client is trusted (the client key is checked later, by `admit`):
MAX_CONNECTIONS at accept, HEADER_TIMEOUT and MAX_HEAD_BYTES on every request head,
MAX_BUFFERED_BYTES on request bodies held across all connections (HTTP/2: window is granted only
for bytes buffered within it), MAX_CONCURRENT_REQUESTS on handlers in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from email.utils import formatdate
from typing import Callable

from http1 import H11Driver
from http2 import H2Driver
from http_common import (  # noqa: F401  (Request, Responder, State, Handler, Rejection: re-exported for the app)
    HOLD_WRITES,
    GONE,
    JSON,
    RETRY_AFTER,
    STARTED,
    WAITING,
    Admit,
    Budget,
    ClientGone,
    Driver,
    Handler,
    Rejection,
    Request,
    Responder,
    State,
    describe,
)

log = logging.getLogger("sambaproxy.server")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4
# GOAWAY(last stream 0, PROTOCOL_ERROR) for a client whose HTTP/2 preface is wrong (RFC 9113 §3.4).
PREFACE_GOAWAY = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x00\x00\x00\x00\x01"
IDLE_TIMEOUT = 75.0  # seconds an idle keep-alive connection, or a client taking no data, is kept
HEADER_TIMEOUT = 10.0  # seconds a client has to send a whole request head (HTTP/2: preface, SETTINGS)
MAX_CONNECTIONS = 1024
MAX_CONCURRENT_REQUESTS = 256
MAX_BUFFERED_BYTES = 64 << 20
REFUSAL_LOG_INTERVAL = 60.0  # seconds between two log lines about refused connections


def default_error_body(status: int, message: str, type_: str, code: str | None) -> bytes:
    """Build an OpenAI-shaped error body, for servers built without the app's own."""
    error = {"message": message, "type": type_, "param": None, "code": code}
    return json.dumps({"error": error}).encode()


def _peer(address) -> str:
    """A socket address as host:port ([host]:port for IPv6)."""
    if not isinstance(address, tuple) or len(address) < 2:
        return ""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _refusal_as_is(request: Request | None, rejection: Rejection) -> Rejection:
    """The default completion of a driver-made answer: none."""
    return rejection


def _admit_all(request: Request) -> None:
    """The default admission check: every request head is let through."""
    return None


class Connection(asyncio.Protocol):
    """One accepted socket: picks the HTTP/1.1 or HTTP/2 driver and owns backpressure and timers.

    Drivers see it as http_common.Link; it calls them as http_common.Driver.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.driver: Driver | None = None  # chosen by ALPN or by the first bytes
        self.paused = False
        self.paused_at = 0.0  # when the transport last asked us to stop writing
        self.closed = False
        self.last_activity = 0.0
        self.client = ""  # the peer's "host:port", for the access log
        self._sniffed = b""
        self._drain_waiters: list[asyncio.Future] = []
        self._timer: asyncio.TimerHandle | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._holds = 0  # HOLD_* reasons reading is paused for

    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self.server.admit_connection():
            self.closed = True
            transport.abort()  # no answer: it would cost what the limit saves
            return
        self.client = _peer(transport.get_extra_info("peername"))
        self.server.connections.add(self)
        self.server.connections_accepted += 1
        ssl_object = transport.get_extra_info("ssl_object")
        protocol = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if protocol == "h2":
            self.driver = H2Driver(self)
        elif protocol == "http/1.1":
            self.driver = H11Driver(self)
        self.touch()
        self._timer = self.loop.call_later(self.server.idle_timeout, self._check_idle)
        self.expect_head()  # the first request head (HTTP/2: the preface and SETTINGS)

    def data_received(self, data: bytes) -> None:
        if self.driver is None:
            # Cleartext HTTP/2 by prior knowledge starts with the preface (RFC 9113 §3.3).
            data = self._sniffed + data
            if len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
                self._sniffed = data
                return
            self._sniffed = b""
            if data.startswith(H2_PREFACE):
                self.driver = H2Driver(self)
            elif data.startswith(b"PRI "):  # PRI is the preface's method alone (RFC 9113 §3.4)
                log.debug("invalid HTTP/2 connection preface")
                self.transport.write(PREFACE_GOAWAY)
                self.transport.close()
                return
            else:
                self.driver = H11Driver(self)
        try:
            self.driver.data_received(data)
        except Exception as exc:
            # A bug must cost one connection, never the event loop's "Fatal error" path.
            log.error("dropping a connection after an unexpected error: %s", describe(exc))
            self.driver.connection_lost()
            self.transport.abort()

    def eof_received(self) -> None:
        """A client that half-closes has left: return None so asyncio closes the transport."""
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        self.head_done()
        if self.driver is not None:
            self.driver.connection_lost()
        self._wake_writers()

    def pause_writing(self) -> None:
        # Stop reading too: a client that sends (PINGs, SETTINGS, requests) but does not read
        # would otherwise make us queue answers without bound.
        self.paused = True
        self.paused_at = self.loop.time()
        self.hold_reading(HOLD_WRITES)

    def resume_writing(self) -> None:
        self.paused = False
        self.release_reading(HOLD_WRITES)
        self._wake_writers()

    def hold_reading(self, reason: int) -> None:
        """Stop reading for `reason` (a HOLD_* bit) until release_reading(reason)."""
        if not self._holds:
            self.transport.pause_reading()
        self._holds |= reason

    def release_reading(self, reason: int) -> None:
        """Read again once no other reason holds reading."""
        if self._holds & reason:
            self._holds &= ~reason
            if not self._holds:
                self.transport.resume_reading()

    def expect_head(self) -> None:
        """Start the HEADER_TIMEOUT clock for a request head, unless it runs already."""
        if self._head_timer is None and not self.closed:
            self._head_timer = self.loop.call_later(self.server.header_timeout, self._head_expired)

    def head_done(self) -> None:
        """The head arrived: stop its clock."""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        """A request head (or the HTTP/2 preface and SETTINGS) took longer than HEADER_TIMEOUT."""
        self._head_timer = None
        log.debug("closing a connection whose request head took longer than %ss", self.server.header_timeout)
        if self.driver is None:
            self.transport.close()
        else:
            self.driver.head_timeout()

    async def drain(self) -> None:
        """Wait until the transport's buffer has drained or the connection is lost."""
        if self.paused and not self.closed:
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _wake_writers(self) -> None:
        """Release every writer waiting in drain()."""
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def touch(self) -> None:
        """Restart the idle clock."""
        self.last_activity = self.loop.time()

    def _check_idle(self) -> None:
        """Close a connection without a request, or whose client takes no data, for `idle_timeout`.

        A client that stops reading would otherwise pin its request, and the upstream request
        behind it, forever: the blocked write raises ClientGone once the connection is gone.
        """
        timeout = self.server.idle_timeout
        now = self.loop.time()
        if self.paused and now - self.paused_at >= timeout:
            log.debug("aborting a connection whose client stopped reading")
            self.transport.abort()  # close() would wait for the unread buffer to drain
            return
        # HTTP/2: a client can also stop granting flow-control window (RFC 9113 §5.2).
        starved = self.driver.check_starved(now - timeout) if self.driver is not None else None
        if self.transport.is_closing():
            self._abort_later()
            return
        quiet = self.driver is None or self.driver.idle()
        if quiet and now - self.last_activity >= timeout:
            log.debug("closing idle connection")
            self.close()
            self._abort_later()
            return
        deadline = self.last_activity + timeout if quiet else now + timeout
        if self.paused:
            deadline = min(deadline, self.paused_at + timeout)
        if starved is not None:
            deadline = min(deadline, starved + timeout)
        self._timer = self.loop.call_later(max(deadline - now, 0.01), self._check_idle)

    def close_later(self, delay: float) -> None:
        """Close the transport after `delay` seconds (lingering close)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, self._close_now)

    def _close_now(self) -> None:
        """Close the transport; abort it when the client is not reading what is buffered."""
        if self.paused:
            self.transport.abort()
        else:
            self.transport.close()
            self._abort_later()

    def _abort_later(self) -> None:
        """Abort a closing transport still open after `idle_timeout`.

        close() waits for the write buffer to drain, without limit: a client that never reads
        a buffer under the high-water mark would otherwise hold its connection (and a
        MAX_CONNECTIONS slot) for good.
        """
        if not self.closed:
            self._timer = self.loop.call_later(self.server.idle_timeout, self.transport.abort)

    def shutdown(self) -> None:
        """Begin a graceful close: idle connections close now, busy ones after their requests."""
        if self.driver is None:
            self.transport.close()
        else:
            self.driver.shutdown()

    def close(self) -> None:
        """Close the connection now (HTTP/2: with GOAWAY)."""
        if self.driver is None:
            self.transport.close()
        else:
            self.driver.close()


class Server:
    """Accepts connections and runs `handler(request, responder)` for each request."""

    def __init__(self, handler: Handler, *, max_body_bytes: int, ssl_context=None,
                 error_body: Callable[[int, str, str, str | None], bytes] | None = None,
                 idle_timeout: float = IDLE_TIMEOUT, admit: Admit | None = None,
                 on_refusal: Callable[[Request | None, Rejection], Rejection] | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 max_concurrent_requests: int = MAX_CONCURRENT_REQUESTS,
                 uncapped: frozenset[str] = frozenset(),
                 max_buffered_bytes: int = MAX_BUFFERED_BYTES,
                 header_timeout: float = HEADER_TIMEOUT) -> None:
        self.handler = handler
        self.admit: Admit = admit or _admit_all
        self.on_refusal = on_refusal or _refusal_as_is
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self.max_concurrent_requests = max_concurrent_requests
        self.uncapped = uncapped
        self.budget = Budget(max_buffered_bytes)  # request-body bytes held, every connection
        self.active = 0  # handlers in flight
        self.ssl_context = ssl_context
        self.error_body = error_body or default_error_body
        self.closing = False
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task] = set()  # running handlers, of every connection
        self.connections_accepted = 0
        self.connections_refused = 0
        self._refused_noted = 0  # refusals counted in the last log line
        self._refusal_logged_at = float("-inf")
        self.sockets: tuple = ()
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._date_second = -1
        self._date = ""

    async def start(self, host: str, port: int) -> None:
        """Bind and start accepting (port 0 picks a free port, see `port`)."""
        self.loop = asyncio.get_running_loop()
        # A TLS handshake is part of the head's time: a client cannot hold it open for longer.
        handshake = self.header_timeout if self.ssl_context is not None else None
        self._server = await self.loop.create_server(lambda: Connection(self), host, port,
                                                     ssl=self.ssl_context, ssl_handshake_timeout=handshake)
        self.sockets = self._server.sockets
        self.port = self.sockets[0].getsockname()[1]

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting, let running handlers finish for up to `grace` seconds, then close all."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        # Handlers can start during the grace period (an HTTP/2 upload that completes): each
        # round waits for the ones running now, so late ones are waited for, then cancelled, too.
        deadline = self.loop.time() + grace
        while self.tasks and (remaining := deadline - self.loop.time()) > 0:
            await asyncio.wait(set(self.tasks), timeout=remaining)
        cancelled: set[asyncio.Task] = set()
        for _ in range(3):  # bounded: a handler may ignore its cancellation
            fresh = self.tasks - cancelled
            if not fresh:
                break
            for task in fresh:
                task.cancel()
            cancelled |= fresh
            await asyncio.wait(set(self.tasks), timeout=1.0)
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                log.debug("some connections were still closing at shutdown")

    def admit_connection(self) -> bool:
        """False past MAX_CONNECTIONS; refusals are logged at most once a minute."""
        if len(self.connections) < self.max_connections:
            return True
        self.connections_refused += 1
        now = self.loop.time()
        if now - self._refusal_logged_at >= REFUSAL_LOG_INTERVAL:
            log.warning("MAX_CONNECTIONS (%d) reached: refused %d connection(s) since the last note",
                        self.max_connections, self.connections_refused - self._refused_noted)
            self._refusal_logged_at = now
            self._refused_noted = self.connections_refused
        return False

    def busy(self, request: Request | None, message: str) -> Rejection:
        """A 503 server_busy answer with Retry-After (a limit of ours, not the client's fault)."""
        return self.refusal(request, 503, message, "server_busy", [("retry-after", RETRY_AFTER)])

    def refusal(self, request: Request | None, status: int, message: str, code: str,
                headers: list[tuple[str, str]] = ()) -> Rejection:
        """A driver-made error answer (a limit, a malformed request), completed by `on_refusal`.

        `request` is None when no head could be read. The app's `on_refusal` gives it what every
        answer has (X-Request-ID, CORS fields for an allowed origin) and its access-log line.
        """
        type_ = "server_error" if status >= 500 else "invalid_request_error"
        body = self.error_body(status, message, type_, code)
        return self.on_refusal(request, Rejection(status, [*JSON, *headers], body))

    def spawn(self, coro) -> asyncio.Task:
        """Run a handler coroutine as a task that shutdown() waits for, then cancels."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def date(self) -> str:
        """The Date field value (RFC 9110 §6.6.1), formatted once per second."""
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = formatdate(now, usegmt=True)
        return self._date

    async def run(self, request: Request, responder: Responder) -> None:
        """Run the handler for one request, within MAX_CONCURRENT_REQUESTS, and make sure it gets a whole answer."""
        try:
            if responder.state is GONE:
                # HTTP/2 rapid reset (CVE-2023-44487): reset before its handler could start.
                log.debug("client left before %s %s started", request.method, request.path)
            elif request.path in self.uncapped:  # probes answer however busy the server is
                await self._handle(request, responder)
            elif self.active >= self.max_concurrent_requests:
                busy = self.busy(request, "The server is handling too many requests; retry shortly")
                await responder.send(busy.status, busy.headers, busy.body)
            else:
                self.active += 1
                try:
                    await self._handle(request, responder)
                finally:
                    self.active -= 1
        finally:
            responder.finish()

    async def _handle(self, request: Request, responder: Responder) -> None:
        """Run the handler; answer 500, or abort a started response, if it fails."""
        try:
            await self.handler(request, responder)
            state = responder.state
            if state is GONE:
                log.debug("client left during %s %s", request.method, request.path)
            elif state is WAITING:
                log.error("handler sent no response to %s %s", request.method, request.path)
                await self._fail(responder)
            elif state is STARTED:
                await responder.end()
        except ClientGone:
            log.debug("client left during %s %s", request.method, request.path)
        except asyncio.CancelledError:
            responder.abort()
            raise
        except Exception as exc:
            log.error("handler failed on %s %s: %s", request.method, request.path, describe(exc))
            await self._fail(responder)

    async def _fail(self, responder: Responder) -> None:
        """Answer 500 while a response can still start; after that, abort the stream."""
        if responder.state is not WAITING:
            responder.abort()
            return
        body = self.error_body(500, "Internal server error", "server_error", "internal_error")
        try:
            await responder.send(500, JSON, body)
        except Exception as exc:
            log.error("could not send the 500 answer: %s", describe(exc))
            responder.abort()

"""The request/response vocabulary both HTTP drivers share: Request, ClientGone, Responder, Handler.

http1.py (h11) and http2.py (h2) subclass Responder and build Requests with the helpers here;
server.py re-exports the vocabulary for the app. Budget and RateLimit are the counters behind
the server's limits, kept here without I/O so both drivers share them. Link, ServerSide and
Driver are the whole contract between server.py's Connection and the drivers.
"""

from __future__ import annotations

import enum
import logging
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("sambaproxy.server")

# The server's own error answers (400, 413, 500) are readable by browser clients too.
JSON = [("content-type", "application/json")]
BODIES_BUSY = "Too many request bodies are being received; retry shortly"  # the 503 of MAX_BUFFERED_BYTES
# Fields the drivers own: they frame the body themselves and add Date.
DRIVER_FIELDS = frozenset({"content-length", "transfer-encoding", "date"})
BODILESS = (204, 304)  # RFC 9110 §6.4.1: these responses never carry content
MAX_HEAD_BYTES = 16384  # a request head (HTTP/1.1 request line and fields, HTTP/2 decoded list)
RETRY_AFTER = "1"  # seconds a client told "server busy" should wait
# Why a connection stops reading: each reason is released on its own (Connection.hold_reading).
HOLD_WRITES = 1  # the transport's write buffer is over its high-water mark
HOLD_PIPELINE = 2  # HTTP/1.1: a pipelined request head is buffered already

@dataclass(slots=True)
class Request:
    """One HTTP request, the same for HTTP/1.1 and HTTP/2 (repr shows no headers, query or body)."""

    method: str
    path: str  # without the query string
    query: str = field(default="", repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # lower-case names
    body: bytes = field(default=b"", repr=False)
    http_version: str = "1.1"  # "1.0", "1.1" or "2"
    client: str = ""  # the peer's "host:port", for the access log


@dataclass(slots=True)
class Rejection:
    """An answer decided from the request head alone (client key, route, origin): no body byte is kept."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Budget:
    """Bytes held at once across all clients (MAX_BUFFERED_BYTES): a counter, a limit, its peak."""

    __slots__ = ("limit", "used", "peak")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0

    def room(self) -> int:
        """Bytes that can still be taken."""
        return self.limit - self.used

    def take(self, size: int) -> bool:
        """Hold `size` more bytes if the limit allows; False (nothing held) if not."""
        used = self.used + size
        if used > self.limit:
            return False
        self.used = used
        if used > self.peak:
            self.peak = used
        return True

    def give(self, size: int) -> None:
        """Return bytes taken earlier."""
        self.used -= size


class RateLimit:
    """A token bucket: `burst` events at once, then `rate` a second; hit() is False past it."""

    __slots__ = ("rate", "burst", "_tokens", "_at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    def hit(self, now: float) -> bool:
        """Count one event at `now`; False once the client is past its allowance."""
        tokens = min(self.burst, self._tokens + (now - self._at) * self.rate) - 1
        self._tokens, self._at = tokens, now
        return tokens >= 0


class ClientGone(Exception):
    """The client left (EOF, connection lost or RST_STREAM) before the response ended."""


def header_dict(pairs) -> dict[str, str]:
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


def describe(exc: BaseException) -> str:
    """An exception for a log line: its type and stack, never its message.

    Messages of h11, h2 and handler code may quote header or body bytes, an API key among them.
    """
    frames = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
    return f"{type(exc).__name__}\n{frames}" if frames else type(exc).__name__


def clean_headers(headers: list[tuple[str, str]], drop: frozenset) -> list[tuple[str, str]]:
    """Lower-case the handler's header names and drop the fields listed in `drop`."""
    return [(name, value) for name, value in ((n.lower(), v) for n, v in headers) if name not in drop]


class State(enum.Enum):
    """A response's life, one state at a time."""

    WAITING = "waiting"  # nothing sent yet
    STARTED = "started"  # status and headers sent, the body still open
    ENDED = "ended"  # the whole response is sent
    ABORTED = "aborted"  # given up by us: the stream is reset or the connection closed
    GONE = "gone"  # the client left before the response ended


WAITING, STARTED, ENDED, ABORTED, GONE = State  # module names: one global lookup on the write path


class Responder:
    """Sends one response; subclassed by the HTTP/1.1 and the HTTP/2 driver.

    WAITING -> STARTED -> ENDED, or ABORTED when we give up; GONE from WAITING or STARTED when
    the client leaves. The server calls abort() and finish(); the drivers call client_left().
    """

    __slots__ = ("state", "_callbacks", "_pending", "_head", "_no_body", "status", "sent", "request_id")

    def __init__(self, head: bool) -> None:
        self.state = WAITING
        self._pending = False
        self.status = self.sent = 0  # for the access log: the status sent, body bytes written
        self.request_id: str | None = None  # sent back as X-Request-ID when set
        self._callbacks: list[Callable[[], None]] | None = None
        self._head = head
        self._no_body = head

    @property
    def started(self) -> bool:
        """A response has begun and the client is still there (or it has ended)."""
        state = self.state
        return state is STARTED or state is ENDED or state is ABORTED

    @property
    def gone(self) -> bool:
        """The client left before the response ended."""
        return self.state is GONE

    @property
    def ended(self) -> bool:
        """Nothing more will be sent: the response is whole, or we gave up on it."""
        state = self.state
        return state is ENDED or state is ABORTED

    def on_gone(self, callback: Callable[[], None]) -> None:
        """Run `callback` once if the client leaves before the response ends (at once if it has)."""
        if self.state is GONE:
            callback()
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def client_left(self) -> None:
        """The client left: unless the response has ended, it is GONE and the on_gone callbacks run, once."""
        state = self.state
        if state is not WAITING and state is not STARTED:
            return
        self.state = GONE
        callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            try:
                callback()
            except Exception as exc:
                log.error("on_gone callback failed: %s", describe(exc))

    def _begin(self, status: int) -> bool:
        """Note that a response starts; False when the client has already left."""
        state = self.state
        if state is WAITING:
            self.state = STARTED
            self.status = status
            self._no_body = self._head or status in BODILESS
            return True
        if state is GONE:
            return False
        raise RuntimeError("response already started")

    def _refuse_write(self) -> None:
        """Raise for a body write outside a started, unfinished response."""
        if self.state is GONE:
            raise ClientGone()
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

    def abort(self) -> None:
        """Give up on the response: reset the stream or close the connection (the client sees it is cut)."""
        raise NotImplementedError

    def finish(self) -> None:
        """The request's task is over: let the driver go on (next request, forget the stream)."""
        raise NotImplementedError


Handler = Callable[[Request, Responder], Awaitable[None]]
# Called with the request head (body still empty) before any body byte is read.
Admit = Callable[[Request], "Rejection | None"]


class ServerSide(Protocol):
    """What a driver may use of the server (server.Server): its limits, its answers, its tasks."""

    closing: bool  # shutting down: finish what runs, take nothing new
    max_body_bytes: int
    budget: Budget  # MAX_BUFFERED_BYTES: take() each body byte kept, give() it back
    admit: Admit
    error_body: Callable[[int, str, str, str | None], bytes]

    def busy(self, message: str) -> Rejection: ...
    def date(self) -> str: ...
    def spawn(self, coro) -> asyncio.Task: ...
    async def run(self, request: Request, responder: Responder) -> None: ...


class Link(Protocol):
    """What a driver may use of its connection (server.Connection), and nothing more."""

    transport: asyncio.Transport  # write(), close(), is_closing(); reading goes through hold_reading()
    loop: asyncio.AbstractEventLoop
    server: ServerSide
    paused: bool  # the transport's write buffer is over its high-water mark: drain() before more
    closed: bool  # the connection is lost

    async def drain(self) -> None: ...
    def touch(self) -> None: ...  # the client made progress: restart the idle clock
    def expect_head(self) -> None: ...  # part of a request head is in: HEADER_TIMEOUT runs
    def head_done(self) -> None: ...
    def hold_reading(self, reason: int) -> None: ...  # HOLD_* reasons
    def release_reading(self, reason: int) -> None: ...
    def close_later(self, delay: float) -> None: ...


class Driver(Protocol):
    """What a connection calls on its driver (http1.H11Driver, http2.H2Driver)."""

    def data_received(self, data: bytes) -> None: ...
    def connection_lost(self) -> None: ...  # every responder's client_left()
    def idle(self) -> bool: ...  # no handler runs
    def check_starved(self, cutoff: float) -> float | None: ...
    def head_timeout(self) -> None: ...  # HEADER_TIMEOUT passed: answer 408 or close
    def shutdown(self) -> None: ...  # refuse new requests, close once the running ones end
    def close(self) -> None: ...

"""The request/response vocabulary both HTTP drivers share: Request, ClientGone, Responder, Handler.

http1.py (h11) and http2.py (h2) subclass Responder and build Requests with the helpers here;
server.py re-exports the vocabulary for the app. Budget and RateLimit are the counters behind
the server's limits, kept here without I/O so both drivers share them.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Awaitable, Callable

log = logging.getLogger("sambaproxy.server")

# The server's own error answers (400, 413, 500) are readable by browser clients too.
JSON = [("content-type", "application/json"), ("access-control-allow-origin", "*")]
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
            except Exception as exc:
                log.error("on_gone callback failed: %s", describe(exc))

    def _begin(self, status: int) -> bool:
        """Note that a response starts; False when the client has already left."""
        if self.started:
            raise RuntimeError("response already started")
        if self.gone:
            return False
        self.started = True
        self._no_body = self._head or status in BODILESS
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
# Called with the request head (body still empty) before any body byte is read.
Admit = Callable[[Request], "Rejection | None"]

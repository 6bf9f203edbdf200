"""Stopping upstream work for a client that has gone, without ever cancelling the task that reads it.

A task cancelled in the middle of an httpx write over TLS breaks the shared HTTP/2 upstream
connection for every request on it, so a departure instead stops what is in flight: the
attempt being opened (Attempt, through httpcore's `trace` extension), then the answer
(stop_upstream: close an HTTP/1.1 answer, reset an HTTP/2 stream). Some of this reaches into
httpcore 1.0's private state, checked at every step; where it differs, nothing is done.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import h2.errors
import h2.events
import h2.exceptions
import httpcore
import httpx

from http_common import ClientGone

log = logging.getLogger("sambaproxy.upstream")

_CONNECTION_STEPS = ("connection.", "http2.send_connection_init")
DONE_GRACE = 0.25  # seconds a complete answer's upstream has to end its body before it is closed


class Departure:
    """A client's departure as the upstream side sees it, registered before anything is opened.

    The opener checks `gone` before every attempt; `stop_with` names what a departure must
    stop now (the attempt in flight, then the answer it opened), so that the task awaiting
    upstream ends on its own and is never cancelled.
    """

    __slots__ = ("gone", "_stop")

    def __init__(self) -> None:
        self.gone = False
        self._stop = None

    def left(self) -> None:
        """The client has gone: stop whatever is in flight for it."""
        if self.gone:
            return
        self.gone = True
        stop, self._stop = self._stop, None
        if stop is not None:
            stop()

    def stop_with(self, stop) -> None:
        """Call `stop()` when the client leaves, at once if it has; None: nothing in flight."""
        if self.gone and stop is not None:
            stop()
        else:
            self._stop = stop

    async def pause(self, delay: float) -> None:
        """Wait `delay` seconds (a retry's back-off), or less if the client leaves meanwhile."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        timer = loop.call_later(delay, wake)
        self.stop_with(wake)
        try:
            await waiter
        finally:
            timer.cancel()
            self.stop_with(None)


class Attempt:
    """One upstream request in flight, which a departure can stop without cancelling its opener.

    httpcore reports each step of the request to a `trace` extension, in the opener's own
    task: at every step boundary a departed client ends the attempt there. Once the request
    is written and its answer awaited, `stop()` (from the departure) shuts an HTTP/1.1
    connection's socket or resets the HTTP/2 stream, so the awaited read fails at once.
    """

    __slots__ = ("client", "departure", "extensions", "stream_id", "waiting", "opening", "tasks")

    def __init__(self, client: httpx.AsyncClient, departure: Departure, tasks: set) -> None:
        self.client = client
        self.departure = departure
        self.extensions: dict = {}
        self.stream_id: int | None = None
        self.waiting = False  # the request is written; its answer's head is awaited
        self.opening = True   # until the answer's head has arrived (or the attempt failed)
        self.tasks = tasks

    async def trace(self, name: str, info: dict) -> None:
        """httpcore's report of one step of the request, in the opener's task."""
        if not self.opening:
            return
        if name == "http2.send_request_headers.started":
            self.stream_id = info.get("stream_id")
        elif name.endswith(".receive_response_headers.started"):
            self.waiting = True
        # Connection-level steps are left alone: ending an HTTP/2 connection's set-up would fail
        # every other request waiting on it (httpcore does not retry them); the request's own
        # next step stops it instead.
        if (self.departure.gone and name.endswith(".started") and not name.endswith("response_closed.started")
                and not name.startswith(_CONNECTION_STEPS)):
            if self.stream_id is not None and name != "http2.send_request_headers.started":
                connection, request = self._connection()  # the stream is open upstream: reset it
                if isinstance(connection, httpcore.AsyncHTTP2Connection):
                    await _reset_http2_stream(connection, self.stream_id, request)
            raise ClientGone()

    def stop(self) -> None:
        """Stop an attempt whose answer is awaited; one still being sent stops at its next step."""
        if not self.waiting or not self.opening:
            return
        connection, request = self._connection()
        if isinstance(connection, httpcore.AsyncHTTP11Connection):
            sock = connection._network_stream.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # the awaited read sees EOF; upstream sees us leave
                except OSError:
                    pass
        elif isinstance(connection, httpcore.AsyncHTTP2Connection) and self.stream_id is not None:
            task = asyncio.get_running_loop().create_task(
                _reset_http2_stream(connection, self.stream_id, request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _connection(self):
        """The httpcore connection (and request) serving this attempt, or (None, None).

        Found in the pool by the identity of the extensions dict, which httpx hands to
        httpcore as it is; private state, checked at every step.
        """
        pool = getattr(getattr(self.client, "_transport", None), "_pool", None)
        for pool_request in list(getattr(pool, "_requests", ())):
            request = getattr(pool_request, "request", None)
            if getattr(request, "extensions", None) is self.extensions:
                connection = getattr(getattr(pool_request, "connection", None), "_connection", None)
                if isinstance(connection, httpcore.AsyncHTTP11Connection):
                    return (connection, request) if hasattr(connection, "_network_stream") else (None, None)
                if isinstance(connection, httpcore.AsyncHTTP2Connection) and _has_h2_state(connection):
                    return connection, request
                return None, None
        return None, None


async def open_for_client(on_gone, spawn, open_attempts) -> tuple[httpx.Response, Departure]:
    """Open an upstream answer for one client, stopped (never cancelled) when the client leaves.

    The departure hook comes first: a client that leaves while upstream is being opened stops
    the attempt in flight, and no further attempt starts; once open, it stops the answer. The
    task awaiting upstream is never cancelled, as a task cancelled mid-write over TLS breaks a
    shared HTTP/2 connection for every request on it.
    """
    departure = Departure()
    on_gone(departure.left)
    response = await open_attempts(departure)
    departure.stop_with(lambda: spawn(stop_upstream(response)))
    return response, departure


async def finish_upstream(response: httpx.Response, chunks, spawn, grace: float = DONE_GRACE) -> None:
    """Give a complete answer's upstream `grace` seconds to end its framing, then close it.

    Upstream normally ends the body right after [DONE], and reading that end keeps an HTTP/1.1
    connection reusable; one that lingers (or drops) is closed without waiting for EOF. The
    client has its whole answer already.
    """
    closer = asyncio.get_running_loop().call_later(grace, lambda: spawn(stop_upstream(response)))
    try:
        async for _ in chunks:
            pass
    except (httpx.HTTPError, httpx.StreamError):
        pass  # the answer was complete: what the connection does now is no one's error
    finally:
        closer.cancel()


async def stop_upstream(response: httpx.Response) -> None:
    """Stop the upstream work behind an answer whose client has gone, without cancelling its reader."""
    if response.http_version == "HTTP/2":
        await cancel_http2_stream(response)
    else:
        await response.aclose()  # closing an HTTP/1.1 answer closes its connection: the read ends at once


async def cancel_http2_stream(response: httpx.Response) -> bool:
    """Tell an HTTP/2 upstream that an answer is abandoned, and wake the task reading it.

    httpcore 1.0 forgets an abandoned HTTP/2 stream without sending RST_STREAM,
    so upstream would go on generating, and the task reading it would wait for
    the next frame of the connection. This sends RST_STREAM (RFC 9113 §6.4) and
    a PING whose ACK wakes that reader, which then finds a StreamReset event and
    ends. It reaches into httpcore's private state, checked at every step, and
    does nothing when that differs. The reading task itself is never cancelled.
    """
    stream = _httpcore_h2_stream(response)
    if stream is None:
        return False
    return await _reset_http2_stream(stream._connection, stream._stream_id, stream._request)


async def _reset_http2_stream(connection, stream_id: int, request) -> bool:
    """RST_STREAM(CANCEL) one stream of an httpcore HTTP/2 connection, and wake its reader."""
    try:
        connection._h2_state.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
    except h2.exceptions.ProtocolError:
        return False  # the stream has ended already
    events = connection._events.get(stream_id)
    if events is not None:  # a reader may still wait on this stream: give it an event, and a PING ACK to wake it
        events.append(h2.events.StreamReset(stream_id=stream_id, error_code=h2.errors.ErrorCodes.CANCEL,
                                            remote_reset=False))
        connection._h2_state.ping(os.urandom(8))
    try:
        await connection._write_outgoing_data(request)
    except Exception as exc:  # the connection is already failing; its reader will see it too
        log.debug("could not reset an abandoned HTTP/2 stream: %s", type(exc).__name__)
    return True


def _has_h2_state(connection) -> bool:
    """Whether an httpcore HTTP/2 connection has the private state the resets above use."""
    return all(hasattr(connection, name) for name in ("_events", "_h2_state", "_write_outgoing_data"))


def _httpcore_h2_stream(response: httpx.Response):
    """The httpcore HTTP/2 stream behind an httpx response, or None."""
    stream = getattr(getattr(response.stream, "_stream", None), "_httpcore_stream", None)
    stream = getattr(stream, "_stream", None)
    connection = getattr(stream, "_connection", None)
    if not isinstance(connection, httpcore.AsyncHTTP2Connection):
        return None
    if not _has_h2_state(connection) or not hasattr(stream, "_stream_id"):
        return None
    return stream

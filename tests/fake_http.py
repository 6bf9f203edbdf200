"""A small asyncio + h11 HTTP/1.1 server for test fakes (tests/fake_samba.py).

It reads requests one after another on keep-alive connections, writes whole or
streamed (chunked) answers, and notices at once when a client leaves, even in
the middle of an answer.  A subclass fills `_routes` ({path: (method, handler)}),
answers through the `Conn` each handler gets, and may shape its error bodies
with `error_object`.
"""
from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
from dataclasses import dataclass
from urllib.parse import parse_qs

import h11


# ---------------------------------------------------------------- connection

class Gone(Exception):
    """The client left (EOF or a failed write)."""


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def cookies(self) -> dict[str, str]:
        pairs = (c.strip().partition("=") for c in self.headers.get("cookie", "").split(";"))
        return {name: value for name, _, value in pairs if name}

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class Conn:
    """One client connection: h11 state plus a reader task that notices EOF at any time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.h11 = h11.Connection(h11.SERVER)
        self.reader, self.writer = reader, writer
        self.gone = asyncio.Event()
        self.status: int | None = None
        self._data = asyncio.Event()
        self._reader_task = asyncio.create_task(self._read_loop())

    async def _read_loop(self) -> None:
        """Feed h11 while the handler runs, so a client leaving mid-stream is seen at once."""
        try:
            while data := await self.reader.read(65536):
                self.h11.receive_data(data)
                self._data.set()
        except OSError:
            pass
        finally:
            self.gone.set()
            self._data.set()

    async def _next_event(self):
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            if self.gone.is_set():
                return None
            self._data.clear()
            await self._data.wait()
        return event

    async def read_request(self) -> Request | None:
        """The next whole request, or None when the client has closed."""
        start = await self._next_event()
        if not isinstance(start, h11.Request):
            return None
        body = bytearray()
        while not isinstance(event := await self._next_event(), h11.EndOfMessage):
            if not isinstance(event, h11.Data):
                return None
            body += event.data
        headers: dict[str, str] = {}
        for name, value in start.headers:
            key, text = name.decode("latin-1"), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        path, _, query = start.target.decode("latin-1").partition("?")
        params = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
        return Request(start.method.decode(), path, params, headers, bytes(body))

    async def _send(self, *events) -> None:
        if self.gone.is_set():
            raise Gone
        try:
            for event in events:
                self.writer.write(self.h11.send(event))
            await self.writer.drain()
        except OSError as exc:
            self.gone.set()
            raise Gone from exc

    async def respond(self, status: int, headers: list, body: bytes = b"") -> None:
        """A whole response with content-length."""
        await self.start(status, [*headers, ("content-length", str(len(body)))])
        await self._send(*([h11.Data(data=body)] if body else []), h11.EndOfMessage())

    async def start(self, status: int, headers: list) -> None:
        """Headers of a streamed response; h11 picks chunked framing for HTTP/1.1."""
        self.status = status
        await self._send(h11.Response(status_code=status, headers=headers,
                                      reason=http.HTTPStatus(status).phrase.encode()))

    async def write(self, data: bytes) -> None:
        await self._send(h11.Data(data=data))

    async def end(self) -> None:
        await self._send(h11.EndOfMessage())

    async def pause(self, seconds: float) -> None:
        """A real delay of the answer that ends early, with Gone, if the client leaves."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.gone.wait(), seconds)
        if self.gone.is_set():
            raise Gone

    async def until_gone(self) -> None:
        """Keep the connection open and silent until the client closes it."""
        await self.gone.wait()
        raise Gone

    def drop(self) -> None:
        """Close the socket mid-response: no terminal chunk, so the body is incomplete."""
        self.writer.close()

    def next_cycle(self) -> bool:
        """Keep the connection alive if h11 says both sides finished cleanly (RFC 9112 §9.3)."""
        if self.gone.is_set() or self.writer.is_closing():
            return False
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    def abort(self) -> None:
        self.gone.set()
        self.writer.transport.abort()

    async def close(self) -> None:
        self._reader_task.cancel()
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        await asyncio.gather(self._reader_task, return_exceptions=True)


# ---------------------------------------------------------------- the server

class FakeHTTPServer:
    """Serve `_routes` on a host and port; every connection is tracked so stop() can close it."""

    logger = logging.getLogger("fake_http")   # a subclass may log through its own

    def __init__(self) -> None:
        self.url = ""
        self._routes: dict = {}               # path -> (method, async handler(conn, request))
        self._server: asyncio.Server | None = None
        self._conns: set[Conn] = set()
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._stopping = False
        self._server = await asyncio.start_server(self._on_connect, host, port)
        bound = self._server.sockets[0].getsockname()[1]
        self.url = f"http://{host}:{bound}"

    async def stop(self) -> None:
        """Close the listener and every open connection, stalled streams included."""
        self._stopping = True
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._conns):
            conn.abort()
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=2.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None

    def error_object(self, status: int, message: str | None = None) -> dict:
        """The JSON body of an error this server answers by itself (no route, wrong method, bad request)."""
        return {"error": {"message": message or http.HTTPStatus(status).phrase}}

    async def _on_connect(self, reader, writer) -> None:
        conn, task = Conn(reader, writer), asyncio.current_task()
        self._conns.add(conn)
        self._tasks.add(task)
        try:
            await self._serve(conn)
        except Exception:  # a bug in the fake: log it, close this connection only
            self.logger.exception("%s: connection failed", self.logger.name)
        finally:
            self._conns.discard(conn)
            self._tasks.discard(task)
            await conn.close()

    async def _serve(self, conn: Conn) -> None:
        """Requests one after another on a keep-alive connection."""
        while True:
            try:
                req = await conn.read_request()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                with contextlib.suppress(Gone, h11.LocalProtocolError):
                    await self._json(conn, status, self.error_object(status))
                return
            if req is None:
                return
            try:
                await self._dispatch(conn, req)
            except Gone:
                return
            self.logger.debug("%s %s -> %s", req.method, req.path, conn.status)
            if not conn.next_cycle():
                return

    async def _dispatch(self, conn: Conn, req: Request) -> None:
        route = self._routes.get(req.path)
        if route is None:
            return await self._json(conn, 404, self.error_object(404, f"no route {req.path}"))
        if route[0] != req.method:
            return await self._json(conn, 405, self.error_object(405), [("allow", route[0])])
        await route[1](conn, req)

    async def _json(self, conn: Conn, status: int, obj, headers=()) -> None:
        await conn.respond(status, [("content-type", "application/json"), *headers],
                           json.dumps(obj).encode())

    async def _redirect(self, conn: Conn, location: str, headers=()) -> None:
        await conn.respond(302, [("location", location), *headers])

    async def _plain(self, conn: Conn, status: int, text: str) -> None:
        await conn.respond(status, [("content-type", "text/plain")], text.encode())

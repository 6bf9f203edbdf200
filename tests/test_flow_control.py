"""HTTP/2 flow control of responses (RFC 9113 §5.2, §6.9), with a raw client that grants window step by step."""

from __future__ import annotations

import asyncio

import h2.events
import pytest

from raw_h2 import WAIT, H2Client, data_of, ended
from server import Server

CONNECTION_WINDOW = 65535  # RFC 9113 §6.9.2: SETTINGS cannot change the connection's window


def pattern(size: int) -> bytes:
    """Bytes whose order shows: a lost or repeated piece changes them."""
    return bytes(i % 251 for i in range(size))


class Writer:
    """Handlers that write more than the client's window allows."""

    def __init__(self) -> None:
        self.idle_results: list[bool] = []
        self.tried = asyncio.Event()  # the first keep-alive comment was tried

    async def __call__(self, request, responder) -> None:
        size = int(request.query or 0)
        if request.path == "/write":
            await responder.start(200, [("content-type", "application/octet-stream")])
            await responder.write(pattern(size))
            await responder.end()
        elif request.path == "/send":
            await responder.send(200, [("content-type", "application/octet-stream")], pattern(size))
        elif request.path == "/keepalive":
            await responder.start(200, [("content-type", "text/event-stream")])
            await responder.write(pattern(size))  # exactly the stream's window
            self.idle_results.append(responder.write_if_idle(b": keep-alive\n\n"))  # no room: refused
            self.tried.set()
            await responder.write(b"x" * 10)  # waits for the test's WINDOW_UPDATE
            self.idle_results.append(responder.write_if_idle(b": ka\n"))  # room again: sent
            await responder.end()


@pytest.fixture
def writer():
    return Writer()


@pytest.fixture
async def port(writer):
    server = Server(writer, max_body_bytes=1000)
    await server.start("127.0.0.1", 0)
    yield server.port
    await server.shutdown(grace=1.0)


@pytest.fixture
async def open_client(port):
    clients: list[H2Client] = []

    async def open_(window: int | None = None) -> H2Client:
        client = await H2Client.open(port, window=window)
        clients.append(client)
        return client

    yield open_
    for client in clients:
        client.close()


@pytest.mark.parametrize("path", ["/write", "/send"])
async def test_stream_window_update_wakes_the_waiting_writer(open_client, path):
    client = await open_client(window=1000)
    stream_id = client.request("GET", f"{path}?5000")
    got, granted, steps = 0, 1000, 0
    while True:
        events = await client.read()  # h2 itself fails the test if the server sends past the window
        got += len(data_of(events, stream_id))
        if any(ended(stream_id)(e) for e in events):
            break
        if got == granted:  # the window is spent: the writer waits until we grant more
            client.grant(stream_id, 1000)
            granted += 1000
            steps += 1
    assert data_of(client.events, stream_id) == pattern(5000)
    assert steps == 4 and isinstance(client.events[-1], h2.events.StreamEnded)


async def test_connection_window_update_wakes_every_waiting_writer(open_client):
    client = await open_client(window=1 << 20)  # streams have room; the connection's 64 KiB runs out
    streams = [client.request("GET", "/write?40000") for _ in range(2)]
    got, granted, done = 0, CONNECTION_WINDOW, set()
    while len(done) < 2:
        events = await client.read()
        got += sum(len(data_of(events, s)) for s in streams)
        done |= {s for s in streams if any(ended(s)(e) for e in events)}
        if got == granted and len(done) < 2:
            client.grant(0, 5000)  # stream 0: the whole connection
            granted += 5000
    assert [data_of(client.events, s) for s in streams] == [pattern(40000)] * 2
    assert granted > CONNECTION_WINDOW  # the writers did wait for the connection's window


async def test_settings_growing_the_initial_window_wakes_the_waiting_writer(open_client):
    client = await open_client(window=1000)
    stream_id = client.request("GET", "/write?5000")
    got = 0
    while got < 1000:
        got += len(data_of(await client.read(), stream_id))
    assert got == 1000
    client.set_window(10000)  # RFC 9113 §6.9.2: open streams' windows grow by the difference
    await client.until(ended(stream_id))
    assert data_of(client.events, stream_id) == pattern(5000)
    assert isinstance(client.events[-1], h2.events.StreamEnded)


async def test_keepalive_comment_waits_for_window_room(open_client, writer):
    client = await open_client(window=1000)
    stream_id = client.request("GET", "/keepalive?1000")
    got = 0
    while got < 1000:
        got += len(data_of(await client.read(), stream_id))
    await asyncio.wait_for(writer.tried.wait(), WAIT)  # the window is spent; the 10 bytes wait for more
    assert writer.idle_results == [False]
    client.grant(stream_id, 100)
    await client.until(ended(stream_id))
    assert writer.idle_results == [False, True]
    assert data_of(client.events, stream_id) == pattern(1000) + b"x" * 10 + b": ka\n"
    assert isinstance(client.events[-1], h2.events.StreamEnded)

"""max_body_bytes at its boundary: exactly the limit is accepted, one byte more is 413, over HTTP/1.1 and HTTP/2."""

from __future__ import annotations

import asyncio
import json

import h2.events
import pytest

from raw_h2 import WAIT, H2Client, data_of, ended, status_of
from server import Server

LIMIT = 1000


class Echo:
    """Answers with the size of the body it got; counts the requests that reached it."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request, responder) -> None:
        self.calls += 1
        await responder.send(200, [("content-type", "text/plain")], b"%d" % len(request.body))


@pytest.fixture
def echo():
    return Echo()


@pytest.fixture
async def port(echo):
    server = Server(echo, max_body_bytes=LIMIT)
    await server.start("127.0.0.1", 0)
    yield server.port
    await server.shutdown(grace=1.0)


async def h1_post(port: int, framing: str, size: int) -> tuple[int, bytes]:
    """POST a body of `size` bytes over a fresh connection; return (status, response body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    try:
        body = b"a" * size
        if framing == "length":
            head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
            writer.write(head + body)
        else:  # two chunks, so the limit is crossed by the second one
            half = size // 2
            chunks = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in (body[:half], body[half:]))
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + chunks + b"0\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        status = int(head.split(b" ", 2)[1])
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        return status, await asyncio.wait_for(reader.readexactly(length), WAIT)
    finally:
        writer.close()


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_h1_body_of_exactly_the_limit_is_accepted(port, echo, framing):
    assert await h1_post(port, framing, LIMIT) == (200, b"%d" % LIMIT)
    assert echo.calls == 1


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_h1_body_one_byte_over_the_limit_is_413(port, echo, framing):
    status, body = await h1_post(port, framing, LIMIT + 1)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    assert echo.calls == 0


async def test_h1_content_length_one_byte_over_the_limit_is_refused_before_the_body(port, echo):
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    try:
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (LIMIT + 1))  # no body
        answer = await asyncio.wait_for(reader.read(), WAIT)  # the answer, then the server closes
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 413 ") and b"request_too_large" in answer
    assert echo.calls == 0


async def h2_post(port: int, size: int, declare: bool) -> tuple[int | None, bytes]:
    """POST `size` bytes on one stream (declare: with content-length); return (status, response body)."""
    client = await H2Client.open(port)
    try:
        extra = [("content-length", str(size))] if declare else []
        stream_id = client.request("POST", "/echo", headers=extra, end_stream=False)
        await client.send_body(stream_id, b"a" * size)
        await client.until(ended(stream_id))
        return status_of(client.events, stream_id), data_of(client.events, stream_id)
    finally:
        client.close()


@pytest.mark.parametrize("declare", [False, True], ids=["no-length", "content-length"])
async def test_h2_body_of_exactly_the_limit_is_accepted(port, echo, declare):
    assert await h2_post(port, LIMIT, declare) == (200, b"%d" % LIMIT)
    assert echo.calls == 1


async def test_h2_body_one_byte_over_the_limit_is_413(port, echo):
    status, body = await h2_post(port, LIMIT + 1, declare=False)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    assert echo.calls == 0


async def test_h2_content_length_over_the_limit_is_refused_before_any_data(port, echo):
    client = await H2Client.open(port)
    try:
        extra = [("content-length", str(LIMIT + 1))]
        stream_id = client.request("POST", "/echo", headers=extra, end_stream=False)  # and no DATA, ever
        events = await client.until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id)
        assert status_of(events, stream_id) == 413
        assert json.loads(data_of(events, stream_id))["error"]["code"] == "request_too_large"
        assert echo.calls == 0
    finally:
        client.close()

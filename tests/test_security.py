"""Issue 6, the app side: admission at the request head, CORS, departures before upstream, [DONE]."""

from __future__ import annotations

import asyncio
import json

import h2.events
import httpx
import pytest

from conftest import AUTH, CLIENT_KEY
from fake_samba import Reply
from server_helpers import RawH2, read_response

HELLO = {"model": "Meta-Llama-3.3-70B-Instruct", "messages": [{"role": "user", "content": "hello"}]}
CHAT = "/v1/chat/completions"
UPLOAD = 30 * 1024 * 1024  # declared, never sent: the answer must come from the head alone
WAIT = 5.0


async def _open(app):
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", app.port), WAIT)


# --- item 1: the client key, route and method are judged at the request head ---------------

async def test_wrong_key_on_a_30mb_http1_upload_is_401_before_any_body_byte(proxy, fake):
    reader, writer = await _open(proxy)
    try:
        writer.write(f"POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-wrong-41c7\r\n"
                     f"content-type: application/json\r\ncontent-length: {UPLOAD}\r\n\r\n".encode())
        writer.write(b"{" + b" " * 65536)  # a first piece of the body; the rest never comes
        _, status, headers, body = await read_response(reader)
    finally:
        writer.close()
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert json.loads(body)["error"]["code"] == "invalid_api_key" and b"sk-wrong-41c7" not in body
    assert not fake.completions


async def test_wrong_key_on_a_30mb_http2_upload_is_401_before_any_body_byte(proxy, fake):
    reader, writer = await _open(proxy)
    try:
        client = RawH2(reader, writer)
        stream_id = client.request("POST", CHAT, end_stream=False, extra=[
            ("authorization", "Bearer sk-wrong-41c7"), ("content-length", str(UPLOAD))])
        client.conn.send_data(stream_id, b"{" + b" " * 16000)
        client.flush()
        seen = await client.until(lambda e: isinstance(e, h2.events.StreamEnded) or
                                  isinstance(e, h2.events.StreamReset))
    finally:
        writer.close()
    response = next(e for e in seen if isinstance(e, h2.events.ResponseReceived))
    assert dict(response.headers)[b":status"] == b"401"
    body = b"".join(e.data for e in seen if isinstance(e, h2.events.DataReceived))
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert not fake.completions


async def test_messages_route_is_judged_at_the_head_in_anthropic_shape(proxy, fake):
    reader, writer = await _open(proxy)
    try:
        writer.write(f"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: sk-wrong-41c7\r\n"
                     f"content-type: application/json\r\ncontent-length: {UPLOAD}\r\n\r\n".encode())
        _, status, _, body = await read_response(reader)
    finally:
        writer.close()
    async with httpx.AsyncClient(timeout=WAIT) as client:
        ok = await client.post(f"{proxy.url}/v1/messages/count_tokens", headers={"x-api-key": CLIENT_KEY},
                               json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 401 and json.loads(body)["type"] == "error" and b"sk-wrong-41c7" not in body
    assert ok.status_code == 200 and not fake.completions


async def test_unknown_path_is_404_before_the_key_and_405_lists_allow(proxy):
    async with httpx.AsyncClient(timeout=WAIT) as client:
        missing = await client.get(f"{proxy.url}/v2/nothing")
        wrong = await client.get(f"{proxy.url}{CHAT}")
        put = await client.put(f"{proxy.url}/info")
        model_post = await client.post(f"{proxy.url}/v1/models/x", headers=AUTH)
        head = await client.head(f"{proxy.url}/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405 and wrong.headers["allow"] == "OPTIONS, POST"
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    assert put.status_code == 405 and put.headers["allow"] == "GET, HEAD, OPTIONS"
    assert model_post.status_code == 405 and model_post.headers["allow"] == "GET, HEAD, OPTIONS"
    assert head.status_code == 404 and head.content == b""


async def test_disabled_debug_endpoint_is_an_unknown_path(fake, start_proxy):
    app = await start_proxy(fake, DEBUG_ENDPOINTS="0")
    async with httpx.AsyncClient(timeout=WAIT) as client:
        r = await client.get(f"{app.url}/debug/token")
    assert r.status_code == 404


# --- item 8: CORS that cannot be abused ----------------------------------------------------

def _simple_post(app, client, origin):
    """What a foreign page can make a browser send without a preflight: a text/plain POST."""
    return client.post(f"{app.url}{CHAT}", content=json.dumps(HELLO),
                       headers={"origin": origin, "content-type": "text/plain"})


@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost.evil.example",
                                    "http://127.0.0.1.nip.io:8666", "null", "https://localhost"])
async def test_without_a_key_a_foreign_origin_gets_403_and_reaches_nothing(fake, start_proxy, origin):
    app = await start_proxy(fake, LOCAL_API_KEY="")
    async with httpx.AsyncClient(timeout=WAIT) as client:
        post = await _simple_post(app, client, origin)
        info = await client.get(f"{app.url}/info", headers={"origin": origin})
        preflight = await client.options(f"{app.url}{CHAT}", headers={
            "origin": origin, "access-control-request-method": "POST"})
    for r in (post, info, preflight):
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in r.headers
    assert not fake.completions


@pytest.mark.parametrize("origin", ["http://localhost", "http://localhost:3000", "http://127.0.0.1:8080",
                                    "http://[::1]:5173"])
async def test_without_a_key_loopback_origins_work(fake, start_proxy, origin):
    app = await start_proxy(fake, LOCAL_API_KEY="")
    async with httpx.AsyncClient(timeout=WAIT) as client:
        post = await _simple_post(app, client, origin)
        stream = await client.post(f"{app.url}{CHAT}", json={**HELLO, "stream": True},
                                   headers={"origin": origin})
        preflight = await client.options(f"{app.url}{CHAT}", headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": "content-type"})
        plain = await client.post(f"{app.url}{CHAT}", json=HELLO)
    assert post.status_code == 200 and post.json()["choices"][0]["message"]["content"] == "Echo: hello"
    assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
    for r in (post, stream, preflight):
        assert r.headers["access-control-allow-origin"] == origin and r.headers["vary"] == "origin"
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-methods"] == "OPTIONS, POST"
    assert preflight.headers["access-control-allow-headers"] == "content-type"
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


async def test_with_a_key_every_origin_is_allowed_and_the_key_still_needed(proxy, fake):
    origin = {"origin": "https://chat.example"}
    async with httpx.AsyncClient(timeout=WAIT) as client:
        refused = await _simple_post(proxy, client, "https://chat.example")
        ok = await client.post(f"{proxy.url}{CHAT}", json=HELLO, headers={**AUTH, **origin})
        preflight = await client.options(f"{proxy.url}/v1/models", headers={
            **origin, "access-control-request-method": "GET"})
        wrong_method = await client.get(f"{proxy.url}{CHAT}", headers={**AUTH, **origin})
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert ok.status_code == 200
    assert preflight.headers["access-control-allow-methods"] == "GET, HEAD, OPTIONS"
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "OPTIONS, POST"
    for r in (refused, ok, preflight, wrong_method):
        assert r.headers["access-control-allow-origin"] == "*"
    assert len(fake.completions) == 1


async def test_every_route_answers_an_allowed_origin_with_its_cors_fields(fake, start_proxy):
    app = await start_proxy(fake, LOCAL_API_KEY="", SAMBANOVA_API_KEY="fake-api-key")
    origin = {"origin": "http://localhost:5173"}
    async with httpx.AsyncClient(timeout=WAIT) as client:
        answers = [await client.post(f"{app.url}/v1/embeddings", headers=origin,
                                     json={"model": "E5-Mistral-7B-Instruct", "input": "hi"}),
                   await client.post(f"{app.url}/v1/responses", headers=origin, json={"model": HELLO["model"], "input": "hi"}),
                   await client.get(f"{app.url}/v1/models/nope", headers=origin),
                   await client.get(f"{app.url}/", headers=origin)]
    assert [r.status_code for r in answers] == [200, 200, 404, 200]
    assert all(r.headers["access-control-allow-origin"] == "http://localhost:5173" for r in answers)


async def test_configured_origins_replace_the_default(fake, start_proxy):
    app = await start_proxy(fake, CORS_ORIGINS="https://app.example, http://localhost:3000")
    async with httpx.AsyncClient(timeout=WAIT) as client:
        listed = await client.get(f"{app.url}/v1/models", headers={**AUTH, "origin": "https://APP.example"})
        other = await client.get(f"{app.url}/v1/models", headers={**AUTH, "origin": "https://b.example"})
        loopback = await client.get(f"{app.url}/v1/models", headers={**AUTH, "origin": "http://localhost:4000"})
    assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == "https://APP.example"
    assert other.status_code == 403 and loopback.status_code == 403


async def test_options_without_origin_lists_allow(proxy):
    async with httpx.AsyncClient(timeout=WAIT) as client:
        known = await client.options(f"{proxy.url}{CHAT}")
        anywhere = await client.options(f"{proxy.url}/v2/else")
    assert known.status_code == 204 and known.headers["allow"] == "OPTIONS, POST"
    assert "access-control-allow-methods" not in known.headers
    assert set(anywhere.headers["allow"].split(", ")) >= {"GET", "POST", "OPTIONS"}


async def test_client_key_never_appears_in_rejections(proxy):
    near_key = {"authorization": f"Bearer {CLIENT_KEY}x", "origin": "https://e.example"}
    async with httpx.AsyncClient(timeout=WAIT) as client:
        bodies = [(await client.request(method, f"{proxy.url}{path}", headers=near_key)).text
                  for method, path in (("POST", CHAT), ("PUT", "/info"), ("GET", "/nothing"))]
    assert all(CLIENT_KEY not in body for body in bodies)


# --- item 6: a departed client causes no upstream work ---------------------------------------

def _chat_head(length: int) -> bytes:
    return (f"POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\n"
            f"content-type: application/json\r\ncontent-length: {length}\r\n\r\n").encode()


@pytest.mark.parametrize("http2", [False, True])
async def test_client_leaving_while_upstream_is_slow_to_answer_stops_the_upstream_request(
        fake, start_proxy, http2):
    app = await start_proxy(fake, UPSTREAM_READ_TIMEOUT="60")
    fake.script.append(Reply(head_delay=30))
    body = json.dumps({**HELLO, "stream": True}).encode()
    reader, writer = await _open(app)
    try:
        if http2:
            client = RawH2(reader, writer)
            stream_id = client.request("POST", CHAT, end_stream=False, extra=[
                ("authorization", f"Bearer {CLIENT_KEY}"), ("content-length", str(len(body)))])
            client.conn.send_data(stream_id, body, end_stream=True)
            client.flush()
        else:
            writer.write(_chat_head(len(body)) + body)
        await fake.wait_for(lambda f: f.open_streams == 1)
        if http2:
            client.conn.reset_stream(stream_id)
            client.flush()
        else:
            writer.close()
        # The fake would answer after 30 s: only the proxy stopping the request ends it sooner.
        await fake.wait_for(lambda f: f.disconnects == 1 and f.open_streams == 0, timeout=2.0)
    finally:
        writer.close()
    await asyncio.wait_for(_until(lambda: app.counters.active == 0), WAIT)
    assert len(fake.completions) == 1


async def test_streams_reset_before_their_upstream_attempt_cause_no_upstream_request(proxy, fake):
    body = json.dumps(HELLO).encode()
    reader, writer = await _open(proxy)
    try:
        client = RawH2(reader, writer)
        for _ in range(5):  # HEADERS + DATA + RST_STREAM in one write: the rapid-reset pattern
            stream_id = client.conn.get_next_available_stream_id()
            client.conn.send_headers(stream_id, [(":method", "POST"), (":path", CHAT), (":scheme", "http"),
                                                 (":authority", "x"), ("authorization", f"Bearer {CLIENT_KEY}")])
            client.conn.send_data(stream_id, body, end_stream=True)
            client.conn.reset_stream(stream_id)
        client.flush()
        last = client.request("POST", CHAT, end_stream=False, extra=[("authorization", f"Bearer {CLIENT_KEY}")])
        client.conn.send_data(last, body, end_stream=True)
        client.flush()
        await client.until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == last)
    finally:
        writer.close()
    await asyncio.wait_for(_until(lambda: proxy.counters.active == 0), WAIT)
    assert len(fake.completions) == 1, "a reset stream reached upstream"


async def _until(predicate):
    while not predicate():
        await asyncio.sleep(0.01)


# --- item 7: [DONE] completes an answer ------------------------------------------------------

def _content(r: httpx.Response, stream: bool) -> str:
    if not stream:
        return r.json()["choices"][0]["message"]["content"]
    events = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert not any("error" in e for e in events), r.text
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in events if c["choices"])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("after", ["drop", "linger"])
async def test_an_answer_is_complete_at_done_whatever_upstream_does_next(fake, start_proxy, stream, after):
    # A read timeout far beyond the client's: waiting for upstream's EOF would fail the request.
    app = await start_proxy(fake, UPSTREAM_READ_TIMEOUT="60")
    fake.script.append(Reply(text="one two three", after_events=after))
    async with httpx.AsyncClient(timeout=WAIT) as client:
        r = await client.post(f"{app.url}{CHAT}", headers=AUTH, json={**HELLO, "stream": stream})
    assert r.status_code == 200 and _content(r, stream) == "one two three"
    if stream:
        assert r.text.endswith("data: [DONE]\n\n") and r.text.count("[DONE]") == 1
    if after == "linger":  # the proxy closed the upstream answer itself
        await fake.wait_for(lambda f: f.disconnects == 1 and f.open_streams == 0)
    await asyncio.wait_for(_until(lambda: app.counters.active == 0), WAIT)


@pytest.mark.parametrize("stream", [False, True])
async def test_the_usage_chunk_completes_an_answer_without_done(fake, start_proxy, stream):
    app = await start_proxy(fake, UPSTREAM_READ_TIMEOUT="60")
    fake.script.append(Reply(text="one two", done=False, after_events="linger"))
    async with httpx.AsyncClient(timeout=WAIT) as client:
        r = await client.post(f"{app.url}{CHAT}", headers=AUTH, json={
            **HELLO, "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})})
    assert r.status_code == 200 and _content(r, stream) == "one two"
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    usage = json.loads(data[-2])["usage"] if stream else r.json()["usage"]
    assert usage["total_tokens"] > 0
    await fake.wait_for(lambda f: f.disconnects == 1 and f.open_streams == 0)


@pytest.mark.parametrize("include_usage, whole", [(False, True), (True, False)])
async def test_a_drop_after_the_finish_reason_is_whole_unless_usage_was_asked(proxy, fake, include_usage,
                                                                             whole):
    fake.script.append(Reply(text="one two", usage=False, done=False, after_events="drop"))
    async with httpx.AsyncClient(timeout=WAIT) as client:
        r = await client.post(f"{proxy.url}{CHAT}", headers=AUTH, json={
            **HELLO, "stream": True, "stream_options": {"include_usage": include_usage}})
    last = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")][-1]
    if whole:
        assert last == "[DONE]" and _content(r, True) == "one two"
    else:
        assert json.loads(last)["error"]["code"] == "upstream_disconnected"


class _SlowH2Upstream:
    """An HTTPS upstream speaking HTTP/2 (the real service's protocol) that never answers in time."""

    def __init__(self):
        self.entered = 0
        self.versions = set()
        self.left = asyncio.Event()

    async def __call__(self, request, responder):
        self.entered += 1
        self.versions.add(request.http_version)
        responder.on_gone(self.left.set)
        await asyncio.wait_for(self.left.wait(), 30)


async def test_client_leaving_while_an_http2_upstream_is_slow_resets_that_stream(
        fake, start_proxy, certificate, monkeypatch):
    import ssl

    from server import Server
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    upstream = _SlowH2Upstream()
    server = Server(upstream, max_body_bytes=1 << 20, ssl_context=context)
    await server.start("127.0.0.1", 0)
    try:
        monkeypatch.setenv("SSL_CERT_FILE", cert)  # read by httpx when the proxy makes its client
        app = await start_proxy(fake, UPSTREAM_READ_TIMEOUT="60",
                                SAMBA_COMPLETION_URL=f"https://127.0.0.1:{server.port}/api/completion")
        body = json.dumps({**HELLO, "stream": True}).encode()
        reader, writer = await _open(app)
        writer.write(_chat_head(len(body)) + body)
        await asyncio.wait_for(_until(lambda: upstream.entered == 1), WAIT)
        writer.close()
        await asyncio.wait_for(upstream.left.wait(), 2.0)  # RST_STREAM reached upstream
        await asyncio.wait_for(_until(lambda: app.counters.active == 0), WAIT)
        assert upstream.versions == {"2"} and len(server.connections) == 1, "the stream alone is reset"
    finally:
        await server.shutdown(grace=0.5)


# --- the same rules, sans-IO -------------------------------------------------------------------

def _chunk(finish=None, usage=None, choices=True) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": finish}] if choices else []}
    if usage is not None:
        chunk["usage"] = usage
    return json.dumps(chunk, separators=(",", ":")).encode()


def test_relay_is_complete_at_done_or_usage_and_whole_at_a_finish_without_usage_asked():
    from sse import StreamRelay
    done = StreamRelay(False)
    done.relay("message", _chunk())
    assert not done.complete and not done.whole()
    done.relay("message", b"[DONE]")
    assert done.complete and done.whole()
    usage = StreamRelay(True)
    usage.relay("message", _chunk(finish="stop"))
    assert not usage.complete and not usage.whole()  # the client waits for its usage chunk
    usage.relay("message", _chunk(usage={"total_tokens": 3}, choices=False))
    assert usage.complete and usage.whole()
    finish = StreamRelay(False)
    finish.relay("message", _chunk(finish="length"))
    assert not finish.complete and finish.whole()


def test_aggregator_is_whole_once_every_choice_has_finished():
    from aggregate import CompletionAggregator
    aggregator = CompletionAggregator("m")
    aggregator.add("message", _chunk())
    assert not aggregator.whole()
    aggregator.add("message", _chunk(finish="stop"))
    assert aggregator.whole() and not aggregator.complete
    aggregator.add("message", _chunk(usage={"total_tokens": 3}, choices=False))
    assert aggregator.complete


async def test_an_attempt_ends_itself_at_the_next_step_once_its_client_has_gone():
    from server import ClientGone
    from departure import Attempt, Departure
    departure = Departure()
    async with httpx.AsyncClient() as client:
        attempt = Attempt(client, departure, set())
        await attempt.trace("connection.connect_tcp.started", {})  # still here: nothing happens
        departure.left()
        await attempt.trace("http11.response_closed.started", {})  # cleanup steps always run
        with pytest.raises(ClientGone):
            await attempt.trace("http11.send_request_headers.started", {})
        attempt.opening = False
        await attempt.trace("http11.receive_response_body.started", {})  # the answer is the relay's


def test_departure_stops_what_is_in_flight_once():
    from departure import Departure
    stopped = []
    departure = Departure()
    departure.stop_with(lambda: stopped.append("attempt"))
    departure.stop_with(None)
    departure.left()
    departure.left()
    departure.stop_with(lambda: stopped.append("answer"))  # registered after the departure: at once
    assert stopped == ["answer"] and departure.gone


@pytest.mark.parametrize("leave_at", ["connection.connect_tcp.started", "http2.send_connection_init.started"])
async def test_a_client_leaving_while_a_shared_http2_connection_opens_costs_only_its_own_request(
        certificate, leave_at):
    """Ending an HTTP/2 connection's set-up would fail every request queued on it (httpcore does
    not retry them): a departure stops only its own request, at that request's next step."""
    import ssl
    from departure import Attempt, Departure
    from server import ClientGone, Server

    async def answer(request, responder):
        await asyncio.sleep(0.1)
        await responder.send(200, [("content-type", "text/plain")], b"ok")

    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    upstream = Server(answer, max_body_bytes=1 << 20, ssl_context=context)
    await upstream.start("127.0.0.1", 0)
    client = httpx.AsyncClient(http2=True, verify=ssl.create_default_context(cafile=cert), timeout=10)

    async def send(leave=None):
        departure = Departure()
        attempt = Attempt(client, departure, set())

        async def trace(name, info):
            if name == leave:
                departure.left()
            await attempt.trace(name, info)

        request = client.build_request("POST", f"https://127.0.0.1:{upstream.port}/x", content=b"{}",
                                       extensions={"trace": trace})
        attempt.extensions = request.extensions
        departure.stop_with(attempt.stop)
        try:
            return (await client.send(request)).status_code
        except ClientGone:
            return "gone"
        finally:
            attempt.opening = False

    try:
        assert await asyncio.gather(send(leave_at), send(), send()) == ["gone", 200, 200]
    finally:
        await client.aclose()
        await upstream.shutdown(0.5)

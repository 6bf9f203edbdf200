"""An HTTPS, HTTP/2 completion endpoint for the bench, like the real SambaNova's transport.

The fake SambaNova speaks plain HTTP/1.1; real SambaNova is TLS with ALPN h2, where httpx's
own cost (the bench's floor) is larger and different. This serves POST /api/completion over
TLS on the project's own server.Server (ALPN h2; an HTTP/1.1 request gets 505, so a client
that fell back would show) and answers with the fake's canned event stream for the prompt:
"Echo: ", one chunk a word of the last user message, usage, [DONE], each event written on its
own with an SSE comment after the first, as the fake does: the bench's short and long streams
have the same shape over both transports. Any access_token cookie is accepted. Logs
"bench upstream on https://HOST:PORT" when ready.

    .venv/bin/python tests/bench_upstream.py --cert cert.pem --key key.pem [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

from fake_samba import PING, Reply, sse_frame, stream_events  # noqa: E402
from server import JSON, Server  # noqa: E402

SSE = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]


class CannedCompletions:
    """The handler: one canned answer a prompt (built once, then the same bytes every time)."""

    def __init__(self) -> None:
        self.answers: dict[str, list[bytes]] = {}

    def frames(self, model: str, prompt: str) -> list[bytes]:
        if (key := f"{model}\0{prompt}") not in self.answers:
            messages = [{"role": "user", "content": prompt}]
            self.answers[key] = [sse_frame(e) for e in stream_events(Reply(), model, messages)]
        return self.answers[key]

    async def __call__(self, request, responder) -> None:
        if request.method != "POST" or request.path != "/api/completion":
            return await responder.send(404, JSON, b'{"error": {"message": "not found"}}')
        if request.http_version != "2":  # the scenario is HTTP/2: make any fallback to 1.1 loud
            return await responder.send(505, JSON, b'{"error": {"message": "HTTP/2 only"}}')
        if "access_token=" not in request.headers.get("cookie", ""):
            return await responder.send(401, JSON, b'{"error": {"message": "no access_token"}}')
        body = json.loads(request.body)["body"]
        frames = self.frames(body["model"], body["messages"][-1]["content"])
        await responder.start(200, SSE)
        for i, frame in enumerate(frames):
            await responder.write(frame)
            if i == 0:
                await responder.write(PING)  # an SSE comment mid-stream, as the fake sends
        await responder.end()


async def main(options: argparse.Namespace) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(options.cert, options.key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    server = Server(CannedCompletions(), max_body_bytes=1 << 24, ssl_context=context)
    await server.start(options.host, options.port)
    print(f"bench upstream on https://{options.host}:{server.port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.shutdown(grace=1.0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(main(parser.parse_args()))

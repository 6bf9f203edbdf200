"""The seed stack, as the bench's baseline: a minimal FastAPI proxy on Hypercorn with one httpx client.

This is what the team's "at least 2x the seed stack's throughput" goal measures against: the
usual first version of such a gateway, with no tuning. One shared httpx.AsyncClient(http2=True);
POST /v1/chat/completions parses the JSON body, builds the same SambaNova payload as the proxy
(chat.samba_payload, upstream.BROWSER_HEADERS), always streams from upstream, and either relays
the upstream bytes (stream: true) or folds the events into one chat.completion (stream: false).
No login: the access_token cookie comes from SEED_TOKEN (the bench logs in once and passes it).

    SEED_TOKEN=... SEED_COMPLETION_URL=http://127.0.0.1:8123/api/completion \
        .venv/bin/python tests/bench_seed.py [--port 0]

Needs requirements-bench.txt (fastapi, hypercorn). Logs "Running on http://HOST:PORT" when ready.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat import new_fingerprint, samba_payload  # noqa: E402
from aggregate import CompletionAggregator  # noqa: E402
from sse import SSEDecoder  # noqa: E402
from upstream import BROWSER_HEADERS  # noqa: E402

TOKEN = os.environ.get("SEED_TOKEN", "")
COMPLETION_URL = os.environ.get("SEED_COMPLETION_URL", "https://cloud.sambanova.ai/api/completion")
DEFAULT_MODEL = "DeepSeek-R1"
log = logging.getLogger("seed")


@asynccontextmanager
async def lifespan(app: FastAPI):
    """One client for the app's life, as the seed had it."""
    async with httpx.AsyncClient(http2=True, timeout=httpx.Timeout(600.0, connect=10.0)) as client:
        app.state.client = client
        yield


app = FastAPI(lifespan=lifespan)


def error(status: int, message: str) -> JSONResponse:
    log.warning("seed answered %d: %s", status, message)
    return JSONResponse({"error": {"message": message, "type": "upstream_error", "param": None,
                                   "code": None}}, status_code=status)


@app.post("/v1/chat/completions")
async def chat_completions(request: Request):
    body = await request.json()
    client: httpx.AsyncClient = request.app.state.client
    payload = samba_payload(body, default_model=DEFAULT_MODEL, fingerprint=new_fingerprint("anon_"))
    headers = dict(BROWSER_HEADERS, cookie=f"access_token={TOKEN}")
    try:
        response = await client.send(client.build_request("POST", COMPLETION_URL, headers=headers,
                                                          json=payload), stream=True)
    except httpx.HTTPError as exc:
        return error(502, f"SambaNova could not be reached ({type(exc).__name__})")
    if response.status_code != 200:
        detail = (await response.aread()).decode("utf-8", "replace")
        await response.aclose()
        return error(response.status_code, detail[:500])

    if body.get("stream"):
        async def relay():
            try:
                async for chunk in response.aiter_bytes():
                    yield chunk
            finally:
                await response.aclose()

        return StreamingResponse(relay(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    decoder, aggregator = SSEDecoder(), CompletionAggregator(body.get("model") or DEFAULT_MODEL)
    try:
        async for chunk in response.aiter_bytes():
            for event in decoder.feed(chunk):
                aggregator.add(*event)
    finally:
        await response.aclose()
    return JSONResponse(aggregator.result())


async def main(host: str, port: int) -> None:
    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await serve(app, config, shutdown_trigger=stop.wait)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    options = parser.parse_args()
    asyncio.run(main(options.host, options.port))

"""Requests/second and server CPU per request for a trivial handler, driven by h2load.

Usage: .venv/bin/python tests/bench_server.py [requests]   (needs h2load: apt-get install nghttp2-client)
The server runs in this process; h2load runs in a child, so time.process_time() is the server's CPU alone.
"""

import asyncio
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import Server  # noqa: E402

RUNS = [  # label, h2load arguments: 10 keep-alive connections; HTTP/2 with 10 streams each
    ("HTTP/1.1 keep-alive, 10 conns", ["--h1", "-c", "10", "-m", "1"]),
    ("HTTP/2 prior knowledge, 10 conns x 10 streams", ["-c", "10", "-m", "10"]),
]


async def handler(request, responder):
    """A trivial answer, so the figures are the server's own overhead."""
    await responder.send(200, [("content-type", "text/plain")], b"ok")


async def run(port: int, requests: int, args: list[str]) -> tuple[float, float]:
    """Run h2load once; return (requests/second, server CPU seconds used)."""
    cpu = time.process_time()
    proc = await asyncio.create_subprocess_exec(
        "h2load", "-n", str(requests), *args, f"http://127.0.0.1:{port}/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    cpu = time.process_time() - cpu
    text = out.decode()
    if not re.search(rf"requests: {requests} total, {requests} started, {requests} done, {requests} succeeded", text):
        raise SystemExit("h2load did not complete every request:\n" + text)
    return float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text).group(1)), cpu


async def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 50000
    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found (apt-get install nghttp2-client)")
    server = Server(handler, max_body_bytes=1 << 20)
    await server.start("127.0.0.1", 0)
    try:
        for label, args in RUNS:
            await run(server.port, requests // 10, args)  # warm-up
            rate, cpu = await run(server.port, requests, args)
            print(f"{label}: {rate:,.0f} req/s, server CPU {cpu / requests * 1e6:.1f} us/request")
    finally:
        await server.shutdown(grace=1.0)


if __name__ == "__main__":
    asyncio.run(main())

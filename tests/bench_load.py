"""The bench's processes and load: children on pinned cores, the load generator, the floor, CPU runs.

tests/bench.py runs the phases and prints the table; this module starts what they measure (the
fake SambaNova, the HTTPS/HTTP/2 bench upstream, the proxy, the seed stack, the floor) and drives
them. Run as `bench_load.py --floor URL CONCURRENCY` (token in BENCH_TOKEN) it is the floor process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import h11  # noqa: E402
import httpx  # noqa: E402

from config import SETTING_NAMES, Config  # noqa: E402
from upstream import AccountRoute, make_client  # noqa: E402

PY, PROXY = sys.executable, str(ROOT / "sambaproxy.py")
FAKE, SEED, H2_UPSTREAM = (str(ROOT / "tests" / f"{name}.py") for name in ("fake_samba", "bench_seed",
                                                                          "bench_upstream"))
EMAIL, PASSWORD = "bench@example.com", "bench-password-not-secret"
MODEL = "Meta-Llama-3.1-8B-Instruct"
CHAT_PATH = "/v1/chat/completions"
JSON_HEADERS = {"content-type": "application/json"}
WAIT = 30.0  # seconds one step (a start, a run) may take before the bench gives up


@dataclass
class Scenario:
    """An upstream to measure against: its completion URL, a token for it, how the proxy reaches it."""
    label: str                # "h1 fake" or "h2 TLS", as the table's rows say
    url: str                  # the completion endpoint
    token: str                # an access_token the floor and the seed stack send
    proxy_env: dict           # the proxy's settings for this upstream
    env: dict = field(default_factory=dict)  # what every client of it needs (SSL_CERT_FILE)


def chat_body(words: int, stream: bool) -> bytes:
    """An OpenAI chat request with a `words`-word prompt: upstream echoes it, one chunk a word."""
    return json.dumps({"model": MODEL, "stream": stream, "messages": [
        {"role": "user", "content": " ".join(["w"] * words)}]}).encode()


def spawn(args, procs: list, argv: list[str], env: dict | None = None, cpus: set | None = None):
    """Start a child (on `cpus`) logging to a file of the work directory; `procs` keeps it to stop it."""
    log = Path(args.workdir, f"child-{len(procs)}.log")
    with open(log, "wb") as out:
        procs.append(subprocess.Popen(argv, cwd=args.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      preexec_fn=cpus and (lambda: os.sched_setaffinity(0, cpus))))
    procs[-1].log = log
    return procs[-1], log


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the graceful stop), SIGKILL if that takes over 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for_log(proc: subprocess.Popen, log: Path, pattern: bytes) -> re.Match:
    """The first match of `pattern` in a child's log, waiting at most WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and proc.poll() is None:
        if match := re.search(pattern, log.read_bytes()):
            return match
        time.sleep(0.01)
    raise SystemExit(f"{log.name}: no {pattern!r}; log tail:\n{log.read_text()[-2000:]}")


def clean_env(base: dict | None = None, **settings: str) -> dict[str, str]:
    """`base` (this environment) without the user's proxy settings, plus `settings`."""
    env = {k: v for k, v in (base or os.environ).items() if k not in SETTING_NAMES}
    return env | {"HOST": "127.0.0.1", "TOKEN_CACHE_FILE": ""} | settings


def start_fake(args, procs: list, *flags: str) -> str:
    argv = [PY, FAKE, "--port", "0", "--email", EMAIL, "--password", PASSWORD, *flags]
    proc, log = spawn(args, procs, argv)
    return wait_for_log(proc, log, rb"fake SambaNova on (http://\S+)")[1].decode()


def fake_settings(fake: str) -> dict[str, str]:
    """The proxy's settings for the fake: it logs in with the bench account."""
    return dict(SAMBA_EMAIL=EMAIL, SAMBA_PASSWORD=PASSWORD, SAMBA_CONFIG_URL=f"{fake}/api/config",
                SAMBA_COMPLETION_URL=f"{fake}/api/completion", SAMBA_MODELS_URL=f"{fake}/v1/models")


def make_certificate(workdir: str) -> tuple[str, str] | None:
    """A throwaway self-signed certificate for 127.0.0.1 by the openssl CLI: (cert, key), or None."""
    if shutil.which("openssl") is None:
        return None
    cert, key = str(Path(workdir, "cert.pem")), str(Path(workdir, "key.pem"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    return cert, key


def start_h2_upstream(args, procs: list, cert: str, key: str) -> Scenario:
    """The HTTPS/HTTP/2 bench upstream (off the measured core), and how to reach it."""
    proc, log = spawn(args, procs, [PY, H2_UPSTREAM, "--cert", cert, "--key", key, "--port", "0"])
    url = wait_for_log(proc, log, rb"bench upstream on (https://\S+)")[1].decode() + "/api/completion"
    token = "bench-h2-token"
    return Scenario("h2 TLS", url, token, {"SAMBA_ACCESS_TOKEN": token, "SAMBA_COMPLETION_URL": url,
                                           "SSL_CERT_FILE": cert}, {"SSL_CERT_FILE": cert})


def start_proxy(args, procs: list, settings: dict, **more: str):
    """A proxy with `settings`, holding its token, on a core of its own; returns (process, port)."""
    proc, log = spawn(args, procs, [PY, PROXY], clean_env(PORT="0", **settings, **more), args.measured)
    port = int(wait_for_log(proc, log, rb"listening on http://[\d.]+:(\d+)")[1])
    wait_for_log(proc, log, rb"logged in to SambaNova|using SAMBA_ACCESS_TOKEN")
    return proc, port


def start_seed(args, procs: list, scenario: Scenario):
    """The seed stack (tests/bench_seed.py) on the measured core; returns (process, port)."""
    env = clean_env(SEED_TOKEN=scenario.token, SEED_COMPLETION_URL=scenario.url, **scenario.env)
    proc, log = spawn(args, procs, [PY, SEED, "--port", "0"], env, args.measured)
    return proc, int(wait_for_log(proc, log, rb"Running on http://[\d.]+:(\d+)")[1])


def start_floor(args, procs: list, scenario: Scenario) -> subprocess.Popen:
    """The floor process on the measured core, for `scenario`'s upstream."""
    env = clean_env(BENCH_TOKEN=scenario.token, **scenario.env)
    procs.append(subprocess.Popen([PY, __file__, "--floor", scenario.url, str(args.concurrency)], env=env,
                                  text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  preexec_fn=lambda: os.sched_setaffinity(0, args.measured)))
    return procs[-1]


def cpu_and_rss(pid: int) -> tuple[float, float]:
    """CPU seconds (utime+stime, every thread: /proc/PID/stat fields 14, 15) and VmRSS in MB."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    rss = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())[1]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(rss) / 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def drive(args, port: int, body: bytes, n: int, reasonless: bool = False) -> float:
    """Requests/s of n POSTs of `body` to a server over --concurrency keep-alive connections.

    `reasonless`: the server's status lines have no reason phrase (Hypercorn's "HTTP/1.1 200 "),
    which h2load's parser never reports, so it counts every such answer as failed though it read
    it whole: then only require every request done, none errored (the caller checks the answers)."""
    if args.client == "python":
        return asyncio.run(asyncio.wait_for(h11_load(port, body, n, args.concurrency), 300))
    Path(args.workdir, "body.json").write_bytes(body)
    argv = ["h2load", "--h1", "-n", str(n), "-c", str(args.concurrency), "-m", "1", "-d", "body.json",
            "-H", "content-type: application/json", f"http://127.0.0.1:{port}{CHAT_PATH}"]
    out = subprocess.run(argv, cwd=args.workdir, capture_output=True, text=True, timeout=300).stdout
    counts = f"0 succeeded, {n} failed, 0 errored, 0 timeout" if reasonless else f"{n} succeeded"
    if f"requests: {n} total, {n} started, {n} done, {counts}" not in out or (
            not reasonless and f"status codes: {n} 2xx" not in out):
        raise SystemExit("h2load: not every request succeeded:\n" + out)
    return float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)[1])


async def h11_load(port: int, body: bytes, n: int, c: int) -> float:
    """The same by a raw h11 client, for machines without h2load."""
    head = h11.Request(method="POST", target=CHAT_PATH, headers=[
        ("host", "bench"), ("content-type", "application/json"), ("content-length", str(len(body)))])

    async def worker(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        for _ in range(count):
            writer.write(conn.send(head) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response) and event.status_code != 200:
                    raise SystemExit(f"the server answered {event.status_code}")
            conn.start_next_cycle()
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker(n // c + (i < n % c)) for i in range(c)))
    return n / (time.perf_counter() - start)


async def floor_child(url: str, c: int) -> None:
    """The floor: the proxy's client and upstream request, straight to upstream; answers each
    `words requests` line on stdin with its CPU seconds a request, after a warm-up."""
    client, token = make_client(Config()), os.environ["BENCH_TOKEN"]
    route = AccountRoute(url, None, MODEL, "anon_")

    async def run(words: int, n: int) -> None:
        headers, content = route.request_parts(json.loads(chat_body(words, True)), token)
        for _ in range(n):
            request = client.build_request("POST", route.url, headers=headers, content=content)
            response = await client.send(request, stream=True)
            await response.aread()  # aiter_bytes() to the end, as the proxy reads, then aclose()
            if response.status_code != 200:
                raise SystemExit(f"upstream answered {response.status_code}")

    for line in sys.stdin:  # blocking between runs is fine: nothing else runs here
        words, n = map(int, line.split())
        await asyncio.gather(*(run(words, max(1, n // 10 // c)) for _ in range(c)))
        before = cpu_and_rss(os.getpid())[0]
        await asyncio.gather(*(run(words, n // c + (i < n % c)) for i in range(c)))
        print((cpu_and_rss(os.getpid())[0] - before) / n, flush=True)


def floor_cpu(floor: subprocess.Popen, words: int, n: int) -> float:
    """Ask the floor process for a run; its CPU seconds a request."""
    floor.stdin.write(f"{words} {n}\n")
    floor.stdin.flush()
    if not select.select([floor.stdout], [], [], 300)[0] or not (line := floor.stdout.readline()):
        raise SystemExit("the floor process failed or is stuck (its error, if any, is above)")
    return float(line)


def check_answers(port: int) -> None:
    """One whole and one streamed answer of a server must be the fake's echo, complete."""
    with httpx.Client(timeout=WAIT) as client:
        url = f"http://127.0.0.1:{port}{CHAT_PATH}"
        whole = client.post(url, headers=JSON_HEADERS, content=chat_body(1, False))
        stream = client.post(url, headers=JSON_HEADERS, content=chat_body(1, True))
    if not (whole.status_code == stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
            and whole.json()["choices"][0]["message"]["content"] == "Echo: w"):
        raise SystemExit(f"port {port}: wrong answers:\n{whole.text[:500]}\n{stream.text[:500]}")


def cpu_runs(args, servers: dict, floor: subprocess.Popen) -> dict[str, list]:
    """For each of --repeat rounds and each case (whole, 4-event stream, long streams): the CPU
    seconds a request of each server (name -> (process, port)) under the same load, its req/s,
    then the floor's CPU for the same answers. Keys: "NAME CASE", "rate NAME CASE", "floor CASE"."""
    n, streams = args.requests, args.concurrency
    cases = {"whole": (chat_body(1, False), n, 1), "stream": (chat_body(1, True), n, 1),
             "long": (chat_body(args.events, True), streams, args.events)}
    for name, (_, port) in servers.items():  # a check of the answers, then a warm-up
        check_answers(port)
        for body, count, _ in cases.values():
            drive(args, port, body, max(2 * streams, count // 10), reasonless=name == "seed")
    runs: dict[str, list] = {}
    for _ in range(args.repeat):
        for case, (body, count, words) in cases.items():
            for name, (proc, port) in servers.items():
                before = cpu_and_rss(proc.pid)[0]
                runs.setdefault(f"rate {name} {case}", []).append(drive(args, port, body, count,
                                                                              reasonless=name == "seed"))
                time.sleep(0.05)  # let the server close its last upstream responses
                runs.setdefault(f"{name} {case}", []).append((cpu_and_rss(proc.pid)[0] - before) / count)
            runs.setdefault(f"floor {case}", []).append(floor_cpu(floor, words, count))
    return runs


if __name__ == "__main__" and sys.argv[1:2] == ["--floor"]:
    asyncio.run(floor_child(sys.argv[2], int(sys.argv[3])))

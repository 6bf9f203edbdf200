"""Measure sambaproxy against the team's goals, with the bare httpx client as the floor.

Run `make bench` (under 2 minutes) or `.venv/bin/python tests/bench.py --quick` (about 25 s).
The fake SambaNova and the proxy run as separate processes on 127.0.0.1, driven from here by
h2load (HTTP/1.1 keep-alive) if installed, else by a raw h11 client. The proxy's CPU time
(utime+stime in /proc/PID/stat, before and after a run) is its alone; it has a core of its own,
as in production, while the fake, h2load and this process share the others. The floor, a child
process on that core, runs one httpx.AsyncClient made as the proxy makes its own: same upstream
request straight to the fake, same concurrency, every byte read, just after each proxy run.
proxy - floor = our share (server, validation, translation, relay), as medians of --repeat
runs; "spread" = min..max of our share. CPU/event = (CPU of a long stream - CPU of a 4-event
one) / extra events, so per-request costs cancel (the fake writes each event on its own).
Latency: sequential requests by httpx from here, straight to the fake (floor column) vs through
the proxy. Memory: VmRSS of a fresh logged-in proxy, then with --streams streams past their first
event (HTTP/2 clients, 90 streams a connection; the fake speaks HTTP/1.1 only, so the proxy holds
an upstream connection a stream). Start-up: exec of `python sambaproxy.py` (no credentials) to
/info's first 200, bytecode cached as in the Docker image. Nothing is asserted.
"""

import argparse
import asyncio
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import h11  # noqa: E402
import httpx  # noqa: E402

from auth import login  # noqa: E402
from config import SETTING_NAMES, Config  # noqa: E402
from upstream import make_client  # noqa: E402
from upstream import AccountRoute  # noqa: E402

PY, PROXY, FAKE = sys.executable, str(ROOT / "sambaproxy.py"), str(ROOT / "tests" / "fake_samba.py")
EMAIL, PASSWORD = "bench@example.com", "bench-password-not-secret"
MODEL = "Meta-Llama-3.1-8B-Instruct"
CHAT_PATH = "/v1/chat/completions"
JSON_HEADERS = {"content-type": "application/json"}
WAIT = 30.0  # seconds one step (a start, a run) may take before the bench gives up


def chat_body(words: int, stream: bool) -> bytes:
    """An OpenAI chat request with a `words`-word prompt: the fake echoes it, one chunk a word."""
    return json.dumps({"model": MODEL, "stream": stream, "messages": [
        {"role": "user", "content": " ".join(["w"] * words)}]}).encode()


def spawn(args, procs: list, argv: list[str], env: dict | None = None, cpus: set | None = None):
    """Start a child (on `cpus`) logging to a file of the work directory; `procs` keeps it to stop it."""
    log = Path(args.workdir, f"child-{len(procs)}.log")
    with open(log, "wb") as out:
        procs.append(subprocess.Popen(argv, cwd=args.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      preexec_fn=cpus and (lambda: os.sched_setaffinity(0, cpus))))
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


def start_fake(args, procs: list, *flags: str) -> str:
    argv = [PY, FAKE, "--port", "0", "--email", EMAIL, "--password", PASSWORD, *flags]
    proc, log = spawn(args, procs, argv)
    return wait_for_log(proc, log, rb"fake SambaNova on (http://\S+)")[1].decode()


def clean_env(base: dict | None = None, **settings: str) -> dict[str, str]:
    """`base` (this environment) without the user's proxy settings, plus `settings`."""
    env = {k: v for k, v in (base or os.environ).items() if k not in SETTING_NAMES}
    return env | {"HOST": "127.0.0.1", "TOKEN_CACHE_FILE": ""} | settings


def start_proxy(args, procs: list, fake: str, **settings: str):
    """A proxy wired to the fake and logged in, on a core of its own; returns (process, port)."""
    env = clean_env(PORT="0", SAMBA_EMAIL=EMAIL, SAMBA_PASSWORD=PASSWORD,
                    SAMBA_CONFIG_URL=f"{fake}/api/config", SAMBA_COMPLETION_URL=f"{fake}/api/completion",
                    SAMBA_MODELS_URL=f"{fake}/v1/models", **settings)
    proc, log = spawn(args, procs, [PY, PROXY], env, args.measured)
    port = int(wait_for_log(proc, log, rb"listening on http://[\d.]+:(\d+)")[1])
    wait_for_log(proc, log, rb"logged in to SambaNova")
    return proc, port


def cpu_and_rss(pid: int) -> tuple[float, float]:
    """CPU seconds (utime+stime, every thread: /proc/PID/stat fields 14, 15) and VmRSS in MB."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    rss = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())[1]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(rss) / 1024


def drive(args, port: int, body: bytes, n: int) -> float:
    """Requests/s of n POSTs of `body` to the proxy over --concurrency keep-alive connections."""
    if args.client == "python":
        return asyncio.run(asyncio.wait_for(h11_load(port, body, n, args.concurrency), 300))
    Path(args.workdir, "body.json").write_bytes(body)
    argv = ["h2load", "--h1", "-n", str(n), "-c", str(args.concurrency), "-m", "1", "-d", "body.json",
            "-H", "content-type: application/json", f"http://127.0.0.1:{port}{CHAT_PATH}"]
    out = subprocess.run(argv, cwd=args.workdir, capture_output=True, text=True, timeout=300).stdout
    if f"status codes: {n} 2xx" not in out:
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
                    raise SystemExit(f"the proxy answered {event.status_code}")
            conn.start_next_cycle()
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker(n // c + (i < n % c)) for i in range(c)))
    return n / (time.perf_counter() - start)


async def floor_child(fake: str, c: int) -> None:
    """The floor: the proxy's client and upstream request, straight to the fake; answers each
    `words requests` line on stdin with its CPU seconds a request, after a warm-up."""
    client = make_client(Config())
    token = await login(client, f"{fake}/api/config", EMAIL, PASSWORD)
    route = AccountRoute(f"{fake}/api/completion", None, MODEL, "anon_")

    async def run(words: int, n: int) -> None:
        headers, content = route.request_parts(json.loads(chat_body(words, True)), token)
        for _ in range(n):
            request = client.build_request("POST", route.url, headers=headers, content=content)
            response = await client.send(request, stream=True)
            await response.aread()  # aiter_bytes() to the end, as the proxy reads, then aclose()
            if response.status_code != 200:
                raise SystemExit(f"the fake answered {response.status_code}")

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


def cpu_phase(args, procs: list, fake: str) -> dict[str, list]:
    """Per run: CPU seconds a request of the proxy, then of the floor (the same answers); req/s."""
    proxy, port = start_proxy(args, procs, fake)
    procs.append(subprocess.Popen([PY, __file__, "--floor", fake, str(args.concurrency)], text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  preexec_fn=lambda: os.sched_setaffinity(0, args.measured)))
    n, streams = args.requests, args.concurrency
    cases = {"whole": (chat_body(1, False), n, 1), "stream": (chat_body(1, True), n, 1),
             "long": (chat_body(args.events, True), streams, args.events)}
    for body, count, _ in cases.values():  # warm-up
        drive(args, port, body, max(2 * streams, count // 10))
    runs: dict[str, list] = {}
    for _ in range(args.repeat):
        for name, (body, count, words) in cases.items():
            before = cpu_and_rss(proxy.pid)[0]
            runs.setdefault(f"rate {name}", []).append(drive(args, port, body, count))
            time.sleep(0.05)  # let the proxy close its last upstream responses
            runs.setdefault(name, []).append((cpu_and_rss(proxy.pid)[0] - before) / count)
            runs.setdefault(f"floor {name}", []).append(floor_cpu(procs[-1], words, count))
    return runs


async def latency_phase(fake: str, port: int, count: int) -> dict[str, list[float]]:
    """Seconds a sequential request takes: straight to the fake, and through the proxy (both kinds)."""
    async with httpx.AsyncClient() as login_client:
        token = await login(login_client, f"{fake}/api/config", EMAIL, PASSWORD)
    route = AccountRoute(f"{fake}/api/completion", None, MODEL, "anon_")
    via = f"http://127.0.0.1:{port}{CHAT_PATH}"
    cases = {"direct": (route.url, *route.request_parts(json.loads(chat_body(1, True)), token)),
             "stream": (via, JSON_HEADERS, chat_body(1, True)),
             "whole": (via, JSON_HEADERS, chat_body(1, False))}
    times: dict[str, list[float]] = {name: [] for name in cases}
    async with httpx.AsyncClient(timeout=WAIT) as client:
        for i in range(count + 20):  # the first 20 rounds warm up
            for name, (url, headers, body) in cases.items():
                start = time.perf_counter()
                response = await client.post(url, headers=headers, content=body)
                if response.status_code != 200:
                    raise SystemExit(f"latency {name}: HTTP {response.status_code}")
                times[name] += [time.perf_counter() - start] if i >= 20 else []
    return times


async def open_streams(port: int, pid: int, count: int) -> float:
    """The proxy's VmRSS (MB) once `count` streams, 90 an HTTP/2 connection, have their first event."""
    clients = [httpx.AsyncClient(http1=False, http2=True, timeout=WAIT) for _ in range(-(-count // 90))]

    async def first_event(client: httpx.AsyncClient) -> httpx.Response:
        request = client.build_request("POST", f"http://127.0.0.1:{port}{CHAT_PATH}",
                                       headers=JSON_HEADERS, content=chat_body(1, True))
        response = await client.send(request, stream=True)
        chunks = response.aiter_raw()
        while b"data:" not in await anext(chunks):
            pass
        return response  # left open: closing the clients ends every stream

    try:
        await asyncio.wait_for(asyncio.gather(*(first_event(clients[i % len(clients)])
                                                for i in range(count))), 4 * WAIT)
        return cpu_and_rss(pid)[1]
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))


def memory_phase(args, procs: list) -> tuple[float, float]:
    """VmRSS (MB) of a fresh, logged-in proxy, idle and then with --streams open streams."""
    fake = start_fake(args, procs, "--stall-after", "1")
    proxy, port = start_proxy(args, procs, fake, UPSTREAM_MAX_CONNECTIONS=str(args.streams + 100))
    return cpu_and_rss(proxy.pid)[1], asyncio.run(open_streams(port, proxy.pid, args.streams))


def info_answers(port: int) -> bool:
    """True once GET /info answers 200."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"GET /info HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def startup_times(args, procs: list, env: dict) -> list[float]:
    """Seconds from exec of `python sambaproxy.py` (no credentials) to /info answering 200."""
    times, env = [], clean_env(env)
    for i in range(args.starts + 1):  # the first start only fills the bytecode cache
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        start = time.perf_counter()
        proc, log = spawn(args, procs, [PY, PROXY], env | {"PORT": str(port)}, args.measured)
        while not info_answers(port):
            if proc.poll() is not None or time.perf_counter() - start > WAIT:
                raise SystemExit(f"the proxy did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.002)
        times += [time.perf_counter() - start] if i else []
        stop(proc)
    return times


def import_time(env: dict) -> float:
    """Total import time (s) of `import sambaproxy`: the sum of every module's own time."""
    err = subprocess.run([PY, "-X", "importtime", "-c", "import sambaproxy"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60).stderr
    return sum(int(own) for own in re.findall(r"import time:\s+(\d+) \|", err)) / 1e6


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if abs(seconds) >= 1e-4 else f"{seconds * 1e6:.1f} µs"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def share_row(label: str, proxy: list, floor: list, goal: str, per: float = 1.0) -> tuple:
    """Proxy, floor and our share (medians of the runs; spread = min..max of the runs' shares)."""
    shares = [(p - f) / per for p, f in zip(proxy, floor)]
    return (label, us(statistics.median(proxy) / per), us(statistics.median(floor) / per),
            us(statistics.median(shares)), goal,
            f"{us(min(shares))}..{us(max(shares))}" if len(shares) > 1 else "")


def table_rows(args, runs: dict, times: dict, memory: tuple, starts: list, imports: float) -> list:
    long = [[a - b for a, b in zip(runs[x], runs[y])]
            for x, y in (("long", "stream"), ("floor long", "floor stream"))]
    rows = [share_row("CPU / non-streamed request", runs["whole"], runs["floor whole"], "< 300 µs"),
            share_row("CPU / streamed request (4 events)", runs["stream"], runs["floor stream"], "< 300 µs"),
            share_row(f"CPU / streamed event ({args.events + 3}-event streams)", *long, "< 30 µs",
                      per=args.events - 1)]  # the echo: 'Echo: ', a chunk a word, usage, [DONE]
    for name, kind in (("stream", "streamed"), ("whole", "non-streamed")):
        for title, stat in (("median", statistics.median),
                            ("p90", lambda xs: statistics.quantiles(xs, n=10)[8])):
            via, direct = stat(times[name]), stat(times["direct"])
            rows.append((f"latency, {kind}, {title}", ms(via), ms(direct), ms(via - direct), "< 1 ms", ""))
    (idle, loaded), rate = memory, {k: statistics.median(runs[f"rate {k}"]) for k in ("whole", "stream")}
    return rows + [
        ("RSS idle, logged in", f"{idle:.1f} MB", "", "", "< 30 MB", ""),
        (f"RSS, {args.streams} open streams", f"{loaded:.1f} MB", "", f"+{loaded - idle:.1f} MB",
         "< 100 MB", ""),
        (f"start-up, exec to /info 200 (median of {len(starts)})", ms(statistics.median(starts)), "", "",
         "< 300 ms", f"{ms(min(starts))}..{ms(max(starts))}"),
        ("import time (python -X importtime)", ms(imports), "", "", "", ""),
        ("throughput, whole / streamed (fake-bound)", f"{rate['whole']:,.0f} / {rate['stream']:,.0f} req/s",
         "", "", "", "")]


def print_table(rows: list[tuple], notes: list[str], command: str) -> None:
    head = ("figure", "proxy", "floor", "our share", "goal", "spread")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [(), head, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("\n".join(["", *("- " + note for note in notes), f"\nReproduce: {command}"]))


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options; --quick and the defaults size the runs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller runs, about 25 s")
    p.add_argument("--requests", type=int, help="requests a CPU run (default 600, quick 200)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--events", type=int, help="words, so chunks, of the long stream (default 2000)")
    p.add_argument("--repeat", type=int, help="runs a CPU figure (default 5, quick 1)")
    p.add_argument("--streams", type=int, default=1000, help="open streams of the memory phase")
    p.add_argument("--client", choices=("h2load", "python"), help="load generator (default h2load if found)")
    args = p.parse_args(argv)
    defaults = dict(requests=200, events=1000, repeat=1, latency=50, starts=3) if args.quick else dict(
        requests=600, events=2000, repeat=5, latency=200, starts=5)
    for name, value in defaults.items():
        setattr(args, name, getattr(args, name, None) or value)
    args.client = args.client or ("h2load" if shutil.which("h2load") else "python")
    return args


def main(argv: list[str]) -> None:
    if argv[:1] == ["--floor"]:
        return asyncio.run(floor_child(argv[1], int(argv[2])))
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Children inherit both: the fd limit (the proxy needs two descriptors a stream, the fake one),
    # and the cores (the measured process, proxy or floor, moves to the last one).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(3 * args.streams + 512, hard)), hard))
    cpus = sorted(os.sched_getaffinity(0))
    args.measured = {cpus[-1]}
    os.sched_setaffinity(0, set(cpus[:-1]) or args.measured)
    began, load_avg, procs = time.monotonic(), os.getloadavg()[0], []
    with tempfile.TemporaryDirectory(prefix="sambaproxy-bench-") as args.workdir:
        # Bytecode cached in the work directory, as in the Docker image, whatever this shell says.
        cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = str(Path(args.workdir, "pycache"))
        try:
            starts = startup_times(args, procs, cached)
            imports = import_time(cached)
            fake = start_fake(args, procs)
            runs = cpu_phase(args, procs, fake)
            times = asyncio.run(latency_phase(fake, start_proxy(args, procs, fake)[1], args.latency))
            memory = memory_phase(args, procs)
        finally:
            for proc in reversed(procs):
                stop(proc)
    notes = [f"load: {args.client}, HTTP/1.1, concurrency {args.concurrency}, {args.requests} requests "
             f"(or {args.concurrency} long streams) a run, {args.repeat} runs; proxy, floor on CPU {cpus[-1]}",
             f"{len(cpus)} CPUs, load average {load_avg:.2f} before the run (other work on the machine skews "
             f"every figure); the bench took {time.monotonic() - began:.0f} s"]
    print_table(table_rows(args, runs, times, memory, starts, imports), notes,
                " ".join([".venv/bin/python tests/bench.py", *argv]))


if __name__ == "__main__":
    main(sys.argv[1:])

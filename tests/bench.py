"""Measure sambaproxy against the team's goals, with the bare httpx client as the floor.

Run `make bench` (about 4 minutes) or `make bench-quick` (`tests/bench.py --quick`, about 40 s).
Upstreams, the proxy and the seed stack run as separate processes on 127.0.0.1, driven from here
by h2load (HTTP/1.1 keep-alive) if installed, else by a raw h11 client (tests/bench_load.py).
Two upstreams: "h1 fake", the fake SambaNova (plain HTTP/1.1), and "h2 TLS", tests/bench_upstream.py
(HTTPS with ALPN h2 like the real service, the same events; needs the openssl CLI for a throwaway
certificate). The proxy's CPU time (utime+stime in /proc/PID/stat, before and after a run) is its
alone; it has a core of its own, as in production, while upstream, h2load and this process share
the others. The floor, a child process on that core, runs one httpx.AsyncClient made as the proxy
makes its own: same upstream request straight to upstream, same concurrency, every byte read, just
after each proxy run. proxy - floor = our share (server, validation, translation, relay), as medians
of --repeat runs; "spread" = min..max of our share. CPU/event = (CPU of a long stream - CPU of a
4-event one) / extra events, so per-request costs cancel (upstream writes each event on its own).
Seed stack: tests/bench_seed.py (FastAPI on Hypercorn, one httpx client; requirements-bench.txt),
on the same core under the same load right after the proxy, for the goal "at least 2x the seed
stack's throughput"; skipped with a note when fastapi or hypercorn cannot be imported.
Latency: sequential requests by httpx from here, straight to the fake (floor column) vs through
the proxy. Memory: VmRSS of a fresh logged-in proxy, then with --streams streams past their first
event (HTTP/2 clients, 90 streams a connection; the fake speaks HTTP/1.1 only, so the proxy holds
an upstream connection a stream). Start-up: exec of `python sambaproxy.py` (no credentials) to
/info's first 200, bytecode cached as in the Docker image. Nothing is asserted.
"""

import argparse
import asyncio
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench_load import (CHAT_PATH, EMAIL, JSON_HEADERS, MODEL, PASSWORD, PROXY, PY, ROOT, WAIT, Scenario,
                        chat_body, clean_env, cpu_and_rss, cpu_runs, fake_settings, free_port,
                        make_certificate, spawn, start_fake, start_floor, start_h2_upstream, start_proxy,
                        start_seed, stop)
from auth import login  # noqa: E402  (bench_load put the project on sys.path)
from upstream import AccountRoute  # noqa: E402


def scenario_phase(args, procs: list, scenario: Scenario) -> dict[str, list]:
    """CPU runs of the proxy (and the seed stack) against one upstream, with its floor."""
    servers = {"proxy": start_proxy(args, procs, scenario.proxy_env)}
    if args.seed:
        servers["seed"] = start_seed(args, procs, scenario)
    floor = start_floor(args, procs, scenario)
    try:
        runs = cpu_runs(args, servers, floor)
        if args.seed and re.search(rb"Traceback|seed answered", log := servers["seed"][0].log.read_bytes()):
            raise SystemExit(f"the seed stack failed during the runs:\n{log.decode()[-2000:]}")
        return runs
    finally:
        for proc in (floor, *(proc for proc, _ in servers.values())):
            stop(proc)
            procs.remove(proc)


def fake_scenario(fake: str) -> Scenario:
    """The fake as upstream: the proxy logs in itself; the floor and the seed get a token logged in here."""
    async def token() -> str:
        async with httpx.AsyncClient() as client:
            return await login(client, f"{fake}/api/config", EMAIL, PASSWORD)
    return Scenario("h1 fake", f"{fake}/api/completion", asyncio.run(token()), fake_settings(fake))


async def latency_phase(fake: Scenario, port: int, count: int) -> dict[str, list[float]]:
    """Seconds a sequential request takes: straight to the fake, and through the proxy (both kinds)."""
    route = AccountRoute(fake.url, None, MODEL, "anon_")
    via = f"http://127.0.0.1:{port}{CHAT_PATH}"
    cases = {"direct": (route.url, *route.request_parts(json.loads(chat_body(1, True)), fake.token)),
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
    proxy, port = start_proxy(args, procs, fake_settings(fake), UPSTREAM_MAX_CONNECTIONS=str(args.streams + 100),
                              MAX_CONCURRENT_REQUESTS=str(args.streams + 100))
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
        port, start = free_port(), time.perf_counter()
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


def per_event(runs: dict, name: str) -> list[float]:
    """Each run's CPU of a long stream less that of a 4-event one (divide by the extra events)."""
    return [a - b for a, b in zip(runs[f"{name} long"], runs[f"{name} stream"])]


def cpu_rows(args, label: str, runs: dict) -> list:
    """Proxy vs floor, a request and an event, against one upstream."""
    return [share_row(f"CPU / non-streamed request ({label})", runs["proxy whole"], runs["floor whole"],
                      "< 300 µs"),
            share_row(f"CPU / streamed request, 4 events ({label})", runs["proxy stream"],
                      runs["floor stream"], "< 300 µs"),
            share_row(f"CPU / streamed event, {args.events + 3}-event streams ({label})",
                      per_event(runs, "proxy"), per_event(runs, "floor"), "< 30 µs", per=args.events - 1)]


def rate(runs: dict, name: str, case: str) -> str:
    """Median req/s of a server, and how busy its core was (CPU a request x req/s)."""
    rates, cpus = runs[f"rate {name} {case}"], runs[f"{name} {case}"]
    busy = statistics.median(r * c for r, c in zip(rates, cpus))
    return f"{statistics.median(rates):,.0f} req/s, core {busy:.0%}"


def ratio_row(label: str, seed: list, proxy: list, seed_text, proxy_text, goal: str = "") -> tuple:
    """Seed CPU / proxy CPU (= proxy req/s / seed req/s on a busy core), median and spread of runs."""
    ratios = [s / p for s, p in zip(seed, proxy)]
    return (label, seed_text, proxy_text, f"{statistics.median(ratios):.1f}x", goal,
            f"{min(ratios):.1f}x..{max(ratios):.1f}x" if len(ratios) > 1 else "")


def seed_rows(args, label: str, runs: dict) -> list:
    """The seed stack against the proxy, under the same load on the same core."""
    rows = []
    for case, kind in (("whole", "non-streamed"), ("stream", "streamed, 4 events")):
        seed, proxy, floor = runs[f"seed {case}"], runs[f"proxy {case}"], runs[f"floor {case}"]
        rows += [ratio_row(f"CPU / request, {kind} ({label})", seed, proxy, us(statistics.median(seed)),
                           us(statistics.median(proxy)), ">= 2x"),
                 ratio_row(f"req/s on one core, {kind} ({label})", runs[f"rate proxy {case}"],
                           runs[f"rate seed {case}"], rate(runs, "seed", case), rate(runs, "proxy", case)),
                 ratio_row(f"req/s a busy core (1 / CPU), {kind} ({label})", seed, proxy,
                           f"{1 / statistics.median(seed):,.0f} req/s",
                           f"{1 / statistics.median(proxy):,.0f} req/s", ">= 2x"),
                 ratio_row(f"ceiling: floor as proxy, {kind} ({label})", seed, floor,
                           us(statistics.median(seed)), us(statistics.median(floor)))]
    seed, proxy = per_event(runs, "seed"), per_event(runs, "proxy")
    return rows + [ratio_row(f"CPU / streamed event ({label})", seed, proxy,
                             us(statistics.median(seed) / (args.events - 1)),
                             us(statistics.median(proxy) / (args.events - 1)))]


def table_rows(args, scenarios: dict, times: dict, memory: tuple, starts: list, imports: float) -> list:
    rows = [row for label, runs in scenarios.items() for row in cpu_rows(args, label, runs)]
    for name, kind in (("stream", "streamed"), ("whole", "non-streamed")):
        for title, stat in (("median", statistics.median),
                            ("p90", lambda xs: statistics.quantiles(xs, n=10)[8])):
            via, direct = stat(times[name]), stat(times["direct"])
            rows.append((f"latency, {kind}, {title} (h1 fake)", ms(via), ms(direct), ms(via - direct),
                         "< 1 ms", ""))
    idle, loaded = memory
    rows += [
        ("RSS idle, logged in", f"{idle:.1f} MB", "", "", "< 30 MB", ""),
        (f"RSS, {args.streams} open streams", f"{loaded:.1f} MB", "", f"+{loaded - idle:.1f} MB",
         "< 100 MB", ""),
        (f"start-up, exec to /info 200 (median of {len(starts)})", ms(statistics.median(starts)), "", "",
         "< 300 ms", f"{ms(min(starts))}..{ms(max(starts))}"),
        ("import time (python -X importtime)", ms(imports), "", "", "", "")]
    return rows + [(f"throughput, {kind} ({label})", rate(runs, "proxy", case), "", "", "", "")
                   for label, runs in scenarios.items()
                   for case, kind in (("whole", "non-streamed"), ("stream", "streamed"))]


def print_table(head: tuple, rows: list[tuple]) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [(), head, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options; --quick and the defaults size the runs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller runs, about 40 s")
    p.add_argument("--requests", type=int, help="requests a CPU run (default 600, quick 200)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--events", type=int, help="words, so chunks, of the long stream (default 2000)")
    p.add_argument("--repeat", type=int, help="runs a CPU figure (default 5, quick 1)")
    p.add_argument("--streams", type=int, default=1000, help="open streams of the memory phase")
    p.add_argument("--client", choices=("h2load", "python"), help="load generator (default h2load if found)")
    p.add_argument("--no-seed", dest="seed", action="store_false", help="skip the seed stack")
    p.add_argument("--no-tls", dest="tls", action="store_false", help="skip the HTTPS/HTTP/2 upstream")
    args = p.parse_args(argv)
    defaults = dict(requests=200, events=1000, repeat=1, latency=50, starts=3) if args.quick else dict(
        requests=600, events=2000, repeat=5, latency=200, starts=5)
    for name, value in defaults.items():
        setattr(args, name, getattr(args, name, None) or value)
    args.client = args.client or ("h2load" if shutil.which("h2load") else "python")
    return args


def main(argv: list[str]) -> None:
    args, notes = parse_args(argv), []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.seed and not all(importlib.util.find_spec(m) for m in ("fastapi", "hypercorn")):
        args.seed = False
        notes.append("seed stack SKIPPED: fastapi or hypercorn is not importable (`make bench` installs "
                     "requirements-bench.txt into .venv)")
    # Children inherit both: the fd limit (the proxy needs two descriptors a stream, the fake one),
    # and the cores (the measured process, proxy, seed or floor, moves to the last one).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(3 * args.streams + 512, hard)), hard))
    cpus = sorted(os.sched_getaffinity(0))
    args.measured = {cpus[-1]}
    os.sched_setaffinity(0, set(cpus[:-1]) or args.measured)
    began, load_avg, procs, scenarios = time.monotonic(), os.getloadavg()[0], [], {}
    with tempfile.TemporaryDirectory(prefix="sambaproxy-bench-") as args.workdir:
        # Bytecode cached in the work directory, as in the Docker image, whatever this shell says.
        cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = str(Path(args.workdir, "pycache"))
        try:
            starts = startup_times(args, procs, cached)
            imports = import_time(cached)
            fake = fake_scenario(start_fake(args, procs))
            scenarios[fake.label] = scenario_phase(args, procs, fake)
            times = asyncio.run(latency_phase(fake, start_proxy(args, procs, fake.proxy_env)[1], args.latency))
            memory = memory_phase(args, procs)
            if args.tls and (certificate := make_certificate(args.workdir)):
                tls = start_h2_upstream(args, procs, *certificate)
                scenarios[tls.label] = scenario_phase(args, procs, tls)
            elif args.tls:
                notes.append("h2 TLS scenario SKIPPED: no openssl command to make a throwaway certificate")
        finally:
            for proc in reversed(procs):
                stop(proc)
    print_table(("figure", "proxy", "floor", "our share", "goal", "spread"),
                table_rows(args, scenarios, times, memory, starts, imports))
    if args.seed:
        print("\nSeed stack (FastAPI + Hypercorn + httpx, tests/bench_seed.py) vs the proxy:")
        print_table(("figure", "seed", "proxy", "ratio", "goal", "spread"),
                    [row for label, runs in scenarios.items() for row in seed_rows(args, label, runs)])
    notes += [
        f"load: {args.client}, HTTP/1.1, concurrency {args.concurrency}, {args.requests} requests "
        f"(or {args.concurrency} long streams) a run, {args.repeat} runs; proxy, {'seed, ' * args.seed}floor "
        f"each in turn on CPU {cpus[-1]}; upstream, load generator and this process on the other CPUs",
        "(h1 fake): the fake SambaNova, plain HTTP/1.1" + ("; (h2 TLS): tests/bench_upstream.py, HTTPS with "
        "ALPN h2 and the same events; the floor talks to each upstream as the proxy does" * (len(scenarios) > 1)),
        "'core N%' = CPU a request x req/s: under ~90% the upstream or the load generator, not the server, "
        "bound req/s, and 1 / CPU is the rate a busy core would give"]
    notes += ["ratio = seed CPU / proxy CPU = proxy req/s / seed req/s when each saturates its core (goal "
              ">= 2x); 'ceiling' = seed CPU / floor CPU, the ratio of a proxy adding nothing to its httpx "
              "client"] * args.seed
    notes.append(f"{len(cpus)} CPUs, load average {load_avg:.2f} before the run (other work on the machine "
                 f"skews every figure); the bench took {time.monotonic() - began:.0f} s")
    print("\n".join(["", *("- " + note for note in notes),
                     "\nReproduce: " + " ".join([".venv/bin/python tests/bench.py", *argv])]))


if __name__ == "__main__":
    main(sys.argv[1:])
